//! `drafter-peer`: runs one VM — booted from a config, restored from a
//! snapshot, resumed from a package's files (`--devices` with `base`
//! paths), or migrated in from another peer (`--raddr`) — and, with
//! `--laddr`, live-migrates it to the first peer that connects, then exits.
//!
//! Guest serial goes to stdout (`--enable-output`, on by default) and reads
//! stdin with `--enable-input`. Progress events go to stderr as single JSON
//! lines (see `EVENTS` below, shown by `--help`).
//!
//! A VM with a guest agent (a vsock device, and the agent's port from the
//! package `config` that came with it or `--agent-vsock-port`) gets the
//! agent's hooks: `AfterResume` after every resume here (within
//! `--resume-timeout`, reported in `migrated-in`/`running`), `BeforeSuspend`
//! right before the final stop of a migration out (reported in
//! `migrated-out`). A failing hook is reported; the VM runs or migrates on.
//!
//! Exit status: 0 once migrated out or when the guest powers off, 2 when it
//! reboots, 3 when a handover ended with authority unknown (the VM was
//! saved, see `migration-failed`), 1 on any other error (one line on stderr).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::tls::{TlsArgsError, TlsDialArgs};
use crate::{enter_jail, JailArgs};
use clap::builder::BoolishValueParser;
use clap::{Parser, ValueEnum};
use drafter::devices::PeerPackage;
use drafter::duration::parse_go_duration;
use drafter::migration::{Resume, SourceOptions, VmPhase};
use drafter::peer::{apply_devices_json, read_config, Origin, Peer, PeerError, PeerOptions};
use drafter_storage::{Mode, OnNoConvergence, Progress, Secret};
use drafter_vmm::config::SerialConfig;
use drafter_vmm::devices::virtio::net::Tap;
use drafter_vmm::ExitStatus;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ResumeAt {
    /// Once every block has arrived (the VM can be migrated on later).
    Complete,
    /// As soon as the handover is offered (the VM runs here once the source
    /// commits); missing memory is fetched on demand.
    Authority,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MigrationMode {
    /// Copy while the VM runs, then a short stop (live migration).
    PreCopy,
    /// Hand the VM over at once and stream everything after.
    PostCopy,
}

/// What `--help` says about the JSON events on stderr.
const EVENTS: &str = "\
Events (stderr, one JSON object a line):
  {\"event\":\"running\"[,\"afterResume\":H]}  the VM runs here (booted or restored)
  {\"event\":\"migrated-in\",\"report\":{..}}  the VM arrived and runs here;
      report.afterResume is H for its agent's AfterResume (null: no agent)
  {\"event\":\"listening\",\"addr\":\"..\"}     waiting for the next peer
  {\"event\":\"migration-failed\",\"error\":\"..\",\"sourceKeepsVm\":B,\"authority\":A[,\"saved\":{\"state\":P,\"memory\":P}]}
      A is \"source\": the other peer does not run the VM; it was resumed here
        (sourceKeepsVm true) and the next peer is awaited.
      A is \"destination\": the other peer runs it; this peer exits (status 1).
      A is \"unknown\": the handover was committed but not acknowledged; the
        other peer runs the VM if the commit reached it. The paused VM is
        saved (saved.state, saved.memory, under <work-dir>/unresolved) and
        this peer exits with status 3: restore it with --state/--memory
        only if the other peer does not run it.
  {\"event\":\"migrated-out\",\"report\":{..}}  the other peer runs the VM;
      report.beforeSuspend is H for the agent's BeforeSuspend (null: no agent)
  {\"event\":\"vm-exited\",\"status\":\"..\"}  the guest powered off or rebooted
  {\"event\":\"phase\",\"role\":R,\"phase\":P}  a step of a migration starts; R is
      \"source\" (migrating out) or \"destination\" (migrating in). P, in order:
      source: handshake, device-info, full-pass, dirty-cycles, suspend (the VM
        is being paused), final-dirty (paused: the last dirty pages and drive
        blocks), tail (the handover is offered; post-copy: everything), verify
        (rarely), authority (Commit sent: until authority-accepted, a fault
        leaves authority unknown), authority-accepted (the other peer runs
        the VM), complete. Post-copy skips full-pass to final-dirty.
      destination: handshake, device-info, full-pass (receiving), dirty-cycles
        (first dirty list), tail (handover offered), restore (everything the
        VM needs is here; at --resume-at authority its drives are fetched
        whole first), ready-to-run (restored, paused; asking for authority),
        authority (Commit received: the VM is resumed here), authority-accepted
        (Running sent), post-copy-fetch (--resume-at authority: running, the
        rest of memory streams in), complete.
      A failure can end the sequence anywhere (see migration-failed).
  With DRAFTER_PEER_STOP_AT=[ROLE:]PHASE in the environment the peer stops
  itself (SIGSTOP) right after the first phase event that matches, until it
  gets SIGCONT: a fault-injection test injects its fault meanwhile.
  H is {\"millis\":F,\"output\":\"hook stdout\",\"error\":null or \"why it failed\"};
  a hook that fails leaves the VM running (or migrating) all the same.";

/// Start a VM and live-migrate it between peers.
#[derive(Parser, Debug)]
#[command(name = "drafter-peer", version, after_help = EVENTS)]
pub struct Args {
    /// Boot a VM from this JSON configuration (drafter-vmm's format).
    #[arg(long, conflicts_with_all = ["state", "raddr"])]
    config: Option<PathBuf>,
    /// Start from this snapshot state file (with --memory).
    #[arg(long, requires = "memory", conflicts_with = "raddr")]
    state: Option<PathBuf>,
    /// The snapshot's memory file (copied into --work-dir, never modified).
    #[arg(long, requires = "state")]
    memory: Option<PathBuf>,
    /// Remote address to migrate the VM in from (host:port): another peer
    /// (--laddr) or a drafter-registry serving a package.
    #[arg(long)]
    raddr: Option<String>,
    /// Local address to listen on (host:port); the first peer to connect
    /// receives the VM, then this peer exits.
    #[arg(long)]
    laddr: Option<String>,
    /// Directory for the VM's memory file and what migrations bring.
    #[arg(long, default_value = "out/peer")]
    work_dir: PathBuf,
    /// Network namespace to open the VM's tap in, instead of the one its
    /// config, snapshot or incoming state names ("" for the current one).
    /// Peers on one host need one each: two VMs cannot share a tap.
    #[arg(long)]
    netns: Option<String>,
    /// Shared secret authenticating peers (default: $DRAFTER_SECRET).
    #[arg(long)]
    secret: Option<String>,
    #[command(flatten)]
    tls: TlsDialArgs,
    /// Run the VM without seccomp filters (for debugging only; vCPU threads
    /// are filtered by default, see DRAFTER_SECCOMP).
    #[arg(long)]
    no_seccomp: bool,
    /// Devices configuration (the Go Drafter's --devices JSON). Each
    /// entry's migration settings (blockSize, expiry, maxDirtyBlocks,
    /// minCycles, maxCycles, cycleThrottle) apply to the device of that name
    /// (memory, state; "drives" for every drive). Without --config, --state
    /// or --raddr, the VM resumes from the package files at the entries'
    /// "base" paths (state, memory, config, kernel, drives) and runs on
    /// copies of its memory and drives at their "overlay" paths (default:
    /// in --work-dir), which must not exist yet; the package is never
    /// written. "state" (the Go Drafter's overlay bitmap) is not needed: an
    /// overlay here is a whole copy.
    #[arg(long)]
    devices: Option<String>,
    /// When a VM migrated in resumes.
    #[arg(long, value_enum, default_value_t = ResumeAt::Complete)]
    resume_at: ResumeAt,
    /// How the VM is migrated out.
    #[arg(long, value_enum, default_value_t = MigrationMode::PreCopy)]
    migration_mode: MigrationMode,
    /// zstd-compress block data sent to the next peer (less traffic, more CPU).
    #[arg(long)]
    compress: bool,
    /// Seconds without any sign of life from the other peer (data or
    /// keepalive, sent every third of this) after which a migration fails;
    /// a VM that still holds authority then keeps running here. 0 waits
    /// forever.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = seconds)]
    link_timeout: Duration,
    /// Downtime budget in milliseconds: the dirty cycles end once the
    /// predicted stop (dirty bytes over the measured bandwidth, plus a
    /// fixed allowance) fits in it.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    max_downtime: u64,
    /// What to do when the guest dirties memory faster than the link sends
    /// it: throttle its vCPUs step by step (auto-converge), give up (the VM
    /// keeps running here), or stop anyway at maxCycles.
    #[arg(long, value_enum, default_value_t = NoConvergence::Throttle)]
    on_no_convergence: NoConvergence,
    /// Maximum amount of time to wait for agent and liveness to resume (Go
    /// duration: 1m0s, 500ms): the agent's reconnection and AfterResume
    /// after a resume here; also bounds BeforeSuspend before the final stop
    /// of a migration out
    #[arg(long, default_value = "1m0s", value_parser = parse_go_duration)]
    resume_timeout: Duration,
    /// Maximum amount of time to wait for rescue operations: the agent's
    /// AfterResume when a migration out failed after BeforeSuspend and the
    /// VM resumed here
    #[arg(long, default_value = "1m0s", value_parser = parse_go_duration)]
    rescue_timeout: Duration,
    /// Whether to enable VM stdin (the peer's stdin feeds the guest console)
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = BoolishValueParser::new())]
    enable_input: bool,
    /// Whether to enable VM stdout and stderr: the guest console on this
    /// peer's stdout (--enable-output=false to disable)
    #[arg(long, num_args = 0..=1, default_value = "true", default_missing_value = "true", value_parser = BoolishValueParser::new())]
    enable_output: bool,
    /// Amount of concurrent workers to use in migrations: drive blocks
    /// fetched at once while a VM migrating in at --resume-at authority
    /// waits for its drives (at most 64 threads). A migration out, and one
    /// in that resumes after every block arrived, stream over one link and
    /// need no workers
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: u64,
    /// The vsock port of the VM's guest agent, for a VM without a package
    /// config telling it (booted with --config, or restored with --state):
    /// its hooks are then called as for a package's VM
    #[arg(long, value_name = "PORT")]
    agent_vsock_port: Option<u32>,
    /// Firecracker binary (accepted and ignored: the VMM is built in)
    #[arg(long, default_value = "firecracker")]
    firecracker_bin: String,
    /// Jailer binary (accepted and ignored: the VMM is built in; the jailer
    /// flags below run the VM jailed)
    #[arg(long, default_value = "jailer")]
    jailer_bin: String,
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

/// What a VM of `config` reads and writes; returns its tap and namespace.
fn jail_config_paths(
    o: &mut drafter_jail::JailOptions,
    c: &drafter_vmm::VmConfig,
    boot: bool,
) -> Option<(String, Option<String>)> {
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
    c.net.as_ref().map(|n| (n.tap.clone(), n.netns.clone()))
}

/// Runs the peer in a jail (any jailer flag given). Called once the TLS
/// files are loaded and --laddr is bound; the peer stays in the host's
/// network namespace (its migration connections live there) and opens the
/// VM's tap ahead: the one its config or snapshot names, or, for a VM that
/// migrates in, every free tap of --netns. The work directory is writable.
fn jail(a: &Args) -> Result<Option<drafter_jail::Supervisor>, PeerError> {
    let cfg = |e: String| PeerError::Config(e);
    let mut o = a.jail.options("drafter-peer").map_err(cfg)?;
    o.write_dir(&a.work_dir);
    o.userfaultfd = matches!(a.resume_at, ResumeAt::Authority);
    let net = match (&a.config, &a.state, &a.memory) {
        (Some(c), ..) => {
            o.read_file(c);
            jail_config_paths(&mut o, &read_config(c)?, true)
        }
        (None, Some(state), Some(memory)) => {
            o.read_file(state).read_file(memory);
            let snap: drafter_vmm::Snapshot =
                drafter_vmm::persist::read_state_file(state).map_err(drafter_vmm::Error::from)?;
            jail_config_paths(&mut o, &snap.config, false)
        }
        _ => match package_of(a)? {
            Some(p) if a.raddr.is_none() => {
                for d in &p.devices.devices {
                    o.read_file(&d.path);
                }
                for (_, overlay) in &p.overlays {
                    if let Some(parent) = overlay.parent().filter(|p| !p.as_os_str().is_empty()) {
                        o.write_dir(parent);
                    }
                }
                let state = p.devices.path(drafter::devices::STATE);
                let snap: drafter_vmm::Snapshot = drafter_vmm::persist::read_state_file(&state)
                    .map_err(drafter_vmm::Error::from)?;
                // Drives come from the package and the vsock socket goes
                // into the work directory, not where the state says.
                let mut config = snap.config;
                config.drives.clear();
                config.vsock = None;
                jail_config_paths(&mut o, &config, false)
            }
            _ => None,
        },
    };
    // --netns replaces the namespace the VM names ("" is the current one).
    let override_ns = a.netns.as_ref().map(|n| (!n.is_empty()).then(|| n.clone()));
    let preopen = move || -> Result<(), String> {
        match (net, override_ns) {
            (Some((tap, named)), ns) => {
                Tap::preopen(&tap, ns.unwrap_or(named).as_deref()).map_err(|e| e.to_string())
            }
            (None, Some(Some(ns))) if a.raddr.is_some() => {
                let taps = Tap::preopen_all(&ns).map_err(|e| e.to_string())?;
                tracing::debug!(?taps, netns = %ns, "taps opened ahead");
                Ok(())
            }
            _ => Ok(()),
        }
    };
    enter_jail(o, preopen).map_err(cfg)
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum NoConvergence {
    /// Slow the vCPUs down (20 %, then +10 % per cycle, up to 95 %).
    Throttle,
    /// Fail the migration before suspending; the VM keeps running here.
    GiveUp,
    /// Keep cycling and stop at maxCycles whatever the dirty set.
    Stop,
}

fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
    Duration::try_from_secs_f64(v).map_err(|e| format!("{s:?}: {e}"))
}

/// Reports that a migration step starts (a `phase` event) and, if it is
/// the one `DRAFTER_PEER_STOP_AT` names, stops this process (once) until
/// it is continued.
fn phase_event(role: &'static str, phase: VmPhase) {
    event(
        "phase",
        serde_json::json!({ "role": role, "phase": phase.name() }),
    );
    static STOP_AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    static STOPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let stop_at = STOP_AT.get_or_init(|| std::env::var("DRAFTER_PEER_STOP_AT").ok());
    let Some(want) = stop_at.as_deref() else {
        return;
    };
    let (want_role, want_phase) = match want.split_once(':') {
        Some((r, p)) => (Some(r), p),
        None => (None, want),
    };
    if want_phase == phase.name()
        && want_role.is_none_or(|r| r == role)
        && !STOPPED.swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        // SAFETY: raise only sends a signal to this process; SIGSTOP cannot
        // be caught, so no handler runs.
        unsafe {
            libc::raise(libc::SIGSTOP);
        }
    }
}

fn event(name: &str, fields: serde_json::Value) {
    let mut v = serde_json::json!({ "event": name });
    if let (Some(o), serde_json::Value::Object(f)) = (v.as_object_mut(), fields) {
        o.extend(f);
    }
    eprintln!("{v}");
}

fn report_json(r: &drafter::migration::VmMigrationReport) -> serde_json::Value {
    serde_json::to_value(r).unwrap_or_default()
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg:>18} [{bar:30}] {pos}/{len} blocks")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn source_options(a: &Args) -> Result<SourceOptions, PeerError> {
    let mut o = SourceOptions::default();
    if let Some(j) = &a.devices {
        apply_devices_json(&mut o, j)?;
    }
    let secret = match &a.secret {
        Some(s) => s.clone(),
        None => std::env::var("DRAFTER_SECRET").unwrap_or_default(),
    };
    if secret.is_empty() {
        tracing::warn!("no secret given (--secret or DRAFTER_SECRET): any peer can take the VM");
    }
    o.migration.secret = Secret::new(secret);
    o.tls = a.tls.load().map_err(|e| match e {
        TlsArgsError::Tls(e) => PeerError::Tls(e),
        other => PeerError::Config(other.to_string()),
    })?;
    o.migration.compression = a.compress;
    o.migration.link_timeout = a.link_timeout;
    o.migration.max_downtime = Duration::from_millis(a.max_downtime);
    o.migration.on_no_convergence = match a.on_no_convergence {
        NoConvergence::Throttle => OnNoConvergence::Throttle,
        NoConvergence::GiveUp => OnNoConvergence::GiveUp,
        NoConvergence::Stop => OnNoConvergence::Stop,
    };
    o.unresolved_dir = Some(a.work_dir.join("unresolved"));
    o.migration.mode = match a.migration_mode {
        MigrationMode::PreCopy => Mode::PreCopy,
        MigrationMode::PostCopy => Mode::PostCopy,
    };
    Ok(o)
}

/// The package `--devices` names with `base` files, if any.
fn package_of(a: &Args) -> Result<Option<PeerPackage>, PeerError> {
    match &a.devices {
        Some(j) => PeerPackage::parse(j).map_err(|e| PeerError::Config(e.to_string())),
        None => Ok(None),
    }
}

fn run(mut a: Args, jailed: bool) -> Result<ExitStatus, PeerError> {
    if a.no_seccomp {
        drafter_vmm::seccomp::set_policy(drafter_vmm::seccomp::SeccompPolicy::OFF);
    }
    // The reference's "leave empty to disable".
    a.raddr = a.raddr.take().filter(|r| !r.is_empty());
    a.laddr = a.laddr.take().filter(|l| !l.is_empty());
    let options = source_options(&a)?;
    let package = package_of(&a)?;
    let origin = match (&a.config, &a.state, &a.memory, &a.raddr, package) {
        (Some(c), None, None, None, _) => Origin::Boot(read_config(c)?),
        (None, Some(s), Some(m), None, _) => Origin::Snapshot {
            state: s.clone(),
            memory: m.clone(),
        },
        (None, None, None, Some(r), _) => Origin::Migrate { raddr: r.clone() },
        (None, None, None, None, Some(p)) => Origin::Package(p),
        _ => {
            return Err(PeerError::Config(
                "nothing to run: give --config, --state with --memory, --raddr, or --devices with the package's base files".into(),
            ))
        }
    };
    let resume = match a.resume_at {
        ResumeAt::Complete => Resume::AfterComplete,
        ResumeAt::Authority => Resume::AtAuthority,
    };
    // Bind first: a bad or busy address fails before any VM starts.
    let listener = match a.laddr.as_deref().map(super::listen_addr) {
        Some(l) => Some(TcpListener::bind(&l).map_err(|source| PeerError::Io {
            what: format!("cannot listen on {l}"),
            source,
        })?),
        None => None,
    };
    if jailed {
        if let Some(supervisor) = jail(&a)? {
            std::process::exit(supervisor.run());
        }
    }
    let peer = Peer::start(
        origin,
        PeerOptions {
            source: options.clone(),
            resume,
            netns: a.netns.clone(),
            serial: Some(SerialConfig {
                stdout: a.enable_output,
                stdin: a.enable_input,
            }),
            agent_vsock_port: a.agent_vsock_port,
            resume_timeout: a.resume_timeout,
            rescue_timeout: a.rescue_timeout,
            fetch_concurrency: usize::try_from(a.concurrency).unwrap_or(usize::MAX),
            observer: Some(Arc::new(|p| phase_event("destination", p))),
            ..PeerOptions::new(&a.work_dir)
        },
    )?;
    match peer.incoming_report() {
        Some(r) => event(
            "migrated-in",
            serde_json::json!({ "report": report_json(r) }),
        ),
        None => event(
            "running",
            match peer.after_resume() {
                Some(h) => serde_json::json!({ "afterResume": h }),
                None => serde_json::json!({}),
            },
        ),
    }
    // The main thread, which serves migrations from here on (their threads
    // inherit it), under the main filter when the policy enables it
    // (DRAFTER_SECCOMP=main or all).
    drafter_vmm::seccomp::install(drafter_vmm::seccomp::ThreadKind::Main)
        .map_err(|e| PeerError::Config(e.to_string()))?;
    let waiter = peer.exit_waiter();
    std::thread::spawn(move || {
        let status = waiter.wait();
        if status != ExitStatus::Stopped {
            event(
                "vm-exited",
                serde_json::json!({ "status": format!("{status:?}") }),
            );
            std::process::exit(exit_code(&status));
        }
    });
    let Some(listener) = listener else {
        return Ok(peer.wait());
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    event("listening", serde_json::json!({ "addr": addr }));
    let bar = progress_bar();
    let b = bar.clone();
    let observer = Arc::new(move |p: &Progress| match p {
        Progress::Phase(phase) => {
            b.set_message(phase.to_string());
            phase_event("source", VmPhase::Engine(*phase));
        }
        Progress::Blocks { done, total } => {
            b.set_length(*total);
            b.set_position(*done);
        }
        Progress::Cycle { .. } => {}
    });
    let report = peer.serve(&listener, options, Some(observer), |e| {
        let mut fields = serde_json::json!({
            "error": e.to_string(),
            "sourceKeepsVm": e.source_keeps_authority(),
            "authority": e.authority().to_string(),
        });
        if let (
            drafter::migration::VmMigrationError::AuthorityUnknown {
                saved: Some(saved), ..
            },
            Some(o),
        ) = (e, fields.as_object_mut())
        {
            o.insert(
                "saved".into(),
                serde_json::json!({
                    "state": saved.0.display().to_string(),
                    "memory": saved.1.display().to_string(),
                }),
            );
        }
        event("migration-failed", fields)
    });
    bar.finish_and_clear();
    let report = report?;
    event(
        "migrated-out",
        serde_json::json!({ "report": report_json(&report) }),
    );
    Ok(ExitStatus::Stopped)
}

fn exit_code(status: &ExitStatus) -> i32 {
    match status {
        ExitStatus::Poweroff | ExitStatus::Stopped => 0,
        ExitStatus::Reboot => 2,
        _ => 1,
    }
}

/// Runs `drafter-peer` on this process's command line.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs `drafter-peer` on `argv` (`argv[0]` names the command in usage
/// lines, e.g. `drafter peer` when run as a subcommand of `drafter`).
pub fn main_from(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    super::init_tracing("error,drafter_peer=warn");
    let (args, matches) = super::parse_with_matches::<Args>(argv);
    let jailed = JailArgs::requested(&matches);
    match run(args, jailed) {
        Ok(ExitStatus::Error(e)) => {
            eprintln!("drafter-peer: VM failed: {e}");
            ExitCode::from(1)
        }
        Ok(status) => ExitCode::from(exit_code(&status) as u8),
        Err(e) => {
            eprintln!("drafter-peer: {e}");
            let unknown = matches!(
                &e,
                PeerError::Migration(m)
                    if m.authority() == drafter_storage::migrator::Authority::Unknown
            );
            ExitCode::from(if unknown { 3 } else { 1 })
        }
    }
}
