//! `drafter-snapshotter`: creates a VM package from a blueprint. Copies each
//! device's input to its output, boots the VM from the copies inside the
//! network namespace, waits for the guest's liveness signal, calls the
//! agent's `BeforeSuspend` hook and writes the snapshot (`state`, `memory`,
//! disks) and `config`. Nothing is left half-written on failure.
//!
//! Prints a report (human-readable, or one JSON object with `--json`) on
//! stdout; exit status 0 on success, 1 on any error (one line on stderr).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::{enter_jail, JailArgs};
use clap::builder::BoolishValueParser;
use clap::Parser;
use drafter::devices::{SnapshotDevices, DEFAULT_SNAPSHOT_DEVICES};
use drafter::duration::parse_go_duration;
use drafter::snapshotter::{
    snapshot, SnapshotProgress, SnapshotReport, SnapshotterError, SnapshotterOptions,
    DEFAULT_BOOT_ARGS, DEFAULT_MAC,
};
use drafter_vmm::devices::virtio::net::Tap;
use indicatif::{ProgressBar, ProgressStyle};

/// Create a VM package from a blueprint: boot it, wait for the guest, snapshot it.
#[derive(Parser, Debug)]
#[command(name = "drafter-snapshotter", version)]
pub struct Args {
    /// Network namespace to run the VM in ("" for the current one)
    #[arg(long, default_value = "ark0")]
    netns: String,
    /// CPU count
    #[arg(long, default_value_t = 1)]
    cpu_count: u8,
    /// Memory size (in MB)
    #[arg(long, default_value_t = 1024)]
    memory_size: u64,
    /// Boot/kernel arguments (the reference's default plus reboot=k, which
    /// our VMM needs to see a guest reboot)
    #[arg(long, default_value = DEFAULT_BOOT_ARGS)]
    boot_args: String,
    /// Agent VSock port
    #[arg(long, default_value_t = 26)]
    agent_vsock_port: u32,
    /// Liveness VSock port
    #[arg(long, default_value_t = 25)]
    liveness_vsock_port: u32,
    /// Maximum amount of time to wait for agent and liveness to resume (Go
    /// duration: 1m0s, 500ms)
    #[arg(long, default_value = "1m0s", value_parser = parse_go_duration)]
    resume_timeout: Duration,
    /// Whether to enable VM stdin
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = BoolishValueParser::new())]
    enable_input: bool,
    /// Whether to enable VM stdout and stderr (--enable-output=false to disable)
    #[arg(long, num_args = 0..=1, default_value = "true", default_missing_value = "true", value_parser = BoolishValueParser::new())]
    enable_output: bool,
    /// Name of the interface in the network namespace to use ("" for no network)
    #[arg(long, default_value = "tap0")]
    interface: String,
    /// MAC of the interface in the network namespace to use
    #[arg(long, default_value = DEFAULT_MAC)]
    mac: String,
    /// CPU template, recorded in the package and checked on every resume
    /// (case-insensitive): "None" (the host's CPUID: the package resumes only
    /// on hosts with at least its features), "X86_64_V2" (x86-64-v2: SSE4.2,
    /// POPCNT, CX16, LAHF; no AVX) or "X86_64_V3" (x86-64-v3: v2 plus AVX,
    /// AVX2, BMI1/2, FMA, F16C, MOVBE, LZCNT, XSAVE; no AVX-512, AMX, TSX,
    /// PKU). A template the host's KVM cannot give is refused naming the
    /// missing features
    #[arg(long, default_value = "None")]
    cpu_template: String,
    /// Devices configuration: [{"name","input","output"}]; state, memory and
    /// config take only an output; kernel, optional initramfs, disk and any
    /// other device (a drive, in the order given; the first is /dev/vda)
    /// take an input
    #[arg(long, default_value = DEFAULT_SNAPSHOT_DEVICES)]
    devices: String,
    /// Firecracker binary (accepted and ignored: the VMM is built in)
    #[arg(long, default_value = "firecracker")]
    firecracker_bin: String,
    /// Jailer binary (accepted and ignored: the VMM is built in)
    #[arg(long, default_value = "jailer")]
    jailer_bin: String,
    #[command(flatten)]
    jail: JailArgs,
    /// Print the report as one JSON object (the guest console, if enabled,
    /// then goes to stderr)
    #[arg(long)]
    json: bool,
    /// Run the VM without seccomp filters (for debugging only; vCPU
    /// threads are filtered by default, see DRAFTER_SECCOMP).
    #[arg(long)]
    no_seccomp: bool,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn print_report(r: &SnapshotReport) {
    println!("package written in {} ms:", r.total_ms);
    println!("  copy inputs        {:>7} ms", r.copy_ms);
    println!("  boot to liveness   {:>7} ms", r.boot_to_liveness_ms);
    println!("  BeforeSuspend      {:>7} ms", r.before_suspend_ms);
    println!("  snapshot           {:>7} ms", r.snapshot_ms);
    let hook = r.before_suspend_output.trim();
    if !hook.is_empty() {
        println!("  BeforeSuspend said: {hook}");
    }
    for d in &r.devices {
        println!(
            "  {:<10} {:>11} ({} on disk)  {}",
            d.name,
            mib(d.size),
            mib(d.allocated),
            d.path.display()
        );
    }
}

