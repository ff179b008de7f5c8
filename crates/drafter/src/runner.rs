//! The runner (the library behind `drafter-runner`): resumes a package in
//! place and suspends it back into the same files.
//!
//! Guest memory is the package's `memory` file mapped shared, and the drives
//! are the package's disk files, read-write: while the VM runs, the package
//! *is* the VM. [`Runner::resume`] restores the VM from the package's
//! `state`, resumes it and calls the agent's `AfterResume` hook (the agent
//! reconnecting and answering is the liveness signal after a resume; the
//! guest's one-shot liveness signal is sent only at boot).
//! [`Runner::suspend`] calls `BeforeSuspend`, pauses, writes the state to
//! `state.partial`, writes guest memory and disks back, and only then
//! renames `state.partial` over `state`, so the package is consistent
//! whenever `state` changes. If anything fails after the VM resumed, the
//! runner still suspends it in place ("rescue", with `BeforeSuspend` bounded
//! by the rescue timeout) before reporting the failure.
//!
//! While the VM runs, the package is marked in use ([`crate::in_use`]): a
//! second runner is refused, and so is a package whose last run ended
//! without a suspend (its memory and disks no longer match its state).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use drafter_guest::HostError;
use drafter_vmm::config::SerialConfig;
use drafter_vmm::device_manager::ConsoleOut;
use drafter_vmm::persist;
use drafter_vmm::{ExitStatus, ExitWaiter, RestoreMemory, Snapshot, Vmm};
use serde::Serialize;

use crate::agent::GuestAgent;
use crate::devices::{self, DevicesError, PackageDevices};
use crate::files;
use crate::in_use::{InUse, InUseError};
use crate::package_config::{PackageConfig, PackageConfigError};
use crate::snapshotter::describe_exit;

/// How to run a package.
pub struct RunnerOptions {
    /// The package's devices (`--devices`).
    pub devices: PackageDevices,
    /// Network namespace holding the package's tap (empty: the current one).
    pub netns: String,
    /// Feed stdin to the guest's serial console.
    pub enable_input: bool,
    /// Copy the guest's serial console to stdout (or to `console`).
    pub enable_output: bool,
    /// Longest wait for the agent's `AfterResume` after a resume, and for
    /// `BeforeSuspend` before a suspend.
    pub resume_timeout: Duration,
    /// Longest wait for `BeforeSuspend` when suspending after a failure.
    pub rescue_timeout: Duration,
    /// Where the guest console goes instead of stdout (used when
    /// `enable_output` is set).
    pub console: Option<ConsoleOut>,
}

impl RunnerOptions {
    /// The reference's defaults (`--netns ark0`, output on, resume timeout
    /// one minute, rescue timeout five seconds) for these devices.
    pub fn new(devices: PackageDevices) -> Self {
        Self {
            devices,
            netns: "ark0".into(),
            enable_input: false,
            enable_output: true,
            resume_timeout: Duration::from_secs(60),
            rescue_timeout: Duration::from_secs(5),
            console: None,
        }
    }
}

/// What a resume took.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResumeReport {
    /// Reading the state and rebuilding the VM (memory mapped, devices
    /// restored), in milliseconds.
    pub restore_ms: u64,
    /// From the start to vCPUs running again.
    pub resume_ms: u64,
    /// The agent's `AfterResume` call (including its reconnection).
    pub after_resume_ms: u64,
    /// From the start to `AfterResume` done: the guest is ready.
    pub total_ms: u64,
    /// Standard output of the `AfterResume` hook.
    pub after_resume_output: String,
}

/// What a suspend took.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SuspendReport {
    /// The agent's `BeforeSuspend` call.
    pub before_suspend_ms: u64,
    /// From pausing to state, memory and disks on stable storage.
    pub suspend_ms: u64,
    /// Everything.
    pub total_ms: u64,
    /// Standard output of the `BeforeSuspend` hook (empty if it failed).
    pub before_suspend_output: String,
    /// Why `BeforeSuspend` failed, if it did (the VM was suspended anyway).
    pub before_suspend_error: Option<String>,
}

