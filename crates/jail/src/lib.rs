//! A per-VM sandbox, drafter's counterpart of Firecracker's jailer, honouring
//! the reference Drafter's `--uid`, `--gid`, `--chroot-base-dir`,
//! `--cgroup-version` and `--numa-node`.
//!
//! [`enter`] splits the calling process in two (it must still be
//! single-threaded):
//!
//! * the **supervisor** ([`Role::Supervisor`]) stays outside, privileged
//!   and small: it forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to
//!   the VM process, applies the VM's cgroup limits once the VM's size is
//!   known ([`apply_vm_limits`]), and when the VM process ends (however it
//!   ends) removes the jail directory and the cgroups and exits with the VM
//!   process's status;
//! * the **VM process** ([`Role::Vm`]) gets a new mount namespace whose root
//!   is a fresh tmpfs mounted on `<chroot-base-dir>/<vm-id>/root`, holding
//!   only `/dev/kvm` (and `/dev/userfaultfd` if asked), an empty `/tmp`, and
//!   bind mounts of the files and directories the command needs, each at its
//!   original absolute path (read-only unless it is written). It joins its
//!   own cgroup (v2, or v1 when asked). [`Confining::lock_down`] then joins
//!   the network namespace if one is given, `pivot_root`s into the jail,
//!   pins the process to the CPUs and memory of the NUMA node, sets
//!   `no_new_privs`, clears the supplementary groups, switches to the uid and
//!   gid and drops every capability (all five sets). Whatever needs
//!   privileges (pre-opening taps, for instance) is done between [`enter`]
//!   and [`Confining::lock_down`].
//!
//! Files the VM writes are handed to the uid/gid (`chown`) before the jail
//! is entered, so writes land in the caller's files at their usual paths.
//! A jail whose processes were killed (`kill -9`) is found by the next
//! [`enter`] with the same base directory, from the pids and start times it
//! recorded in `<vm-id>/jail.json`, and removed; a jail whose supervisor or
//! VM process is alive is never touched.

#![deny(missing_docs)]

mod cgroup;
mod numa;
mod root;
mod supervisor;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;

pub use cgroup::CgroupVersion;
pub use supervisor::{clean_stale, Supervisor};

/// Guest RAM is not all a VM process uses: the VMM's own heap, thread stacks,
/// device queues, migration buffers and the page cache of the files it
/// writes (snapshot outputs, migrated drives) come on top. The memory limit
/// of a VM's cgroup is its guest RAM plus this much (256 MiB), plus 1/16 of
/// the guest RAM for the structures that grow with it (dirty bitmaps, page
/// tables, migration block maps).
pub const MEMORY_OVERHEAD_BYTES: u64 = 256 << 20;

/// The memory limit of a jailed VM with `guest_bytes` of RAM: guest RAM +
/// 1/16 of it + [`MEMORY_OVERHEAD_BYTES`].
pub fn memory_limit(guest_bytes: u64) -> u64 {
    guest_bytes
        .saturating_add(guest_bytes / 16)
        .saturating_add(MEMORY_OVERHEAD_BYTES)
}

/// The CPU limit of a jailed VM with `vcpus` vCPUs, in CPUs: one per vCPU
/// plus one for the VMM's own threads (device I/O, migration, console).
pub fn cpu_limit(vcpus: u32) -> u32 {
    vcpus.saturating_add(1)
}

/// Why a jail could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The options cannot work (bad path, missing file, unreadable input...).
    #[error("jail: {0}")]
    Invalid(String),
    /// A file operation failed.
    #[error("jail: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("jail: {what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// Cause.
        source: Errno,
    },
    /// The cgroup could not be set up or limited.
    #[error("jail: cgroup: {0}")]
    Cgroup(String),
    /// Capabilities could not be dropped.
    #[error("jail: dropping capabilities: {0}")]
    Caps(String),
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Io { what, source }
}

pub(crate) fn sys_err(what: impl Into<String>) -> impl FnOnce(Errno) -> JailError {
    let what = what.into();
    move |source| JailError::Sys { what, source }
}

/// How the VM uses a path given to the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Only read: bind-mounted read-only; the uid or gid must be able to
    /// read it already (the jail does not change its owner).
    Read,
    /// Written: bind-mounted read-write and handed to the uid/gid (`chown`).
    Write,
}

/// Whether a path given to the jail is a file or a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// A regular file (or a device or socket).
    File,
    /// A directory, visible with all it holds (and, when written, with the
    /// files the VM creates or renames in it).
    Dir,
}

/// A path the VM needs, visible inside the jail at the same absolute path.
#[derive(Debug, Clone)]
pub struct JailPath {
    /// As the command will use it (relative paths are taken from the
    /// current directory, which the jail keeps).
    pub path: PathBuf,
    /// File or directory.
    pub kind: PathKind,
    /// Read or written.
    pub access: Access,
}

