//! Migrating a running VM out.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use drafter_storage::migrator::{Authority, Observer};
use drafter_storage::{
    BlockDevice, DeviceConfig, FileDevice, Link, MemoryDevice, MigrationConfig, MigrationSource,
    SourceDevice, TlsConfig, TrackedDevice,
};
use drafter_vmm::Vmm;

use crate::agent::{GuestAgent, HookSummary};

use super::dirty_source::{VmDriveDirtySource, VmMemoryDirtySource};
use super::error::VmMigrationError;
use super::guest_memory::{GuestMemoryDevice, Harvests};
use super::report::VmMigrationReport;
use super::state::{StateFrame, DEFAULT_STATE_CAPACITY};
use super::{drive_device_name, file_device_name, MEMORY_DEVICE, STATE_DEVICE};

/// How a VM is migrated out.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Settings of the "memory" device (block size, dirty cycles).
    pub memory: DeviceConfig,
    /// Settings of the "state" device.
    pub state: DeviceConfig,
    /// Capacity of the "state" device in bytes.
    pub state_capacity: u64,
    /// Settings of drive devices (read-only and writable).
    pub drives: DeviceConfig,
    /// Mode, secret, downtime budget and the rest.
    pub migration: MigrationConfig,
    /// Where a VM whose handover ended with authority unknown (Commit sent,
    /// no acknowledgement) is saved (`state.bin`, `memory.bin`), so it can be
    /// restored here if the destination turns out not to run it. `None`:
    /// the VM is only kept paused in this process.
    pub unresolved_dir: Option<PathBuf>,
    /// Files that travel with the VM (name, path), sent once as
    /// `file/<name>` devices with the drives' settings: a package's
    /// `config`, `kernel` and `initramfs` that came with the VM from a
    /// registry ([`IncomingVm::files`](super::IncomingVm::files)), so a
    /// terminator at the end of the chain can write the package again.
    /// They must not change while the VM migrates.
    pub files: Vec<(String, PathBuf)>,
    /// TLS settings for migration links (mutual certificate
    /// authentication, see [`drafter_storage::tls`]); `None`: plain TCP.
    /// [`VmMigrationSource::migrate`] takes a link as it is: the code that
    /// accepts or dials wraps it ([`TlsConfig::maybe_accept`],
    /// [`TlsConfig::maybe_connect`]), as [`crate::peer::Peer`] does.
    pub tls: Option<TlsConfig>,
}

/// Guest RAM travels in 4 KiB blocks by default, the granularity of KVM's
/// dirty log: a guest that writes a few bytes here and there dirties (and
/// resends) pages, not 64 KiB blocks, so its measured dirty rate, its final
/// dirty set and the downtime follow what it really wrote. In the lab an idle
/// 1 GiB guest's VM downtime went from 233 ms (64 KiB blocks, throttled to
/// 30 % on a dirty rate inflated 16 times) to 176 ms (not throttled).
pub const MEMORY_BLOCK_SIZE: u32 = 4096;

impl Default for SourceOptions {
    fn default() -> Self {
        let state = DeviceConfig {
            block_size: 64 * 1024,
            ..DeviceConfig::default()
        };
        SourceOptions {
            memory: DeviceConfig {
                block_size: MEMORY_BLOCK_SIZE,
                ..DeviceConfig::default()
            },
            state,
            state_capacity: DEFAULT_STATE_CAPACITY,
            drives: DeviceConfig::default(),
            migration: MigrationConfig::default(),
            unresolved_dir: None,
            files: Vec::new(),
            tls: None,
        }
    }
}

/// Migrates a running VM to one destination per [`Self::migrate`] call.
///
/// Devices: "memory" (guest RAM, dirty pages from KVM's dirty log),
/// "state" (the snapshot state, written after the VM is paused so the final
/// dirty cycle carries it), `drive/<name>` for each drive (a writable
/// one tracked through the VMM's virtio-blk dirty log, like memory) and
/// `file/<name>` for each of [`SourceOptions::files`].
pub struct VmMigrationSource {
    vmm: Arc<Mutex<Vmm>>,
    state_device: Arc<TrackedDevice>,
    /// Files of the writable drives, flushed once the VM is paused.
    writable_drives: Vec<PathBuf>,
    source: MigrationSource,
    unresolved_dir: Option<PathBuf>,
    agent: Option<SourceAgent>,
}

