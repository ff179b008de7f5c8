//! `drafter-runner`: resumes a VM package in place (its memory file is guest
//! memory, its disk files are the drives) and, on SIGINT or SIGTERM, calls
//! the agent's `BeforeSuspend` hook and suspends the VM back into the same
//! files, so that the next run resumes from there.
//!
//! Reports go to stderr as text, or to stdout as one JSON object per line
//! with `--json`: `{"event":"resumed",…}` once the guest's `AfterResume`
//! hook has run, then `{"event":"suspended",…}`. Exit status: 0 once
//! suspended; 1 on any error (one line on stderr), including the VM ending
//! on its own (its state is then not written) and failures after the resume
//! (the VM is still suspended into the package within --rescue-timeout).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::{enter_jail, JailArgs};
use clap::builder::BoolishValueParser;
use clap::Parser;
use drafter::devices::{self as devs, PackageDevices, DEFAULT_PACKAGE_DEVICES};
use drafter::duration::parse_go_duration;
use drafter::package_config::PackageConfig;
use drafter::runner::{ResumeReport, RunEnd, Runner, RunnerError, RunnerOptions, SuspendReport};
use drafter::snapshotter::describe_exit;
use drafter_vmm::devices::virtio::net::Tap;
use indicatif::{ProgressBar, ProgressStyle};

/// Resume a VM package in place; SIGINT/SIGTERM suspend it back into the package.
#[derive(Parser, Debug)]
#[command(name = "drafter-runner", version)]
pub struct Args {
    /// Network namespace to run the VM in ("" for the current one)
    #[arg(long, default_value = "ark0")]
    netns: String,
    /// Devices configuration: [{"name","path"}]; state, memory, config and
    /// every drive in the package's config are required
    #[arg(long, default_value = DEFAULT_PACKAGE_DEVICES)]
    devices: String,
    /// Whether to enable VM stdin
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", value_parser = BoolishValueParser::new())]
    enable_input: bool,
    /// Whether to enable VM stdout and stderr (--enable-output=false to disable)
    #[arg(long, num_args = 0..=1, default_value = "true", default_missing_value = "true", value_parser = BoolishValueParser::new())]
    enable_output: bool,
    /// Maximum amount of time to wait for agent and liveness to resume (Go
    /// duration: 1m0s, 500ms); also bounds BeforeSuspend on a suspend
    #[arg(long, default_value = "1m0s", value_parser = parse_go_duration)]
    resume_timeout: Duration,
    /// Maximum amount of time to wait for rescue operations (BeforeSuspend
    /// when suspending after a failure)
    #[arg(long, default_value = "5s", value_parser = parse_go_duration)]
    rescue_timeout: Duration,
    /// Firecracker binary (accepted and ignored: the VMM is built in)
    #[arg(long, default_value = "firecracker")]
    firecracker_bin: String,
    /// Jailer binary (accepted and ignored: the VMM is built in)
    #[arg(long, default_value = "jailer")]
    jailer_bin: String,
    #[command(flatten)]
    jail: JailArgs,
    /// Print each report as one JSON object per line on stdout (the guest
    /// console, if enabled, then goes to stderr)
    #[arg(long)]
    json: bool,
    /// Run the VM without seccomp filters (for debugging only; vCPU
    /// threads are filtered by default, see DRAFTER_SECCOMP).
    #[arg(long)]
    no_seccomp: bool,
}

fn emit(json: bool, event: &str, value: serde_json::Value, human: String) {
    if json {
        let mut v = serde_json::json!({ "event": event });
        if let (Some(o), serde_json::Value::Object(f)) = (v.as_object_mut(), value) {
            o.extend(f);
        }
        println!("{v}");
    } else {
        eprintln!("{human}");
    }
}

fn resumed(json: bool, r: &ResumeReport) {
    let hook = r.after_resume_output.trim();
    emit(
        json,
        "resumed",
        serde_json::to_value(r).unwrap_or_default(),
        format!(
            "drafter-runner: resumed in {} ms (restore {} ms, vCPUs running at {} ms, AfterResume {} ms){}; Ctrl-C suspends it into the package",
            r.total_ms,
            r.restore_ms,
            r.resume_ms,
            r.after_resume_ms,
            if hook.is_empty() { String::new() } else { format!(", AfterResume said: {hook}") }
        ),
    );
}

