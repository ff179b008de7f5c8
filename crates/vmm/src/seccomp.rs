//! Seccomp filters, one per kind of thread (vCPU, device I/O, migration,
//! main), built with `seccompiler`.
//!
//! # What happens on a forbidden system call
//!
//! A call outside a thread's list makes the kernel stop it before it runs
//! (`SECCOMP_RET_TRAP`) and deliver `SIGSYS` to that thread. The handler
//! installed here writes one line naming the call to stderr — `drafter:
//! seccomp: thread vcpu0 (vcpu filter) made forbidden system call 59
//! (execve); killing the process` — and ends the whole process with
//! `exit_group(159)` (128 + SIGSYS, as a shell reports a process killed by
//! SIGSYS). `SECCOMP_RET_KILL_PROCESS` would kill just as surely but tells
//! only the kernel's audit log, which an operator of the VMM rarely sees;
//! the trap is as safe: the call never runs, the handler only uses calls
//! every filter allows (`write`, `exit_group`), and a thread that blocked or
//! ignored `SIGSYS` is still killed (the kernel forces the signal and, when
//! it is blocked or ignored, its default action: the process dies). No list
//! allows `rt_sigaction`, so filtered code cannot replace the handler.
//!
//! # Which filters run
//!
//! [`SeccompPolicy`] says which kinds of thread install their filter; it is
//! process-wide (one VM per process), set by the commands' `--no-seccomp`
//! flag ([`set_policy`]) or the environment variable `DRAFTER_SECCOMP`
//! (`off`, `vcpu`, `all`, or a comma-separated list of kinds). The default
//! is [`SeccompPolicy::DEFAULT`]: vCPU threads only. The vCPU list is
//! complete for everything a vCPU thread does in this VMM (KVM ioctls,
//! device register accesses that write eventfds, consoles and channels,
//! allocation, kicks, throttling, exit), which the host tests exercise with
//! a real guest; the device I/O, migration and main lists are written for
//! what those threads do but cannot be checked against a booting Linux
//! guest on every host, so they are opt-in until the lab has run with them.
//!
//! Where they are installed: each vCPU thread before it first enters the
//! guest; each device I/O thread as it starts; the main thread of
//! `drafter-vmm` and `drafter-peer` once the VM runs (a peer's migration
//! threads are started from it and inherit it, with everything the
//! migration does: dirty logs, pausing, saving state, sockets, TLS).
//! [`ThreadKind::Migration`] has the main list, for code that runs a
//! migration on a thread of its own. The main and migration lists allow
//! threads but no processes: `clone` must carry `CLONE_THREAD`, `clone3`
//! fails with ENOSYS (a first filter) so the C library falls back to
//! `clone`, and `execve`, `fork` and `vfork` are in no list. With
//! `DRAFTER_SECCOMP=all`, `drafter-vmm`'s control commands and a TLS
//! migration between two `drafter-peer`s pass on the host (the CLI tests).
//!
//! Filters are inherited by threads a filtered thread creates. A vCPU
//! thread starts a device's I/O thread when the guest activates it, so
//! threads are started through [`spawn`], which hands the creation to a
//! spawner thread started unfiltered ([`prepare`]) whenever the caller is
//! filtered: a vCPU filter never needs `clone`.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, Once};
use std::thread::JoinHandle;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The kinds of thread that get their own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs one vCPU (`KVM_RUN`) and the device register accesses it traps.
    Vcpu,
    /// A virtio device's I/O thread (block, net, vsock backends).
    DeviceIo,
    /// The migration engine's threads (reading devices, the link).
    Migration,
    /// The VMM's controlling thread (build, pause, snapshot, stop).
    Main,
}

impl ThreadKind {
    fn bit(self) -> u8 {
        match self {
            ThreadKind::Vcpu => 1,
            ThreadKind::DeviceIo => 2,
            ThreadKind::Migration => 4,
            ThreadKind::Main => 8,
        }
    }

