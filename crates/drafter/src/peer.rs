//! A peer: runs one VM — booted, restored from a snapshot or migrated in
//! from another peer — and migrates it out to the next peer that connects.
//! The library behind `drafter-peer`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drafter_storage::migrator::Observer;
use drafter_storage::tls::host_of;
use drafter_storage::{DeviceConfig, TlsConfig};
use drafter_vmm::config::SerialConfig;
use drafter_vmm::device_manager::ConsoleOut;
use drafter_vmm::{BuildOptions, ExitStatus, ExitWaiter, RestoreMemory, VmConfig, Vmm};

use crate::agent::{GuestAgent, HookSummary};
use crate::devices::{self, PeerPackage};
use crate::migration::{
    DestinationOptions, IncomingVm, Resume, SourceOptions, VmMigrationDestination,
    VmMigrationError, VmMigrationReport, VmMigrationSource, VmObserver, MEMORY_DEVICE,
    STATE_DEVICE,
};
use crate::package_config::PackageConfig;

/// Why a peer could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The VM configuration file is unusable.
    #[error("{0}")]
    Config(String),
    /// The `--devices` JSON is unusable.
    #[error("invalid devices configuration: {0}")]
    Devices(String),
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The VMM refused.
    #[error("VM: {0}")]
    Vmm(#[from] drafter_vmm::Error),
    /// A migration failed.
    #[error(transparent)]
    Migration(#[from] VmMigrationError),
    /// The TLS settings are unusable.
    #[error(transparent)]
    Tls(#[from] drafter_storage::TlsError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PeerError {
    let what = what.into();
    move |source| PeerError::Io { what, source }
}

/// Where the peer's VM comes from.
pub enum Origin {
    /// Boot a new VM from a configuration.
    Boot(VmConfig),
    /// Restore a snapshot (its memory file is copied into the work directory,
    /// so the snapshot itself is never modified).
    Snapshot {
        /// The state file.
        state: PathBuf,
        /// The memory file.
        memory: PathBuf,
    },
    /// Resume a package from its files (the reference peer's `--devices`
    /// with `base` paths and no `--raddr`). The VM runs on copies of the
    /// package's memory and drives (at their `overlay` paths, or in the work
    /// directory); the package itself is never written.
    Package(PeerPackage),
    /// Migrate the VM in from the peer listening at this address.
    Migrate {
        /// `host:port` of the peer that has the VM.
        raddr: String,
    },
}

/// How the peer runs ([`PeerOptions::new`] gives the defaults).
pub struct PeerOptions {
    /// Holds the memory file the VM runs from (`memory.bin`) and what a
    /// migration brings (state, drives); created if missing.
    pub work_dir: PathBuf,
    /// Migration settings (secret, mode, per-device settings) for both
    /// directions.
    pub source: SourceOptions,
    /// When a VM migrated in resumes.
    pub resume: Resume,
    /// Guest console; defaults to what the VM's config says.
    pub console: Option<ConsoleOut>,
    /// Network namespace for the VM's tap, replacing the one its
    /// configuration or state names (`None`: keep that one). Peers on one
    /// host need one namespace each: two VMs cannot share a tap.
    pub netns: Option<String>,
    /// The guest console's input and output (`--enable-input`,
    /// `--enable-output`), replacing what the VM's configuration or state
    /// says (`None`: keep that).
    pub serial: Option<SerialConfig>,
    /// The vsock port the VM's guest agent connects to. `None`: the
    /// `agent_vsock_port` of the package `config` that came with the VM
    /// (from a registry, passed on from peer to peer), if one did. The
    /// agent's hooks are called only for a VM with a vsock device and a
    /// known port; any other VM (a flat test guest) runs without them.
    pub agent_vsock_port: Option<u32>,
    /// Longest wait for the agent after a resume (its reconnection and
    /// `AfterResume`), and for `BeforeSuspend` before the final stop of a
    /// migration out.
    pub resume_timeout: Duration,
    /// Longest wait for the agent's `AfterResume` when a migration out
    /// failed after `BeforeSuspend` and the VM resumed here (the rescue).
    pub rescue_timeout: Duration,
    /// Most drive blocks fetched at once before a VM migrated in resumes at
    /// authority ([`DestinationOptions::fetch_concurrency`]).
    pub fetch_concurrency: usize,
    /// Told of each step of the migration that brings the VM in
    /// ([`Origin::Migrate`]) as it starts.
    pub observer: Option<VmObserver>,
}

impl PeerOptions {
    /// Defaults (the reference's timeouts: one minute each) with files in
    /// `work_dir`.
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        PeerOptions {
            work_dir: work_dir.into(),
            source: SourceOptions::default(),
            resume: Resume::default(),
            console: None,
            netns: None,
            serial: None,
            agent_vsock_port: None,
            resume_timeout: Duration::from_secs(60),
            rescue_timeout: Duration::from_secs(60),
            fetch_concurrency: crate::migration::MAX_FETCH_WORKERS,
            observer: None,
        }
    }
}

/// A running VM owned by this peer.
pub struct Peer {
    vmm: Arc<Mutex<Vmm>>,
    exit: ExitWaiter,
    incoming: Option<VmMigrationReport>,
    /// Files that came with the VM (a package's config, kernel, ...), passed
    /// on to the next peer.
    files: Vec<(String, PathBuf)>,
    /// The VM's guest agent, if it has one.
    agent: Option<Arc<Mutex<GuestAgent>>>,
    /// The `AfterResume` call after the VM resumed here.
    after_resume: Option<HookSummary>,
    resume_timeout: Duration,
    rescue_timeout: Duration,
}

/// `netns` for a tap: the empty name is the current namespace.
fn namespace(netns: &str) -> Option<String> {
    (!netns.is_empty()).then(|| netns.to_string())
}

impl Peer {
    /// Starts the VM from `origin`; returns once it runs (for a migration:
    /// once every block has arrived).
    pub fn start(origin: Origin, mut options: PeerOptions) -> Result<Peer, PeerError> {
        let dir = &options.work_dir;
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        if !matches!(origin, Origin::Migrate { .. }) {
            // A receive into this directory whose process died left its
            // (RAM-sized) files behind; a migration in does this itself.
            let removed = VmMigrationDestination::clean_unfinished(dir)?;
            if !removed.is_empty() {
                tracing::warn!(files = ?removed, "removed the files of an unfinished receive");
            }
        }
        let memory_file = dir.join("memory.bin");
        let mut after_resume = None;
        let (vmm, mut incoming, files, agent) = match origin {
            Origin::Boot(mut config) => {
                if let (Some(net), Some(ns)) = (&mut config.net, &options.netns) {
                    net.netns = namespace(ns);
                }
                if let Some(serial) = &options.serial {
                    config.serial = serial.clone();
                }
                // Anonymous memory: nothing RAM-sized on disk, and the
                // migration source reads guest RAM through the VMM's mapping.
                let vmm = Vmm::boot(
                    config,
                    BuildOptions {
                        console: options.console,
                        shared_memory_file: None,
                        flat_program: None,
                    },
                )?;
                // A booted VM's agent connects once it is up; its first
                // hook is BeforeSuspend when the VM migrates out.
                let agent = agent_of(&vmm, options.agent_vsock_port);
                (vmm, None, Vec::new(), agent)
            }
            Origin::Snapshot { state, memory } => {
                copy_memory(&memory, &memory_file)?;
                let state = if options.netns.is_some() || options.serial.is_some() {
                    // The snapshot is never modified: the changed state
                    // goes into the work directory.
                    let mut snap: drafter_vmm::Snapshot =
                        drafter_vmm::persist::read_state_file(&state)
                            .map_err(drafter_vmm::Error::from)?;
                    if let (Some(net), Some(ns)) = (&mut snap.config.net, &options.netns) {
                        net.netns = namespace(ns);
                    }
                    if let Some(serial) = &options.serial {
                        snap.config.serial = serial.clone();
                    }
                    let here = dir.join("netns-state.bin");
                    drafter_vmm::persist::write_state_file(&here, &snap)
                        .map_err(drafter_vmm::Error::from)?;
                    here
                } else {
                    state
                };
                let mut vmm = Vmm::restore(
                    &state,
                    RestoreMemory::Shared(memory_file.clone()),
                    options.console,
                )?;
                let agent = agent_of(&vmm, options.agent_vsock_port);
                vmm.resume()?;
                after_resume = call_after_resume(agent.as_ref(), options.resume_timeout);
                (vmm, None, Vec::new(), agent)
            }
            Origin::Package(package) => {
                let console = options.console.take();
                let (vmm, files, agent) =
                    resume_package(&package, &memory_file, &options, console)?;
                after_resume = call_after_resume(agent.as_ref(), options.resume_timeout);
                (vmm, None, files, agent)
            }
            Origin::Migrate { raddr } => {
                let tcp = crate::dial::connect(&raddr, options.source.migration.handshake_timeout)
                    .map_err(io(format!("cannot connect to {raddr}")))?;
                // With TLS the listener's certificate must name the host
                // dialled (or the configured server name).
                let link =
                    TlsConfig::maybe_connect(options.source.tls.as_ref(), tcp, host_of(&raddr))?;
                let mut incoming = VmMigrationDestination::accept(
                    link,
                    DestinationOptions {
                        work_dir: dir.clone(),
                        resume: options.resume,
                        migration: options.source.migration.clone(),
                        console: options.console,
                        netns: options.netns.clone(),
                        serial: options.serial.clone(),
                        fetch_concurrency: options.fetch_concurrency,
                        observer: options.observer.clone(),
                    },
                )?;
                // The VM runs here now (at authority, its memory still
                // streaming in): nothing below may lose it. Its agent
                // reconnects and gets AfterResume before the transfer's end
                // is awaited.
                let port = options
                    .agent_vsock_port
                    .or_else(|| package_agent_port(&incoming));
                let agent = agent_of(incoming.vmm(), port);
                after_resume = call_after_resume(agent.as_ref(), options.resume_timeout);
                let report = incoming.finish_transfer()?;
                let files = incoming.files().to_vec();
                let (vmm, _memory_file) = incoming.into_parts()?;
                (vmm, Some(report), files, agent)
            }
        };
        if let Some(r) = &mut incoming {
            r.after_resume = after_resume.clone();
        }
        let exit = vmm.exit_waiter();
        Ok(Peer {
            vmm: Arc::new(Mutex::new(vmm)),
            exit,
            incoming,
            files,
            agent,
            after_resume,
            resume_timeout: options.resume_timeout,
            rescue_timeout: options.rescue_timeout,
        })
    }

    /// The agent's `AfterResume` call after the VM resumed here (restored
    /// from a snapshot or migrated in); `None` if the VM has no agent or
    /// was booted here.
    pub fn after_resume(&self) -> Option<&HookSummary> {
        self.after_resume.as_ref()
    }

    /// Whether the VM's guest agent is called ([`PeerOptions::agent_vsock_port`]).
    pub fn has_agent(&self) -> bool {
        self.agent.is_some()
    }

    /// The files that came with the VM (a package's `config`, `kernel`, ...
    /// from a registry): name and path in the work directory. [`Self::serve`]
    /// passes them on.
    pub fn files(&self) -> &[(String, PathBuf)] {
        &self.files
    }

    /// The report of the migration that brought the VM here, if one did.
    pub fn incoming_report(&self) -> Option<&VmMigrationReport> {
        self.incoming.as_ref()
    }

    /// Waits for the VM's end from any thread.
    pub fn exit_waiter(&self) -> ExitWaiter {
        self.exit.clone()
    }

    /// Accepts peers on `listener` until one receives the VM (a peer, or a
    /// terminator that writes it into a package), sending the files that
    /// came with it ([`Self::files`]) along. `on_failure`
    /// hears of every failed migration. One that leaves authority here (the
    /// destination provably does not run the VM) resumes the VM here and the
    /// next peer is awaited. Any other failure is returned: authority moved
    /// (the VM is stopped here), or it is unknown (Commit sent, no
    /// acknowledgement: the VM is kept paused and saved to
    /// [`SourceOptions::unresolved_dir`], see
    /// [`VmMigrationError::AuthorityUnknown`]).
    pub fn serve(
        &self,
        listener: &TcpListener,
        mut options: SourceOptions,
        observer: Option<Observer>,
        mut on_failure: impl FnMut(&VmMigrationError),
    ) -> Result<VmMigrationReport, PeerError> {
        for (name, path) in &self.files {
            if !options.files.iter().any(|(n, _)| n == name) {
                options.files.push((name.clone(), path.clone()));
            }
        }
        let tls = options.tls.clone();
        let mut source = VmMigrationSource::new(self.vmm.clone(), options)?;
        if let Some(o) = observer {
            source = source.with_observer(o);
        }
        if let Some(agent) = &self.agent {
            source = source.with_agent(agent.clone(), self.resume_timeout, self.rescue_timeout);
        }
        loop {
            let (link, peer) = listener
                .accept()
                .map_err(io("accepting a peer connection"))?;
            tracing::info!(%peer, "peer connected, migrating the VM out");
            // A TLS handshake that fails is a failed migration like any
            // other before the handover: the VM keeps running here.
            let link = match TlsConfig::maybe_accept(tls.as_ref(), link) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot set up TLS; the VM keeps running here");
                    continue;
                }
            };
            match source.migrate(link) {
                Ok(report) => return Ok(report),
                Err(e) if e.source_keeps_authority() => {
                    tracing::warn!(%peer, error = %e, "migration failed; the VM keeps running here");
                    on_failure(&e);
                }
                Err(e) => {
                    on_failure(&e);
                    return Err(e.into());
                }
            }
        }
    }

    /// Blocks until the VM ends, then returns how.
    pub fn wait(&self) -> ExitStatus {
        self.exit.wait();
        self.vmm.lock().unwrap_or_else(|p| p.into_inner()).wait()
    }
}