/// What the jail is made of.
#[derive(Debug, Clone)]
pub struct JailOptions {
    /// Command name, the first part of the VM id (`<name>-<pid>-<nonce>`).
    pub name: String,
    /// `--chroot-base-dir`: the jail is `<base_dir>/<vm-id>/root`.
    pub base_dir: PathBuf,
    /// `--uid` of the VM process.
    pub uid: u32,
    /// `--gid` of the VM process.
    pub gid: u32,
    /// `--cgroup-version`.
    pub cgroup_version: CgroupVersion,
    /// `--numa-node`: the VM process runs on this node's CPUs and memory.
    pub numa_node: u32,
    /// Network namespace (name under `/run/netns`) the VM process joins.
    pub netns: Option<String>,
    /// What the VM reads and writes.
    pub paths: Vec<JailPath>,
    /// Give the VM `/dev/userfaultfd` (post-copy memory served on demand).
    pub userfaultfd: bool,
}

impl JailOptions {
    /// A jail for command `name` under `base_dir` for `uid`/`gid`, cgroup v2,
    /// NUMA node 0, no network namespace and no paths yet.
    pub fn new(name: &str, base_dir: impl Into<PathBuf>, uid: u32, gid: u32) -> Self {
        JailOptions {
            name: name.to_owned(),
            base_dir: base_dir.into(),
            uid,
            gid,
            cgroup_version: CgroupVersion::V2,
            numa_node: 0,
            netns: None,
            paths: Vec::new(),
            userfaultfd: false,
        }
    }

    /// Adds a file the VM reads.
    pub fn read_file(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.add(path.into(), PathKind::File, Access::Read)
    }

    /// Adds a file the VM writes in place.
    pub fn write_file(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.add(path.into(), PathKind::File, Access::Write)
    }

    /// Adds a directory the VM creates, renames or removes files in
    /// (created, and removed again at the end if still empty, when missing).
    pub fn write_dir(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.add(path.into(), PathKind::Dir, Access::Write)
    }

    /// Adds a directory the VM only reads.
    pub fn read_dir(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.add(path.into(), PathKind::Dir, Access::Read)
    }

    fn add(&mut self, path: PathBuf, kind: PathKind, access: Access) -> &mut Self {
        self.paths.push(JailPath { path, kind, access });
        self
    }
}

/// What [`enter`] made of the calling process.
pub enum Role {
    /// The privileged process outside the jail: call [`Supervisor::run`]
    /// and exit with what it returns.
    Supervisor(Supervisor),
    /// The VM process, in its mount namespace and cgroup, still privileged:
    /// do what needs privileges, then [`Confining::lock_down`].
    Vm(Confining),
}

/// The VM process between [`enter`] and [`Confining::lock_down`].
pub struct Confining {
    vm_id: String,
    jail_dir: PathBuf,
    root: PathBuf,
    cwd: PathBuf,
    uid: u32,
    gid: u32,
    netns: Option<String>,
    numa: numa::Placement,
    supervisor: nix::unistd::Pid,
    channel: OwnedFd,
}

/// The limits channel to the supervisor, once locked down.
static CHANNEL: Mutex<Option<OwnedFd>> = Mutex::new(None);

/// Whether this process is a jailed VM process (after
/// [`Confining::lock_down`]).
pub fn is_jailed() -> bool {
    CHANNEL.lock().map(|c| c.is_some()).unwrap_or(false)
}

/// Asks the supervisor to limit this VM's cgroup for a VM of `guest_bytes`
/// RAM and `vcpus` vCPUs ([`memory_limit`], [`cpu_limit`]); call it before
/// the guest first runs. Outside a jail it does nothing. The supervisor
/// takes the first request and afterwards only requests that do not raise
/// the limits, so a compromised VM process cannot lift them.
pub fn apply_vm_limits(guest_bytes: u64, vcpus: u32) -> Result<(), JailError> {
    let guard = CHANNEL
        .lock()
        .map_err(|_| JailError::Cgroup("limits channel poisoned".into()))?;
    let Some(fd) = guard.as_ref() else {
        return Ok(());
    };
    supervisor::request_limits(fd, guest_bytes, vcpus)
}

/// The lexical absolute form of `p` (taken from `cwd` when relative), with
/// `.` and `..` components resolved as names, not through symbolic links:
/// the jail has no symbolic links, so the kernel resolves the same way.
pub(crate) fn absolute(cwd: &Path, p: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        cwd.join(p)
    };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Sets up the jail described by `options` and splits the process: see the