    /// The kind's name as `DRAFTER_SECCOMP` and the log spell it.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::DeviceIo => "device",
            ThreadKind::Migration => "migration",
            ThreadKind::Main => "main",
        }
    }

    const ALL: [ThreadKind; 4] = [
        ThreadKind::Vcpu,
        ThreadKind::DeviceIo,
        ThreadKind::Migration,
        ThreadKind::Main,
    ];
}

/// Which kinds of thread install their filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeccompPolicy(u8);

impl SeccompPolicy {
    /// No filters (`--no-seccomp`): for debugging only.
    pub const OFF: SeccompPolicy = SeccompPolicy(0);
    /// The default: vCPU threads.
    pub const DEFAULT: SeccompPolicy = SeccompPolicy(1);
    /// Every kind of thread.
    pub const ALL: SeccompPolicy = SeccompPolicy(15);

    /// This policy with `kind` enabled.
    pub fn with(self, kind: ThreadKind) -> Self {
        SeccompPolicy(self.0 | kind.bit())
    }

    /// Whether threads of `kind` install their filter.
    pub fn enables(self, kind: ThreadKind) -> bool {
        self.0 & kind.bit() != 0
    }

    /// Parses `off`, `vcpu`, `all` or a comma-separated list of kinds
    /// (`vcpu,device,migration,main`).
    pub fn parse(s: &str) -> Result<Self, SeccompError> {
        match s.trim() {
            "off" | "none" | "" => return Ok(Self::OFF),
            "all" => return Ok(Self::ALL),
            _ => {}
        }
        let mut p = Self::OFF;
        for part in s.split(',') {
            let kind = ThreadKind::ALL
                .into_iter()
                .find(|k| k.name() == part.trim())
                .ok_or_else(|| SeccompError::Policy(s.to_string()))?;
            p = p.with(kind);
        }
        Ok(p)
    }
}

/// Seccomp setup failed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A policy string that names no kind of thread.
    #[error(
        "invalid seccomp policy {0:?}: use off, all, or a list of vcpu, device, migration, main"
    )]
    Policy(String),
    /// The filter could not be built.
    #[error("building the {kind} seccomp filter: {why}")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        why: String,
    },
    /// The kernel refused the filter.
    #[error("installing the {kind} seccomp filter: {why}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        why: String,
    },
}

/// The policy bits; `NOT_SET` until [`set_policy`] or the first use.
static POLICY: AtomicU8 = AtomicU8::new(NOT_SET);
const NOT_SET: u8 = 0xff;

/// Sets the process-wide policy (before the VM is built).
pub fn set_policy(p: SeccompPolicy) {
    POLICY.store(p.0, Ordering::SeqCst);
}

/// The process-wide policy: what [`set_policy`] set, else
/// `DRAFTER_SECCOMP`, else [`SeccompPolicy::DEFAULT`]. An unparsable
/// `DRAFTER_SECCOMP` is reported and the default used.
pub fn policy() -> SeccompPolicy {
    let bits = POLICY.load(Ordering::SeqCst);
    if bits != NOT_SET {
        return SeccompPolicy(bits);
    }
    let p = match std::env::var("DRAFTER_SECCOMP") {
        Ok(s) => SeccompPolicy::parse(&s).unwrap_or_else(|e| {
            tracing::error!("{e}; using the default (vcpu)");
            SeccompPolicy::DEFAULT
        }),
        Err(_) => SeccompPolicy::DEFAULT,
    };
    // Keep a value set meanwhile by set_policy.
    let _ = POLICY.compare_exchange(NOT_SET, p.0, Ordering::SeqCst, Ordering::SeqCst);
    SeccompPolicy(POLICY.load(Ordering::SeqCst))
}

thread_local! {
    /// The kind whose filter this thread installed (its bit), 0 for none.
    /// Const-initialised, so the SIGSYS handler may read it.
    static FILTERED: Cell<u8> = const { Cell::new(0) };
    /// The thread's name, NUL-padded, for the SIGSYS handler (which cannot
    /// ask the kernel: `prctl` is not in every list).
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Whether the calling thread runs under a filter installed here.
pub fn current_thread_filtered() -> bool {
    FILTERED.with(|f| f.get() != 0)
}

/// Calls every thread may make: memory, locks, signals' return, time,
/// logging, exit.
fn common(rules: &mut Rules) {
    for nr in [
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_futex,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_getrandom,
        libc::SYS_gettid,
        libc::SYS_getpid,
    ] {
        rules.allow(nr);
    }
    // Memory may be mapped or protected, never executable.
    let no_exec = |arg| {
        SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )
    };
    rules.allow_if(libc::SYS_mmap, vec![no_exec(2)]);
    rules.allow_if(libc::SYS_mprotect, vec![no_exec(2)]);
}

