//! The host's reconnect rules against a real target on loopback: a session that loses its controller (the
//! target goes away) reconnects every reconnect-delay, and the I/O that was waiting is sent again once the
//! target is back; with fast-io-fail-tmo waiting I/O fails after that long; after ctrl-loss-tmo the path
//! gives up and I/O fails at once.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use initiator::{ConnectOptions, DataDir, HostError, PathState, ReconnectPolicy, Session};
use nvme_proto::IoCommand;
use nvme_proto::io::ReadWrite;
use support::{SubsystemSpec, TestTarget};
use target::TargetLimits;

const NQN: &str = "nqn.2026-11.dev.nvmf-rs:reconnect";

fn spec() -> Vec<SubsystemSpec> {
    vec![SubsystemSpec::ram(NQN, 8 << 20)]
}

fn policy(ctrl_loss: u64, fast_io_fail: Option<u64>) -> ReconnectPolicy {
    ReconnectPolicy {
        reconnect_delay: Duration::from_millis(200),
        ctrl_loss_tmo: Some(Duration::from_secs(ctrl_loss)),
        fast_io_fail_tmo: fast_io_fail.map(Duration::from_secs),
    }
}

async fn session(target: &TestTarget, policy: ReconnectPolicy) -> Arc<Session> {
    let mut options = ConnectOptions::new(NQN);
    options.keep_alive_tmo = Some(Duration::from_secs(1));
    Arc::new(Session::connect(vec![(target.addr, options)], policy).await.expect("connect"))
}

fn write(lba: u64, fill: u8) -> (IoCommand, DataDir) {
    (IoCommand::Write(ReadWrite::new(1, lba, 8).unwrap()), DataDir::ToController(vec![fill; 4096].into()))
}

fn read(lba: u64) -> (IoCommand, DataDir) {
    (IoCommand::Read(ReadWrite::new(1, lba, 8).unwrap()), DataDir::ToHost(4096))
}

async fn wait_state(session: &Session, ok: impl Fn(&PathState) -> bool, within: Duration) -> PathState {
    let deadline = Instant::now() + within;
    loop {
        let s = session.paths()[0].state();
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "path state {s:?} after {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_io_is_sent_again_once_the_target_is_back() {
    let first = TestTarget::start(spec(), &[4420]).await;
    let port = first.addr.udp.port();
    let s = session(&first, policy(60, None)).await;
    let (c, d) = write(0, 0xa1);
    s.io(None, c, d).await.expect("write before the loss");
    first.rdma.shutdown().await;
    wait_state(&s, |p| matches!(p, PathState::Reconnecting { .. }), Duration::from_secs(5)).await;

    // Issued while no path is live: it waits (no error) …
    let pending = tokio::spawn({
        let s = s.clone();
        async move {
            let (c, d) = write(8, 0xb2);
            s.io(Some(1), c, d).await
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!pending.is_finished(), "I/O failed instead of waiting for the reconnection");

    // … and completes on the target that comes back at the same address.
    let second = TestTarget::start_on(spec(), &[4420], TargetLimits::default(), Duration::from_secs(1), port).await;
    let done = tokio::time::timeout(Duration::from_secs(15), pending).await.expect("no reconnection").unwrap();
    done.expect("the waiting write completed after the reconnection");
    let (c, d) = read(8);
    let (_, _, data) = s.io(None, c, d).await.expect("read back");
    assert_eq!(data, vec![0xb2; 4096]);
    assert_eq!(s.paths()[0].reconnects(), 1);
    assert_eq!(s.paths()[0].state(), PathState::Live);
    Arc::into_inner(s).expect("one owner").shutdown().await.expect("clean shutdown");
    second.wait_idle(Duration::from_secs(10)).await;
    second.rdma.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_io_fail_fails_waiting_io_and_ctrl_loss_gives_up() {
    // fast-io-fail-tmo 1 s, ctrl-loss-tmo 3 s: I/O waits ~1 s then fails while the path still tries; after
    // 3 s the path has given up and I/O fails at once.
    let t = TestTarget::start(spec(), &[4420]).await;
    let s = session(&t, policy(3, Some(1))).await;
    t.rdma.shutdown().await;
    let lost = Instant::now();
    wait_state(&s, |p| matches!(p, PathState::Reconnecting { .. }), Duration::from_secs(5)).await;
    let (c, d) = read(0);
    let e = s.io(None, c, d).await.expect_err("no target: the read must fail");
    let waited = lost.elapsed();
    assert!(matches!(e, HostError::PathsLost(ref m) if m.contains("fast-io-fail")), "{e}");
    assert!(waited >= Duration::from_millis(900), "failed after {waited:?}, before fast-io-fail-tmo");
    assert!(matches!(s.paths()[0].state(), PathState::Reconnecting { .. }), "still reconnecting");

    let state = wait_state(&s, |p| matches!(p, PathState::Failed { .. }), Duration::from_secs(10)).await;
    assert!(lost.elapsed() >= Duration::from_secs(3), "gave up after {:?}, before ctrl-loss-tmo", lost.elapsed());
    eprintln!("given up: {state:?}");
    let (c, d) = read(0);
    let e = s.io(None, c, d).await.expect_err("gave up");
    assert!(matches!(e, HostError::PathsLost(ref m) if m.contains("gave up")), "{e}");
    Arc::into_inner(s).expect("one owner").shutdown().await.expect("nothing to shut down");
}
