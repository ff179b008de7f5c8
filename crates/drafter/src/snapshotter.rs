//! The snapshotter (the library behind `drafter-snapshotter`): turns a
//! blueprint into a package.
//!
//! It copies every device's `input` to its `output` (sparsely: the package
//! never aliases the blueprint), boots the VM from the copies (kernel,
//! optional `initramfs`, every other device with an input as a read-write
//! virtio-blk drive in the order given) with guest memory backed by the
//! `memory` output, waits for the guest's liveness signal, calls the agent's
//! `BeforeSuspend` hook, pauses, and writes `state`, the memory and the
//! disks to stable storage and `config` last. Every output is written as
//! `<output>.partial` and renamed into place only once all of them are
//! complete, so a failure (or a cancel) leaves no half-written package, and
//! the directories it created are removed again.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drafter_guest::{AgentServer, HostError, LivenessServer};
use drafter_vmm::config::{DriveConfig, NetConfig, SerialConfig, VsockConfig};
use drafter_vmm::device_manager::ConsoleOut;
use drafter_vmm::{BuildOptions, CpuTemplate, ExitStatus, VmConfig, Vmm};
use serde::Serialize;

use crate::devices::{self, DevicesError, SnapshotDevices};
use crate::files::{self, Created};
use crate::in_use::{InUse, InUseError};
use crate::package_config::{
    PackageConfig, PackageDrive, PackageNetwork, CPU_TEMPLATE_NONE, PACKAGE_FORMAT_VERSION,
};

/// The reference Drafter's default kernel command line plus `reboot=k` (our
/// VMM sees a guest reboot through the keyboard controller). It works for
/// our `os` blueprint too: its initramfs mounts `/dev/vda` (or
/// `drafter.root=`) itself, so `root=` and `rootfstype=` are harmless.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 panic=1 pci=off modules=ext4 rootfstype=ext4 root=/dev/vda i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd rootflags=rw printk.devkmsg=on printk_ratelimit=0 printk_ratelimit_burst=0 reboot=k";

/// The reference Drafter's default guest MAC.
pub const DEFAULT_MAC: &str = "02:0e:d9:fd:68:3d";

/// Guest vsock CID of every package.
pub const VSOCK_CID: u32 = 3;

/// How to take the snapshot.
pub struct SnapshotterOptions {
    /// The devices (`--devices`).
    pub devices: SnapshotDevices,
    /// Network namespace holding the tap (empty: the current one).
    pub netns: String,
    /// vCPUs.
    pub cpu_count: u8,
    /// Guest memory in MiB.
    pub memory_size_mib: u64,
    /// Kernel command line.
    pub boot_args: String,
    /// Guest vsock port of the agent.
    pub agent_vsock_port: u32,
    /// Guest vsock port of the liveness signal.
    pub liveness_vsock_port: u32,
    /// Longest wait for the liveness signal, and for the `BeforeSuspend` hook.
    pub resume_timeout: Duration,
    /// Feed stdin to the guest's serial console.
    pub enable_input: bool,
    /// Copy the guest's serial console to stdout (unless `console` is given).
    pub enable_output: bool,
    /// Tap device in the namespace (empty: no network interface).
    pub interface: String,
    /// Guest MAC address.
    pub mac: String,
    /// CPU template by name ([`drafter_vmm::CpuTemplate`]: `None`, the
    /// host's CPUID, or a portable baseline `X86_64_V2`, `X86_64_V3`;
    /// case-insensitive).
    pub cpu_template: String,
    /// Where the guest console goes instead of stdout (used when
    /// `enable_output` is set).
    pub console: Option<ConsoleOut>,
    /// Set to abandon the snapshot (e.g. on SIGINT); outputs are removed.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl SnapshotterOptions {
    /// The reference's defaults (`--netns ark0`, one vCPU, 1024 MiB, ports
    /// 26 and 25, one minute, output on, `tap0`, its MAC, template `None`)
    /// for these devices.
    pub fn new(devices: SnapshotDevices) -> Self {
        Self {
            devices,
            netns: "ark0".into(),
            cpu_count: 1,
            memory_size_mib: 1024,
            boot_args: DEFAULT_BOOT_ARGS.into(),
            agent_vsock_port: 26,
            liveness_vsock_port: 25,
            resume_timeout: Duration::from_secs(60),
            enable_input: false,
            enable_output: true,
            interface: "tap0".into(),
            mac: DEFAULT_MAC.into(),
            cpu_template: CPU_TEMPLATE_NONE.into(),
            console: None,
            cancel: None,
        }
    }
}

