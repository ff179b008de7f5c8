//! Running a lifecycle hook command through the shell with a timeout.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Most bytes of stdout and of stderr kept in a [`HookReport`].
pub const MAX_OUTPUT: usize = 64 * 1024;

/// What happened when a hook ran.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookReport {
    /// Exit code, if the command exited normally.
    pub exit_code: Option<i32>,
    /// Signal that ended the command, if any.
    pub signal: Option<i32>,
    /// Whether the command was killed for exceeding its timeout.
    pub timed_out: bool,
    /// Captured standard output (lossy UTF-8, at most [`MAX_OUTPUT`] bytes).
    pub stdout: String,
    /// Captured standard error (lossy UTF-8, at most [`MAX_OUTPUT`] bytes).
    pub stderr: String,
}

impl HookReport {
    /// True when the command exited with status 0 within its timeout.
    pub fn succeeded(&self) -> bool {
        !self.timed_out && self.exit_code == Some(0)
    }
}

/// Runs `command` with `shell -c command`, killing its whole process group
/// when `timeout` passes. An empty command succeeds without running anything.
pub fn run_hook(shell: &str, command: &str, timeout: Duration) -> std::io::Result<HookReport> {
    if command.trim().is_empty() {
        return Ok(HookReport {
            exit_code: Some(0),
            ..HookReport::default()
        });
    }
    let mut child = Command::new(shell)
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    let pid = child.id();
    let stdout = child.stdout.take().map(capture);
    let stderr = child.stderr.take().map(capture);

    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let deadline = Instant::now() + timeout;
    let mut report = HookReport::default();
    let status = match rx.recv_timeout(timeout) {
        Ok(status) => status?,
        Err(_) => {
            report.timed_out = true;
            kill_group(pid);
            rx.recv()
                .map_err(|_| std::io::Error::other("hook waiter vanished"))??
        }
    };
    report.exit_code = status.code();
    report.signal = status.signal();
    // Output readers finish when every holder of the pipes exits; background
    // processes started by the hook may keep them open, so bound the wait.
    let grace = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(200));
    report.stdout = stdout.map(|r| collect(r, grace)).unwrap_or_default();
    report.stderr = stderr.map(|r| collect(r, grace)).unwrap_or_default();
    Ok(report)
}

fn kill_group(pid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a negative pid signals a process group; it takes
    // no pointers and the group was created for this hook via process_group(0).
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

fn capture<R: Read + Send + 'static>(mut pipe: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut kept = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = MAX_OUTPUT.saturating_sub(kept.len());
                    kept.extend_from_slice(&chunk[..n.min(room)]);
                }
            }
        }
        let _ = tx.send(kept);
    });
    rx
}

fn collect(rx: mpsc::Receiver<Vec<u8>>, wait: Duration) -> String {
    rx.recv_timeout(wait)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_status_and_output() {
        let r = run_hook(
            "sh",
            "echo out; echo err >&2; exit 3",
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(r.exit_code, Some(3));
        assert!(!r.succeeded());
        assert_eq!(r.stdout, "out\n");
        assert_eq!(r.stderr, "err\n");
    }

    /// True when `pid` no longer runs (gone, or a zombie awaiting reaping).
    fn is_dead(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z')),
        }
    }

    #[test]
    fn kills_the_whole_group_on_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        let cmd = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
        let start = Instant::now();
        let r = run_hook("sh", &cmd, Duration::from_millis(300)).unwrap();
        assert!(r.timed_out);
        assert_eq!(r.signal, Some(libc::SIGKILL));
        assert!(start.elapsed() < Duration::from_secs(5));
        // The background child was in the hook's process group, so it was
        // killed too; give the kernel a bounded moment to finish its exit.
        let bg = std::fs::read_to_string(&pidfile).unwrap();
        let bg = bg.trim();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_dead(bg) && Instant::now() < deadline {
            thread::yield_now();
        }
        assert!(is_dead(bg), "background process {bg} survived the timeout");
    }

    #[test]
    fn empty_command_is_a_successful_no_op() {
        assert!(run_hook("sh", "  ", Duration::from_secs(1))
            .unwrap()
            .succeeded());
    }

    #[test]
    fn missing_shell_is_an_error() {
        assert!(run_hook("/nonexistent/sh", "true", Duration::from_secs(1)).is_err());
    }
}