/// The agent of `vmm` if it can have one (see [`GuestAgent::for_vm`]). The
/// VM runs (or is about to) whatever happens here: a listener that cannot
/// be made only costs the hooks, and is reported.
fn agent_of(vmm: &Vmm, port: Option<u32>) -> Option<Arc<Mutex<GuestAgent>>> {
    match GuestAgent::for_vm(vmm.config(), port) {
        Ok(agent) => agent.map(|a| Arc::new(Mutex::new(a))),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for the guest agent; its hooks are skipped");
            None
        }
    }
}

/// The agent port in the package `config` that came with an incoming VM.
fn package_agent_port(incoming: &IncomingVm) -> Option<u32> {
    let bytes = match incoming.read_file(crate::devices::CONFIG) {
        Ok(Some(b)) => b,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the package config that came with the VM; the agent's hooks are skipped");
            return None;
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    match crate::package_config::PackageConfig::from_json(&text, "config (from the source)") {
        Ok(c) => Some(c.agent_vsock_port),
        Err(e) => {
            tracing::warn!(error = %e, "the package config that came with the VM is unusable; the agent's hooks are skipped");
            None
        }
    }
}

/// Calls `AfterResume` on a VM that just resumed here; a failure is
/// reported (the VM keeps running).
fn call_after_resume(
    agent: Option<&Arc<Mutex<GuestAgent>>>,
    timeout: Duration,
) -> Option<HookSummary> {
    let call = agent?
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .after_resume(timeout);
    match call.error() {
        Some(e) => {
            tracing::warn!(error = %e, "the agent's AfterResume hook failed; the VM keeps running here")
        }
        None => tracing::info!(ms = call.ms(), "the agent's AfterResume hook ran"),
    }
    Some(call.summary())
}

fn remove_stale(path: &Path) -> Result<(), PeerError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io(format!("removing {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

/// Restores and resumes the VM of a package from copies of its memory and
/// drives; returns the VM, the package's other files (passed on to the
/// next peer) and its guest agent.
#[allow(clippy::type_complexity)]
fn resume_package(
    package: &PeerPackage,
    memory_file: &Path,
    options: &PeerOptions,
    console: Option<ConsoleOut>,
) -> Result<(Vmm, Vec<(String, PathBuf)>, Option<Arc<Mutex<GuestAgent>>>), PeerError> {
    let devices = &package.devices;
    let config_path = devices.path(devices::CONFIG);
    let config = PackageConfig::read(&config_path).map_err(|e| PeerError::Config(e.to_string()))?;
    devices
        .check_drives(config.drives.iter().map(|d| d.name.as_str()))
        .map_err(|e| PeerError::Devices(e.to_string()))?;
    let state_path = devices.path(devices::STATE);
    // A runner running the package, or one killed while it ran, leaves its
    // memory and disks out of step with its state.
    crate::in_use::InUse::check(&state_path).map_err(|e| PeerError::Config(e.to_string()))?;
    let mut snap: drafter_vmm::Snapshot =
        drafter_vmm::persist::read_state_file(&state_path).map_err(drafter_vmm::Error::from)?;
    let dir = &options.work_dir;
    // The VM's own copies: a file already at an overlay path may hold
    // another run's writes, which this package's memory does not match.
    let copy_of = |name: &str, fallback: PathBuf| -> Result<PathBuf, PeerError> {
        match package.overlay(name) {
            Some(o) if o.exists() => Err(PeerError::Config(format!(
                "overlay {} of device {name:?} already exists (another run's writes?): remove it to start from the package",
                o.display()
            ))),
            Some(o) => {
                if let Some(parent) = o.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent)
                        .map_err(io(format!("creating {}", parent.display())))?;
                }
                Ok(o.clone())
            }
            None => Ok(fallback),
        }
    };
    let memory = copy_of(devices::MEMORY, memory_file.to_path_buf())?;
    copy_memory(&devices.path(devices::MEMORY), &memory)?;
    for d in &mut snap.config.drives {
        let base = devices.path(&d.name);
        let copy = copy_of(&d.name, dir.join(format!("{}.drive", d.name)))?;
        remove_stale(&copy)?;
        crate::files::sparse_copy(&base, &copy, &mut |_, _| {}).map_err(io(format!(
            "copying drive {:?} from {} to {}",
            d.name,
            base.display(),
            copy.display()
        )))?;
        d.path = copy;
    }
    if let Some(k) = devices.get(devices::KERNEL) {
        snap.config.kernel = k.path.clone();
    }
    if let Some(i) = devices.get(devices::INITRAMFS) {
        snap.config.initramfs = Some(i.path.clone());
    }
    if let (Some(net), Some(ns)) = (&mut snap.config.net, &options.netns) {
        net.netns = namespace(ns);
    }
    if let Some(serial) = &options.serial {
        snap.config.serial = serial.clone();
    }
    if let Some(v) = &mut snap.config.vsock {
        v.uds_path = dir.join("vsock.sock");
        remove_stale(&v.uds_path)?;
    }
    let run_state = dir.join("package-state.bin");
    drafter_vmm::persist::write_state_file(&run_state, &snap).map_err(drafter_vmm::Error::from)?;
    let mut vmm = Vmm::restore(&run_state, RestoreMemory::Shared(memory), console)?;
    let agent = agent_of(
        &vmm,
        options.agent_vsock_port.or(Some(config.agent_vsock_port)),
    );
    vmm.resume()?;
    let files = [devices::CONFIG, devices::KERNEL, devices::INITRAMFS]
        .iter()
        .filter_map(|n| devices.get(n).map(|d| (d.name.clone(), d.path.clone())))
        .collect();
    Ok((vmm, files, agent))
}

fn copy_memory(from: &Path, to: &Path) -> Result<(), PeerError> {
    let meta = std::fs::metadata(from).map_err(io(format!("memory file {}", from.display())))?;
    if !meta.is_file() {
        return Err(PeerError::Config(format!(
            "memory file {} is not a regular file",
            from.display()
        )));
    }
    remove_stale(to)?;
    std::fs::copy(from, to).map_err(io(format!(
        "copying {} to {}",
        from.display(),
        to.display()
    )))?;
    Ok(())
}

/// Reads a VM configuration file (`drafter-vmm`'s JSON).
pub fn read_config(path: &Path) -> Result<VmConfig, PeerError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| PeerError::Config(format!("cannot read config {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| PeerError::Config(format!("invalid config {}: {e}", path.display())))
}

/// Applies the Go Drafter's `--devices` JSON (a list of objects with `name`
/// and `blockSize`, `expiry`, `maxDirtyBlocks`, `minCycles`, `maxCycles`,
/// `cycleThrottle`): entries named `memory` and `state` set those devices,
/// one named `drives` sets every read-only drive; the Go Drafter's other
/// names (`kernel`, `disk`, `config`, `oci`), `initramfs` and any drive
/// of a package given by its `base` file are accepted and ignored.
pub fn apply_devices_json(options: &mut SourceOptions, json: &str) -> Result<(), PeerError> {
    let entries: Vec<serde_json::Value> =
        serde_json::from_str(json).map_err(|e| PeerError::Devices(e.to_string()))?;
    for entry in entries {
        let name = entry
            .get("name")
            .and_then(|n| n.as_str())
            .ok_or_else(|| PeerError::Devices("an entry has no \"name\"".into()))?
            .to_string();
        let has_base = entry
            .get("base")
            .and_then(|b| b.as_str())
            .is_some_and(|b| !b.is_empty());
        let config: DeviceConfig = serde_json::from_value(entry)
            .map_err(|e| PeerError::Devices(format!("device {name:?}: {e}")))?;
        drafter_storage::device::validate_block_size(config.block_size)
            .map_err(|e| PeerError::Devices(format!("device {name:?}: {e}")))?;
        match name.as_str() {
            MEMORY_DEVICE => options.memory = config,
            STATE_DEVICE => options.state = config,
            "drives" => options.drives = config,
            "kernel" | "initramfs" | "disk" | "config" | "oci" => {
                tracing::debug!(%name, "device settings not used by this peer")
            }
            // Another drive of a package this peer starts from.
            _ if has_base => tracing::debug!(%name, "drive settings not used by this peer"),
            other => return Err(PeerError::Devices(format!("unknown device {other:?}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn devices_json_sets_memory_and_state_and_refuses_nonsense() {
        let mut o = SourceOptions::default();
        let json = r#"[{"name":"memory","base":"out/package/memory.bin","blockSize":4096,"cycleThrottle":100000000},
                       {"name":"state","blockSize":65536,"maxCycles":3},
                       {"name":"oci","blockSize":65536}]"#;
        apply_devices_json(&mut o, json).unwrap_or_else(|e| panic!("{e}"));
        // A package's own drive, any name.
        apply_devices_json(
            &mut o,
            r#"[{"name":"data","base":"out/package/data.ext4"}]"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.memory.block_size, 4096);
        assert_eq!(o.memory.cycle_throttle, Duration::from_millis(100));
        assert_eq!(o.state.max_cycles, 3);
        for (bad, want) in [
            ("[{\"name\":\"memory\"", "invalid devices configuration"),
            ("[{\"blockSize\":4096}]", "no \"name\""),
            (
                "[{\"name\":\"memory\",\"blockSize\":1000}]",
                "invalid block size",
            ),
            ("[{\"name\":\"bogus\"}]", "unknown device \"bogus\""),
            (
                "[{\"name\":\"data\",\"base\":\"\"}]",
                "unknown device \"data\"",
            ),
            ("[{\"name\":\"memory\",\"expiry\":-5}]", "device \"memory\""),
        ] {
            let e = apply_devices_json(&mut o, bad)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(want) && !e.contains('\n'), "{bad}: {e}");
        }
    }

    #[test]
    fn config_errors_name_the_file_and_problem() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("vm.json");
        let e = read_config(&p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.starts_with("cannot read config") && e.contains("vm.json"),
            "{e}"
        );
        std::fs::write(&p, "{\"kernel\": 3").unwrap_or_else(|e| panic!("{e}"));
        let e = read_config(&p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.starts_with("invalid config") && !e.contains('\n'), "{e}");
    }
}
