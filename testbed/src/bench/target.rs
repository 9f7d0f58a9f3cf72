//! Our target as a benchmark runs it: the release `nvmf-target`, a control socket for its stats, SIGTERM to
//! stop it as an operator does.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::BenchError;

/// Our release target, started for one configuration and reached by its control socket.
pub(crate) struct RunningTarget {
    child: Child,
    control: PathBuf,
}

impl RunningTarget {
    /// Starts `bin` with `args` and a control socket `DIR/NAME.sock` (log in `DIR/NAME.log`), and waits until
    /// it answers `stats`.
    pub(crate) fn start(bin: &Path, dir: &Path, name: &str, args: &[String]) -> Result<RunningTarget, BenchError> {
        let control = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&control);
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).map_err(|source| BenchError::Io { path: log_path, source })?;
        let child = Command::new(bin)
            .args(args)
            .arg("--control-socket")
            .arg(&control)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| BenchError::Io { path: bin.to_path_buf(), source })?;
        let mut target = RunningTarget { child, control };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match target.stats() {
                Ok(_) => return Ok(target),
                Err(e) if Instant::now() >= deadline => {
                    let _ = target.stop();
                    return Err(e);
                }
                Err(_) => {
                    if let Ok(Some(status)) = target.child.try_wait() {
                        return Err(BenchError::Failed(format!("nvmf-target exited at start: {status}")));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    pub(crate) fn stats(&mut self) -> Result<Value, BenchError> {
        let io = |source| BenchError::Io { path: self.control.clone(), source };
        let mut stream = UnixStream::connect(&self.control).map_err(io)?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(io)?;
        stream.write_all(b"stats\n").map_err(io)?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).map_err(io)?;
        serde_json::from_str(&line).map_err(|e| BenchError::Failed(format!("target stats: {e}: {line:?}")))
    }

    /// SIGTERM, as an operator stops it: it drains and exits 0.
    pub(crate) fn stop(mut self) -> Result<(), BenchError> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => return Err(BenchError::Failed(format!("nvmf-target exited {status}"))),
                _ if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(BenchError::Failed("nvmf-target did not stop within 20 s of SIGTERM".into()));
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for RunningTarget {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