/// Files, sockets and polling, for threads doing I/O.
fn io_calls(rules: &mut Rules) {
    for nr in [
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_lseek,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        libc::SYS_ftruncate,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_fcntl,
        libc::SYS_dup,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_eventfd2,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
    ] {
        rules.allow(nr);
    }
}

/// Creating threads and files, for the migration and main threads.
fn process_calls(rules: &mut Rules) {
    // Threads only, never processes: clone must carry CLONE_THREAD, and
    // clone3 (whose flags a filter cannot read) is allowed here only because
    // a first filter makes it fail with ENOSYS, so the C library falls back
    // to clone (see `install_always`).
    r_clone_thread(rules);
    rules.allow(libc::SYS_clone3);
    for nr in [
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_prctl,
        libc::SYS_sched_getaffinity,
        libc::SYS_tgkill,
        libc::SYS_openat,
        libc::SYS_readlink,
        libc::SYS_stat,
        libc::SYS_lstat,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_rmdir,
        libc::SYS_unlink,
        libc::SYS_rename,
        libc::SYS_chmod,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_access,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_statfs,
        libc::SYS_fstatfs,
        libc::SYS_copy_file_range,
        libc::SYS_sendfile,
        libc::SYS_umask,
        libc::SYS_unlinkat,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_linkat,
        libc::SYS_getdents64,
        libc::SYS_msync,
        libc::SYS_memfd_create,
        libc::SYS_socket,
        libc::SYS_socketpair,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept4,
        libc::SYS_ioctl,
        libc::SYS_userfaultfd,
        libc::SYS_getcwd,
        libc::SYS_readlinkat,
        libc::SYS_setns,
        libc::SYS_wait4,
        libc::SYS_pipe2,
    ] {
        rules.allow(nr);
    }
}

fn r_clone_thread(rules: &mut Rules) {
    rules.allow_if(
        libc::SYS_clone,
        vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )],
    );
}

/// The filter installed before the main and migration filters: `clone3`
/// fails with ENOSYS (the stricter result wins when filters disagree).
fn no_clone3() -> Result<BpfProgram, SeccompError> {
    let build = |why: String| SeccompError::Build {
        kind: "clone3",
        why,
    };
    let mut rules = BTreeMap::new();
    rules.insert(libc::SYS_clone3, Vec::new());
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| build(e.to_string()))?;
    BpfProgram::try_from(f).map_err(|e| build(e.to_string()))
}

struct Rules(BTreeMap<i64, Vec<SeccompRule>>);

impl Rules {
    fn allow(&mut self, nr: libc::c_long) {
        self.0.insert(nr, Vec::new());
    }
    fn allow_if(
        &mut self,
        nr: libc::c_long,
        conditions: Vec<Result<SeccompCondition, seccompiler::BackendError>>,
    ) {
        let rule = conditions
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .and_then(SeccompRule::new);
        match rule {
            // Rules of one call are alternatives: any may match.
            Ok(r) => self.0.entry(nr).or_default().push(r),
            // Unreachable with the constant conditions above; leaving the
            // call out only makes the filter stricter.
            Err(e) => tracing::error!(nr, "seccomp rule: {e}"),
        }
    }
}

