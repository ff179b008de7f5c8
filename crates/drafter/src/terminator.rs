//! The terminator (the library behind `drafter-terminator`): takes a running
//! VM from a peer as the last hop of a migration and writes it into a
//! package that `drafter-runner` resumes — a backup that ends the VM's run.
//!
//! It is a migration destination without a VM ([`crate::migration`]): every
//! device the peer sends goes into a `.partial` file next to its `output`
//! (`memory`, every `drive/<name>` under the drive's name, every
//! `file/<name>` such as `config` or `kernel` that came with the VM from a
//! registry), and the `state` device's VM state into the `state` output.
//! Only once every block has arrived and every file is on stable storage
//! does the terminator ask for the VM (ReadyToRun); on the peer's Commit it
//! renames the files into place, flushes their folders, and acknowledges
//! (Running), after which the peer stops the VM. The handover rules are the
//! same as between peers ([`drafter_storage::migrator`]):
//!
//! * anything that fails before the files are complete and durable — a bad
//!   device list, a full disk, a cut link, a terminator that dies — leaves
//!   the VM running on the peer, and the `.partial` files are removed;
//! * if renaming fails after Commit, the terminator declines and the peer
//!   resumes the VM;
//! * a failure between Commit and the acknowledgement leaves authority
//!   unknown: the peer keeps the VM paused and saved, as for a peer.
//!
//! If the peer sent no `config` (its VM was booted or restored by the peer
//! rather than pulled from a registry) but `--devices` asks for one, a
//! `config.json` is written from the VM's state, with the reference's agent
//! and liveness ports (26 and 25).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drafter_storage::migrator::DestinationSession;
use drafter_storage::protocol::DeviceInfo;
use drafter_storage::tls::host_of;
use drafter_storage::{
    BlockDevice, DestinationDevice, FileDevice, Initial, LazyDevice, Link, MemoryDevice,
    MigrationConfig, MigrationDestination, MigrationError, MigrationReport, TlsConfig,
};
use drafter_vmm::{persist, Snapshot};
use serde::Serialize;

use crate::devices::{self, DevicesError, TerminatorDevices};
use crate::files::{self, Created};
use crate::in_use::{InUse, InUseError};
use crate::migration::{
    StateFrame, StateFrameError, DRIVE_PREFIX, FILE_PREFIX, MEMORY_DEVICE, STATE_DEVICE,
};
use crate::package_config::{
    PackageConfig, PackageConfigError, PackageDrive, PackageNetwork, PACKAGE_FORMAT_VERSION,
};

/// Largest `state` device accepted (it is held in memory).
const MAX_STATE: u64 = 64 << 20;

