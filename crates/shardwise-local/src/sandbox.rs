//! Function processes a killed runner left behind, found and stopped by the next runner.
//!
//! A runner that dies without cleaning up (SIGKILL, an OOM kill, a power cut of the terminal)
//! leaves its function processes running, and one that was mid-invocation goes on with its
//! effects. The next runner on the same state directory redelivers that batch from the
//! checkpoint to a new process: two invocations of one shard at once, which Lambda never does
//! and which Shardwise's idempotency relies on (record keys take no lock, because a shard's
//! records go to one invocation at a time). So every process the runner starts is recorded in
//! `<state-dir>/sandboxes/`, and a runner stops the recorded processes of the functions it is
//! about to run that still run before it starts its own. Another runner's functions on the same
//! state directory (one terminal per function) are left alone.
//!
//! A process is identified by its id *and* its start time (from `/proc`), so a recycled id does
//! not get another program killed (short of a new process with the same id started in the
//! same clock tick of another boot). Where `/proc` is missing nothing is stopped.

use std::path::{Path, PathBuf};

/// Where one instance's process is recorded.
#[derive(Debug, Clone)]
pub struct SandboxFile(PathBuf);

impl SandboxFile {
    pub fn new(dir: &Path, function: &str, instance: usize) -> Self {
        Self(dir.join(format!("{function}-{instance}.pid")))
    }

    /// Record a started process. Best effort: a missing record only weakens the next start.
    pub fn record(&self, pid: u32) {
        let Some(started) = start_time(pid) else {
            return;
        };
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        // Written aside and renamed: a runner killed mid-write leaves no half record.
        let partial = self.0.with_extension("pid.partial");
        if std::fs::write(&partial, format!("{pid} {started}\n")).is_ok() {
            let _ = std::fs::rename(&partial, &self.0);
        }
    }

    /// The process exited (or was killed by this runner).
    pub fn clear(&self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Stop every recorded process of `functions` in `dir` that still runs. Returns how many were
/// stopped.
pub fn stop_stale(dir: &Path, functions: &[&str]) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut stopped = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".pid"))
            .and_then(|n| n.rsplit_once('-'))
            .is_some_and(|(function, instance)| {
                functions.contains(&function) && instance.parse::<usize>().is_ok()
            });
        if !ours {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Some((pid, started)) = parse(&text)
            && start_time(pid) == Some(started)
            && let Some(id) = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            && rustix::process::kill_process(id, rustix::process::Signal::KILL).is_ok()
        {
            tracing::warn!(pid, file = %path.display(), "stopped a function process left by an earlier run");
            stopped += 1;
        }
        let _ = std::fs::remove_file(&path);
    }
    stopped
}

fn parse(text: &str) -> Option<(u32, u64)> {
    let mut parts = text.split_whitespace();
    let pid = parts.next()?.parse().ok()?;
    let started = parts.next()?.parse().ok()?;
    Some((pid, started))
}

/// The process's start time in clock ticks since boot (`/proc/<pid>/stat`, field 22), or `None`
/// when it does not run (a zombie counts as gone) or `/proc` cannot say.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (the state).
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(22 - 4)?.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_process_that_still_runs_is_stopped_and_a_recycled_id_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let sleep = || {
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .unwrap()
        };
        let (mut child, mut other) = (sleep(), sleep());
        SandboxFile::new(dir.path(), "my-fn", 0).record(child.id());
        // Another function's process (another runner on the same state directory): left alone.
        SandboxFile::new(dir.path(), "other", 0).record(other.id());
        // The same id with another start time: a recycled id, left alone.
        std::fs::write(
            dir.path().join("my-fn-1.pid"),
            format!("{} 1\n", std::process::id()),
        )
        .unwrap();
        assert_eq!(stop_stale(dir.path(), &["my-fn"]), 1);
        assert!(!child.wait().unwrap().success());
        assert!(
            other.try_wait().unwrap().is_none(),
            "another runner's process was stopped"
        );
        // The recycled id's record is gone too; the other function's stays.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(stop_stale(dir.path(), &["my-fn"]), 0);
        assert_eq!(stop_stale(dir.path(), &["other"]), 1);
        assert!(!other.wait().unwrap().success());
    }

    #[test]
    fn start_time_reads_this_process() {
        assert!(start_time(std::process::id()).is_some());
        assert!(parse("12 34\n") == Some((12, 34)));
        assert!(parse("x").is_none());
    }
}
