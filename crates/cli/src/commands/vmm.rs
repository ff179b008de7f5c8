//! `drafter-vmm`: run one microVM from a JSON config file or flags, or restore one
//! from a state + memory file. For manual use and tests.
//!
//! Exit status: 0 when the guest powers off (or is stopped over the control
//! socket), 2 when it reboots, 1 on any error.
//!
//! With `--control-socket PATH`, a Unix socket takes one command per line and
//! answers `ok[ detail]` or `error <message>`: `pause`, `resume`,
//! `snapshot <state> <memory>` (VM paused), `msync`, `dirty` (count of pages
//! written since the last call), `stop`. The socket is created mode 0600
//! (only its owner may connect) before the VM starts. Paths a command names
//! are resolved inside the VM's directory (`--vm-dir`, by default the
//! socket's directory): relative ones from there, absolute ones only if
//! inside it; `..`, symbolic-link escapes and other places are refused.
//!
//! vCPU threads run under a seccomp filter (see `drafter_vmm::seccomp`);
//! `--no-seccomp` turns the filters off for debugging.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{channel, Sender};

use crate::{bind_private_socket, enter_jail, resolve_inside, JailArgs};
use clap::{Parser, ValueEnum};
use drafter_jail::JailOptions;
use drafter_vmm::config::{DriveConfig, NetConfig, SerialConfig, VsockConfig};
use drafter_vmm::devices::virtio::net::Tap;
use drafter_vmm::seccomp::{self, SeccompPolicy};
use drafter_vmm::uffd::FilePageProvider;
use drafter_vmm::{BuildOptions, ExitStatus, RestoreMemory, VmConfig, Vmm};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MemoryMode {
    /// MAP_PRIVATE: pages load lazily, writes stay in the process.
    Private,
    /// MAP_SHARED: guest memory is the file; msync writes it back.
    Shared,
    /// userfaultfd: every page is served on demand from the memory file.
    Uffd,
}

/// Run one microVM.
#[derive(Parser, Debug)]
#[command(name = "drafter-vmm", version)]
pub struct Args {
    /// JSON VM configuration (flags below override its fields).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kernel image (bzImage or ELF vmlinux).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    boot_args: Option<String>,
    /// Number of vCPUs.
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory in MiB.
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Drive as NAME:PATH[:ro]; repeat in guest order (first is /dev/vda).
    #[arg(long = "drive")]
    drives: Vec<String>,
    /// Tap device for virtio-net.
    #[arg(long)]
    tap: Option<String>,
    /// Guest MAC address.
    #[arg(long)]
    mac: Option<String>,
    /// Network namespace holding the tap.
    #[arg(long)]
    netns: Option<String>,
    /// vsock Unix socket path (enables virtio-vsock).
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// Guest vsock CID.
    #[arg(long, default_value_t = 3)]
    vsock_cid: u32,
    /// Feed stdin to the guest's serial console.
    #[arg(long)]
    serial_stdin: bool,
    /// Do not copy the serial console to stdout.
    #[arg(long)]
    no_serial_stdout: bool,
    /// Back guest memory with this file (MAP_SHARED) when booting.
    #[arg(long)]
    memory_file: Option<PathBuf>,
    /// Restore from this state file instead of booting.
    #[arg(long, requires = "restore_memory")]
    restore_state: Option<PathBuf>,
    /// Memory file to restore from.
    #[arg(long, requires = "restore_state")]
    restore_memory: Option<PathBuf>,
    /// How restored memory is mapped.
    #[arg(long, value_enum, default_value_t = MemoryMode::Private)]
    memory_mode: MemoryMode,
    /// Unix socket taking control commands (pause, resume, snapshot, msync,
    /// dirty, stop); created mode 0600.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// The VM's directory: paths named over the control socket must lie
    /// inside it (default: the control socket's directory).
    #[arg(long, requires = "control_socket")]
    vm_dir: Option<PathBuf>,
    /// Run without seccomp filters (for debugging only).
    #[arg(long)]
    no_seccomp: bool,
    #[command(flatten)]
    jail: JailArgs,
}

/// The directory holding `p` (`.` for a bare name).
fn dir_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// What a VM of `config` reads and writes; the tap it opens is returned.
fn jail_config_paths(o: &mut JailOptions, c: &VmConfig, boot: bool) -> Option<NetConfig> {
    if boot {
        o.read_file(&c.kernel);
        if let Some(i) = &c.initramfs {
            o.read_file(i);
        }
    }
    for d in &c.drives {
        if d.read_only {
            o.read_file(&d.path);
        } else {
            o.write_file(&d.path);
        }
    }
    if let Some(v) = &c.vsock {
        o.write_dir(dir_of(&v.uds_path));
    }
    c.net.clone()
}