/// How [`Runner::run_until`] ended.
#[derive(Debug)]
pub enum RunEnd {
    /// Stopped on request and suspended into the package.
    Suspended(SuspendReport),
    /// The VM itself ended; the package's state was left as it was.
    VmEnded(ExitStatus),
}

/// Why running a package failed.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// Bad `--devices`.
    #[error(transparent)]
    Devices(#[from] DevicesError),
    /// Bad `config.json`.
    #[error(transparent)]
    Config(#[from] PackageConfigError),
    /// A package file cannot be used.
    #[error("device {name:?}: {path}: {source}")]
    File {
        /// The device.
        name: String,
        /// Its file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The state does not match the package's config.
    #[error("package state {path} does not match its config: {reason}")]
    Mismatch {
        /// The state file.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// The VMM failed.
    #[error("{what}: {source}")]
    Vmm {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: drafter_vmm::Error,
    },
    /// The agent failed.
    #[error("{what}: {source}")]
    Guest {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: HostError,
    },
    /// Another run holds the package, or the last one ended without a
    /// suspend (see [`crate::in_use`]).
    #[error(transparent)]
    InUse(#[from] InUseError),
    /// The agent's `BeforeSuspend` hook failed (the VM was suspended anyway).
    #[error("the agent's BeforeSuspend hook failed: {0}")]
    BeforeSuspend(String),
    /// The VM ended on its own.
    #[error("the VM ended: {0}; the package's state was not updated")]
    VmEnded(String),
    /// Something failed after the VM resumed; the runner then tried to
    /// suspend it back into the package.
    #[error("{cause}; {}", rescue_outcome(.rescue))]
    Rescued {
        /// What failed.
        cause: Box<RunnerError>,
        /// How the rescue went.
        rescue: Result<(), Box<RunnerError>>,
    },
}

fn rescue_outcome(rescue: &Result<(), Box<RunnerError>>) -> String {
    match rescue {
        Ok(()) => "the VM was suspended back into the package".to_owned(),
        Err(e) => format!("suspending it into the package failed too: {e}"),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A package's VM, running.
pub struct Runner {
    vmm: Vmm,
    agent: GuestAgent,
    state_path: PathBuf,
    flush: Vec<(String, PathBuf)>,
    resume_timeout: Duration,
    rescue_timeout: Duration,
    /// The package's in-use mark, released by a completed suspend only.
    in_use: Option<InUse>,
    // Holds the vsock sockets and the rewritten state; removed on drop.
    _work: tempfile::TempDir,
}

fn file_err(name: &str, path: &Path) -> impl FnOnce(std::io::Error) -> RunnerError {
    let (name, path) = (name.to_owned(), path.to_path_buf());
    move |source| RunnerError::File { name, path, source }
}

/// Checks the devices against the package's config and the files on disk,
/// and returns the config.
fn check_package(devices: &PackageDevices) -> Result<PackageConfig, RunnerError> {
    let config = PackageConfig::read(&devices.path(devices::CONFIG))?;
    devices.check_drives(config.drives.iter().map(|d| d.name.as_str()))?;
    if config.initramfs && devices.get(devices::INITRAMFS).is_none() {
        // Not needed to resume (the kernel is in guest memory), but a
        // package without it cannot be booted again: say so.
        tracing::debug!("the package's initramfs device is not given");
    }
    for d in &devices.devices {
        let meta = std::fs::metadata(&d.path).map_err(file_err(&d.name, &d.path))?;
        if !meta.is_file() {
            return Err(file_err(&d.name, &d.path)(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
    }
    Ok(config)
}

impl Runner {
    /// Resumes the package: restores the VM from its `state` with its
    /// `memory` file as guest memory, resumes it, and calls `AfterResume`
    /// within the resume timeout. If `AfterResume` fails, the VM is
    /// suspended back into the package before the error is returned.
    pub fn resume(mut options: RunnerOptions) -> Result<(Runner, ResumeReport), RunnerError> {
        let start = Instant::now();
        let devices = &options.devices;
        let config = check_package(devices)?;
        let state_path = devices.path(devices::STATE);
        let mut snap: Snapshot = persist::read_state_file(&state_path)
            .map_err(drafter_vmm::Error::from)
            .map_err(|source| RunnerError::Vmm {
                what: "cannot read the package's state",
                source,
            })?;
        let mismatch = |reason: String| RunnerError::Mismatch {
            path: state_path.clone(),
            reason,
        };
        if snap.config.vcpus != config.cpu_count {
            return Err(mismatch(format!(
                "{} vCPUs, config says {}",
                snap.config.vcpus, config.cpu_count
            )));
        }
        if snap.memory_size != config.memory_size << 20 {
            return Err(mismatch(format!(
                "{} bytes of memory, config says {} MiB",
                snap.memory_size, config.memory_size
            )));
        }
        let names: Vec<&str> = snap.config.drives.iter().map(|d| d.name.as_str()).collect();
        let expected: Vec<&str> = config.drives.iter().map(|d| d.name.as_str()).collect();
        if names != expected {
            return Err(mismatch(format!(
                "drives [{}], config says [{}]",
                names.join(", "),
                expected.join(", ")
            )));
        }
        // The template is re-checked against this host by the restore.
        if config.template().ok() != Some(snap.config.cpu_template) {
            return Err(mismatch(format!(
                "CPU template {}, config says {}",
                snap.config.cpu_template, config.cpu_template
            )));
        }
        let memory_path = devices.path(devices::MEMORY);
        let memory_len = std::fs::metadata(&memory_path)
            .map_err(file_err(devices::MEMORY, &memory_path))?
            .len();
        if memory_len != snap.memory_size {
            return Err(file_err(devices::MEMORY, &memory_path)(
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "holds {memory_len} bytes, the package's VM has {}",
                        snap.memory_size
                    ),
                ),
            ));
        }

        // Point the state at this run: the package's files, a fresh vsock
        // socket, this namespace and console.
        let work = tempfile::Builder::new()
            .prefix("drafter-runner-")
            .tempdir()
            .map_err(file_err("vsock", &std::env::temp_dir()))?;
        let uds = work.path().join("vsock.sock");
        if let Some(k) = devices.get(devices::KERNEL) {
            snap.config.kernel = k.path.clone();
        }
        if let Some(i) = devices.get(devices::INITRAMFS) {
            snap.config.initramfs = Some(i.path.clone());
        }
        let mut flush = vec![(devices::MEMORY.to_owned(), memory_path.clone())];
        for d in &mut snap.config.drives {
            d.path = devices.path(&d.name);
            flush.push((d.name.clone(), d.path.clone()));
        }
        if let Some(net) = &mut snap.config.net {
            net.netns = (!options.netns.is_empty()).then(|| options.netns.clone());
        }
        match &mut snap.config.vsock {
            Some(v) => v.uds_path = uds.clone(),
            None => {
                return Err(mismatch("the VM has no vsock device".into()));
            }
        }
        snap.config.serial = SerialConfig {
            stdout: options.enable_output,
            stdin: options.enable_input,
        };
        let run_state = work.path().join("state.bin");
        persist::write_state_file(&run_state, &snap)
            .map_err(drafter_vmm::Error::from)
            .map_err(|source| RunnerError::Vmm {
                what: "cannot prepare the state",
                source,
            })?;
        let agent = GuestAgent::listen(&uds, config.agent_vsock_port).map_err(|source| {
            RunnerError::Guest {
                what: "cannot listen for the agent",
                source,
            }
        })?;
        let console = if options.enable_output {
            options.console.take()
        } else {
            None
        };
        // From the restore on, the package's memory and disks may move
        // ahead of its state until a suspend puts them back in step.
        let in_use = InUse::acquire(&state_path)?;
        let mut vmm = match Vmm::restore(&run_state, RestoreMemory::Shared(memory_path), console) {
            Ok(vmm) => vmm,
            Err(source) => {
                // The guest never ran: the package is as it was.
                in_use.release()?;
                return Err(RunnerError::Vmm {
                    what: "cannot restore the VM",
                    source,
                });
            }
        };
        let restore_ms = ms(start.elapsed());
        // From here on the guest may write the package's memory and disks.
        let resumed = vmm.resume();
        let resume_ms = ms(start.elapsed());
        let mut runner = Runner {
            vmm,
            agent,
            state_path,
            flush,
            resume_timeout: options.resume_timeout,
            rescue_timeout: options.rescue_timeout,
            in_use: Some(in_use),
            _work: work,
        };
        if let Err(source) = resumed {
            return Err(runner.rescue(RunnerError::Vmm {
                what: "cannot resume the VM",
                source,
            }));
        }
        let call = runner.agent.after_resume(options.resume_timeout);
        let after_resume_ms = call.ms();
        match call.result {
            Ok(hook) => Ok((
                runner,
                ResumeReport {
                    restore_ms,
                    resume_ms,
                    after_resume_ms,
                    total_ms: ms(start.elapsed()),
                    after_resume_output: hook.stdout,
                },
            )),
            Err(source) => {
                let ended = runner.vmm.exit_waiter().get();
                let cause = match ended {
                    Some(status) => RunnerError::VmEnded(describe_exit(&status)),
                    None => RunnerError::Guest {
                        what: "the agent's AfterResume hook failed",
                        source,
                    },
                };
                Err(runner.rescue(cause))
            }
        }
    }

    /// A handle to wait for the VM's end from another thread.
    pub fn exit_waiter(&self) -> ExitWaiter {
        self.vmm.exit_waiter()
    }

    /// Runs until `stop` is set (then suspends into the package) or the VM
    /// ends on its own (then leaves the package's state alone).
    pub fn run_until(self, stop: &AtomicBool) -> Result<RunEnd, RunnerError> {
        let waiter = self.vmm.exit_waiter();
        loop {
            if let Some(status) = waiter.wait_timeout(Duration::from_millis(100)) {
                let mut this = self;
                this.vmm.stop();
                return Ok(RunEnd::VmEnded(status));
            }
            if stop.load(Ordering::SeqCst) {
                return self.suspend().map(RunEnd::Suspended);
            }
        }
    }

    /// Calls `BeforeSuspend` (within the resume timeout), pauses, and writes
    /// the VM back into the package: state, memory, disks. If the hook
    /// fails, the VM is suspended anyway and the error returned says so.
    pub fn suspend(mut self) -> Result<SuspendReport, RunnerError> {
        let timeout = self.resume_timeout;
        let report = self.suspend_in_place(timeout)?;
        match &report.before_suspend_error {
            Some(e) => Err(RunnerError::Rescued {
                cause: Box::new(RunnerError::BeforeSuspend(e.clone())),
                rescue: Ok(()),
            }),
            None => Ok(report),
        }
    }

    /// Suspends in place after `cause` (rescue timeout for the hook) and
    /// wraps both outcomes into one error.
    fn rescue(mut self, cause: RunnerError) -> RunnerError {
        if matches!(cause, RunnerError::VmEnded(_)) || self.vmm.exit_waiter().get().is_some() {
            // Nothing left to suspend; do not overwrite the state.
            self.vmm.stop();
            return cause;
        }
        tracing::warn!("{cause}; suspending the VM back into the package");
        let timeout = self.rescue_timeout;
        let rescue = self.suspend_in_place(timeout).map(|_| ()).map_err(Box::new);
        RunnerError::Rescued {
            cause: Box::new(cause),
            rescue,
        }
    }

    fn suspend_in_place(&mut self, hook_timeout: Duration) -> Result<SuspendReport, RunnerError> {
        let start = Instant::now();
        let call = self.agent.before_suspend(hook_timeout);
        let (before_suspend_ms, before_suspend_output, before_suspend_error) =
            (call.ms(), call.output(), call.error());
        let pause_start = Instant::now();
        let vmm_err = |what: &'static str| move |source| RunnerError::Vmm { what, source };
        if let Some(status) = self.vmm.exit_waiter().get() {
            self.vmm.stop();
            return Err(RunnerError::VmEnded(describe_exit(&status)));
        }
        self.vmm.pause().map_err(vmm_err("cannot pause the VM"))?;
        let partial = files::partial_path(&self.state_path);
        let written = self.vmm.snapshot_state(&partial);
        if written.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        written.map_err(vmm_err("cannot write the VM state"))?;
        let finish = (|| {
            self.vmm
                .msync()
                .map_err(vmm_err("cannot write guest memory"))?;
            for (name, path) in &self.flush {
                files::fsync(path).map_err(file_err(name, path))?;
            }
            std::fs::rename(&partial, &self.state_path)
                .map_err(file_err(devices::STATE, &self.state_path))?;
            let _ = files::fsync_dir_of(&self.state_path);
            // State, memory and disks are in step again.
            if let Some(mark) = self.in_use.take() {
                mark.release()?;
            }
            Ok::<(), RunnerError>(())
        })();
        if finish.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        finish?;
        self.vmm.stop();
        Ok(SuspendReport {
            before_suspend_ms,
            suspend_ms: ms(pause_start.elapsed()),
            total_ms: ms(start.elapsed()),
            before_suspend_output,
            before_suspend_error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_package_that_does_not_fit_is_refused_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = |n: &str| dir.path().join(n);
        let json = serde_json::json!([
            {"name": "state", "path": p("state.bin")},
            {"name": "memory", "path": p("memory.bin")},
            {"name": "config", "path": p("config.json")},
            {"name": "disk", "path": p("rootfs.ext4")},
        ])
        .to_string();
        let devices = PackageDevices::parse(&json).unwrap_or_else(|e| panic!("{e}"));
        let err = |d: &PackageDevices| {
            Runner::resume(RunnerOptions::new(d.clone()))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let e = err(&devices);
        assert!(e.contains("config.json"), "{e}");
        let config = crate::package_config::PackageConfig {
            format_version: crate::package_config::PACKAGE_FORMAT_VERSION,
            agent_vsock_port: 26,
            liveness_vsock_port: 25,
            cpu_count: 1,
            memory_size: 64,
            boot_args: String::new(),
            initramfs: false,
            drives: vec![
                crate::package_config::PackageDrive {
                    name: "disk".into(),
                    read_only: false,
                },
                crate::package_config::PackageDrive {
                    name: "oci".into(),
                    read_only: false,
                },
            ],
            vsock_cid: 3,
            network: None,
            cpu_template: "None".into(),
        };
        std::fs::write(p("config.json"), config.to_json()).unwrap_or_else(|e| panic!("{e}"));
        let e = err(&devices);
        assert!(e.contains("missing required device(s) oci"), "{e}");
        let mut with_oci = devices.clone();
        with_oci.devices.push(crate::devices::PackageDevice {
            name: "oci".into(),
            path: p("oci.ext4"),
        });
        let e = err(&with_oci);
        assert!(
            e.contains("device \"state\"") && e.contains("state.bin"),
            "{e}"
        );
        for f in ["state.bin", "memory.bin", "rootfs.ext4", "oci.ext4"] {
            std::fs::write(p(f), b"junk").unwrap_or_else(|e| panic!("{e}"));
        }
        let e = err(&with_oci);
        assert!(e.contains("cannot read the package's state"), "{e}");
        assert_eq!(std::fs::read(p("state.bin")).ok(), Some(b"junk".to_vec()));
    }
}
