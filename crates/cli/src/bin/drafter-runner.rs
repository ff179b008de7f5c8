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

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::Parser;
use drafter::devices::{PackageDevices, DEFAULT_PACKAGE_DEVICES};
use drafter::duration::parse_go_duration;
use drafter::runner::{ResumeReport, RunEnd, Runner, RunnerError, RunnerOptions, SuspendReport};
use drafter::snapshotter::describe_exit;
use indicatif::{ProgressBar, ProgressStyle};

/// Resume a VM package in place; SIGINT/SIGTERM suspend it back into the package.
#[derive(Parser, Debug)]
#[command(name = "drafter-runner", version)]
struct Args {
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
    /// User ID for the VMM process (accepted; not honoured yet: isolation is
    /// a separate issue)
    #[arg(long, default_value_t = 0)]
    uid: u32,
    /// Group ID for the VMM process (accepted; not honoured yet)
    #[arg(long, default_value_t = 0)]
    gid: u32,
    /// chroot base directory (accepted; not honoured yet)
    #[arg(long, default_value = "out/vms")]
    chroot_base_dir: String,
    /// Cgroup version to use for isolation (accepted; not honoured yet)
    #[arg(long, default_value_t = 2)]
    cgroup_version: u32,
    /// NUMA node to run the VM in (accepted; not honoured yet)
    #[arg(long, default_value_t = 0)]
    numa_node: u32,
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drafter-runner: {e}");
            ExitCode::from(1)
        }
    }
}