/// Runs the VM in a jail (any jailer flag given): see `drafter_jail`.
fn jail(a: &Args) -> Result<Option<drafter_jail::Supervisor>, String> {
    let mut o = a.jail.options("drafter-vmm")?;
    let net = match (&a.restore_state, &a.restore_memory) {
        (Some(state), Some(mem)) => {
            o.read_file(state);
            match a.memory_mode {
                MemoryMode::Private => o.read_file(mem),
                MemoryMode::Shared => o.write_file(mem),
                MemoryMode::Uffd => {
                    o.userfaultfd = true;
                    o.read_file(mem)
                }
            };
            let snap: drafter_vmm::Snapshot = drafter_vmm::persist::read_state_file(state)
                .map_err(|e| format!("cannot read state {}: {e}", state.display()))?;
            jail_config_paths(&mut o, &snap.config, false)
        }
        _ => {
            let c = build_config(a)?;
            if let Some(p) = &a.config {
                o.read_file(p);
            }
            if let Some(m) = &a.memory_file {
                if m.exists() {
                    o.write_file(m);
                } else {
                    o.write_dir(dir_of(m));
                }
            }
            jail_config_paths(&mut o, &c, true)
        }
    };
    if let Some(sock) = &a.control_socket {
        let vm_dir = a.vm_dir.clone().unwrap_or_else(|| dir_of(sock));
        o.write_dir(&vm_dir);
        if dir_of(sock) != vm_dir {
            o.write_dir(dir_of(sock));
        }
    }
    o.netns = net.as_ref().and_then(|n| n.netns.clone());
    enter_jail(o, || match &net {
        // Opened now: the jailed process may not open taps.
        Some(n) => Tap::preopen(&n.tap, n.netns.as_deref()).map_err(|e| e.to_string()),
        None => Ok(()),
    })
}

fn parse_drive(s: &str) -> Result<DriveConfig, String> {
    let mut parts = s.splitn(2, ':');
    let name = parts.next().unwrap_or_default();
    let rest = parts
        .next()
        .ok_or_else(|| format!("drive '{s}': expected NAME:PATH[:ro]"))?;
    let (path, read_only) = match rest.strip_suffix(":ro") {
        Some(p) => (p, true),
        None => (rest, false),
    };
    if name.is_empty() || path.is_empty() {
        return Err(format!("drive '{s}': expected NAME:PATH[:ro]"));
    }
    Ok(DriveConfig {
        name: name.to_string(),
        path: PathBuf::from(path),
        read_only,
    })
}

fn build_config(a: &Args) -> Result<VmConfig, String> {
    let mut c = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read config {}: {e}", p.display()))?;
            serde_json::from_str::<VmConfig>(&text)
                .map_err(|e| format!("invalid config {}: {e}", p.display()))?
        }
        None => {
            let k = a
                .kernel
                .clone()
                .ok_or("either --config or --kernel is required")?;
            VmConfig::new(k)
        }
    };
    if let Some(k) = &a.kernel {
        c.kernel = k.clone();
    }
    if let Some(i) = &a.initramfs {
        c.initramfs = Some(i.clone());
    }
    if let Some(b) = &a.boot_args {
        c.boot_args = b.clone();
    }
    if let Some(v) = a.vcpus {
        c.vcpus = v;
    }
    if let Some(m) = a.memory_mib {
        c.memory_mib = m;
    }
    for d in &a.drives {
        c.drives.push(parse_drive(d)?);
    }
    if let Some(tap) = &a.tap {
        c.net = Some(NetConfig {
            tap: tap.clone(),
            mac: a.mac.clone(),
            netns: a.netns.clone(),
        });
    }
    if let Some(uds) = &a.vsock_uds {
        c.vsock = Some(VsockConfig {
            cid: a.vsock_cid,
            uds_path: uds.clone(),
        });
    }
    c.serial = SerialConfig {
        stdout: c.serial.stdout && !a.no_serial_stdout,
        stdin: c.serial.stdin || a.serial_stdin,
    };
    Ok(c)
}

enum Event {
    Control(String, Sender<String>),
    Exited,
}

fn serve_control(listener: UnixListener, events: Sender<Event>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let events = events.clone();
        let _ = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || handle_conn(conn, &events));
    }
}

fn handle_conn(conn: UnixStream, events: &Sender<Event>) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        let (tx, rx) = channel();
        if events.send(Event::Control(line, tx)).is_err() {
            return;
        }
        let reply = rx.recv().unwrap_or_else(|_| "error VM is gone".into());
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