/// The system calls (and argument checks) a thread of `kind` may make.
fn rules(kind: ThreadKind) -> Rules {
    let mut r = Rules(BTreeMap::new());
    common(&mut r);
    match kind {
        ThreadKind::Vcpu => {
            // KVM ioctls (type 0xAE: KVM_RUN, register get/set for
            // snapshots), and FIONBIO, which a vsock device's activation
            // sets on its listener. No other ioctl.
            r.allow_if(
                libc::SYS_ioctl,
                vec![SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(0xff00),
                    0xAE00,
                )],
            );
            r.allow_if(
                libc::SYS_ioctl,
                vec![SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    libc::FIONBIO,
                )],
            );
            // A guest activating a virtio device makes its vCPU set the
            // device up (queue eventfds duplicated, a stop eventfd, the
            // vsock epoll set) before the spawner starts its I/O thread.
            // No file, socket or process is opened or created.
            for nr in [
                libc::SYS_dup,
                libc::SYS_fcntl,
                libc::SYS_eventfd2,
                libc::SYS_epoll_create1,
                libc::SYS_epoll_ctl,
            ] {
                r.allow(nr);
            }
        }
        ThreadKind::DeviceIo => {
            io_calls(&mut r);
            r.allow(libc::SYS_ioctl);
            r.allow(libc::SYS_connect);
            r.allow(libc::SYS_socket);
            r.allow(libc::SYS_accept4);
        }
        ThreadKind::Migration | ThreadKind::Main => {
            io_calls(&mut r);
            process_calls(&mut r);
        }
    }
    r
}

/// The compiled filter for `kind`: forbidden calls trap (see the module
/// documentation).
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |why: String| SeccompError::Build {
        kind: kind.name(),
        why,
    };
    let f = SeccompFilter::new(
        rules(kind).0,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| build(e.to_string()))?;
    BpfProgram::try_from(f).map_err(|e| build(e.to_string()))
}

/// Installs the filter of `kind` on the calling thread if the policy
/// enables it; returns whether it did. The thread keeps the filter until it
/// ends, and threads it creates inherit it (use [`spawn`]).
pub fn install(kind: ThreadKind) -> Result<bool, SeccompError> {
    if !policy().enables(kind) {
        return Ok(false);
    }
    install_always(kind)?;
    Ok(true)
}

/// Installs the filter of `kind` on the calling thread whatever the policy.
pub fn install_always(kind: ThreadKind) -> Result<(), SeccompError> {
    let prog = filter(kind)?;
    install_sigsys_handler();
    let failed = |e: seccompiler::Error| SeccompError::Install {
        kind: kind.name(),
        why: e.to_string(),
    };
    if matches!(kind, ThreadKind::Main | ThreadKind::Migration) {
        seccompiler::apply_filter(&no_clone3()?).map_err(failed)?;
    }
    seccompiler::apply_filter(&prog).map_err(failed)?;
    FILTERED.with(|f| f.set(kind.bit()));
    let mut name = [0u8; 16];
    let current = std::thread::current();
    let n = current.name().unwrap_or("unnamed").as_bytes();
    let len = n.len().min(name.len() - 1);
    name[..len].copy_from_slice(&n[..len]);
    THREAD_NAME.with(|t| t.set(name));
    Ok(())
}

/// Installs the filter of `kind`, logging a failure (the thread then runs
/// unfiltered); for threads that have no way to report an error.
fn install_or_log(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        tracing::error!("{e}; this thread runs without a seccomp filter");
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The spawner thread's queue, once started.
static SPAWNER: Mutex<Option<Sender<Job>>> = Mutex::new(None);

/// Starts the spawner thread that creates threads for filtered callers.
/// Must run on an unfiltered thread before filtered threads need [`spawn`]
/// (the VMM calls it before starting vCPUs); later calls do nothing.
pub fn prepare() -> io::Result<()> {
    let mut s = SPAWNER.lock().unwrap_or_else(|p| p.into_inner());
    if s.is_some() {
        return Ok(());
    }
    if current_thread_filtered() {
        return Err(io::Error::other(
            "the thread spawner must be started by an unfiltered thread",
        ));
    }
    let (tx, rx) = channel::<Job>();
    std::thread::Builder::new()
        .name("drafter-spawner".into())
        .spawn(move || {
            for job in rx {
                job();
            }
        })?;
    *s = Some(tx);
    Ok(())
}

/// Starts a thread called `name` that installs the filter of `kind` (if
/// the policy enables it) and runs `f`. A filtered caller's thread is
/// created by the spawner thread ([`prepare`]), so it does not inherit the
/// caller's filter and the caller needs no `clone`.
pub fn spawn<T: Send + 'static>(
    name: String,
    kind: ThreadKind,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    let body = move || {
        install_or_log(kind);
        f()
    };
    if !current_thread_filtered() {
        return std::thread::Builder::new().name(name).spawn(body);
    }
    let (tx, rx) = channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(std::thread::Builder::new().name(name).spawn(body));
    });
    let queued = SPAWNER
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|s| s.send(job).is_ok())
        .unwrap_or(false);
    if !queued {
        return Err(io::Error::other(
            "no thread spawner (seccomp::prepare was not called)",
        ));
    }
    rx.recv()
        .map_err(|_| io::Error::other("the thread spawner is gone"))?
}