fn suspended(json: bool, r: &SuspendReport) {
    let hook = r.before_suspend_output.trim();
    emit(
        json,
        "suspended",
        serde_json::to_value(r).unwrap_or_default(),
        format!(
            "drafter-runner: suspended into the package in {} ms (BeforeSuspend {} ms, state+memory+disks {} ms){}",
            r.total_ms,
            r.before_suspend_ms,
            r.suspend_ms,
            if hook.is_empty() { String::new() } else { format!(", BeforeSuspend said: {hook}") }
        ),
    );
}

fn spinner(json: bool, msg: &'static str) -> ProgressBar {
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(msg);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn run(a: Args) -> Result<(), RunnerError> {
    if a.no_seccomp {
        drafter_vmm::seccomp::set_policy(drafter_vmm::seccomp::SeccompPolicy::OFF);
    }
    let devices = PackageDevices::parse(&a.devices)?;
    // Registered before the resume: a signal during it suspends right after.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            tracing::warn!("cannot handle signal {sig}: {e}");
        }
    }
    let mut options = RunnerOptions::new(devices);
    options.netns = a.netns;
    options.enable_input = a.enable_input;
    options.enable_output = a.enable_output;
    options.resume_timeout = a.resume_timeout;
    options.rescue_timeout = a.rescue_timeout;
    if a.json && a.enable_output {
        options.console = Some(Box::new(std::io::stderr()));
    }
    let bar = spinner(a.json || a.enable_output, "resuming the package");
    let result = Runner::resume(options);
    bar.finish_and_clear();
    let (runner, report) = result?;
    resumed(a.json, &report);
    match runner.run_until(&stop)? {
        RunEnd::Suspended(r) => {
            suspended(a.json, &r);
            Ok(())
        }
        RunEnd::VmEnded(status) => Err(RunnerError::VmEnded(describe_exit(&status))),
    }
}

/// The directory holding `p` (`.` for a bare name).
fn dir_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Runs the VM in a jail (any jailer flag given): the package's files are
/// the VM's (handed to --uid/--gid), the state's directory is writable (the
/// suspend renames the new state over the old), the tap is opened ahead.
fn jail(a: &Args) -> Result<Option<drafter_jail::Supervisor>, String> {
    let devices = PackageDevices::parse(&a.devices).map_err(|e| e.to_string())?;
    let mut o = a.jail.options("drafter-runner")?;
    let state = devices.path(devs::STATE);
    o.write_dir(dir_of(&state));
    let drives: Vec<String> = PackageConfig::read(&devices.path(devs::CONFIG))
        .map(|c| c.drives.into_iter().map(|d| d.name).collect())
        .unwrap_or_default();
    for d in &devices.devices {
        if d.name == devs::STATE || d.name == devs::MEMORY || drives.contains(&d.name) {
            o.write_file(&d.path);
        } else {
            o.read_file(&d.path);
        }
    }
    // The tap the state names, opened in --netns (which the jail joins).
    let snap: Option<drafter_vmm::Snapshot> = drafter_vmm::persist::read_state_file(&state).ok();
    let tap = snap.and_then(|s| s.config.net).map(|n| n.tap);
    let netns = (!a.netns.is_empty()).then(|| a.netns.clone());
    if tap.is_some() {
        o.netns = netns.clone();
    }
    enter_jail(o, || match &tap {
        Some(t) => Tap::preopen(t, netns.as_deref()).map_err(|e| e.to_string()),
        None => Ok(()),
    })
}

/// Runs `drafter-runner` on this process's command line.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs `drafter-runner` on `argv` (`argv[0]` names the command in usage
/// lines, e.g. `drafter runner` when run as a subcommand of `drafter`).
pub fn main_from(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    super::init_tracing("error");
    let (args, matches) = super::parse_with_matches::<Args>(argv);
    if let Some(code) = super::enter_jail_if_requested("drafter-runner", &matches, || jail(&args)) {
        return code;
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drafter-runner: {e}");
            ExitCode::from(1)
        }
    }
}