/// Runs one control command; returns the reply and whether to stop. Paths
/// are resolved inside `dir`.
fn control(vmm: &mut Vmm, dir: &std::path::Path, line: &str) -> (String, bool) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let res = match words.as_slice() {
        ["snapshot", state, mem] => {
            let paths = resolve_inside(dir, state).and_then(|s| Ok((s, resolve_inside(dir, mem)?)));
            match paths {
                Ok((state, mem)) => vmm.snapshot(&state, &mem).map(|_| String::new()),
                Err(e) => return (format!("error {e}"), false),
            }
        }
        ["pause"] => vmm.pause().map(|_| String::new()),
        ["resume"] => vmm.resume().map(|_| String::new()),
        ["msync"] => vmm.msync().map(|_| String::new()),
        // The first call turns KVM's dirty log on.
        ["dirty"] => vmm
            .set_dirty_logging(true)
            .and_then(|_| vmm.dirty_pages())
            .map(|d| d.count().to_string()),
        ["stop"] => return ("ok".into(), true),
        _ => return (format!("error unknown command '{line}'"), false),
    };
    match res {
        Ok(d) if d.is_empty() => ("ok".into(), false),
        Ok(d) => (format!("ok {d}"), false),
        Err(e) => (format!("error {e}"), false),
    }
}

fn run(a: Args) -> Result<ExitStatus, String> {
    if a.no_seccomp {
        seccomp::set_policy(SeccompPolicy::OFF);
    }
    // The control socket exists (mode 0600) before any VM thread does.
    let control_socket = match &a.control_socket {
        Some(path) => {
            let dir = match &a.vm_dir {
                Some(d) => d.clone(),
                None => match path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => PathBuf::from("."),
                },
            };
            if !dir.is_dir() {
                return Err(format!("VM directory {} is not a directory", dir.display()));
            }
            Some((bind_private_socket(path)?, dir))
        }
        None => None,
    };
    let mut vmm = match (&a.restore_state, &a.restore_memory) {
        (Some(state), Some(mem)) => {
            let memory = match a.memory_mode {
                MemoryMode::Private => RestoreMemory::Private(mem.clone()),
                MemoryMode::Shared => RestoreMemory::Shared(mem.clone()),
                MemoryMode::Uffd => {
                    let f = std::fs::File::open(mem)
                        .map_err(|e| format!("cannot open memory file {}: {e}", mem.display()))?;
                    RestoreMemory::Userfault(Box::new(FilePageProvider::new(f)))
                }
            };
            let console: Option<Box<dyn Write + Send>> = if a.no_serial_stdout {
                Some(Box::new(std::io::sink()))
            } else {
                None
            };
            let mut v = Vmm::restore(state, memory, console).map_err(|e| e.to_string())?;
            v.resume().map_err(|e| e.to_string())?;
            v
        }
        _ => {
            let config = build_config(&a)?;
            let opts = BuildOptions {
                shared_memory_file: a.memory_file.clone(),
                ..Default::default()
            };
            Vmm::boot(config, opts).map_err(|e| e.to_string())?
        }
    };
    tracing::info!("VM running");
    // The main thread (and the threads it starts from here on) under the
    // main filter, when the policy enables it (DRAFTER_SECCOMP=main or all).
    seccomp::install(seccomp::ThreadKind::Main).map_err(|e| e.to_string())?;
    let (tx, rx) = channel();
    let vm_dir = control_socket
        .as_ref()
        .map(|(_, d)| d.clone())
        .unwrap_or_default();
    if let Some((l, _)) = control_socket {
        let tx = tx.clone();
        std::thread::spawn(move || serve_control(l, tx));
    }
    let waiter = vmm.exit_waiter();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        waiter.wait();
        let _ = tx2.send(Event::Exited);
    });
    drop(tx);
    while let Ok(ev) = rx.recv() {
        match ev {
            Event::Control(line, reply) => {
                let (r, stop) = control(&mut vmm, &vm_dir, &line);
                let _ = reply.send(r);
                if stop {
                    return Ok(vmm.stop());
                }
            }
            Event::Exited => break,
        }
    }
    let status = vmm.wait();
    // Commands that arrived as the VM ended learn how it ended.
    while let Ok(ev) = rx.try_recv() {
        if let Event::Control(_, reply) = ev {
            let _ = reply.send(format!("error the VM has ended ({status:?})"));
        }
    }
    Ok(status)
}

/// Runs `drafter-vmm` on this process's command line.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs `drafter-vmm` on `argv` (`argv[0]` names the command in usage
/// lines, e.g. `drafter vmm` when run as a subcommand of `drafter`).
pub fn main_from(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    super::init_tracing("warn");
    let (args, matches) = super::parse_with_matches::<Args>(argv);
    if let Some(code) = super::enter_jail_if_requested("drafter-vmm", &matches, || jail(&args)) {
        return code;
    }
    match run(args) {
        Ok(ExitStatus::Poweroff) | Ok(ExitStatus::Stopped) => ExitCode::SUCCESS,
        Ok(ExitStatus::Reboot) => ExitCode::from(2),
        Ok(ExitStatus::Error(e)) => {
            eprintln!("drafter-vmm: VM failed: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("drafter-vmm: {e}");
            ExitCode::from(1)
        }
    }
}
