//! The split into supervisor and VM process, the supervisor's loop, the
//! jail's record (`jail.json`) and the removal of jails left by dead VMs.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};
use serde::{Deserialize, Serialize};

use crate::cgroup::Cgroups;
use crate::numa::Placement;
use crate::root::{self, Plan};
use crate::{io_err, sys_err, Confining, JailError, JailOptions, Role};

/// The record of a jail, `<jail>/jail.json`.
const RECORD: &str = "jail.json";

/// Signals the supervisor passes on to the VM process.
const FORWARDED: [Signal; 6] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// A process, by pid and start time (so a reused pid is not mistaken for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Proc {
    pid: i32,
    start: u64,
}

impl Proc {
    fn of(pid: i32) -> Option<Proc> {
        start_time(pid).map(|start| Proc { pid, start })
    }

    fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start)
    }
}

/// Field 22 of `/proc/<pid>/stat`: start time in clock ticks since boot;
/// `None` for a process that is gone or a zombie (dead, not yet reaped).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    // After the command: state is field 3, start time field 22.
    let mut fields = after.split_whitespace();
    if matches!(fields.next(), Some("Z") | Some("X") | None) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// What a jail records about itself, for the next start to judge it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    supervisor: Proc,
    vm: Option<Proc>,
    cgroups: Cgroups,
}

fn write_record(dir: &Path, record: &Record) -> Result<(), JailError> {
    let tmp = dir.join(format!("{RECORD}.tmp"));
    let text = serde_json::to_string(record)
        .map_err(|e| JailError::Invalid(format!("jail record: {e}")))?;
    std::fs::write(&tmp, text).map_err(io_err(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, dir.join(RECORD)).map_err(io_err(format!("writing {}", tmp.display())))
}

/// Removes the jails under `base` whose supervisor and VM process are both
/// gone (killed with `kill -9`, say): their cgroups and directories.
/// Directories without a jail record, or whose processes live, are left
/// alone. Returns the directories removed.
pub fn clean_stale(base: &Path) -> Result<Vec<PathBuf>, JailError> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(base) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io_err(format!("reading {}", base.display()))(e)),
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(text) = std::fs::read_to_string(dir.join(RECORD)) else {
            continue;
        };
        let Ok(record) = serde_json::from_str::<Record>(&text) else {
            continue;
        };
        if record.supervisor.alive() || record.vm.is_some_and(|v| v.alive()) {
            continue;
        }
        record.cgroups.remove();
        std::fs::remove_dir_all(&dir).map_err(io_err(format!("removing {}", dir.display())))?;
        removed.push(dir);
    }
    Ok(removed)
}

/// Everything [`split`] needs.
pub(crate) struct Setup {
    pub vm_id: String,
    pub base: PathBuf,
    pub cwd: PathBuf,
    pub options: JailOptions,
    pub plan: Plan,
    pub placement: Placement,
}

/// The supervisor: see the crate documentation.
pub struct Supervisor {
    name: String,
    child: Pid,
    channel: OwnedFd,
    signals: SigSet,
    jail_dir: PathBuf,
    cgroups: Cgroups,
    created: Vec<PathBuf>,
}

/// Undoes a half-made jail in the supervisor.
fn undo(jail_dir: &Path, cgroups: &Cgroups, created: &[PathBuf]) {
    cgroups.remove();
    if let Err(e) = std::fs::remove_dir_all(jail_dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", jail_dir.display());
        }
    }
    root::remove_empty_dirs(created);
}

