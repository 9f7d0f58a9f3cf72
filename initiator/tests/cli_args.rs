//! `nvmf` refusing what cannot work, before any packet: bad arguments exit 2 with a message naming the
//! problem; an unreachable target is a clear error (exit 1) within the connect timeout; the verbs provider,
//! absent from this build, says so. Nothing here needs a target.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn nvmf(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nvmf")).args(args).output().expect("run nvmf")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const NQN: &str = "nqn.2026-11.dev.nvmf-rs:ram";

#[test]
fn bad_arguments_exit_2_with_a_message() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "Usage"),
        (&["frobnicate"], "unrecognized subcommand"),
        (&["id-ctrl"], "--traddr"),
        (&["id-ctrl", "-a", "not-an-address", "-n", NQN], "invalid IP address"),
        (&["id-ctrl", "-a", "127.0.0.1", "-n", NQN, "-t", "tcp"], "--transport"),
        (&["id-ctrl", "-a", "127.0.0.1", "-n", NQN, "-Q", "1"], "--queue-size"),
        (&["id-ctrl", "-a", "127.0.0.1", "-n", NQN, "-o", "xml"], "--output-format"),
        (&["id-ctrl", "-a", "127.0.0.1", "-n", NQN, "--provider", "magic"], "--provider"),
        (&["id-ctrl", "-a", "127.0.0.1"], "--nqn"),
        (&["id-ctrl", "-a", "127.0.0.1", "-a", "127.0.0.2", "--host-traddr", "127.0.0.1", "-n", NQN], "--host-traddr"),
        (&["id-ctrl", "-a", "127.0.0.1", "-n", NQN, "--hostid", "not-a-uuid"], "--hostid"),
        (&["read", "-a", "127.0.0.1", "-n", NQN, "--start-block=-4"], "--start-block"),
        (&["read", "-a", "127.0.0.1", "-n", NQN, "--start-block", "18446744073709551616"], "--start-block"),
        (&["perf", "-a", "127.0.0.1", "-n", NQN, "-w", "sideways"], "sideways"),
        (&["perf", "-a", "127.0.0.1", "-n", NQN, "--bs", "4x"], "suffix"),
        (&["perf", "-a", "127.0.0.1", "-n", NQN, "-M", "101"], "--rwmixread"),
        (&["perf", "-a", "127.0.0.1", "-n", NQN, "-q", "0"], "--iodepth"),
        (&["perf", "-a", "127.0.0.1", "-n", NQN, "--verify", "-w", "randread"], "--verify needs writes"),
    ];
    for (args, expect) in cases {
        let out = nvmf(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "nvmf {args:?} → {:?}: {err}", out.status);
        assert!(err.contains(expect), "nvmf {args:?}: {expect:?} not in: {err}");
        assert!(out.stdout.is_empty(), "nvmf {args:?} printed to stdout");
    }
    // --help is not an error.
    assert_eq!(nvmf(&["perf", "--help"]).status.code(), Some(0));
}

#[test]
fn an_unreachable_target_is_a_clear_error_within_the_connect_timeout() {
    // A bound, silent socket on loopback: the CM request goes out and nothing ever answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port().to_string();
    let started = Instant::now();
    let out = nvmf(&["id-ctrl", "-a", "127.0.0.1", "--udp-port", &port, "-n", NQN]);
    let took = started.elapsed();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("cannot connect to {NQN} at 127.0.0.1:4420")), "{err}");
    assert!(err.contains("no answer"), "{err}");
    let bound = initiator::CONNECT_TIMEOUT + Duration::from_secs(3);
    assert!(took < bound, "gave up after {took:?}, beyond the connect timeout");
    let mut buf = [0u8; 2048];
    silent.set_nonblocking(true).expect("nonblocking");
    assert!(silent.recv(&mut buf).is_ok(), "nvmf sent its connection request to the silent port");
}

#[test]
fn the_verbs_provider_says_rdma_is_unavailable() {
    let out = nvmf(&["id-ctrl", "-a", "127.0.0.1", "-n", NQN, "--provider", "verbs"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("RDMA unavailable"), "{}", stderr(&out));
}
