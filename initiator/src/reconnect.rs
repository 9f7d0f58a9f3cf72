//! When to try again and when to give up after losing a controller association — nvme-cli's
//! `--reconnect-delay`, `--ctrl-loss-tmo` and `--fast-io-fail-tmo`, as a pure function of the times it is
//! given (no clock, no I/O), so that every edge is unit-tested.

use std::time::{Duration, Instant};

/// Linux's defaults: reconnect every 10 s for 600 s; I/O waits for the whole of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Between two connection attempts.
    pub reconnect_delay: Duration,
    /// Give up this long after the loss; `None` = never.
    pub ctrl_loss_tmo: Option<Duration>,
    /// I/O waiting for the association fails once it has been lost this long; `None` = wait for the
    /// reconnection or for `ctrl_loss_tmo`.
    pub fast_io_fail_tmo: Option<Duration>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            reconnect_delay: Duration::from_secs(10),
            ctrl_loss_tmo: Some(Duration::from_secs(600)),
            fast_io_fail_tmo: None,
        }
    }
}

/// What to do after a loss or a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Try to connect at this instant.
    RetryAt(Instant),
    /// `ctrl_loss_tmo` has passed (or would before the next attempt): the path is gone for good.
    GiveUp,
}

impl ReconnectPolicy {
    /// nvme-cli's rule: a negative `ctrl_loss_tmo` means forever; the numbers are seconds.
    pub fn from_secs(reconnect_delay: u32, ctrl_loss_tmo: i64, fast_io_fail_tmo: Option<u32>) -> ReconnectPolicy {
        ReconnectPolicy {
            reconnect_delay: Duration::from_secs(reconnect_delay as u64),
            ctrl_loss_tmo: u64::try_from(ctrl_loss_tmo).ok().map(Duration::from_secs),
            fast_io_fail_tmo: fast_io_fail_tmo.map(|s| Duration::from_secs(s as u64)),
        }
    }

    /// The step after the association was lost at `lost_at`, `attempts` attempts having failed since. The
    /// first attempt is immediate (the target may already be back: a keep-alive or a single queue failed),
    /// then one every `reconnect_delay`; no attempt starts after `ctrl_loss_tmo`.
    pub fn next(&self, lost_at: Instant, attempts: u32, now: Instant) -> NextStep {
        let at = if attempts == 0 { now } else { now + self.reconnect_delay };
        match self.ctrl_loss_tmo {
            Some(tmo) if at.saturating_duration_since(lost_at) > tmo => NextStep::GiveUp,
            _ => NextStep::RetryAt(at),
        }
    }

    /// Whether I/O waiting for a path lost at `lost_at` should fail now rather than wait.
    pub fn io_fails(&self, lost_at: Instant, now: Instant) -> bool {
        self.fast_io_fail_tmo.is_some_and(|t| now.saturating_duration_since(lost_at) >= t)
    }

    /// When waiting I/O will fail, if it will.
    pub fn io_fail_deadline(&self, lost_at: Instant) -> Option<Instant> {
        self.fast_io_fail_tmo.map(|t| lost_at + t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn first_attempt_is_immediate_then_every_delay_until_the_loss_timeout() {
        let p = ReconnectPolicy::from_secs(2, 5, None);
        let t0 = Instant::now();
        assert_eq!(p.next(t0, 0, t0), NextStep::RetryAt(t0));
        assert_eq!(p.next(t0, 1, t0 + s(1)), NextStep::RetryAt(t0 + s(3)));
        assert_eq!(p.next(t0, 2, t0 + s(3)), NextStep::RetryAt(t0 + s(5)));
        // The next would start at 7 s, past the 5 s loss timeout.
        assert_eq!(p.next(t0, 3, t0 + s(5)), NextStep::GiveUp);
    }

    #[test]
    fn negative_loss_timeout_retries_forever_and_zero_gives_up_after_one_try() {
        let forever = ReconnectPolicy::from_secs(1, -1, None);
        let t0 = Instant::now();
        assert_eq!(forever.next(t0, 1000, t0 + s(100_000)), NextStep::RetryAt(t0 + s(100_001)));
        let once = ReconnectPolicy::from_secs(1, 0, None);
        assert_eq!(once.next(t0, 0, t0), NextStep::RetryAt(t0));
        assert_eq!(once.next(t0, 1, t0), NextStep::GiveUp);
    }

    #[test]
    fn fast_io_fail_only_when_set_and_due() {
        let t0 = Instant::now();
        let none = ReconnectPolicy::from_secs(1, 600, None);
        assert!(!none.io_fails(t0, t0 + s(10_000)));
        assert_eq!(none.io_fail_deadline(t0), None);
        let fast = ReconnectPolicy::from_secs(1, 600, Some(3));
        assert!(!fast.io_fails(t0, t0 + s(2)));
        assert!(fast.io_fails(t0, t0 + s(3)));
        assert_eq!(fast.io_fail_deadline(t0), Some(t0 + s(3)));
    }
}