pub(crate) fn split(setup: Setup) -> Result<Role, JailError> {
    let jail_dir = setup.base.join(&setup.vm_id);
    let root_dir = jail_dir.join("root");
    std::fs::create_dir(&jail_dir).map_err(io_err(format!("creating {}", jail_dir.display())))?;
    let me = Proc::of(std::process::id() as i32)
        .ok_or_else(|| JailError::Invalid("cannot read this process's start time".into()))?;
    let mut record = Record {
        supervisor: me,
        vm: None,
        cgroups: Cgroups::default(),
    };
    let mut created = Vec::new();
    let prepared = (|| {
        write_record(&jail_dir, &record)?;
        std::fs::create_dir(&root_dir)
            .map_err(io_err(format!("creating {}", root_dir.display())))?;
        record.cgroups =
            Cgroups::create(setup.options.cgroup_version, &setup.vm_id, &setup.placement)?;
        write_record(&jail_dir, &record)?;
        created = setup.plan.apply()?;
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(sys_err("socketpair"))?;
        Ok::<_, JailError>((a, b))
    })();
    let (ours, theirs) = match prepared {
        Ok(p) => p,
        Err(e) => {
            undo(&jail_dir, &record.cgroups, &created);
            return Err(e);
        }
    };
    // Blocked before the fork so that no SIGCHLD or forwarded signal can be
    // missed; the VM process restores the mask at once.
    let mut signals = SigSet::empty();
    for s in FORWARDED {
        signals.add(s);
    }
    signals.add(Signal::SIGCHLD);
    let mut old = SigSet::empty();
    if let Err(e) =
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), Some(&mut old))
    {
        undo(&jail_dir, &record.cgroups, &created);
        return Err(sys_err("blocking signals")(e));
    }
    // SAFETY: the process has one thread (checked by `enter`), so the child
    // may run any code, not only async-signal-safe code.
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
            undo(&jail_dir, &record.cgroups, &created);
            Err(sys_err("fork")(e))
        }
        Ok(ForkResult::Child) => {
            drop(ours);
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None)
                .map_err(sys_err("restoring the signal mask"))?;
            let supervisor = nix::unistd::getppid();
            record.cgroups.join(std::process::id())?;
            root::build(
                &root_dir,
                &setup.plan,
                &setup.cwd,
                setup.options.userfaultfd,
            )?;
            Ok(Role::Vm(Confining {
                vm_id: setup.vm_id,
                jail_dir,
                root: root_dir,
                cwd: setup.cwd,
                uid: setup.options.uid,
                gid: setup.options.gid,
                netns: setup.options.netns,
                numa: setup.placement,
                supervisor,
                channel: theirs,
            }))
        }
        Ok(ForkResult::Parent { child }) => {
            drop(theirs);
            record.vm = Proc::of(child.as_raw());
            if let Err(e) = write_record(&jail_dir, &record) {
                tracing::warn!("{e}");
            }
            Ok(Role::Supervisor(Supervisor {
                name: setup.options.name,
                child,
                channel: ours,
                signals,
                jail_dir,
                cgroups: record.cgroups,
                created,
            }))
        }
    }
}

/// Closes every descriptor but stdio and `keep` (copies of the command's
/// sockets would keep connections open after the VM process closed them).
fn close_others(keep: RawFd) {
    let fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(rd) => rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        if fd > 2 && fd != keep {
            // SAFETY: closing a descriptor this process no longer uses; the
            // one read_dir used is already closed (closing it again fails
            // harmlessly with EBADF).
            unsafe { libc::close(fd) };
        }
    }
}

/// A limits request: guest bytes, vCPUs.
const REQUEST_LEN: usize = 12;

pub(crate) fn request_limits(fd: &OwnedFd, guest_bytes: u64, vcpus: u32) -> Result<(), JailError> {
    let mut msg = [0u8; REQUEST_LEN];
    msg[..8].copy_from_slice(&guest_bytes.to_le_bytes());
    msg[8..].copy_from_slice(&vcpus.to_le_bytes());
    send(fd.as_raw_fd(), &msg, MsgFlags::empty()).map_err(sys_err("asking for cgroup limits"))?;
    let mut reply = [0u8; 512];
    let n = recv(fd.as_raw_fd(), &mut reply, MsgFlags::empty())
        .map_err(sys_err("waiting for cgroup limits"))?;
    match n {
        0 => Err(JailError::Cgroup("the supervisor is gone".into())),
        _ if reply[0] == b'+' => Ok(()),
        _ => Err(JailError::Cgroup(
            String::from_utf8_lossy(&reply[1..n]).into_owned(),
        )),
    }
}

impl Supervisor {
    /// The VM process's pid.
    pub fn vm_pid(&self) -> u32 {
        self.child.as_raw() as u32
    }

    /// Serves the VM process until it ends: forwards signals, applies its
    /// limits, then removes the jail and its cgroups. Returns the exit
    /// status for this process (the VM process's; 128 + the signal if it was
    /// killed).
    pub fn run(self) -> i32 {
        close_others(self.channel.as_raw_fd());
        let status = self.serve();
        undo(&self.jail_dir, &self.cgroups, &self.created);
        status
    }

