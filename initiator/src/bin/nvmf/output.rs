//! What the verbs print: one table of (field, value) per result, rendered as nvme-cli's aligned text or as
//! JSON with nvme-cli's key names where it has them.

use initiator::perf::{Histogram, PerfJob, PerfReport};
use nvme_proto::discovery::{DiscoveryLog, DiscoveryLogEntry, adrfam, rdma, subtype, treq, trtype};
use nvme_proto::identify::{IdentifyController, IdentifyNamespace};
use serde_json::{Value, json};

fn text(bytes: Result<&str, nvme_proto::DecodeError>) -> Value {
    Value::String(bytes.unwrap_or("<invalid>").trim_end().to_string())
}

pub fn id_ctrl_fields(id: &IdentifyController) -> Vec<(&'static str, Value)> {
    vec![
        ("vid", json!(id.vid.get())),
        ("ssvid", json!(id.ssvid.get())),
        ("sn", text(id.serial())),
        ("mn", text(id.model())),
        ("fr", text(id.firmware())),
        ("rab", json!(id.rab)),
        ("ieee", json!(u32::from_le_bytes([id.ieee[0], id.ieee[1], id.ieee[2], 0]))),
        ("cmic", json!(id.cmic)),
        ("mdts", json!(id.mdts)),
        ("cntlid", json!(id.cntlid.get())),
        ("ver", json!(id.ver.get())),
        ("oaes", json!(id.oaes.get())),
        ("ctratt", json!(id.ctratt.get())),
        ("cntrltype", json!(id.cntrltype)),
        ("oacs", json!(id.oacs.get())),
        ("acl", json!(id.acl)),
        ("aerl", json!(id.aerl)),
        ("frmw", json!(id.frmw)),
        ("lpa", json!(id.lpa)),
        ("elpe", json!(id.elpe)),
        ("kas", json!(id.kas.get())),
        ("anacap", json!(id.anacap)),
        ("sqes", json!(id.sqes)),
        ("cqes", json!(id.cqes)),
        ("maxcmd", json!(id.maxcmd.get())),
        ("nn", json!(id.nn.get())),
        ("oncs", json!(id.oncs.get())),
        ("fuses", json!(id.fuses.get())),
        ("vwc", json!(id.vwc)),
        ("sgls", json!(id.sgls.get())),
        ("subnqn", text(id.subnqn())),
        ("ioccsz", json!(id.ioccsz.get())),
        ("iorcsz", json!(id.iorcsz.get())),
        ("icdoff", json!(id.icdoff.get())),
        ("fcatt", json!(id.fcatt)),
        ("msdbd", json!(id.msdbd)),
    ]
}

pub fn id_ns_fields(id: &IdentifyNamespace) -> Vec<(&'static str, Value)> {
    let nguid: String = id.nguid.iter().map(|b| format!("{b:02x}")).collect();
    let lbafs: Vec<Value> = id.lbaf[..=(id.nlbaf as usize).min(63)]
        .iter()
        .map(|f| json!({"ms": f.ms.get(), "ds": f.ds, "rp": f.rp}))
        .collect();
    vec![
        ("nsze", json!(id.nsze.get())),
        ("ncap", json!(id.ncap.get())),
        ("nuse", json!(id.nuse.get())),
        ("nsfeat", json!(id.nsfeat)),
        ("nlbaf", json!(id.nlbaf)),
        ("flbas", json!(id.flbas)),
        ("nmic", json!(id.nmic)),
        ("dlfeat", json!(id.dlfeat)),
        ("anagrpid", json!(id.anagrpid.get())),
        ("nguid", json!(nguid)),
        ("lbafs", Value::Array(lbafs)),
    ]
}