fn run(a: Args) -> Result<SnapshotReport, SnapshotterError> {
    if a.no_seccomp {
        drafter_vmm::seccomp::set_policy(drafter_vmm::seccomp::SeccompPolicy::OFF);
    }
    let devices = SnapshotDevices::parse(&a.devices)?;
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, cancel.clone())
            .map_err(|e| SnapshotterError::Options(format!("cannot handle signals: {e}")))?;
    }
    let mut options = SnapshotterOptions::new(devices);
    options.netns = a.netns;
    options.cpu_count = a.cpu_count;
    options.memory_size_mib = a.memory_size;
    options.boot_args = a.boot_args;
    options.agent_vsock_port = a.agent_vsock_port;
    options.liveness_vsock_port = a.liveness_vsock_port;
    options.resume_timeout = a.resume_timeout;
    options.enable_input = a.enable_input;
    options.enable_output = a.enable_output;
    options.interface = a.interface;
    options.mac = a.mac;
    options.cpu_template = a.cpu_template;
    options.cancel = Some(cancel);
    if a.json && a.enable_output {
        options.console = Some(Box::new(std::io::stderr()));
    }
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    bar.enable_steady_tick(Duration::from_millis(120));
    let spinner = ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let bytes = ProgressStyle::with_template("{msg:>20} [{bar:30}] {bytes}/{total_bytes}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(spinner.clone());
    let mut copying = false;
    let result = snapshot(options, &mut |p| match p {
        SnapshotProgress::Step(step) => {
            if copying {
                bar.set_style(spinner.clone());
                copying = false;
            }
            bar.set_message(step);
        }
        SnapshotProgress::Copy {
            device,
            done,
            total,
        } => {
            if !copying {
                bar.set_style(bytes.clone());
                copying = true;
            }
            bar.set_message(format!("copying {device}"));
            bar.set_length(total);
            bar.set_position(done);
        }
    });
    bar.finish_and_clear();
    result
}

/// The directory holding `p` (`.` for a bare name).
fn dir_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Runs the VM in a jail (any jailer flag given): the inputs are read-only,
/// the outputs' directories writable (every output is written as
/// `<output>.partial` and renamed into place) and handed to --uid/--gid,
/// the tap is opened ahead in --netns (which the jail joins).
fn jail(a: &Args) -> Result<Option<drafter_jail::Supervisor>, String> {
    let devices = SnapshotDevices::parse(&a.devices).map_err(|e| e.to_string())?;
    let mut o = a.jail.options("drafter-snapshotter")?;
    for d in &devices.devices {
        if let Some(input) = &d.input {
            o.read_file(input);
        }
        o.write_dir(dir_of(&d.output));
    }
    let netns = (!a.netns.is_empty()).then(|| a.netns.clone());
    let tap = (!a.interface.is_empty()).then(|| a.interface.clone());
    if tap.is_some() {
        o.netns = netns.clone();
    }
    enter_jail(o, || match &tap {
        Some(t) => Tap::preopen(t, netns.as_deref()).map_err(|e| e.to_string()),
        None => Ok(()),
    })
}

/// Runs `drafter-snapshotter` on this process's command line.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs `drafter-snapshotter` on `argv` (`argv[0]` names the command in usage
/// lines, e.g. `drafter snapshotter` when run as a subcommand of `drafter`).
pub fn main_from(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    super::init_tracing("error");
    let (args, matches) = super::parse_with_matches::<Args>(argv);
    if let Some(code) =
        super::enter_jail_if_requested("drafter-snapshotter", &matches, || jail(&args))
    {
        return code;
    }
    let json = args.json;
    match run(args) {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_value(&report).unwrap_or_default());
            } else {
                print_report(&report);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("drafter-snapshotter: {e}");
            ExitCode::from(1)
        }
    }
}