    fn serve(&self) -> i32 {
        let sfd = match SignalFd::with_flags(&self.signals, SfdFlags::SFD_CLOEXEC) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{}: supervisor: signalfd: {e}", self.name);
                // Nothing to forward with: just wait for the VM process.
                return self.wait_blocking();
            }
        };
        let mut limits: Option<(u64, u32)> = None;
        let mut channel_open = true;
        loop {
            let mut fds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
            if channel_open {
                fds.push(PollFd::new(self.channel.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    eprintln!("{}: supervisor: poll: {e}", self.name);
                    return self.wait_blocking();
                }
            }
            let channel_ready = fds
                .get(1)
                .and_then(|f| f.revents())
                .is_some_and(|r| !r.is_empty());
            let signal_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
            if channel_ready {
                channel_open = self.answer(&mut limits);
            }
            if signal_ready {
                if let Ok(Some(info)) = sfd.read_signal() {
                    let sig = Signal::try_from(info.ssi_signo as i32).ok();
                    match sig {
                        Some(Signal::SIGCHLD) => {}
                        Some(s) => {
                            let _ = kill(self.child, s);
                        }
                        None => {}
                    }
                }
                if let Some(code) = self.reap(WaitPidFlag::WNOHANG) {
                    return code;
                }
            }
        }
    }

    /// Answers one limits request; false once the VM process closed its end.
    fn answer(&self, limits: &mut Option<(u64, u32)>) -> bool {
        let mut msg = [0u8; REQUEST_LEN + 1];
        let n = match recv(self.channel.as_raw_fd(), &mut msg, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => return true,
            Err(_) => return false,
        };
        let reply = if n != REQUEST_LEN {
            "-malformed limits request".to_owned()
        } else {
            let mut b = [0u8; 8];
            b.copy_from_slice(&msg[..8]);
            let bytes = u64::from_le_bytes(b);
            let mut v = [0u8; 4];
            v.copy_from_slice(&msg[8..12]);
            let vcpus = u32::from_le_bytes(v);
            match *limits {
                Some((b0, v0)) if bytes <= b0 && vcpus <= v0 => "+".to_owned(),
                Some((b0, v0)) => format!(
                    "-the limits are set already (a VM of {b0} bytes and {v0} vCPUs); \
                     they are not raised for one of {bytes} bytes and {vcpus} vCPUs"
                ),
                None => match self.cgroups.limit(bytes, vcpus) {
                    Ok(()) => {
                        *limits = Some((bytes, vcpus));
                        "+".to_owned()
                    }
                    Err(e) => format!("-{e}"),
                },
            }
        };
        let _ = send(
            self.channel.as_raw_fd(),
            reply.as_bytes(),
            MsgFlags::empty(),
        );
        true
    }

    fn reap(&self, flags: WaitPidFlag) -> Option<i32> {
        loop {
            match waitpid(self.child, Some(flags)) {
                Ok(WaitStatus::Exited(_, code)) => return Some(code),
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    eprintln!("{}: the VM process was killed by {sig}", self.name);
                    return Some(128 + sig as i32);
                }
                Ok(WaitStatus::StillAlive) => return None,
                Ok(_) => {
                    if flags.contains(WaitPidFlag::WNOHANG) {
                        return None;
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    eprintln!("{}: supervisor: waitpid: {e}", self.name);
                    return Some(1);
                }
            }
        }
    }

    fn wait_blocking(&self) -> i32 {
        self.reap(WaitPidFlag::empty()).unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_times_tell_live_processes_from_gone_ones() {
        let me = Proc::of(std::process::id() as i32).unwrap_or_else(|| panic!("no start time"));
        assert!(me.alive());
        let reused = Proc {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(!reused.alive());
    }

    #[test]
    fn only_jails_whose_processes_are_gone_are_removed() {
        let base = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let me = Proc::of(std::process::id() as i32).unwrap_or_else(|| panic!("no start time"));
        let gone = Proc {
            pid: me.pid,
            start: me.start + 7,
        };
        let make = |name: &str, record: Option<Record>| {
            let d = base.path().join(name);
            std::fs::create_dir_all(d.join("root")).unwrap_or_else(|e| panic!("{e}"));
            if let Some(r) = record {
                write_record(&d, &r).unwrap_or_else(|e| panic!("{e}"));
            }
            d
        };
        let dead = make(
            "dead",
            Some(Record {
                supervisor: gone,
                vm: Some(gone),
                cgroups: Cgroups::default(),
            }),
        );
        let live_vm = make(
            "live-vm",
            Some(Record {
                supervisor: gone,
                vm: Some(me),
                cgroups: Cgroups::default(),
            }),
        );
        let live_sup = make(
            "live-supervisor",
            Some(Record {
                supervisor: me,
                vm: None,
                cgroups: Cgroups::default(),
            }),
        );
        let unknown = make("not-a-jail", None);
        let removed = clean_stale(base.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(removed, vec![dead.clone()]);
        assert!(!dead.exists());
        assert!(live_vm.exists() && live_sup.exists() && unknown.exists());
    }
}