/// The guest agent's part in a migration out ([`VmMigrationSource::with_agent`]).
struct SourceAgent {
    agent: Arc<Mutex<GuestAgent>>,
    before_suspend_timeout: Duration,
    rescue_timeout: Duration,
}

fn tracked(dev: Arc<dyn BlockDevice>, cfg: &DeviceConfig) -> TrackedDevice {
    TrackedDevice::new(dev, cfg.expiry)
}

impl VmMigrationSource {
    /// Prepares to migrate `vmm`. Guest RAM is read through the VMM's own
    /// mapping, so any memory backend migrates: anonymous, a MAP_SHARED file,
    /// or userfaultfd (a VM that resumed at authority moves on once its pages
    /// arrive; a page still missing is fetched as the engine reads it).
    pub fn new(vmm: Arc<Mutex<Vmm>>, options: SourceOptions) -> Result<Self, VmMigrationError> {
        let (ram, drives) = {
            let v = vmm.lock().unwrap_or_else(|p| p.into_inner());
            // The VMM sizes guest RAM (all regions together) from the config.
            let ram = v.config().memory_mib << 20;
            (ram, v.config().drives.clone())
        };
        let mut devices = Vec::new();
        let mut drive_devices = Vec::new();
        let mut writable_drives = Vec::new();
        for d in &drives {
            let name = drive_device_name(&d.name)?;
            let file = Arc::new(FileDevice::open_read_only(
                &d.path,
                options.drives.block_size,
            )?);
            if d.read_only {
                drive_devices.push(SourceDevice::fixed(name, file, options.drives.clone()));
            } else {
                // The guest writes the file through the VMM's virtio-blk
                // device, which logs the blocks it wrote.
                let dirty = VmDriveDirtySource::new(vmm.clone(), d.name.clone());
                let dev = tracked(file, &options.drives).with_dirty_source(Arc::new(dirty));
                drive_devices.push(SourceDevice::tracked(
                    name,
                    Arc::new(dev),
                    options.drives.clone(),
                ));
                writable_drives.push(d.path.clone());
            }
        }
        let mut file_devices = Vec::new();
        for (name, path) in &options.files {
            let file = FileDevice::open_read_only(path, options.drives.block_size)?;
            file_devices.push(SourceDevice::fixed(
                file_device_name(name)?,
                Arc::new(file),
                options.drives.clone(),
            ));
        }
        // The engine reads guest RAM through the VMM's mapping, whatever
        // backs it; only the guest writes it.
        let (guest, untouched_is_zero) = {
            let v = vmm.lock().unwrap_or_else(|p| p.into_inner());
            (v.guest_memory().clone(), v.untouched_memory_is_zero())
        };
        let harvests = Harvests::default();
        let mut file = GuestMemoryDevice::new(guest, options.memory.block_size)?;
        if untouched_is_zero {
            file = file.skip_untouched_pages(harvests.clone());
        }
        if file.size() != ram {
            return Err(VmMigrationError::GuestMemorySize {
                actual: file.size(),
                expected: ram,
            });
        }
        let memory = Arc::new(tracked(Arc::new(file), &options.memory).with_dirty_source(
            Arc::new(VmMemoryDirtySource::new(vmm.clone()).with_harvests(harvests)),
        ));
        let state_device = Arc::new(tracked(
            Arc::new(MemoryDevice::new(
                options.state_capacity,
                options.state.block_size,
            )?),
            &options.state,
        ));
        devices.push(SourceDevice::tracked(
            MEMORY_DEVICE,
            memory,
            options.memory.clone(),
        ));
        devices.push(SourceDevice::tracked(
            STATE_DEVICE,
            state_device.clone(),
            options.state.clone(),
        ));
        devices.extend(drive_devices);
        devices.extend(file_devices);
        Ok(VmMigrationSource {
            vmm: vmm.clone(),
            state_device,
            writable_drives,
            source: MigrationSource::new(devices, options.migration)
                .with_throttle(throttle_hook(vmm.clone())),
            unresolved_dir: options.unresolved_dir,
            agent: None,
        })
    }