/// crate documentation. Must be called while the process has one thread.
/// Errors before the split leave nothing behind; an error in the VM process
/// is returned there (report it and exit: the supervisor then cleans up).
pub fn enter(options: JailOptions) -> Result<Role, JailError> {
    if thread_count()? != 1 {
        return Err(JailError::Invalid(
            "the jail must be entered before the process starts any thread".into(),
        ));
    }
    let cwd = std::env::current_dir().map_err(io_err("current directory"))?;
    let base = absolute(&cwd, &options.base_dir);
    if options.name.is_empty() || options.name.contains('/') {
        return Err(JailError::Invalid(format!(
            "bad command name {:?}",
            options.name
        )));
    }
    if let Some(ns) = &options.netns {
        if ns.is_empty() || ns.contains('/') {
            return Err(JailError::Invalid(format!(
                "bad network namespace name {ns:?}"
            )));
        }
        let p = Path::new("/run/netns").join(ns);
        if !p.exists() {
            return Err(JailError::Invalid(format!(
                "network namespace {ns:?} does not exist ({})",
                p.display()
            )));
        }
    }
    let placement = numa::Placement::of_node(options.numa_node)?;
    std::fs::create_dir_all(&base).map_err(io_err(format!("creating {}", base.display())))?;
    let removed = clean_stale(&base)?;
    if !removed.is_empty() {
        tracing::warn!(jails = ?removed, "removed jails of VMs that are gone");
    }
    let plan = root::Plan::new(&cwd, &options)?;
    let vm_id = format!(
        "{}-{}-{:x}",
        options.name,
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default()
    );
    supervisor::split(supervisor::Setup {
        vm_id,
        base,
        cwd,
        options,
        plan,
        placement,
    })
}

impl Confining {
    /// The VM id (`<name>-<pid>-<nonce>`): the jail is
    /// `<chroot-base-dir>/<vm-id>/root`.
    pub fn vm_id(&self) -> &str {
        &self.vm_id
    }

    /// The jail directory `<chroot-base-dir>/<vm-id>` (as the host sees it).
    pub fn jail_dir(&self) -> &Path {
        &self.jail_dir
    }

    /// Joins the network namespace (if given), moves into the jail
    /// (`pivot_root`), pins the process to its NUMA node, sets
    /// `no_new_privs`, clears the supplementary groups, switches to the
    /// uid/gid and drops every capability. The process must still have one
    /// thread. On error the process must exit (it is half confined).
    pub fn lock_down(self) -> Result<(), JailError> {
        use nix::sched::{setns, CloneFlags};
        use nix::unistd::{Gid, Uid};
        // A helper thread joined just now (a tap opened in a namespace) may
        // still be leaving the thread group for a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while thread_count()? != 1 {
            if std::time::Instant::now() > deadline {
                return Err(JailError::Invalid(
                    "the jail must be locked down while the process has one thread".into(),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if let Some(ns) = &self.netns {
            let path = Path::new("/run/netns").join(ns);
            let f = std::fs::File::open(&path)
                .map_err(io_err(format!("network namespace {}", path.display())))?;
            setns(&f, CloneFlags::CLONE_NEWNET)
                .map_err(sys_err(format!("joining network namespace {ns:?}")))?;
        }
        root::pivot(&self.root, &self.cwd)?;
        self.numa.apply()?;
        // Bounding and ambient sets first: dropping from the bounding set
        // needs CAP_SETPCAP, which goes with the uid switch.
        caps::clear(None, caps::CapSet::Ambient).map_err(|e| JailError::Caps(e.to_string()))?;
        caps::clear(None, caps::CapSet::Bounding)
            .map_err(|e| JailError::Caps(format!("bounding set: {e}")))?;
        nix::sys::prctl::set_no_new_privs().map_err(sys_err("setting no_new_privs"))?;
        nix::unistd::setgroups(&[]).map_err(sys_err("clearing supplementary groups"))?;
        let (uid, gid) = (Uid::from_raw(self.uid), Gid::from_raw(self.gid));
        nix::unistd::setresgid(gid, gid, gid).map_err(sys_err(format!("setgid {}", self.gid)))?;
        nix::unistd::setresuid(uid, uid, uid).map_err(sys_err(format!("setuid {}", self.uid)))?;
        for set in [
            caps::CapSet::Effective,
            caps::CapSet::Permitted,
            caps::CapSet::Inheritable,
        ] {
            caps::clear(None, set).map_err(|e| JailError::Caps(format!("{set:?}: {e}")))?;
        }
        // Cleared by the credential change above, so set it now; and if the
        // supervisor is already gone, nothing would clean up after us.
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
            .map_err(sys_err("setting the parent-death signal"))?;
        if nix::unistd::getppid() != self.supervisor {
            return Err(JailError::Invalid("the supervisor is gone".into()));
        }
        tracing::debug!(
            vm_id = %self.vm_id,
            fd = self.channel.as_raw_fd(),
            "VM process locked down"
        );
        let mut c = CHANNEL
            .lock()
            .map_err(|_| JailError::Cgroup("limits channel poisoned".into()))?;
        *c = Some(self.channel);
        Ok(())
    }
}

fn thread_count() -> Result<usize, JailError> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(io_err("/proc/self/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| JailError::Invalid("no thread count in /proc/self/status".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_paths_are_lexical() {
        let cwd = Path::new("/work/a");
        assert_eq!(
            absolute(cwd, Path::new("out/p/../q/./s")),
            PathBuf::from("/work/a/out/q/s")
        );
        assert_eq!(absolute(cwd, Path::new("/x/../../y")), PathBuf::from("/y"));
    }

    #[test]
    fn limits_grow_with_the_vm() {
        assert_eq!(memory_limit(1 << 30), (1 << 30) + (64 << 20) + (256 << 20));
        assert_eq!(cpu_limit(2), 3);
    }
}