/// What the snapshotter is doing, for progress displays.
#[derive(Debug, Clone)]
pub enum SnapshotProgress {
    /// A step began.
    Step(&'static str),
    /// Bytes of a device's input copied so far.
    Copy {
        /// The device.
        device: String,
        /// Bytes copied.
        done: u64,
        /// Bytes in all.
        total: u64,
    },
}

/// One device of the package written.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    /// Device name.
    pub name: String,
    /// Its file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Bytes it occupies on disk (holes excluded).
    pub allocated: u64,
}

/// What a snapshot took and produced.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotReport {
    /// Copying the inputs, in milliseconds.
    pub copy_ms: u64,
    /// From starting the VM to the guest's liveness signal.
    pub boot_to_liveness_ms: u64,
    /// The agent's `BeforeSuspend` call (including its connection).
    pub before_suspend_ms: u64,
    /// From pausing to state, memory and disks on stable storage.
    pub snapshot_ms: u64,
    /// Everything.
    pub total_ms: u64,
    /// Standard output of the `BeforeSuspend` hook.
    pub before_suspend_output: String,
    /// The package's devices.
    pub devices: Vec<DeviceReport>,
}

/// Why a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotterError {
    /// Bad `--devices`.
    #[error(transparent)]
    Devices(#[from] DevicesError),
    /// A runner runs the package the outputs would replace.
    #[error(transparent)]
    InUse(#[from] InUseError),
    /// Bad options.
    #[error("{0}")]
    Options(String),
    /// An input cannot be used.
    #[error("device {name:?}: cannot read input {path}: {source}")]
    Input {
        /// The device.
        name: String,
        /// The input file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// An output cannot be written.
    #[error("device {name:?}: cannot write {path}: {source}")]
    Output {
        /// The device.
        name: String,
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The VMM failed.
    #[error("{what}: {source}")]
    Vmm {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: drafter_vmm::Error,
    },
    /// The guest side (liveness, agent) failed.
    #[error("{what}: {source}")]
    Guest {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: HostError,
    },
    /// The VM ended before it was snapshotted.
    #[error("the VM ended before the snapshot ({0})")]
    VmEnded(String),
    /// Canceled through [`SnapshotterOptions::cancel`].
    #[error("interrupted; no package written")]
    Interrupted,
}

/// Describes how a VM ended, for messages.
pub fn describe_exit(status: &ExitStatus) -> String {
    match status {
        ExitStatus::Poweroff => "the guest powered off".into(),
        ExitStatus::Reboot => "the guest rebooted".into(),
        ExitStatus::Stopped => "stopped".into(),
        ExitStatus::Error(e) => format!("VM error: {e}"),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn check_options(o: &SnapshotterOptions) -> Result<(), SnapshotterError> {
    let bad = |s: String| Err(SnapshotterError::Options(s));
    if o.cpu_count == 0 {
        return bad("--cpu-count must be at least 1".into());
    }
    if o.memory_size_mib < 16 {
        return bad(format!(
            "--memory-size must be at least 16 (MB), got {}",
            o.memory_size_mib
        ));
    }
    if o.agent_vsock_port == o.liveness_vsock_port {
        return bad(format!(
            "--agent-vsock-port and --liveness-vsock-port are both {}",
            o.agent_vsock_port
        ));
    }
    if !o.interface.is_empty() && drafter_vmm::config::parse_mac(&o.mac).is_none() {
        return bad(format!("--mac {:?} is not aa:bb:cc:dd:ee:ff", o.mac));
    }
    match o.cpu_template.parse::<CpuTemplate>() {
        Err(e) => return bad(format!("--cpu-template: {e}")),
        // Refused before any disk is copied when this host cannot give it.
        Ok(t) => Vmm::check_cpu_template(t).map_err(|source| SnapshotterError::Vmm {
            what: "cannot use --cpu-template",
            source,
        })?,
    }
    for d in &o.devices.devices {
        let Some(input) = &d.input else { continue };
        let input_err = |source| SnapshotterError::Input {
            name: d.name.clone(),
            path: input.clone(),
            source,
        };
        let meta = std::fs::metadata(input).map_err(input_err)?;
        if !meta.is_file() {
            return Err(input_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        for other in &o.devices.devices {
            if files::same_file(input, &other.output) {
                return Err(DevicesError::SamePath(
                    d.name.clone(),
                    other.name.clone(),
                    input.clone(),
                )
                .into());
            }
        }
    }
    Ok(())
}

/// Takes the snapshot described by `options`; `progress` hears about each
/// step. On success every output exists; on failure none was changed.
pub fn snapshot(
    mut options: SnapshotterOptions,
    progress: &mut dyn FnMut(SnapshotProgress),
) -> Result<SnapshotReport, SnapshotterError> {
    check_options(&options)?;
    // A runner running the package being replaced would write it too.
    InUse::ensure_not_running(&options.devices.output(devices::STATE))?;
    let start = Instant::now();
    let cancel = options.cancel.clone();
    let canceled = || cancel.as_ref().is_some_and(|c| c.load(Ordering::SeqCst));
    let mut created = Created::default();
    let devices = options.devices.clone();
    let partial = |name: &str| files::partial_path(&devices.output(name));

    // Copy the inputs.
    progress(SnapshotProgress::Step("copying the blueprint"));
    for d in &devices.devices {
        let out_err = |source| SnapshotterError::Output {
            name: d.name.clone(),
            path: d.output.clone(),
            source,
        };
        if let Some(parent) = d.output.parent() {
            created.create_dir_all(parent).map_err(out_err)?;
        }
        let p = files::partial_path(&d.output);
        // A stale .partial from an earlier failed run is ours to replace.
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(out_err(e)),
        }
        created.file(p.clone());
        let Some(input) = &d.input else { continue };
        let mut interrupted = false;
        files::sparse_copy(input, &p, &mut |done, total| {
            interrupted |= canceled();
            progress(SnapshotProgress::Copy {
                device: d.name.clone(),
                done,
                total,
            })
        })
        .map_err(|source| {
            // Name the input when it is the input that failed.
            match std::fs::File::open(input) {
                Err(source) => SnapshotterError::Input {
                    name: d.name.clone(),
                    path: input.clone(),
                    source,
                },
                Ok(_) => out_err(source),
            }
        })?;
        if interrupted || canceled() {
            return Err(SnapshotterError::Interrupted);
        }
    }
    let copy_ms = ms(start.elapsed());

    // Boot from the copies.
    let work = tempfile::Builder::new()
        .prefix("drafter-snapshotter-")
        .tempdir()
        .map_err(|source| SnapshotterError::Output {
            name: "vsock".into(),
            path: std::env::temp_dir(),
            source,
        })?;
    let uds = work.path().join("vsock.sock");
    let guest = |what: &'static str| move |source| SnapshotterError::Guest { what, source };
    let liveness = LivenessServer::listen(&uds, options.liveness_vsock_port)
        .map_err(guest("cannot listen for the liveness signal"))?;
    let mut agent = AgentServer::listen(&uds, options.agent_vsock_port)
        .map_err(guest("cannot listen for the agent"))?;
    let template: CpuTemplate = options
        .cpu_template
        .parse()
        .map_err(|e| SnapshotterError::Options(format!("--cpu-template: {e}")))?;
    let mut config = VmConfig::new(partial(devices::KERNEL));
    config.cpu_template = template;
    config.initramfs = devices
        .get(devices::INITRAMFS)
        .map(|_| partial(devices::INITRAMFS));
    config.boot_args = options.boot_args.clone();
    config.vcpus = options.cpu_count;
    config.memory_mib = options.memory_size_mib;
    config.drives = devices
        .drives()
        .map(|d| DriveConfig {
            name: d.name.clone(),
            path: files::partial_path(&d.output),
            read_only: false,
        })
        .collect();
    config.net = (!options.interface.is_empty()).then(|| NetConfig {
        tap: options.interface.clone(),
        mac: Some(options.mac.clone()),
        netns: (!options.netns.is_empty()).then(|| options.netns.clone()),
    });
    config.vsock = Some(VsockConfig {
        cid: VSOCK_CID,
        uds_path: uds.clone(),
    });
    config.serial = SerialConfig {
        stdout: options.enable_output,
        stdin: options.enable_input,
    };
    let console = if options.enable_output {
        options.console.take()
    } else {
        None
    };
    progress(SnapshotProgress::Step("booting the VM"));
    let boot_start = Instant::now();
    let mut vmm = Vmm::boot(
        config,
        BuildOptions {
            console,
            shared_memory_file: Some(partial(devices::MEMORY)),
            ..Default::default()
        },
    )
    .map_err(|source| SnapshotterError::Vmm {
        what: "cannot boot the VM",
        source,
    })?;
    let result = run_guest(
        &mut vmm, &liveness, &mut agent, &options, &devices, boot_start, &canceled, progress,
    );
    vmm.stop();
    let (boot_to_liveness_ms, before_suspend_ms, snapshot_ms, before_suspend_output) = result?;

    // Every output is complete: move them into place, config last.
    progress(SnapshotProgress::Step("moving the package into place"));
    let mut order: Vec<&devices::SnapshotDevice> = devices
        .devices
        .iter()
        .filter(|d| d.name != devices::CONFIG)
        .collect();
    order.extend(devices.get(devices::CONFIG));
    let mut reports = Vec::new();
    for d in order {
        let p = files::partial_path(&d.output);
        std::fs::rename(&p, &d.output).map_err(|source| SnapshotterError::Output {
            name: d.name.clone(),
            path: d.output.clone(),
            source,
        })?;
        created.forget(&p);
        let _ = files::fsync_dir_of(&d.output);
        reports.push(DeviceReport {
            name: d.name.clone(),
            path: d.output.clone(),
            size: std::fs::metadata(&d.output).map(|m| m.len()).unwrap_or(0),
            allocated: files::allocated_bytes(&d.output),
        });
    }
    created.keep();
    // A new package: a mark left by a run of the old one no longer applies.
    InUse::clear_stale(&devices.output(devices::STATE))?;
    Ok(SnapshotReport {
        copy_ms,
        boot_to_liveness_ms,
        before_suspend_ms,
        snapshot_ms,
        total_ms: ms(start.elapsed()),
        before_suspend_output,
        devices: reports,
    })
}

/// Waits for liveness, calls `BeforeSuspend`, pauses and writes state,
/// memory, disks and config (all still `.partial`).
#[allow(clippy::too_many_arguments)]
fn run_guest(
    vmm: &mut Vmm,
    liveness: &LivenessServer,
    agent: &mut AgentServer,
    options: &SnapshotterOptions,
    devices: &SnapshotDevices,
    boot_start: Instant,
    canceled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(SnapshotProgress),
) -> Result<(u64, u64, u64, String), SnapshotterError> {
    progress(SnapshotProgress::Step(
        "waiting for the guest's liveness signal",
    ));
    let waiter = vmm.exit_waiter();
    let deadline = boot_start + options.resume_timeout;
    loop {
        if let Some(status) = waiter.get() {
            return Err(SnapshotterError::VmEnded(describe_exit(&status)));
        }
        if canceled() {
            return Err(SnapshotterError::Interrupted);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SnapshotterError::Guest {
                what: "the guest never signalled liveness",
                source: HostError::Timeout {
                    what: format!(
                        "the liveness signal on vsock port {}",
                        options.liveness_vsock_port
                    ),
                    timeout: options.resume_timeout,
                },
            });
        }
        match liveness.wait(left.min(Duration::from_millis(200))) {
            Ok(()) => break,
            Err(HostError::Timeout { .. }) => {}
            Err(source) => {
                return Err(SnapshotterError::Guest {
                    what: "liveness signal",
                    source,
                })
            }
        }
    }
    let boot_to_liveness_ms = ms(boot_start.elapsed());

    progress(SnapshotProgress::Step("calling BeforeSuspend in the guest"));
    let hook_start = Instant::now();
    let hook = agent
        .before_suspend(options.resume_timeout)
        .map_err(|source| SnapshotterError::Guest {
            what: "the agent's BeforeSuspend hook failed",
            source,
        })?;
    let before_suspend_ms = ms(hook_start.elapsed());
    if canceled() {
        return Err(SnapshotterError::Interrupted);
    }

    progress(SnapshotProgress::Step("writing the snapshot"));
    let snap_start = Instant::now();
    let vmm_err = |what: &'static str| move |source| SnapshotterError::Vmm { what, source };
    vmm.pause().map_err(vmm_err("cannot pause the VM"))?;
    let state = files::partial_path(&devices.output(devices::STATE));
    let result = vmm.snapshot_state(&state);
    if result.is_err() {
        let mut tmp = state.as_os_str().to_owned();
        tmp.push(".tmp");
        let _ = std::fs::remove_file(PathBuf::from(tmp));
    }
    result.map_err(vmm_err("cannot write the VM state"))?;
    vmm.msync().map_err(vmm_err("cannot write guest memory"))?;
    for d in &devices.devices {
        if d.name == devices::CONFIG {
            continue;
        }
        let p = files::partial_path(&d.output);
        files::fsync(&p).map_err(|source| SnapshotterError::Output {
            name: d.name.clone(),
            path: p.clone(),
            source,
        })?;
    }
    let config = PackageConfig {
        format_version: PACKAGE_FORMAT_VERSION,
        agent_vsock_port: options.agent_vsock_port,
        liveness_vsock_port: options.liveness_vsock_port,
        cpu_count: options.cpu_count,
        memory_size: options.memory_size_mib,
        boot_args: options.boot_args.clone(),
        initramfs: devices.get(devices::INITRAMFS).is_some(),
        drives: devices
            .drives()
            .map(|d| PackageDrive {
                name: d.name.clone(),
                read_only: false,
            })
            .collect(),
        vsock_cid: VSOCK_CID,
        network: (!options.interface.is_empty()).then(|| PackageNetwork {
            interface: options.interface.clone(),
            mac: options.mac.clone(),
        }),
        cpu_template: vmm.config().cpu_template.name().into(),
    };
    let config_path = devices.output(devices::CONFIG);
    let config_partial = files::partial_path(&config_path);
    std::fs::write(&config_partial, config.to_json())
        .and_then(|()| files::fsync(&config_partial))
        .map_err(|source| SnapshotterError::Output {
            name: devices::CONFIG.into(),
            path: config_path.clone(),
            source,
        })?;
    let snapshot_ms = ms(snap_start.elapsed());
    Ok((
        boot_to_liveness_ms,
        before_suspend_ms,
        snapshot_ms,
        hook.stdout,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn devices_in(dir: &Path, kernel_input: &Path) -> SnapshotDevices {
        let o = |n: &str| dir.join("out").join(n).display().to_string();
        let json = serde_json::json!([
            {"name": "state", "output": o("state.bin")},
            {"name": "memory", "output": o("memory.bin")},
            {"name": "kernel", "input": kernel_input, "output": o("vmlinux")},
            {"name": "disk", "input": dir.join("rootfs.ext4"), "output": o("rootfs.ext4")},
            {"name": "config", "output": o("config.json")},
        ]);
        SnapshotDevices::parse(&json.to_string()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn bad_options_fail_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("rootfs.ext4"), b"disk").unwrap_or_else(|e| panic!("{e}"));
        let missing = dir.path().join("vmlinux");
        let e = snapshot(
            SnapshotterOptions::new(devices_in(dir.path(), &missing)),
            &mut |_| {},
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            e.contains("device \"kernel\": cannot read input") && e.contains("vmlinux"),
            "{e}"
        );
        std::fs::write(&missing, b"kernel").unwrap_or_else(|e| panic!("{e}"));
        for (tweak, want) in [
            (
                (|o: &mut SnapshotterOptions| o.cpu_template = "T2".into())
                    as fn(&mut SnapshotterOptions),
                "--cpu-template: unknown CPU template \"T2\" (valid: None, X86_64_V2, X86_64_V3)",
            ),
            (|o| o.cpu_count = 0, "--cpu-count must be at least 1"),
            (|o| o.mac = "bad".into(), "--mac \"bad\""),
            (|o| o.agent_vsock_port = 25, "are both 25"),
        ] {
            let mut o = SnapshotterOptions::new(devices_in(dir.path(), &missing));
            tweak(&mut o);
            let e = snapshot(o, &mut |_| {})
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(want), "{e}");
        }
        // A template this host's KVM cannot give (X86_64_V3 on a host
        // without AVX2, or this PVM host offering no SSE3) is refused
        // naming what is missing, before anything is written.
        if let Err(lacks) = Vmm::check_cpu_template(CpuTemplate::X86_64V3) {
            let mut o = SnapshotterOptions::new(devices_in(dir.path(), &missing));
            o.cpu_template = "x86-64-v3".into();
            let e = snapshot(o, &mut |_| {})
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert_eq!(e, format!("cannot use --cpu-template: {lacks}"));
            assert!(
                e.contains("CPU template X86_64_V3 needs CPU features"),
                "{e}"
            );
        }
        assert!(!dir.path().join("out").exists());
    }
}