/// nvme-cli's "name : value" lines (its header first).
pub fn fields_text(header: &str, fields: &[(&'static str, Value)]) -> String {
    let mut out = format!("{header}\n");
    for (name, value) in fields {
        match value {
            Value::String(s) => out += &format!("{name:<10}: {s}\n"),
            Value::Array(items) if *name == "lbafs" => {
                for (i, f) in items.iter().enumerate() {
                    out += &format!("lbaf {i:>2} : ms:{:<3} lbads:{:<3} rp:{} \n", f["ms"], f["ds"], f["rp"]);
                }
            }
            Value::Number(n) if n.as_u64().is_some_and(|v| v > 9) => {
                out += &format!("{name:<10}: {n:#x}\n", n = n.as_u64().unwrap_or(0));
            }
            v => out += &format!("{name:<10}: {v}\n"),
        }
    }
    out
}

pub fn fields_json(fields: Vec<(&'static str, Value)>) -> Value {
    Value::Object(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

fn trtype_name(t: u8) -> &'static str {
    match t {
        trtype::RDMA => "rdma",
        trtype::FC => "fc",
        trtype::TCP => "tcp",
        trtype::LOOP => "loop",
        _ => "unrecognized",
    }
}

fn adrfam_name(a: u8) -> &'static str {
    match a {
        adrfam::IPV4 => "ipv4",
        adrfam::IPV6 => "ipv6",
        adrfam::IB => "infiniband",
        adrfam::FC => "fibre-channel",
        adrfam::LOOP => "loop",
        _ => "unrecognized",
    }
}

fn subtype_name(s: u8) -> &'static str {
    match s {
        subtype::DISCOVERY_REFERRAL => "discovery subsystem referral",
        subtype::NVME => "nvme subsystem",
        subtype::CURRENT_DISCOVERY => "current discovery subsystem",
        _ => "unrecognized",
    }
}

fn treq_name(t: u8) -> String {
    let secure = match t & treq::SECURE_CHANNEL_MASK {
        treq::REQUIRED => "required",
        treq::NOT_REQUIRED => "not required",
        _ => "not specified",
    };
    if t & treq::DISABLE_SQ_FLOW_CONTROL != 0 {
        format!("{secure}, sq flow control disable supported")
    } else {
        secure.to_string()
    }
}

fn prtype_name(p: u8) -> &'static str {
    match p {
        rdma::PRTYPE_NOT_SPECIFIED => "not specified",
        rdma::PRTYPE_IB => "infiniband",
        rdma::PRTYPE_ROCE => "roce",
        rdma::PRTYPE_ROCEV2 => "roce-v2",
        rdma::PRTYPE_IWARP => "iwarp",
        _ => "unrecognized",
    }
}

fn qptype_name(q: u8) -> &'static str {
    match q {
        rdma::QPTYPE_CONNECTED => "connected",
        rdma::QPTYPE_DATAGRAM => "datagram",
        _ => "unrecognized",
    }
}

fn cms_name(c: u8) -> &'static str {
    if c == rdma::CMS_RDMA_CM { "rdma-cm" } else { "unrecognized" }
}

fn entry_json(e: &DiscoveryLogEntry) -> Value {
    let mut v = json!({
        "trtype": trtype_name(e.trtype),
        "adrfam": adrfam_name(e.adrfam),
        "subtype": subtype_name(e.subtype),
        "treq": treq_name(e.treq),
        "portid": e.portid,
        "trsvcid": e.trsvcid,
        "subnqn": e.subnqn,
        "traddr": e.traddr,
        "eflags": e.eflags,
    });
    if let Some(r) = e.rdma {
        v["rdma_prtype"] = json!(prtype_name(r.prtype));
        v["rdma_qptype"] = json!(qptype_name(r.qptype));
        v["rdma_cms"] = json!(cms_name(r.cms));
        v["rdma_pkey"] = json!(format!("{:#06x}", r.pkey));
    }
    v
}

pub fn discovery_json(log: &DiscoveryLog) -> Value {
    json!({ "genctr": log.genctr, "records": log.entries.iter().map(entry_json).collect::<Vec<_>>() })
}

pub fn discovery_text(log: &DiscoveryLog) -> String {
    let mut out = format!("\nDiscovery Log Number of Records {}, Generation counter {}\n", log.numrec, log.genctr);
    for (i, e) in log.entries.iter().enumerate() {
        out += &format!("=====Discovery Log Entry {i}======\n");
        out += &format!(
            "trtype:  {}\nadrfam:  {}\nsubtype: {}\n",
            trtype_name(e.trtype),
            adrfam_name(e.adrfam),
            subtype_name(e.subtype)
        );
        out += &format!(
            "treq:    {}\nportid:  {}\ntrsvcid: {}\nsubnqn:  {}\ntraddr:  {}\n",
            treq_name(e.treq),
            e.portid,
            e.trsvcid,
            e.subnqn,
            e.traddr
        );
        if let Some(r) = e.rdma {
            out += &format!(
                "rdma_prtype: {}\nrdma_qptype: {}\nrdma_cms:    {}\nrdma_pkey: {:#06x}\n",
                prtype_name(r.prtype),
                qptype_name(r.qptype),
                cms_name(r.cms),
                r.pkey
            );
        }
    }
    out
}

fn latency_json(h: &Histogram) -> Value {
    let us = |v: Option<u64>| v.map(|n| (n as f64 / 1000.0 * 10.0).round() / 10.0);
    json!({
        "min": us(h.min()),
        "avg": h.mean().map(|m| (m / 100.0).round() / 10.0),
        "max": us(h.max()),
        "p50": us(h.percentile(50.0)),
        "p90": us(h.percentile(90.0)),
        "p99": us(h.percentile(99.0)),
        "p99.9": us(h.percentile(99.9)),
        "p99.99": us(h.percentile(99.99)),
    })
}

