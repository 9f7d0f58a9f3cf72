//! The one signal a controller association's parts raise when it is lost: any queue's task ending (completion
//! error, flush, CM disconnect, device event), a keep-alive failure, an I/O timeout. Raising is idempotent and
//! the first reason wins; whoever owns the association (a [`crate::Path`]) waits on it and alone tears it down.

use tokio::sync::watch;

#[derive(Debug)]
pub struct LossSignal {
    reason: watch::Sender<Option<&'static str>>,
}

impl Default for LossSignal {
    fn default() -> Self {
        LossSignal { reason: watch::channel(None).0 }
    }
}

impl LossSignal {
    /// Marks the association lost (again: no effect).
    pub fn raise(&self, reason: &'static str) {
        self.reason.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// Why it was lost, if it was.
    pub fn reason(&self) -> Option<&'static str> {
        *self.reason.borrow()
    }

    /// Waits until it is lost; returns the first reason.
    pub async fn lost(&self) -> &'static str {
        let mut rx = self.reason.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(r) => r.expect("waited for Some"),
            // The sender lives in `self`: it cannot be gone while we borrow it.
            Err(_) => "signal dropped",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_reason_wins_and_waiters_wake() {
        let s = std::sync::Arc::new(LossSignal::default());
        assert_eq!(s.reason(), None);
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.lost().await }
        });
        tokio::task::yield_now().await;
        s.raise("link down");
        s.raise("keep-alive timeout");
        assert_eq!(waiter.await.unwrap(), "link down");
        assert_eq!(s.reason(), Some("link down"));
        assert_eq!(s.lost().await, "link down");
    }
}