    /// Calls the VM's guest agent around the final stop: `BeforeSuspend`
    /// (within `before_suspend_timeout`) while the VM still runs, once the
    /// dirty cycles are done (not when the migration starts), followed by
    /// one more dirty cycle before the pause for the handover. A hook that fails is reported
    /// ([`VmMigrationReport::before_suspend`]) and the VM is migrated
    /// anyway. If the migration then fails and the VM resumes here, the
    /// agent's `AfterResume` is called within `rescue_timeout`.
    pub fn with_agent(
        mut self,
        agent: Arc<Mutex<GuestAgent>>,
        before_suspend_timeout: Duration,
        rescue_timeout: Duration,
    ) -> Self {
        self.agent = Some(SourceAgent {
            agent,
            before_suspend_timeout,
            rescue_timeout,
        });
        self
    }

    /// Calls `observer` with the engine's progress.
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.source = self.source.with_observer(observer);
        self
    }

    /// Migrates the VM over `link`. The VM is paused for the handover and
    /// stays paused (never stopped) until the destination acknowledged that
    /// it runs it ([`drafter_storage::migrator`] describes the protocol).
    /// On success the VM here is stopped: it runs on the destination now.
    /// On failure, by [`VmMigrationError::authority`]:
    /// * source: the destination provably does not run it; it is resumed
    ///   here and may be migrated again later;
    /// * destination: it runs there; it is stopped here;
    /// * unknown ([`VmMigrationError::AuthorityUnknown`]): Commit was sent
    ///   but not acknowledged; it stays paused here (and is saved to
    ///   [`SourceOptions::unresolved_dir`]) until an operator has checked
    ///   the destination ([`Self::resume_here`] then resumes it).
    pub fn migrate<L: Link>(&self, link: L) -> Result<VmMigrationReport, VmMigrationError> {
        let scratch = tempfile::Builder::new()
            .prefix("drafter-migration-")
            .tempdir()
            .map_err(|e| VmMigrationError::io("temporary directory for the VM state", e))?;
        let state_path = scratch.path().join("state");
        let mut state_bytes = 0u64;
        let mut timings = (None, None);
        let hook = std::cell::OnceCell::new();
        // KVM logs dirty pages only while a migration runs.
        self.vmm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_dirty_logging(true)?;
        // The final stop: the guest prepares while it still runs, and what
        // the hook wrote goes out in one more dirty cycle before the pause.
        let prepare = Box::new(|| {
            let _ = hook.set(self.before_suspend());
        });
        let result = self.source.migrate_prepared(link, Some(prepare), || {
            let start = Instant::now();
            let frame = self.suspend(&state_path, &mut timings.0)?;
            state_bytes = frame.state.len() as u64;
            frame
                .write_to(self.state_device.as_ref())
                .map_err(|e| e.to_string())?;
            let total = start.elapsed().as_secs_f64() * 1e3;
            timings.1 = Some(total - timings.0.unwrap_or(0.0));
            Ok(())
        });
        let before_suspend = hook.into_inner().flatten();
        let mut vmm = self.vmm.lock().unwrap_or_else(|p| p.into_inner());
        // Whatever the outcome, the VM runs unthrottled again.
        if let Err(e) = vmm.set_throttle(0) {
            tracing::warn!(error = %e, "cannot remove the vCPU throttle");
        }
        match result {
            Ok(storage) => {
                vmm.stop();
                Ok(VmMigrationReport {
                    storage,
                    state_bytes,
                    pause_millis: timings.0,
                    state_millis: timings.1,
                    before_suspend,
                    ..VmMigrationReport::default()
                })
            }
            Err(e) => match e.authority {
                Authority::Source => {
                    if let Err(e) = vmm.set_dirty_logging(false) {
                        tracing::warn!(error = %e, "cannot turn the dirty log off");
                    }
                    if vmm.is_paused() {
                        vmm.resume()?;
                    }
                    drop(vmm);
                    if before_suspend.is_some() {
                        self.after_resume_here();
                    }
                    Err(e.into())
                }
                Authority::Destination => {
                    vmm.stop();
                    Err(e.into())
                }
                Authority::Unknown => {
                    // Neither resumed nor stopped: the destination may run it.
                    let saved = self.unresolved_dir.as_ref().and_then(|dir| {
                        match save_unresolved(&mut vmm, dir) {
                            Ok(files) => Some(files),
                            Err(err) => {
                                tracing::error!(dir = %dir.display(), error = %err, "cannot save the paused VM of an unresolved handover");
                                None
                            }
                        }
                    });
                    tracing::error!(error = %e, "handover unresolved: the VM stays paused here");
                    Err(VmMigrationError::AuthorityUnknown {
                        source: e,
                        saved: saved.map(Box::new),
                    })
                }
            },
        }
    }

    /// Resumes the VM here after a handover with authority unknown, once an
    /// operator has made sure the destination does not run it.
    pub fn resume_here(&self) -> Result<(), VmMigrationError> {
        let mut vmm = self.vmm.lock().unwrap_or_else(|p| p.into_inner());
        if vmm.is_paused() {
            vmm.resume()?;
        }
        Ok(())
    }

    /// Runs the agent's `BeforeSuspend` hook, if the VM has an agent.
    fn before_suspend(&self) -> Option<HookSummary> {
        let a = self.agent.as_ref()?;
        let call = a
            .agent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .before_suspend(a.before_suspend_timeout);
        match call.error() {
            Some(e) => {
                tracing::warn!(error = %e, "the agent's BeforeSuspend hook failed; suspending the VM anyway")
            }
            None => tracing::info!(ms = call.ms(), "the agent's BeforeSuspend hook ran"),
        }
        Some(call.summary())
    }

    /// The VM resumed here after `BeforeSuspend` ran and the migration
    /// failed: tells the agent (`AfterResume`, within the rescue timeout).
    fn after_resume_here(&self) {
        let Some(a) = &self.agent else { return };
        let call = a
            .agent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .after_resume(a.rescue_timeout);
        match call.error() {
            Some(e) => {
                tracing::warn!(error = %e, "the VM resumed here, but the agent's AfterResume hook failed")
            }
            None => {
                tracing::info!(
                    ms = call.ms(),
                    "the VM resumed here; the agent's AfterResume hook ran"
                )
            }
        }
    }

    /// Pauses the VM and captures its state. Guest memory needs no sync: the
    /// engine reads it through the VMM's own mapping.
    fn suspend(
        &self,
        state_path: &Path,
        pause_millis: &mut Option<f64>,
    ) -> Result<StateFrame, String> {
        let paused_at = SystemTime::now();
        {
            let mut vmm = self.vmm.lock().unwrap_or_else(|p| p.into_inner());
            let start = Instant::now();
            vmm.pause().map_err(|e| format!("pausing the VM: {e}"))?;
            *pause_millis = Some(start.elapsed().as_secs_f64() * 1e3);
            vmm.snapshot_state(state_path)
                .map_err(|e| format!("saving the VM state: {e}"))?;
        }
        // No block request is in flight now (the pause joined the drives'
        // I/O threads); the engine reads the files through the page cache,
        // the flush makes what the guest wrote durable here too.
        for path in &self.writable_drives {
            std::fs::File::open(path)
                .and_then(|f| f.sync_data())
                .map_err(|e| format!("flushing drive {}: {e}", path.display()))?;
        }
        let state = std::fs::read(state_path).map_err(|e| format!("reading the VM state: {e}"))?;
        Ok(StateFrame { paused_at, state })
    }
}

/// The engine's throttle hook: slows the VM's vCPUs while it dirties
/// memory faster than the link drains (auto-converge).
fn throttle_hook(vmm: Arc<Mutex<Vmm>>) -> drafter_storage::ThrottleHook {
    Arc::new(move |percent| {
        let mut v = vmm.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = v.set_throttle(percent) {
            tracing::warn!(percent, error = %e, "cannot throttle the vCPUs");
        }
    })
}

/// Saves the paused VM as a snapshot (`state.bin`, `memory.bin`) in `dir`.
fn save_unresolved(vmm: &mut Vmm, dir: &Path) -> Result<(PathBuf, PathBuf), VmMigrationError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| VmMigrationError::io(format!("creating {}", dir.display()), e))?;
    let (state, memory) = (dir.join("state.bin"), dir.join("memory.bin"));
    vmm.snapshot(&state, &memory)?;
    Ok((state, memory))
}
