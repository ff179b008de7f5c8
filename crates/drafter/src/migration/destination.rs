//! Receiving a VM and restoring it in this process.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use drafter_storage::migrator::DestinationSession;
use drafter_storage::protocol::DeviceInfo;
use drafter_storage::{
    BlockDevice, DestinationDevice, FileDevice, Initial, LazyDevice, Link, MemoryDevice,
    MigrationConfig, MigrationDestination,
};
use drafter_vmm::device_manager::ConsoleOut;
use drafter_vmm::{persist, RestoreMemory, Snapshot, Vmm};

use super::error::VmMigrationError;
use super::page_provider::LazyPageProvider;
use super::report::VmMigrationReport;
use super::state::StateFrame;
use super::{drive_device_name, DRIVE_PREFIX, MEMORY_DEVICE, STATE_DEVICE};

/// Largest "state" device a destination accepts (it is held in memory).
pub const MAX_STATE_CAPACITY: u64 = 64 << 20;

/// When the received VM resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resume {
    /// Once every block is here: guest RAM is the received memory file,
    /// mapped MAP_SHARED (the VM can be migrated on from here).
    #[default]
    AfterComplete,
    /// As soon as authority arrives: guest RAM is filled on demand through
    /// userfaultfd from the incoming memory device while the rest streams
    /// in (post-copy). If the connection breaks before every page arrived,
    /// the guest cannot continue.
    AtAuthority,
}

/// How a VM is received.
pub struct DestinationOptions {
    /// Where the memory file (`memory.bin`), the state (`state.bin`) and
    /// drives (`drive-<name>`) are stored; created if missing.
    pub work_dir: PathBuf,
    /// When the VM resumes.
    pub resume: Resume,
    /// Secret, timeouts and the rest (the mode is the source's choice).
    pub migration: MigrationConfig,
    /// Guest console sink; defaults to what the VM's config says.
    pub console: Option<ConsoleOut>,
}

impl DestinationOptions {
    /// Defaults with files under `work_dir`.
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        DestinationOptions {
            work_dir: work_dir.into(),
            resume: Resume::default(),
            migration: MigrationConfig::default(),
            console: None,
        }
    }

    /// The memory file a received VM runs from.
    pub fn memory_file(&self) -> PathBuf {
        self.work_dir.join("memory.bin")
    }
}

/// Receives VMs.
pub struct VmMigrationDestination;

/// A VM received and running in this process.
pub struct IncomingVm {
    vmm: Vmm,
    memory_file: Option<PathBuf>,
    session: Option<DestinationSession>,
    report: VmMigrationReport,
}

impl IncomingVm {
    /// The running VM.
    pub fn vmm(&mut self) -> &mut Vmm {
        &mut self.vmm
    }

    /// The MAP_SHARED memory file backing guest RAM ([`Resume::AfterComplete`]).
    pub fn memory_file(&self) -> Option<&Path> {
        self.memory_file.as_deref()
    }

    /// The report so far (complete once [`Self::finish_transfer`] returned).
    pub fn report(&self) -> &VmMigrationReport {
        &self.report
    }

    /// Waits until every block arrived (at once for
    /// [`Resume::AfterComplete`]) and returns the full report.
    pub fn finish_transfer(&mut self) -> Result<VmMigrationReport, VmMigrationError> {
        if let Some(session) = self.session.take() {
            self.report.storage = session.wait_complete()?;
        }
        Ok(self.report.clone())
    }

    /// The VM and its memory file, once the transfer is finished.
    pub fn into_parts(mut self) -> Result<(Vmm, Option<PathBuf>), VmMigrationError> {
        self.finish_transfer()?;
        Ok((self.vmm, self.memory_file))
    }
}

fn make_device(work_dir: &Path, info: &DeviceInfo) -> Result<DestinationDevice, String> {
    let backing: Arc<dyn BlockDevice> = if info.name == MEMORY_DEVICE {
        Arc::new(
            FileDevice::create(work_dir.join("memory.bin"), info.size, info.block_size)
                .map_err(|e| e.to_string())?,
        )
    } else if info.name == STATE_DEVICE {
        if info.size > MAX_STATE_CAPACITY {
            return Err(format!(
                "state device of {} bytes is larger than the {MAX_STATE_CAPACITY} accepted",
                info.size
            ));
        }
        Arc::new(MemoryDevice::new(info.size, info.block_size).map_err(|e| e.to_string())?)
    } else if let Some(drive) = info.name.strip_prefix(DRIVE_PREFIX) {
        drive_device_name(drive).map_err(|e| e.to_string())?;
        Arc::new(
            FileDevice::create(drive_path(work_dir, drive), info.size, info.block_size)
                .map_err(|e| e.to_string())?,
        )
    } else {
        return Err("not a device of a VM migration".into());
    };
    Ok(DestinationDevice {
        backing,
        initial: Initial::Zeroed,
    })
}

fn drive_path(work_dir: &Path, drive: &str) -> PathBuf {
    work_dir.join(format!("drive-{drive}"))
}

