//! The registry (the library behind `drafter-registry`): serves a package's
//! devices to any number of peers at once, each in pure post-copy.
//!
//! A package on disk (what `drafter-snapshotter` wrote, or what
//! `drafter-runner` suspended into) is served as the devices of a VM
//! migration ([`crate::migration`]), so `drafter-peer --raddr` pulls it as it
//! would pull a VM from another peer:
//!
//! * `state`: the package's state file, framed as the migration's state
//!   device ([`StateFrame::from_package`]: no VM was paused for it);
//! * `memory`: the package's memory file;
//! * `drive/<name>`: every drive the state names (`disk`, `oci`, ...);
//! * `file/<name>`: every other device given (`config`, `kernel`,
//!   `initramfs`, ...), which the peer keeps and passes on with the VM so a
//!   terminator at the end of the chain can write the whole package again.
//!
//! The order on the wire is state, drives, memory, files: a peer resuming at
//! authority needs the state and every drive block before the VM runs, and
//! fetches memory pages on demand.
//!
//! Every connection is a migration of its own ([`Mode::PostCopy`]): the
//! registry has no VM, so nothing is paused, authority is granted as soon as
//! the peer asks for it, every block is pushed in the background, and the
//! blocks the peer asks for jump the queue. The devices never change, so all
//! connections share the same open files; a peer that fails, stalls or
//! vanishes ends only its own migration.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use drafter_storage::{
    BlockDevice, FileDevice, Link, MemoryDevice, MigrationConfig, MigrationError, MigrationReport,
    MigrationSource, Mode, Phase, SourceDevice, TlsConfig,
};
use drafter_vmm::{persist, Snapshot};
use serde::Serialize;

use crate::devices::{self, DevicesError, RegistryDevices};
use crate::migration::{
    drive_device_name, file_device_name, StateFrame, VmMigrationError, MEMORY_DEVICE, STATE_DEVICE,
};
use crate::package_config::{PackageConfig, PackageConfigError};

/// The reference's default number of concurrent migrations.
pub const DEFAULT_CONCURRENCY: usize = 4096;