pub fn perf_json(job: &PerfJob, r: &PerfReport) -> Value {
    let mut v = json!({
        "job": {
            "rw": job.mode.name(), "bs": job.block_bytes, "iodepth": job.iodepth, "io_queues": job.io_queues,
            "runtime_s": job.runtime.as_secs_f64(), "nsid": job.nsid, "rwmixread": job.rwmixread,
            "size": job.size, "verify": job.verify, "seed": job.seed,
        },
        "elapsed_s": r.elapsed.as_secs_f64(),
        "ios": r.reads + r.writes,
        "reads": r.reads,
        "writes": r.writes,
        "bytes": r.bytes,
        "iops": r.iops().round(),
        "mib_per_s": (r.mib_per_s() * 100.0).round() / 100.0,
        "errors": r.errors,
        "first_error": r.first_error,
        "latency_us": latency_json(&r.latency),
        "read_latency_us": latency_json(&r.read_latency),
        "write_latency_us": latency_json(&r.write_latency),
        "reconnects": r.reconnects,
        "longest_gap_ms": r.longest_gap.as_millis() as u64,
        "cpu_seconds": r.cpu.map(|c| c.as_secs_f64()),
        "cpu_us_per_io": r.cpu_us_per_io().map(|c| (c * 100.0).round() / 100.0),
        "paths": r.paths.iter().map(|p| json!({
            "address": p.address, "completions": p.completions, "reconnects": p.reconnects, "state": p.state,
            "data_moves": p.data_moves.map(|m| json!({
                "in_place": m.in_place, "copied": m.copied, "registered": m.registered,
                "pool_buffers": m.pool_buffers,
            })),
        })).collect::<Vec<_>>(),
    });
    if let Some(ver) = &r.verify {
        v["verify"] = json!({
            "checked_blocks": ver.checked_blocks,
            "final_checked_blocks": ver.final_checked_blocks,
            "errors": ver.errors,
            "first_errors": ver.first_errors,
        });
    }
    v
}

pub fn perf_text(job: &PerfJob, r: &PerfReport) -> String {
    let mut out = format!(
        "{} bs={} iodepth={} io_queues={} runtime={:.1}s nsid={}{}\n",
        job.mode.name(),
        job.block_bytes,
        job.iodepth,
        job.io_queues,
        r.elapsed.as_secs_f64(),
        job.nsid,
        if job.verify { " verify" } else { "" }
    );
    out += &format!(
        "  IOPS {:.0}, {:.1} MiB/s; {} reads, {} writes, {} errors\n",
        r.iops(),
        r.mib_per_s(),
        r.reads,
        r.writes,
        r.errors
    );
    let mut histograms = vec![("latency", &r.latency)];
    if r.reads > 0 && r.writes > 0 {
        histograms.extend([("read latency", &r.read_latency), ("write latency", &r.write_latency)]);
    }
    for (name, h) in histograms {
        let l = latency_json(h);
        let f = |k: &str| l[k].as_f64().map_or("-".to_string(), |v| format!("{v:.1}"));
        out += &format!("  {name} (µs): min {} avg {} max {}\n", f("min"), f("avg"), f("max"));
        out += &format!(
            "    p50 {}  p90 {}  p99 {}  p99.9 {}  p99.99 {}\n",
            f("p50"),
            f("p90"),
            f("p99"),
            f("p99.9"),
            f("p99.99")
        );
    }
    out +=
        &format!("  reconnects {}, longest gap without completions {} ms\n", r.reconnects, r.longest_gap.as_millis());
    if let (Some(cpu), Some(per_io)) = (r.cpu, r.cpu_us_per_io()) {
        out += &format!("  host CPU {:.2} s (user + system), {per_io:.1} µs per I/O\n", cpu.as_secs_f64());
    }
    for p in &r.paths {
        out +=
            &format!("  path {}: {} completions, {} reconnects, {}", p.address, p.completions, p.reconnects, p.state);
        if let Some(m) = p.data_moves {
            out += &format!(
                "; keyed data in place {}, copied {}, registered per command {} ({} pool buffers)",
                m.in_place, m.copied, m.registered, m.pool_buffers
            );
        }
        out += "\n";
    }
    if let Some(e) = &r.first_error {
        out += &format!("  first error: {e}\n");
    }
    if let Some(v) = &r.verify {
        out += &format!(
            "  verify: {} blocks checked during the run, {} read back after it, {} errors\n",
            v.checked_blocks, v.final_checked_blocks, v.errors
        );
        for e in &v.first_errors {
            out += &format!("    {e}\n");
        }
    }
    out
}