impl VmMigrationDestination {
    /// Receives a VM over `link` and restores it here, resuming it as
    /// `options.resume` says. Returns with the VM running.
    pub fn accept<L: Link>(
        link: L,
        options: DestinationOptions,
    ) -> Result<IncomingVm, VmMigrationError> {
        let work_dir = options.work_dir.clone();
        std::fs::create_dir_all(&work_dir)
            .map_err(|e| VmMigrationError::io(format!("creating {}", work_dir.display()), e))?;
        // A state file left by an earlier run must not pass for this one's.
        let stale = work_dir.join("state.bin");
        if let Err(e) = std::fs::remove_file(&stale) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(VmMigrationError::io(
                    format!("removing {}", stale.display()),
                    e,
                ));
            }
        }
        let session = MigrationDestination::accept(link, &options.migration, |info| {
            make_device(&work_dir, info)
        })?;
        let device = |name: &str| {
            session.device(name).ok_or_else(|| {
                session.abort();
                VmMigrationError::MissingDevice(name.to_string())
            })
        };
        let memory = device(MEMORY_DEVICE)?;
        let state = device(STATE_DEVICE)?;
        let drives: Vec<(String, Arc<LazyDevice>)> = session
            .devices()
            .iter()
            .filter_map(|(i, d)| {
                i.name
                    .strip_prefix(DRIVE_PREFIX)
                    .map(|n| (n.to_string(), d.clone()))
            })
            .collect();
        let memory_file = options.memory_file();
        let fail = |session: &DestinationSession, e: VmMigrationError| {
            session.abort();
            e
        };
        let (session, storage, restore_memory, resumed) = match options.resume {
            Resume::AfterComplete => {
                let report = session.wait_complete()?;
                (
                    None,
                    report,
                    RestoreMemory::Shared(memory_file.clone()),
                    "after-complete",
                )
            }
            Resume::AtAuthority => {
                session.wait_authority()?;
                if let Err(e) = fetch_all(&drives) {
                    return Err(fail(&session, e));
                }
                let provider = LazyPageProvider::new(memory.clone());
                (
                    Some(session),
                    Default::default(),
                    RestoreMemory::Userfault(Box::new(provider)),
                    "at-authority",
                )
            }
        };
        let restored = restore(
            &work_dir,
            &state,
            memory.size(),
            &drives,
            restore_memory,
            options.console,
        );
        let (vmm, frame, restore_millis) = match restored {
            Ok(r) => r,
            Err(e) => {
                if let Some(s) = &session {
                    s.abort();
                }
                if options.resume == Resume::AfterComplete && work_dir.join("state.bin").exists() {
                    return Err(VmMigrationError::Restore {
                        dir: work_dir,
                        source: Box::new(e),
                    });
                }
                return Err(e);
            }
        };
        let downtime = SystemTime::now()
            .duration_since(frame.paused_at)
            .ok()
            .map(|d| d.as_secs_f64() * 1e3);
        Ok(IncomingVm {
            vmm,
            memory_file: (options.resume == Resume::AfterComplete).then_some(memory_file),
            session,
            report: VmMigrationReport {
                storage,
                state_bytes: frame.state.len() as u64,
                restore_millis: Some(restore_millis),
                vm_downtime_millis: downtime,
                resumed: Some(resumed.into()),
                ..VmMigrationReport::default()
            },
        })
    }
}

/// Makes every block of the drives present (the VMM reads drive files
/// directly, not through the lazy device).
fn fetch_all(drives: &[(String, Arc<LazyDevice>)]) -> Result<(), VmMigrationError> {
    for (_, d) in drives {
        if d.missing_blocks() == 0 {
            continue;
        }
        let bs = u64::from(d.block_size());
        let mut buf = vec![0u8; bs as usize];
        for i in 0..d.block_count() {
            if d.is_present(i) {
                continue;
            }
            let len = bs.min(d.size() - i * bs) as usize;
            d.read_at(&mut buf[..len], i * bs)?;
        }
    }
    Ok(())
}

/// Restores and resumes the VM from the received state; returns it, the
/// state frame and the milliseconds the restore took.
fn restore(
    work_dir: &Path,
    state: &LazyDevice,
    memory_size: u64,
    drives: &[(String, Arc<LazyDevice>)],
    memory: RestoreMemory,
    console: Option<ConsoleOut>,
) -> Result<(Vmm, StateFrame, f64), VmMigrationError> {
    let start = Instant::now();
    let frame = StateFrame::read_from(state)?;
    let state_path = work_dir.join("state.bin");
    std::fs::write(&state_path, &frame.state)
        .map_err(|e| VmMigrationError::io(format!("writing {}", state_path.display()), e))?;
    let mut snap: Snapshot =
        persist::read_state_file(&state_path).map_err(drafter_vmm::Error::from)?;
    if snap.memory_size != memory_size {
        return Err(VmMigrationError::MemoryFileSize {
            path: work_dir.join("memory.bin"),
            actual: memory_size,
            expected: snap.memory_size,
        });
    }
    if !snap.config.drives.is_empty() {
        for d in &mut snap.config.drives {
            if !drives.iter().any(|(n, _)| *n == d.name) {
                return Err(VmMigrationError::MissingDevice(format!(
                    "{DRIVE_PREFIX}{}",
                    d.name
                )));
            }
            d.path = drive_path(work_dir, &d.name);
        }
        persist::write_state_file(&state_path, &snap).map_err(drafter_vmm::Error::from)?;
    }
    let mut vmm = Vmm::restore(&state_path, memory, console)?;
    vmm.resume()?;
    Ok((vmm, frame, start.elapsed().as_secs_f64() * 1e3))
}
