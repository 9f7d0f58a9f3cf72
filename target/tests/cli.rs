//! The `nvmf` CLI against the `nvmf-target` binary over the soft provider on loopback: every verb (text and
//! JSON output, the JSON parsed and checked against what the target serves), and perf over two paths. (perf
//! through faults: `link_flap.rs`.)

mod support;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Output, Stdio};

use support::process::{NQN, TargetProcess, nvmf_binary};

/// Runs `nvmf` (through `prefix`) with `args`, feeding `stdin`.
fn nvmf(prefix: &[&str], args: &[&str], stdin: &[u8]) -> Output {
    let bin = nvmf_binary();
    let mut all: Vec<&str> = prefix.to_vec();
    all.push(bin.to_str().expect("utf-8 path"));
    all.extend_from_slice(args);
    let mut child = Command::new(all[0])
        .args(&all[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nvmf");
    child.stdin.take().expect("stdin").write_all(stdin).expect("feed stdin");
    let out = child.wait_with_output().expect("nvmf output");
    eprintln!("nvmf {}: {:?}\n{}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr));
    out
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "nvmf failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("JSON: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Connection flags for a loopback target on `udp` with `addrs` paths.
fn conn(addrs: &[&str], udp: u16) -> Vec<String> {
    let mut v = Vec::new();
    for a in addrs {
        v.extend(["-a".to_string(), a.to_string()]);
    }
    v.extend(["-n", NQN, "--udp-port"].map(String::from));
    v.push(udp.to_string());
    v
}

fn with<'a>(base: &'a [String], more: &[&'a str]) -> Vec<&'a str> {
    base.iter().map(String::as_str).chain(more.iter().copied()).collect()
}

#[test]
fn every_verb_against_the_target() {
    // Two listeners on RoCEv2's own UDP port, as on any RoCEv2 network (each address its own port would not
    // be: a discovery record carries no UDP port), on loopback addresses nothing else here uses.
    let (a1, a2) = (Ipv4Addr::new(127, 0, 0, 3), Ipv4Addr::new(127, 0, 0, 4));
    let target = TargetProcess::start(&[], &[IpAddr::V4(a1), IpAddr::V4(a2)], 4791, "cli");
    let udp = target.udp_port;
    let c = conn(&["127.0.0.3"], udp);
    let udp_s = udp.to_string();

    // discover: text like nvme-cli's, and JSON with both listeners' records.
    let out = nvmf(&[], &["discover", "-t", "rdma", "-a", "127.0.0.3", "-s", "4420", "--udp-port", &udp_s], b"");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Discovery Log Number of Records") && text.contains(&format!("subnqn:  {NQN}")), "{text}");
    let log = json(&nvmf(&[], &["discover", "-a", "127.0.0.3", "--udp-port", &udp_s, "-o", "json"], b""));
    let records = log["records"].as_array().expect("records");
    let subsystems: Vec<_> = records.iter().filter(|r| r["subtype"] == "nvme subsystem").collect();
    assert_eq!(subsystems.len(), 2, "one record per listener: {log}");
    assert!(subsystems.iter().all(|r| r["subnqn"] == NQN && r["trsvcid"] == "4420" && r["trtype"] == "rdma"));
    assert!(subsystems.iter().all(|r| r["rdma_qptype"] == "connected" && r["rdma_cms"] == "rdma-cm"), "{log}");
    let addrs: Vec<_> = subsystems.iter().map(|r| r["traddr"].as_str().unwrap_or("")).collect();
    assert!(addrs.contains(&"127.0.0.3") && addrs.contains(&"127.0.0.4"), "{addrs:?}");

    // id-ctrl / id-ns against what the target was started with (64 MiB of 512-byte blocks).
    let id = json(&nvmf(&[], &cmd("id-ctrl", &c, &["-o", "json"]), b""));
    assert_eq!(id["mn"], "nvmf-target");
    assert_eq!(id["subnqn"], NQN);
    assert_eq!(id["ioccsz"], 260);
    assert!(id["cntlid"].as_u64().is_some_and(|n| n > 0), "{id}");
    let text = String::from_utf8_lossy(&nvmf(&[], &cmd("id-ctrl", &c, &[]), b"").stdout).to_string();
    assert!(text.starts_with("NVME Identify Controller:") && text.contains("mn        : nvmf-target"), "{text}");
    let ns = json(&nvmf(&[], &cmd("id-ns", &c, &["--namespace-id", "1", "-o", "json"]), b""));
    assert_eq!(ns["nsze"], 64 * 1024 * 2);
    assert_eq!(ns["lbafs"][0]["ds"], 9);
    // An inactive namespace identifies as zeroes, as the spec says.
    let inactive = json(&nvmf(&[], &cmd("id-ns", &c, &["--namespace-id", "7", "-o", "json"]), b""));
    assert_eq!(inactive["nsze"], 0);

    // list: the subsystem, at both addresses, with its namespace.
    let list = json(&nvmf(&[], &["list", "-a", "127.0.0.3", "--udp-port", &udp_s, "-o", "json"], b""));
    let subs = list["subsystems"].as_array().expect("subsystems");
    assert_eq!(subs.len(), 2, "{list}");
    for s in subs {
        assert_eq!(s["subnqn"], NQN);
        assert_eq!(s["namespaces"][0]["bytes"], 64u64 << 20, "{s}");
        assert_eq!(s["model"], "nvmf-target");
    }

    // write / read through files and through stdin / stdout; flush.
    let dir = std::env::temp_dir().join(format!("nvmf-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (w, r) = (dir.join("w.bin"), dir.join("r.bin"));
    let data: Vec<u8> = (0..8192u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&w, &data).expect("data file");
    let ok = |o: Output| assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ok(nvmf(&[], &cmd("write", &c, &["--start-block", "100", "--data", w.to_str().unwrap()]), b""));
    ok(nvmf(&[], &cmd("read", &c, &["--start-block", "100", "-c", "15", "--data", r.to_str().unwrap()]), b""));
    assert_eq!(std::fs::read(&r).expect("read file"), data);
    ok(nvmf(&[], &cmd("write", &c, &["--start-block", "300", "-c", "1"]), &data[..1024]));
    let out = nvmf(&[], &cmd("read", &c, &["--start-block", "299", "-c", "2", "-z", "1536"]), b"");
    ok(out.clone());
    assert_eq!(out.stdout.len(), 1536);
    assert_eq!(&out.stdout[512..], &data[..1024]);
    ok(nvmf(&[], &cmd("flush", &c, &[]), b""));
    let _ = std::fs::remove_dir_all(&dir);

    // Wrong sizes are refused before anything is sent (exit 2); the target's errors are exit 1.
    let short = nvmf(&[], &cmd("write", &c, &["--start-block", "0", "-c", "3"]), &data[..1000]);
    assert_eq!(short.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&short.stderr).contains("nothing is padded or cut"));
    let beyond = nvmf(&[], &cmd("read", &c, &["--start-block", "131071", "-c", "1"]), b"");
    assert_eq!(beyond.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&beyond.stderr).contains("LBA Out of Range"),
        "{}",
        String::from_utf8_lossy(&beyond.stderr)
    );

    // perf with verify on two paths: both carry I/O, nothing fails, everything checks out.
    let two = conn(&["127.0.0.3", "127.0.0.4"], udp);
    let report = json(&nvmf(
        &[],
        &cmd(
            "perf",
            &two,
            &[
                "-q",
                "8",
                "--bs",
                "4k",
                "-w",
                "randrw",
                "-M",
                "50",
                "--runtime",
                "3",
                "--size",
                "8m",
                "--verify",
                "-o",
                "json",
            ],
        ),
        b"",
    ));
    eprintln!("perf: {report}");
    assert_eq!(report["errors"], 0);
    assert!(report["ios"].as_u64().is_some_and(|n| n > 100), "{report}");
    assert_eq!(report["verify"]["errors"], 0);
    assert!(report["verify"]["final_checked_blocks"].as_u64().is_some_and(|n| n > 0));
    let lat = &report["latency_us"];
    let l = |k: &str| lat[k].as_f64().expect(k);
    assert!(
        l("min") <= l("p50")
            && l("p50") <= l("p90")
            && l("p90") <= l("p99")
            && l("p99") <= l("p99.99")
            && l("p99.99") <= l("max"),
        "{lat}"
    );
    let paths = report["paths"].as_array().expect("paths");
    assert_eq!(paths.len(), 2);
    assert!(
        paths.iter().all(|p| p["completions"].as_u64().is_some_and(|n| n > 0) && p["state"] == "live"),
        "{paths:?}"
    );
    let text = String::from_utf8_lossy(
        &nvmf(&[], &cmd("perf", &c, &["-q", "4", "-w", "randrw", "--runtime", "1"]), b"").stdout,
    )
    .to_string();
    assert!(text.contains("IOPS") && text.contains("p99.99"), "{text}");
    assert!(text.contains("read latency (µs)") && text.contains("write latency (µs)"), "{text}");
    let status = target.terminate();
    assert!(status.success());
}

fn cmd<'a>(verb: &'a str, conn: &'a [String], more: &[&'a str]) -> Vec<&'a str> {
    std::iter::once(verb).chain(with(conn, more)).collect()
}