/// The name of x86_64 system call `nr`, if known.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    usize::try_from(nr)
        .ok()
        .and_then(|i| crate::seccomp_names::NAMES.get(i))
        .copied()
        .filter(|n| !n.is_empty())
}

/// Exit status of a process killed for a forbidden call (128 + SIGSYS).
pub const BAD_SYSCALL_EXIT: i32 = 128 + libc::SIGSYS;

fn install_sigsys_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting value; we set a
        // handler of the SA_SIGINFO signature with an empty mask, and
        // sigaction only reads the struct we pass.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = sigsys_handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
                tracing::error!(
                    "cannot install the SIGSYS handler: {}; a forbidden system call then \
                     kills the process without naming it",
                    io::Error::last_os_error()
                );
            }
        }
    });
}

/// A fixed buffer the handler formats into (no allocation in a handler).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }
    fn push_num(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

extern "C" fn sigsys_handler(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // The number of the trapped call: siginfo's `si_syscall`, an int after
    // the three ints of the header, padding and the `si_call_addr` pointer
    // (offset 24 on x86_64; the libc crate has no accessor for it).
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO
        // handlers; for SIGSYS the int at byte 24 is si_syscall, within
        // the 128-byte struct.
        unsafe {
            info.cast::<u8>()
                .add(24)
                .cast::<libc::c_int>()
                .read_unaligned()
        }
    };
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"drafter: seccomp: thread ");
    let name = THREAD_NAME.with(|t| t.get());
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    line.push(if end == 0 { b"?" } else { &name[..end] });
    let kind = FILTERED.with(|f| f.get());
    line.push(b" (");
    line.push(
        ThreadKind::ALL
            .into_iter()
            .find(|k| k.bit() == kind)
            .map_or("no", |k| k.name())
            .as_bytes(),
    );
    line.push(b" filter) made forbidden system call ");
    line.push_num(u64::try_from(nr).unwrap_or(u64::MAX));
    if let Some(n) = syscall_name(i64::from(nr)) {
        line.push(b" (");
        line.push(n.as_bytes());
        line.push(b")");
    }
    line.push(b"; killing the process\n");
    // SAFETY: write(2) and exit_group(2) are async-signal-safe and allowed
    // by every filter; the buffer is ours and `len` within it.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::syscall(libc::SYS_exit_group, BAD_SYSCALL_EXIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_builds_and_policies_parse() {
        for k in ThreadKind::ALL {
            assert!(!filter(k).unwrap_or_default().is_empty(), "{k:?}");
        }
        assert_eq!(SeccompPolicy::parse("off").ok(), Some(SeccompPolicy::OFF));
        assert_eq!(SeccompPolicy::parse("all").ok(), Some(SeccompPolicy::ALL));
        let p = SeccompPolicy::parse("vcpu,device").unwrap_or(SeccompPolicy::OFF);
        assert!(p.enables(ThreadKind::Vcpu) && p.enables(ThreadKind::DeviceIo));
        assert!(!p.enables(ThreadKind::Main));
        let e = SeccompPolicy::parse("vcpu,bogus")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("bogus") && !e.contains('\n'), "{e}");
        assert_eq!(syscall_name(59), Some("execve"));
        assert_eq!(syscall_name(100_000), None);
    }
}