/// Why a terminator failed. Unless it is a [`Self::Migration`] error whose
/// authority is not the source's, the VM still runs on the peer.
#[derive(Debug, thiserror::Error)]
pub enum TerminatorError {
    /// Bad `--devices`.
    #[error(transparent)]
    Devices(#[from] DevicesError),
    /// A runner runs the package the outputs would replace.
    #[error(transparent)]
    InUse(#[from] InUseError),
    /// The peer could not be reached.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// An output file could not be written.
    #[error("device {name:?}: {path}: {source}")]
    Output {
        /// The device.
        name: String,
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The peer's VM does not fit `--devices`, or its state is unusable; the
    /// terminator declined and the VM keeps running on the peer.
    #[error("{0}; the VM keeps running on the peer")]
    Refused(String),
    /// The migration failed ([`MigrationError::authority`] says who has
    /// the VM).
    #[error(transparent)]
    Migration(#[from] MigrationError),
    /// The TLS settings cannot be used for this connection (e.g. a server
    /// name that is not a DNS name or IP address).
    #[error(transparent)]
    Tls(#[from] drafter_storage::TlsError),
}

impl TerminatorError {
    /// True if the VM is still the peer's (nothing was handed over).
    pub fn peer_keeps_vm(&self) -> bool {
        match self {
            TerminatorError::Migration(e) => e.source_keeps_authority(),
            _ => true,
        }
    }
}

/// Progress callback: blocks present so far, blocks in all devices.
pub type TerminatorProgress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// How to take a VM.
pub struct TerminatorOptions {
    /// Where each device goes (`--devices`).
    pub devices: TerminatorDevices,
    /// Secret and timeouts (the mode is the peer's choice).
    pub migration: MigrationConfig,
    /// Called about ten times a second while blocks arrive.
    pub progress: Option<TerminatorProgress>,
    /// TLS settings for [`terminate_from`] (TLS 1.3 with mutual certificate
    /// authentication, see [`drafter_storage::tls`]): the peer's
    /// certificate must name the host of its address, or the settings'
    /// server name. `None`: plain TCP. [`terminate`] takes the link as
    /// given.
    pub tls: Option<TlsConfig>,
}

/// One written output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WrittenDevice {
    /// Device name.
    pub name: String,
    /// Where it was written.
    pub output: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// "received", or for a `config` the peer did not send, "from-state".
    pub source: String,
}

/// What a terminator did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TerminatorReport {
    /// Bytes read from the peer.
    pub bytes_received: u64,
    /// From connecting to every block received.
    pub transfer_ms: f64,
    /// From connecting to the files in place and the peer told.
    pub total_ms: f64,
    /// Flushing every file to stable storage before asking for the VM.
    pub sync_ms: f64,
    /// The outputs, in `--devices` order.
    pub devices: Vec<WrittenDevice>,
    /// Devices the peer sent that `--devices` gives no output (dropped).
    pub dropped: Vec<String>,
    /// The storage engine's report.
    pub storage: MigrationReport,
}

/// A device that drops what it is given: a travelling file nobody asked for.
struct Discard {
    size: u64,
    block_size: u32,
}

impl BlockDevice for Discard {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> drafter_storage::error::Result<()> {
        drafter_storage::device::check_range(offset, buf.len(), self.size)?;
        buf.fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> drafter_storage::error::Result<()> {
        drafter_storage::device::check_range(offset, buf.len(), self.size)
    }

    fn flush(&self) -> drafter_storage::error::Result<()> {
        Ok(())
    }
}

/// The outputs being written: partial files, and the folders made for them.
struct Outputs<'a> {
    devices: &'a TerminatorDevices,
    created: Created,
    /// Wire name → the `--devices` name it is written as.
    incoming: HashMap<String, String>,
    dropped: Vec<String>,
}

impl Outputs<'_> {
    fn output(&self, name: &str) -> Option<&Path> {
        self.devices.get(name).map(|d| d.output.as_path())
    }

    fn out_err(name: &str, path: &Path) -> impl FnOnce(std::io::Error) -> String {
        let (name, path) = (name.to_owned(), path.to_path_buf());
        move |e| format!("device {name:?}: {}: {e}", path.display())
    }

    /// Records that wire device `info` is written as `name`, refusing a
    /// second device written as the same name.
    fn claim(&mut self, name: &str, info: &DeviceInfo) -> Result<(), String> {
        if self.incoming.values().any(|n| n == name) {
            return Err(format!("the peer sent a second device for {name:?}"));
        }
        self.incoming.insert(info.name.clone(), name.to_owned());
        Ok(())
    }

    /// Creates `<output>.partial` for device `name`.
    fn partial(&mut self, name: &str, info: &DeviceInfo) -> Result<Arc<FileDevice>, String> {
        self.claim(name, info)?;
        let output = self
            .output(name)
            .map(Path::to_path_buf)
            .ok_or_else(|| format!("no output for {name:?}"))?;
        if output.is_dir() {
            return Err(format!(
                "device {name:?}: {} is a directory",
                output.display()
            ));
        }
        if let Some(dir) = output.parent() {
            self.created
                .create_dir_all(dir)
                .map_err(Self::out_err(name, dir))?;
        }
        let partial = files::partial_path(&output);
        self.created.file(partial.clone());
        let dev = FileDevice::create(&partial, info.size, info.block_size)
            .map_err(|e| format!("device {name:?}: {e}"))?;
        Ok(Arc::new(dev))
    }

    /// The factory of the destination's devices.
    fn make(&mut self, info: &DeviceInfo) -> Result<DestinationDevice, String> {
        let backing: Arc<dyn BlockDevice> = if info.name == STATE_DEVICE {
            if info.size > MAX_STATE {
                return Err(format!(
                    "a state device of {} bytes is larger than the {MAX_STATE} accepted",
                    info.size
                ));
            }
            self.claim(devices::STATE, info)?;
            Arc::new(MemoryDevice::new(info.size, info.block_size).map_err(|e| e.to_string())?)
        } else if info.name == MEMORY_DEVICE {
            self.partial(devices::MEMORY, info)?
        } else if let Some(drive) = info.name.strip_prefix(DRIVE_PREFIX) {
            if self.output(drive).is_none() {
                return Err(format!(
                    "the VM has a drive {drive:?} and --devices gives it no output"
                ));
            }
            self.partial(drive, info)?
        } else if let Some(file) = info.name.strip_prefix(FILE_PREFIX) {
            if self.output(file).is_some() {
                self.partial(file, info)?
            } else {
                self.dropped.push(file.to_owned());
                Arc::new(Discard {
                    size: info.size,
                    block_size: info.block_size,
                })
            }
        } else {
            return Err("not a device of a VM migration".into());
        };
        Ok(DestinationDevice {
            backing,
            initial: Initial::Zeroed,
        })
    }
}

/// A `config.json` for a VM whose peer sent none, from its state.
fn config_from_state(snap: &Snapshot) -> PackageConfig {
    PackageConfig {
        format_version: PACKAGE_FORMAT_VERSION,
        agent_vsock_port: 26,
        liveness_vsock_port: 25,
        cpu_count: snap.config.vcpus,
        memory_size: snap.memory_size >> 20,
        boot_args: snap.config.boot_args.clone(),
        initramfs: snap.config.initramfs.is_some(),
        drives: snap
            .config
            .drives
            .iter()
            .map(|d| PackageDrive {
                name: d.name.clone(),
                read_only: d.read_only,
            })
            .collect(),
        vsock_cid: snap.config.vsock.as_ref().map_or(3, |v| v.cid),
        network: snap.config.net.as_ref().and_then(|n| {
            n.mac.as_ref().map(|mac| PackageNetwork {
                interface: n.tap.clone(),
                mac: mac.clone(),
            })
        }),
        cpu_template: snap.config.cpu_template.name().into(),
    }
}

/// Connects to the peer at `raddr` (`host:port`), over TLS with
/// [`TerminatorOptions::tls`], and takes its VM. The TLS handshake runs
/// within the migration's handshake timeout; a TLS failure is a failed
/// migration that leaves the VM on the peer.
pub fn terminate_from(
    raddr: &str,
    options: TerminatorOptions,
) -> Result<TerminatorReport, TerminatorError> {
    let link =
        crate::dial::connect(raddr, options.migration.handshake_timeout).map_err(|source| {
            TerminatorError::Connect {
                addr: raddr.to_owned(),
                source,
            }
        })?;
    let link = TlsConfig::maybe_connect(options.tls.as_ref(), link, host_of(raddr))?;
    terminate(link, options)
}

/// Takes the VM the peer at the other end of `link` sends and writes it
/// into the `--devices` outputs (see the module documentation for the
/// order of events and what each failure leaves behind).
pub fn terminate<L: Link>(
    link: L,
    options: TerminatorOptions,
) -> Result<TerminatorReport, TerminatorError> {
    let start = Instant::now();
    // A runner running the package being replaced would write it too.
    if let Some(state) = options.devices.get(devices::STATE) {
        InUse::ensure_not_running(&state.output)?;
    }
    let mut outputs = Outputs {
        devices: &options.devices,
        created: Created::default(),
        incoming: HashMap::new(),
        dropped: Vec::new(),
    };
    let session =
        MigrationDestination::accept(link, &options.migration, |info| outputs.make(info))?;
    // Until Commit, any failure declines: the peer resumes its VM, and
    // dropping `outputs` removes every partial file.
    let refuse = |why: String| {
        session.decline(&why);
        TerminatorError::Refused(why)
    };
    for (required, wire) in [
        (devices::STATE, STATE_DEVICE),
        (devices::MEMORY, MEMORY_DEVICE),
    ] {
        if session.device(wire).is_none() {
            return Err(refuse(format!("the peer sent no {required:?} device")));
        }
    }
    let wanted_missing: Vec<&str> = options
        .devices
        .devices
        .iter()
        .map(|d| d.name.as_str())
        .filter(|n| *n != devices::CONFIG && !outputs.incoming.values().any(|i| i == n))
        .collect();
    if !wanted_missing.is_empty() {
        return Err(refuse(format!(
            "the peer's VM has no device(s) {} asked for in --devices",
            wanted_missing.join(", ")
        )));
    }

    received_with_progress(&session, options.progress.as_ref())?;
    let transfer_ms = start.elapsed().as_secs_f64() * 1e3;

    // The state: its VM state goes to the state output (checked first).
    let state_out = outputs
        .output(devices::STATE)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let state_partial = files::partial_path(&state_out);
    let snap = (|| {
        let dev = session
            .device(STATE_DEVICE)
            .ok_or_else(|| "the peer sent no state".to_string())?;
        let frame = StateFrame::read_from(&*dev).map_err(|e: StateFrameError| e.to_string())?;
        outputs.created.file(state_partial.clone());
        std::fs::write(&state_partial, &frame.state)
            .map_err(Outputs::out_err(devices::STATE, &state_partial))?;
        let snap: Snapshot = persist::read_state_file(&state_partial)
            .map_err(|e| format!("the peer's VM state is unusable: {e}"))?;
        let memory = session.device(MEMORY_DEVICE).map_or(0, |m| m.size());
        if memory != snap.memory_size {
            return Err(format!(
                "the peer sent {memory} bytes of memory for a VM with {}",
                snap.memory_size
            ));
        }
        Ok(snap)
    })()
    .map_err(&refuse)?;

    // The config: the one that came with the VM, checked, or one from the state.
    let config_source = match outputs.output(devices::CONFIG).map(Path::to_path_buf) {
        None => None,
        Some(out) => {
            let partial = files::partial_path(&out);
            if outputs.incoming.values().any(|i| i == devices::CONFIG) {
                PackageConfig::read(&partial)
                    .map_err(|e: PackageConfigError| e.to_string())
                    .map_err(&refuse)?;
                Some("received")
            } else {
                let text = config_from_state(&snap).to_json();
                if let Some(dir) = out.parent() {
                    outputs
                        .created
                        .create_dir_all(dir)
                        .map_err(Outputs::out_err(devices::CONFIG, dir))
                        .map_err(&refuse)?;
                }
                outputs.created.file(partial.clone());
                std::fs::write(&partial, text)
                    .map_err(Outputs::out_err(devices::CONFIG, &partial))
                    .map_err(&refuse)?;
                Some("from-state")
            }
        }
    };

    // Everything on stable storage before the VM is asked for.
    let sync_start = Instant::now();
    let mut to_place: Vec<(String, PathBuf, PathBuf)> = Vec::new();
    for d in &options.devices.devices {
        to_place.push((
            d.name.clone(),
            files::partial_path(&d.output),
            d.output.clone(),
        ));
    }
    for (name, partial, _) in &to_place {
        files::fsync(partial)
            .map_err(Outputs::out_err(name, partial))
            .map_err(&refuse)?;
    }
    let sync_ms = sync_start.elapsed().as_secs_f64() * 1e3;

    // Ask for the VM; from Commit on it is ours once the files are in place.
    session.ready_to_run()?;
    let mut placed = Vec::new();
    let placing = (|| {
        for (name, partial, output) in &to_place {
            std::fs::rename(partial, output).map_err(Outputs::out_err(name, output))?;
            placed.push(output.clone());
            let _ = files::fsync_dir_of(output);
        }
        Ok::<(), String>(())
    })();
    if let Err(why) = placing {
        // The peer resumes its VM; what was placed is a copy of a VM that
        // runs on, so it goes too.
        for p in &placed {
            let _ = std::fs::remove_file(p);
        }
        return Err(refuse(format!("placing the outputs failed: {why}")));
    }
    outputs.created.keep();
    // A new package: a mark left by a run of the old one no longer applies.
    if let Some(state) = options.devices.get(devices::STATE) {
        if let Err(e) = InUse::clear_stale(&state.output) {
            tracing::warn!(error = %e, "the package's old in-use mark stays");
        }
    }
    if let Err(e) = session.running() {
        tracing::warn!(error = %e, "the peer may not have heard that the VM is in the package");
    }
    let storage = session.wait_complete().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "the link failed after the VM was handed over");
        MigrationReport::default()
    });
    let devices = to_place
        .iter()
        .map(|(name, _, output)| WrittenDevice {
            name: name.clone(),
            output: output.clone(),
            bytes: std::fs::metadata(output).map(|m| m.len()).unwrap_or(0),
            source: if name == devices::CONFIG {
                config_source.unwrap_or("received").to_owned()
            } else {
                "received".to_owned()
            },
        })
        .collect();
    Ok(TerminatorReport {
        bytes_received: storage.bytes_received,
        transfer_ms,
        total_ms: start.elapsed().as_secs_f64() * 1e3,
        sync_ms,
        devices,
        dropped: outputs.dropped.clone(),
        storage,
    })
}

/// Waits until every block arrived, reporting progress meanwhile.
fn received_with_progress(
    session: &DestinationSession,
    progress: Option<&TerminatorProgress>,
) -> Result<(), MigrationError> {
    let Some(progress) = progress else {
        return session.wait_received();
    };
    let lazies: Vec<Arc<LazyDevice>> = session.devices().iter().map(|(_, d)| d.clone()).collect();
    let total: u64 = lazies.iter().map(|d| d.block_count()).sum();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let reporter = s.spawn(|| {
            let report = || {
                let missing: u64 = lazies.iter().map(|d| d.missing_blocks()).sum();
                progress(total - missing.min(total), total);
            };
            while !done.load(Ordering::SeqCst) {
                report();
                std::thread::park_timeout(Duration::from_millis(100));
            }
            report();
        });
        let r = session.wait_received();
        done.store(true, Ordering::SeqCst);
        reporter.thread().unpark();
        r
    })
}