/// Why a registry cannot serve a package.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Bad `--devices`.
    #[error(transparent)]
    Devices(#[from] DevicesError),
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
    /// The state file is not a VM state.
    #[error("device \"state\": {0}")]
    State(String),
    /// The package's `config.json` is unusable.
    #[error(transparent)]
    Config(#[from] PackageConfigError),
    /// The package's files do not fit together.
    #[error("the package does not fit together: {0}")]
    Mismatch(String),
    /// A device name cannot be sent.
    #[error(transparent)]
    Name(#[from] VmMigrationError),
    /// Accepting connections failed.
    #[error("accepting connections: {0}")]
    Accept(std::io::Error),
    /// A runner runs the package, or one ended without a suspend (its
    /// memory and disks do not match its state).
    #[error(transparent)]
    InUse(#[from] crate::in_use::InUseError),
}

/// How to serve a package.
pub struct RegistryOptions {
    /// The package's devices (`--devices`).
    pub devices: RegistryDevices,
    /// Secret, timeouts and compression; the mode is always post-copy.
    pub migration: MigrationConfig,
    /// How many peers are served at once; further connections wait in the
    /// listen backlog until one finishes (their handshake timeout runs
    /// meanwhile). At least 1.
    pub concurrency: usize,
    /// TLS settings (TLS 1.3 with mutual certificate authentication, see
    /// [`drafter_storage::tls`]): every accepted connection is wrapped in
    /// TLS before the migration's handshake, which also bounds the TLS
    /// handshake. `None`: plain TCP.
    pub tls: Option<TlsConfig>,
}

/// One device as the registry serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServedDevice {
    /// The package's name for it (`--devices`).
    pub name: String,
    /// Its name on the wire (`state`, `memory`, `drive/<name>`, `file/<name>`).
    pub wire_name: String,
    /// The package file.
    pub path: PathBuf,
    /// Bytes served (for `state`: the framed state).
    pub size: u64,
    /// Block size.
    pub block_size: u32,
}

/// A package, opened and checked, ready to be served.
pub struct Registry {
    source: MigrationSource,
    served: Vec<ServedDevice>,
    concurrency: usize,
    tls: Option<TlsConfig>,
}

/// What one peer's pull did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServeReport {
    /// The peer's address.
    pub peer: String,
    /// Bytes sent to it.
    pub bytes_sent: u64,
    /// Milliseconds from its connection to its last block.
    pub total_ms: f64,
    /// Blocks it asked for ahead of the background push.
    pub on_demand_blocks: u64,
    /// The storage engine's full report (phases, per-device sizes).
    pub storage: MigrationReport,
}

impl ServeReport {
    fn new(peer: String, storage: MigrationReport) -> Self {
        ServeReport {
            peer,
            bytes_sent: storage.bytes_sent,
            total_ms: storage.total_millis,
            on_demand_blocks: storage.need_block_requests,
            storage,
        }
    }
}

fn file_err(name: &str, path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError {
    let (name, path) = (name.to_owned(), path.to_path_buf());
    move |source| RegistryError::File { name, path, source }
}

fn open_file(name: &str, path: &Path, block_size: u32) -> Result<Arc<FileDevice>, RegistryError> {
    let meta = std::fs::metadata(path).map_err(file_err(name, path))?;
    if !meta.is_file() {
        return Err(file_err(name, path)(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let dev = FileDevice::open_read_only(path, block_size)
        .map_err(|e| file_err(name, path)(std::io::Error::other(e.to_string())))?;
    Ok(Arc::new(dev))
}

/// Checks `config.json` against the state (when both are given).
fn check_config(config: &PackageConfig, snap: &Snapshot) -> Result<(), RegistryError> {
    let mismatch = |what: String| Err(RegistryError::Mismatch(what));
    if config.cpu_count != snap.config.vcpus {
        return mismatch(format!(
            "config says {} vCPUs, the state has {}",
            config.cpu_count, snap.config.vcpus
        ));
    }
    if config.memory_size << 20 != snap.memory_size {
        return mismatch(format!(
            "config says {} MiB of memory, the state has {} bytes",
            config.memory_size, snap.memory_size
        ));
    }
    let named: Vec<&str> = config.drives.iter().map(|d| d.name.as_str()).collect();
    let has: Vec<&str> = snap.config.drives.iter().map(|d| d.name.as_str()).collect();
    if named != has {
        return mismatch(format!(
            "config names drives [{}], the state has [{}]",
            named.join(", "),
            has.join(", ")
        ));
    }
    if config.template().ok() != Some(snap.config.cpu_template) {
        return mismatch(format!(
            "config says CPU template {}, the state has {}",
            config.cpu_template, snap.config.cpu_template
        ));
    }
    Ok(())
}

impl Registry {
    /// Opens and checks the package: every file exists and is a regular
    /// file, the state is a VM state whose drives are all given, the memory
    /// file has the VM's size, and `config` (if given) agrees with the state.
    /// Nothing is written.
    pub fn open(options: RegistryOptions) -> Result<Registry, RegistryError> {
        let devs = &options.devices;
        let state = devs
            .get(devices::STATE)
            .ok_or_else(|| DevicesError::Missing(vec![devices::STATE.into()]))?;
        let memory = devs
            .get(devices::MEMORY)
            .ok_or_else(|| DevicesError::Missing(vec![devices::MEMORY.into()]))?;
        crate::in_use::InUse::check(&state.input)?;
        // Every file first, so a missing one is named before its content is.
        let mut files = Vec::new();
        for d in &devs.devices {
            files.push(open_file(&d.name, &d.input, d.block_size)?);
        }
        let file = |name: &str| {
            devs.devices
                .iter()
                .position(|d| d.name == name)
                .map(|i| files[i].clone())
        };

        let state_bytes =
            std::fs::read(&state.input).map_err(file_err(&state.name, &state.input))?;
        let snap: Snapshot = persist::read_state_file(&state.input)
            .map_err(|e| RegistryError::State(e.to_string()))?;
        let memory_size = file(devices::MEMORY).map_or(0, |f| f.size());
        if memory_size != snap.memory_size {
            return Err(RegistryError::Mismatch(format!(
                "memory file {} holds {memory_size} bytes, the state's VM has {}",
                memory.input.display(),
                snap.memory_size
            )));
        }
        let missing: Vec<String> = snap
            .config
            .drives
            .iter()
            .filter(|d| devs.get(&d.name).is_none())
            .map(|d| d.name.clone())
            .collect();
        if !missing.is_empty() {
            return Err(DevicesError::Missing(missing).into());
        }
        if let Some(c) = devs.get(devices::CONFIG) {
            check_config(&PackageConfig::read(&c.input)?, &snap)?;
        }

        let mut sources = Vec::new();
        let mut served = Vec::new();
        let mut serve =
            |name: &str, wire: String, path: &Path, dev: Arc<dyn BlockDevice>, block_size: u32| {
                served.push(ServedDevice {
                    name: name.to_owned(),
                    wire_name: wire.clone(),
                    path: path.to_path_buf(),
                    size: dev.size(),
                    block_size,
                });
                let config = drafter_storage::DeviceConfig {
                    block_size,
                    ..Default::default()
                };
                sources.push(SourceDevice::fixed(wire, dev, config));
            };

        let frame = StateFrame::from_package(state_bytes).encode();
        let state_dev = MemoryDevice::new(frame.len() as u64, state.block_size)
            .map_err(|e| RegistryError::State(e.to_string()))?;
        state_dev
            .write_at(&frame, 0)
            .map_err(|e| RegistryError::State(e.to_string()))?;
        serve(
            &state.name,
            STATE_DEVICE.into(),
            &state.input,
            Arc::new(state_dev),
            state.block_size,
        );
        let drives: Vec<&str> = snap.config.drives.iter().map(|d| d.name.as_str()).collect();
        for name in &drives {
            if let (Some(d), Some(f)) = (devs.get(name), file(name)) {
                serve(&d.name, drive_device_name(name)?, &d.input, f, d.block_size);
            }
        }
        if let Some(f) = file(devices::MEMORY) {
            serve(
                &memory.name,
                MEMORY_DEVICE.into(),
                &memory.input,
                f,
                memory.block_size,
            );
        }
        for d in &devs.devices {
            let special = d.name == devices::STATE || d.name == devices::MEMORY;
            if special || drives.contains(&d.name.as_str()) {
                continue;
            }
            if let Some(f) = file(&d.name) {
                serve(
                    &d.name,
                    file_device_name(&d.name)?,
                    &d.input,
                    f,
                    d.block_size,
                );
            }
        }
        let migration = MigrationConfig {
            mode: Mode::PostCopy,
            ..options.migration
        };
        Ok(Registry {
            source: MigrationSource::new(sources, migration),
            served,
            concurrency: options.concurrency.max(1),
            tls: options.tls,
        })
    }

    /// The devices served, in the order they are sent.
    pub fn devices(&self) -> &[ServedDevice] {
        &self.served
    }

    /// Serves one peer on `link` until it has every block (or fails). Any
    /// number of calls may run at once, from any threads. With
    /// [`RegistryOptions::tls`] the link is wrapped in TLS first; a TLS
    /// handshake that fails (a client without a certificate of the CA, or
    /// without TLS) fails this pull only.
    pub fn serve_connection<L: Link>(&self, link: L) -> Result<MigrationReport, MigrationError> {
        let link =
            TlsConfig::maybe_accept(self.tls.as_ref(), link).map_err(|e| MigrationError {
                phase: Phase::Handshake,
                authority: drafter_storage::migrator::Authority::Source,
                cause: drafter_storage::migrator::Cause::Connection(format!(
                    "cannot set up TLS: {e}"
                )),
            })?;
        // No VM to pause: the suspend hook has nothing to do.
        self.source.migrate(link, || Ok(()))
    }

    /// Accepts peers on `listener` and serves each on a thread of its own,
    /// at most [`RegistryOptions::concurrency`] at once, calling `on_client`
    /// with each one's outcome. Runs until accepting fails (transient
    /// failures such as an aborted connection are skipped).
    pub fn serve(
        &self,
        listener: &TcpListener,
        on_client: &(dyn Fn(Result<ServeReport, (String, MigrationError)>) + Sync),
    ) -> Result<(), RegistryError> {
        let slots = Slots::new(self.concurrency);
        std::thread::scope(|s| loop {
            let permit = slots.acquire();
            let (stream, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) if transient(&e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    continue;
                }
                Err(e) => return Err(RegistryError::Accept(e)),
            };
            let peer = peer.to_string();
            tracing::info!(%peer, "peer connected");
            let spawned = std::thread::Builder::new()
                .name("drafter-registry-client".into())
                .spawn_scoped(s, move || {
                    let _permit = permit;
                    let outcome = self
                        .serve_connection(stream)
                        .map(|r| ServeReport::new(peer.clone(), r))
                        .map_err(|e| (peer, e));
                    on_client(outcome);
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a thread for a peer; its connection is dropped");
            }
        })
    }
}

fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    )
}

/// Bounds the peers served at once.
struct Slots {
    free: Mutex<usize>,
    cv: Condvar,
}

/// A slot held while a peer is served; freed when dropped.
struct Permit<'a>(&'a Slots);

impl Slots {
    fn new(n: usize) -> Self {
        Slots {
            free: Mutex::new(n),
            cv: Condvar::new(),
        }
    }

    fn acquire(&self) -> Permit<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.cv.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.cv.notify_one();
    }
}
