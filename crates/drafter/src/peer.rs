//! A peer: runs one VM — booted, restored from a snapshot or migrated in
//! from another peer — and migrates it out to the next peer that connects.
//! The library behind `drafter-peer`.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use drafter_storage::migrator::Observer;
use drafter_storage::tls::host_of;
use drafter_storage::{DeviceConfig, TlsConfig};
use drafter_vmm::device_manager::ConsoleOut;
use drafter_vmm::{BuildOptions, ExitStatus, ExitWaiter, RestoreMemory, VmConfig, Vmm};

use crate::migration::{
    DestinationOptions, Resume, SourceOptions, VmMigrationDestination, VmMigrationError,
    VmMigrationReport, VmMigrationSource, VmObserver, MEMORY_DEVICE, STATE_DEVICE,
};

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
    /// Migrate the VM in from the peer listening at this address.
    Migrate {
        /// `host:port` of the peer that has the VM.
        raddr: String,
    },
}

/// How the peer runs.
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
    /// Told of each step of the migration that brings the VM in
    /// ([`Origin::Migrate`]) as it starts.
    pub observer: Option<VmObserver>,
}

/// A running VM owned by this peer.
pub struct Peer {
    vmm: Arc<Mutex<Vmm>>,
    exit: ExitWaiter,
    incoming: Option<VmMigrationReport>,
    /// Files that came with the VM (a package's config, kernel, ...), passed
    /// on to the next peer.
    files: Vec<(String, PathBuf)>,
}

/// `netns` for a tap: the empty name is the current namespace.
fn namespace(netns: &str) -> Option<String> {
    (!netns.is_empty()).then(|| netns.to_string())
}

impl Peer {
    /// Starts the VM from `origin`; returns once it runs (for a migration:
    /// once every block has arrived).
    pub fn start(origin: Origin, options: PeerOptions) -> Result<Peer, PeerError> {
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
        let (vmm, incoming, files) = match origin {
            Origin::Boot(mut config) => {
                if let (Some(net), Some(ns)) = (&mut config.net, &options.netns) {
                    net.netns = namespace(ns);
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
                (vmm, None, Vec::new())
            }
            Origin::Snapshot { state, memory } => {
                copy_memory(&memory, &memory_file)?;
                let state = match &options.netns {
                    Some(ns) => {
                        // The snapshot is never modified: the changed state
                        // goes into the work directory.
                        let mut snap: drafter_vmm::Snapshot =
                            drafter_vmm::persist::read_state_file(&state)
                                .map_err(drafter_vmm::Error::from)?;
                        if let Some(net) = &mut snap.config.net {
                            net.netns = namespace(ns);
                        }
                        let here = dir.join("netns-state.bin");
                        drafter_vmm::persist::write_state_file(&here, &snap)
                            .map_err(drafter_vmm::Error::from)?;
                        here
                    }
                    None => state,
                };
                let mut vmm = Vmm::restore(
                    &state,
                    RestoreMemory::Shared(memory_file.clone()),
                    options.console,
                )?;
                vmm.resume()?;
                (vmm, None, Vec::new())
            }
            Origin::Migrate { raddr } => {
                let tcp =
                    TcpStream::connect(&raddr).map_err(io(format!("cannot connect to {raddr}")))?;
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
                        observer: options.observer.clone(),
                    },
                )?;
                let report = incoming.finish_transfer()?;
                let files = incoming.files().to_vec();
                let (vmm, _memory_file) = incoming.into_parts()?;
                (vmm, Some(report), files)
            }
        };
        let exit = vmm.exit_waiter();
        Ok(Peer {
            vmm: Arc::new(Mutex::new(vmm)),
            exit,
            incoming,
            files,
        })
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

fn remove_stale(path: &Path) -> Result<(), PeerError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io(format!("removing {}", path.display()))(e))
        }
        _ => Ok(()),
    }
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
/// names (`kernel`, `disk`, `config`, `oci`) are accepted and ignored.
pub fn apply_devices_json(options: &mut SourceOptions, json: &str) -> Result<(), PeerError> {
    let entries: Vec<serde_json::Value> =
        serde_json::from_str(json).map_err(|e| PeerError::Devices(e.to_string()))?;
    for entry in entries {
        let name = entry
            .get("name")
            .and_then(|n| n.as_str())
            .ok_or_else(|| PeerError::Devices("an entry has no \"name\"".into()))?
            .to_string();
        let config: DeviceConfig = serde_json::from_value(entry)
            .map_err(|e| PeerError::Devices(format!("device {name:?}: {e}")))?;
        drafter_storage::device::validate_block_size(config.block_size)
            .map_err(|e| PeerError::Devices(format!("device {name:?}: {e}")))?;
        match name.as_str() {
            MEMORY_DEVICE => options.memory = config,
            STATE_DEVICE => options.state = config,
            "drives" => options.drives = config,
            "kernel" | "disk" | "config" | "oci" => {
                tracing::debug!(%name, "device settings not used by this peer")
            }
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
