//! Our binaries inside the VMs: where they are (built beside `testbed`, reached through the guest's view of the
//! host's `/`), the shell that starts `nvmf-target` on the verbs provider and reads its stats from the control
//! socket, and the comparison of those stats before and after a scenario.

use std::path::PathBuf;

use serde::Serialize;

use super::{NQN, ScenarioError};

/// The control socket of our target inside its VM.
pub const CONTROL: &str = "/tmp/nvmf-target.sock";

/// Where a binary staged with [`files`] is inside the VMs.
pub fn in_vm(name: &str) -> PathBuf {
    PathBuf::from("/testbed/bin").join(name)
}

/// Our binaries `names`, built beside this one, as files for [`crate::vm::Run::start_with_files`] (they are
/// staged into the run's shared directory: the VMs see the host's `/`, but not its `/tmp`, where a checkout
/// may be).
pub fn files(names: &[&str]) -> Result<Vec<(PathBuf, String)>, ScenarioError> {
    names.iter().map(|n| Ok((host_binary(n)?, format!("bin/{n}")))).collect()
}

/// `name` built beside this binary (`build/debug/` or `build/release/`).
pub(crate) fn host_binary(name: &str) -> Result<PathBuf, ScenarioError> {
    let exe = std::env::current_exe().map_err(|source| ScenarioError::Io { path: "current_exe".into(), source })?;
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    // Test binaries live one level further down (build/debug/deps/).
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ScenarioError::Missing(format!(
            "{} (build it first: cargo build -p {})",
            path.display(),
            if name == "nvmf-target" { "target" } else { "initiator" }
        )))
    }
}

/// Shell functions: `stats` prints one JSON line of the target's stats (python3 talks to the Unix socket).
pub fn stats_fn() -> String {
    format!(
        r#"stats() {{ python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect("{CONTROL}"); s.sendall(b"stats\n"); print(s.makefile().readline().strip())'; }}
"#
    )
}

/// Starts our target (verbs provider, two poll groups, a RAM namespace) on `addr`: [`start_target_on`].
pub fn start_target(target: &std::path::Path, addr: &str) -> String {
    start_target_on(target, addr, "verbs", 2)
}

/// Starts our target (`provider`, `poll_groups`, a 256 MiB RAM namespace) on `addr` in the background as
/// `$tpid`, waits until it listens, and writes its baseline stats to `$T/stats.before`. Its log goes to
/// `$T/nvmf-target.log` (the VM's own script log is `$T/target.log`).
pub fn start_target_on(target: &std::path::Path, addr: &str, provider: &str, poll_groups: usize) -> String {
    format!(
        r#"{stats}RUST_LOG=info {bin} --provider {provider} -a {addr} -n {NQN} --ram-size 256M --poll-groups {poll_groups} \
    --control-socket {CONTROL} > $T/target.out 2> $T/nvmf-target.log &
tpid=$!
n=0; until grep -q 'listening on' $T/target.out 2>/dev/null; do
    sleep 0.2; n=$((n+1))
    if [ $n -gt 300 ] || ! kill -0 $tpid 2>/dev/null; then log "our target did not start"; cat $T/nvmf-target.log; exit 3; fi
done
stats > $T/stats.before
log "our target listening on {addr}:4420"
"#,
        stats = stats_fn(),
        bin = target.display()
    )
}

/// Waits (up to 30 s) until the target holds no controller, queue pair, poller, connection (one in the CM's
/// time-wait lasts a second after the host's disconnect) or pool buffer, writes its stats
/// to `$T/stats.after`, stops it with SIGINT and records its exit code in `$T/nvmf-target.exit` (and whether it
/// was still running in `$T/nvmf-target.alive`). Not `target.exit`: that is the target VM's own script exit.
pub fn stop_target() -> String {
    r#"if kill -0 $tpid 2>/dev/null; then echo yes > $T/nvmf-target.alive; else echo no > $T/nvmf-target.alive; fi
n=0; while [ $n -lt 150 ]; do
    s=$(stats)
    echo "$s" | grep -q '"controllers":0,"qpairs":0,"pollers":0' && echo "$s" | grep -q '"pool_buffers_in_use":0' \
        && echo "$s" | grep -q '"connections":0,' && break
    sleep 0.2; n=$((n+1))
done
stats > $T/stats.after
kill -INT $tpid 2>/dev/null
wait $tpid
echo $? > $T/nvmf-target.exit
"#
    .to_string()
}

/// The target's counts before and after, and whether each came back.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatsCheck {
    pub before: serde_json::Value,
    pub after: serde_json::Value,
    /// Fields that differ (controllers, qpairs, pollers, connections, memory_regions, pool buffers in use,
    /// threads, fds).
    pub differing: Vec<String>,
    pub back_to_baseline: bool,
}

const COUNTED: [&str; 8] =
    ["controllers", "qpairs", "pollers", "connections", "memory_regions", "pool_buffers_in_use", "threads", "fds"];

impl StatsCheck {
    pub fn from_texts(before: Option<String>, after: Option<String>) -> StatsCheck {
        let parse = |t: Option<String>| -> serde_json::Value {
            t.and_then(|t| serde_json::from_str(t.trim()).ok()).unwrap_or(serde_json::Value::Null)
        };
        let (before, after) = (parse(before), parse(after));
        let differing: Vec<String> = if before.is_null() || after.is_null() {
            vec!["stats missing".into()]
        } else {
            COUNTED
                .iter()
                .filter(|k| before[**k] != after[**k])
                .map(|k| format!("{k}: {} → {}", before[*k], after[*k]))
                .collect()
        };
        let back_to_baseline = differing.is_empty();
        // Only the counts: the per-controller detail of a long run would swamp the result.
        let pick = |v: &serde_json::Value| -> serde_json::Value {
            COUNTED.iter().map(|k| (k.to_string(), v[*k].clone())).collect::<serde_json::Map<_, _>>().into()
        };
        StatsCheck { before: pick(&before), after: pick(&after), differing, back_to_baseline }
    }
}

/// Lines of our target's log that say something went wrong (warnings and errors, panics).
pub fn log_problems(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(" ERROR ") || l.contains("panicked"))
        .map(|l| l.trim().to_string())
        .take(20)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_comparison_names_what_moved() {
        let before = r#"{"controllers":0,"qpairs":0,"pollers":0,"connections":0,"memory_regions":0,"pool_buffers_in_use":0,"threads":7,"fds":20}"#;
        let same = StatsCheck::from_texts(Some(before.into()), Some(before.into()));
        assert!(same.back_to_baseline, "{same:?}");
        let after = before.replace("\"fds\":20", "\"fds\":23");
        let moved = StatsCheck::from_texts(Some(before.into()), Some(after));
        assert!(!moved.back_to_baseline);
        assert_eq!(moved.differing, vec!["fds: 20 → 23".to_string()]);
        assert!(!StatsCheck::from_texts(None, Some(before.into())).back_to_baseline);
    }

    #[test]
    fn scripts_parse() {
        let script = format!("{}{}", start_target(std::path::Path::new("/x/nvmf-target"), "198.18.0.1"), stop_target());
        crate::guest::assert_parses(&script);
    }
}
