//! Receiving a VM and restoring it in this process.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use drafter_storage::migrator::DestinationSession;
use drafter_storage::protocol::DeviceInfo;
use drafter_storage::{
    BlockDevice, DestinationDevice, FileDevice, Initial, LazyDevice, Link, MemoryDevice,
    MigrationConfig, MigrationDestination,
};
use drafter_vmm::config::SerialConfig;
use drafter_vmm::device_manager::ConsoleOut;
use drafter_vmm::{persist, RestoreMemory, Snapshot, Vmm};

use super::error::VmMigrationError;
use super::page_provider::LazyPageProvider;
use super::phase::{engine_observer, VmObserver, VmPhase};
use super::report::VmMigrationReport;
use super::state::StateFrame;
use super::{
    drive_device_name, file_device_name, DRIVE_PREFIX, FILE_PREFIX, MEMORY_DEVICE, STATE_DEVICE,
};

/// Largest "state" device a destination accepts (it is held in memory).
pub const MAX_STATE_CAPACITY: u64 = 64 << 20;

/// When the received VM resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resume {
    /// Once every block is here: guest RAM is the received memory file,
    /// mapped MAP_SHARED (the VM can be migrated on from here).
    #[default]
    AfterComplete,
    /// As soon as the source offers the handover: guest RAM is filled on
    /// demand through userfaultfd from the incoming memory device while the
    /// rest streams in (post-copy). Drives are not lazy: every drive block
    /// is fetched (with priority) before the VM resumes, since the VMM
    /// reads and writes drive files directly. If the connection breaks
    /// after the VM resumed here and before every page arrived, the guest
    /// cannot continue (the source no longer runs it either).
    AtAuthority,
}

/// How a VM is received.
pub struct DestinationOptions {
    /// Where the memory file (`memory.bin`), the state (`state.bin`) and
    /// drives (`drive-<name>`) are stored; created if missing. While a
    /// receive runs its files carry a `.partial` suffix and are listed in
    /// [`VmMigrationDestination::MARKER`]; a receive that fails removes them,
    /// and one that finds the leftovers of a receive that died removes those
    /// first. Other files in the directory are never touched.
    pub work_dir: PathBuf,
    /// When the VM resumes.
    pub resume: Resume,
    /// Secret, timeouts and the rest (the mode is the source's choice).
    pub migration: MigrationConfig,
    /// Guest console sink; defaults to what the VM's config says.
    pub console: Option<ConsoleOut>,
    /// Network namespace the VM's tap is opened in, instead of the one the
    /// received state names (`None`: that one). Two VMs cannot share a tap,
    /// so a destination on the source's host needs its own namespace.
    pub netns: Option<String>,
    /// The guest console's input and output, instead of what the received
    /// state says (`None`: that).
    pub serial: Option<SerialConfig>,
    /// Most drive blocks fetched at once when the VM resumes at authority
    /// ([`Resume::AtAuthority`]: every drive block must be here before it
    /// resumes; each missing one is a request to the source). 1 fetches
    /// one block per round trip; at most [`MAX_FETCH_WORKERS`] are used.
    pub fetch_concurrency: usize,
    /// Told of each step of the receive as it starts ([`VmPhase`]): the
    /// engine's phases, then [`VmPhase::Restore`], [`VmPhase::ReadyToRun`]
    /// and, resuming at authority, [`VmPhase::PostCopyFetch`].
    pub observer: Option<VmObserver>,
}

/// Most threads fetching drive blocks at once
/// ([`DestinationOptions::fetch_concurrency`]).
pub const MAX_FETCH_WORKERS: usize = 64;

impl DestinationOptions {
    /// Defaults with files under `work_dir`.
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        DestinationOptions {
            work_dir: work_dir.into(),
            resume: Resume::default(),
            migration: MigrationConfig::default(),
            console: None,
            netns: None,
            serial: None,
            fetch_concurrency: MAX_FETCH_WORKERS,
            observer: None,
        }
    }

    /// The memory file a received VM runs from.
    pub fn memory_file(&self) -> PathBuf {
        self.work_dir.join(MEMORY_FILE)
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
    /// The receive's files while the transfer is not finished
    /// ([`Resume::AtAuthority`]); removed if it never finishes.
    files: Option<ReceiveFiles>,
    /// The travelling files (`file/<name>` devices): name and path, in the
    /// order the source sent them.
    travelling: Vec<(String, PathBuf)>,
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
    /// [`Resume::AfterComplete`]) and returns the full report. If the
    /// transfer fails, the memory file this receive created is removed (the
    /// VM cannot continue without the missing pages); its drives and state
    /// stay, holding what the guest wrote here.
    pub fn finish_transfer(&mut self) -> Result<VmMigrationReport, VmMigrationError> {
        if let Some(session) = self.session.take() {
            // On any error `files` is dropped with the session's error, which
            // removes what this receive created.
            let files = self.files.take();
            self.report.storage = session.wait_complete()?;
            if let Some(mut f) = files {
                f.commit(MEMORY_FILE)?;
                for (name, _) in &self.travelling {
                    f.commit(&travelling_file(name))?;
                }
                f.finish()?;
            }
        }
        Ok(self.report.clone())
    }

    /// The files that came with the VM (`file/<name>` devices, e.g. a
    /// package's `config` and `kernel`): name and path in the work
    /// directory, complete once [`Self::finish_transfer`] returned. A
    /// migration out of this VM passes them on
    /// ([`SourceOptions::files`](super::SourceOptions::files)).
    pub fn files(&self) -> &[(String, PathBuf)] {
        &self.travelling
    }

    /// The contents of the travelling file `name` (a `file/<name>` device,
    /// see [`Self::files`]), fetched with priority if the transfer is not
    /// finished ([`Resume::AtAuthority`]); `None` if the VM came without it.
    pub fn read_file(&self, name: &str) -> Result<Option<Vec<u8>>, VmMigrationError> {
        let Some((_, path)) = self.travelling.iter().find(|(n, _)| n == name) else {
            return Ok(None);
        };
        let lazy = self
            .session
            .as_ref()
            .and_then(|s| s.device(&format!("{FILE_PREFIX}{name}")));
        match lazy {
            Some(device) => {
                let len = usize::try_from(device.size()).map_err(|_| {
                    VmMigrationError::io(
                        format!("reading {}", path.display()),
                        std::io::Error::other("too large to hold in memory"),
                    )
                })?;
                let mut buf = vec![0u8; len];
                device.read_at(&mut buf, 0)?;
                Ok(Some(buf))
            }
            None => std::fs::read(path)
                .map(Some)
                .map_err(|e| VmMigrationError::io(format!("reading {}", path.display()), e)),
        }
    }

    /// The VM and its memory file, once the transfer is finished.
    pub fn into_parts(mut self) -> Result<(Vmm, Option<PathBuf>), VmMigrationError> {
        self.finish_transfer()?;
        Ok((self.vmm, self.memory_file))
    }
}

/// The memory file's name in the work directory.
const MEMORY_FILE: &str = "memory.bin";
/// The state file's name in the work directory.
const STATE_FILE: &str = "state.bin";
/// Suffix of a file whose receive has not finished.
const PARTIAL: &str = ".partial";

fn drive_file(drive: &str) -> String {
    format!("drive-{drive}")
}

fn drive_path(work_dir: &Path, drive: &str) -> PathBuf {
    work_dir.join(drive_file(drive))
}

fn travelling_file(name: &str) -> String {
    format!("file-{name}")
}

/// The host socket of the restored VM's vsock device, in the work directory
/// (the source's socket path belongs to the source's host or process).
pub const VSOCK_FILE: &str = "vsock.sock";

/// True for the names a receive creates (so the only names a marker may
/// make us remove).
fn is_receive_file(name: &str) -> bool {
    let base = name.strip_suffix(PARTIAL).unwrap_or(name);
    base == MEMORY_FILE
        || base == STATE_FILE
        || base
            .strip_prefix("drive-")
            .is_some_and(|d| drive_device_name(d).is_ok())
        || base
            .strip_prefix("file-")
            .is_some_and(|f| file_device_name(f).is_ok())
}

/// The files one receive creates in its work directory. Each is listed in
/// the locked marker ([`VmMigrationDestination::MARKER`]) before it is
/// created, so a receive whose process dies leaves a list of what to remove;
/// the marker goes once the receive's files are complete. Dropped before
/// [`Self::finish`], it removes every file it created.
struct ReceiveFiles {
    dir: PathBuf,
    marker: Option<File>,
    /// Names created (partial and final), in order.
    created: Vec<String>,
}

impl ReceiveFiles {
    /// Locks the work directory's marker, removes what an unfinished earlier
    /// receive left (returned), and starts an empty list.
    fn start(dir: &Path) -> Result<(ReceiveFiles, Vec<PathBuf>), VmMigrationError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| VmMigrationError::io(format!("creating {}", dir.display()), e))?;
        let path = dir.join(VmMigrationDestination::MARKER);
        let mut marker = lock_marker(dir, &path)?;
        let mut listed = Vec::new();
        marker
            .read_to_end(&mut listed)
            .map_err(|e| VmMigrationError::io(format!("reading {}", path.display()), e))?;
        let mut removed = Vec::new();
        for name in String::from_utf8_lossy(&listed).lines() {
            if !is_receive_file(name) {
                tracing::warn!(marker = %path.display(), name, "ignoring an unexpected name in the receive marker");
                continue;
            }
            let stale = dir.join(name);
            match std::fs::remove_file(&stale) {
                Ok(()) => removed.push(stale),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(VmMigrationError::io(
                        format!("removing {} left by an unfinished receive", stale.display()),
                        e,
                    ))
                }
            }
        }
        marker
            .set_len(0)
            .map_err(|e| VmMigrationError::io(format!("truncating {}", path.display()), e))?;
        Ok((
            ReceiveFiles {
                dir: dir.to_path_buf(),
                marker: Some(marker),
                created: Vec::new(),
            },
            removed,
        ))
    }

    fn marker_path(&self) -> PathBuf {
        self.dir.join(VmMigrationDestination::MARKER)
    }

    /// Lists `name` in the marker (once) and returns its path.
    fn record(&mut self, name: &str) -> Result<PathBuf, VmMigrationError> {
        if !self.created.iter().any(|n| n == name) {
            let marker_path = self.marker_path();
            let marker = self.marker.as_mut().ok_or_else(|| {
                VmMigrationError::io(
                    format!("recording {name} in {}", marker_path.display()),
                    std::io::Error::other("the receive is already finished"),
                )
            })?;
            marker
                .write_all(format!("{name}\n").as_bytes())
                .map_err(|e| {
                    VmMigrationError::io(
                        format!("recording {name} in {}", marker_path.display()),
                        e,
                    )
                })?;
            self.created.push(name.to_string());
        }
        Ok(self.dir.join(name))
    }

    /// The partial file that becomes `name` on [`Self::commit`], refused if
    /// this receive already made it (a device announced twice).
    fn partial(&mut self, name: &str) -> Result<PathBuf, VmMigrationError> {
        let partial = format!("{name}{PARTIAL}");
        if self.created.contains(&partial) {
            return Err(VmMigrationError::io(
                format!("creating {}", self.dir.join(&partial).display()),
                std::io::Error::new(ErrorKind::AlreadyExists, "device announced twice"),
            ));
        }
        self.record(&partial)
    }

    /// Renames the complete partial file to `name`, replacing any file of
    /// that name.
    fn commit(&mut self, name: &str) -> Result<PathBuf, VmMigrationError> {
        let from = self.dir.join(format!("{name}{PARTIAL}"));
        let to = self.record(name)?;
        std::fs::rename(&from, &to).map_err(|e| {
            VmMigrationError::io(
                format!("renaming {} to {}", from.display(), to.display()),
                e,
            )
        })?;
        Ok(to)
    }

    /// The committed file `name` belongs to the VM running here now: this
    /// receive never removes it, even if its transfer fails later, and it
    /// is taken off the marker so a later receive into the directory does
    /// not remove it either (it holds what the guest wrote here).
    fn keep(&mut self, name: &str) -> Result<(), VmMigrationError> {
        self.created.retain(|n| n != name);
        let path = self.marker_path();
        let Some(marker) = self.marker.as_mut() else {
            return Ok(());
        };
        let io = |e| VmMigrationError::io(format!("rewriting {}", path.display()), e);
        // Appends land at the new end: the list is written anew.
        marker.set_len(0).map_err(io)?;
        let list: String = self.created.iter().map(|n| format!("{n}\n")).collect();
        marker.write_all(list.as_bytes()).map_err(io)?;
        Ok(())
    }

    /// Writes the partial file that becomes `name` with `bytes`.
    fn write_partial(&mut self, name: &str, bytes: &[u8]) -> Result<PathBuf, VmMigrationError> {
        let path = self.partial(name)?;
        std::fs::write(&path, bytes)
            .map_err(|e| VmMigrationError::io(format!("writing {}", path.display()), e))?;
        Ok(path)
    }

    /// The receive's files are complete: removes the marker so they are
    /// kept. Dropping `self` then removes nothing.
    fn finish(&mut self) -> Result<(), VmMigrationError> {
        let path = self.marker_path();
        if let Some(marker) = &self.marker {
            // An empty marker lists nothing to remove, even if unlinking fails.
            marker
                .set_len(0)
                .map_err(|e| VmMigrationError::io(format!("truncating {}", path.display()), e))?;
        }
        self.created.clear();
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(marker = %path.display(), error = %e, "cannot remove the (empty) receive marker");
        }
        self.marker = None;
        Ok(())
    }
}

impl Drop for ReceiveFiles {
    fn drop(&mut self) {
        if self.marker.is_none() {
            return;
        }
        for name in self.created.iter().rev() {
            let path = self.dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::debug!(file = %path.display(), "removed a failed receive's file")
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot remove a failed receive's file")
                }
            }
        }
        if let Err(e) = std::fs::remove_file(self.marker_path()) {
            tracing::warn!(error = %e, "cannot remove the receive marker");
        }
    }
}

/// Opens and locks the marker at `path`, checking that the file locked is
/// still the one at `path` (a receive that finished may have removed it
/// between the open and the lock).
fn lock_marker(dir: &Path, path: &Path) -> Result<File, VmMigrationError> {
    let io = |what: &str, e| VmMigrationError::io(format!("{what} {}", path.display()), e);
    for _ in 0..16 {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io("opening", e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(VmMigrationError::io(
                    format!(
                        "another receive into {} is in progress ({} is locked)",
                        dir.display(),
                        path.display()
                    ),
                    std::io::Error::from(ErrorKind::ResourceBusy),
                ))
            }
            Err(TryLockError::Error(e)) => return Err(io("locking", e)),
        }
        let locked = file.metadata().map_err(|e| io("inspecting", e))?;
        match std::fs::metadata(path) {
            Ok(m) if m.ino() == locked.ino() && m.dev() == locked.dev() => return Ok(file),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io("inspecting", e)),
        }
    }
    Err(io(
        "locking",
        std::io::Error::other("the marker keeps being replaced"),
    ))
}

fn make_device(files: &mut ReceiveFiles, info: &DeviceInfo) -> Result<DestinationDevice, String> {
    let backing: Arc<dyn BlockDevice> = if info.name == MEMORY_DEVICE {
        let path = files.partial(MEMORY_FILE).map_err(|e| e.to_string())?;
        Arc::new(FileDevice::create(path, info.size, info.block_size).map_err(|e| e.to_string())?)
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
        let path = files
            .partial(&drive_file(drive))
            .map_err(|e| e.to_string())?;
        Arc::new(FileDevice::create(path, info.size, info.block_size).map_err(|e| e.to_string())?)
    } else if let Some(name) = info.name.strip_prefix(FILE_PREFIX) {
        file_device_name(name).map_err(|e| e.to_string())?;
        let path = files
            .partial(&travelling_file(name))
            .map_err(|e| e.to_string())?;
        Arc::new(FileDevice::create(path, info.size, info.block_size).map_err(|e| e.to_string())?)
    } else {
        return Err("not a device of a VM migration".into());
    };
    Ok(DestinationDevice {
        backing,
        initial: Initial::Zeroed,
    })
}

impl VmMigrationDestination {
    /// The file in a work directory that lists the files of a receive in
    /// progress (one name a line) and is locked while it runs. It is removed
    /// once the received files are complete; if it is found unlocked, the
    /// receive that wrote it died, and the files it lists are removed.
    pub const MARKER: &'static str = "receiving.lock";

    /// Removes what an unfinished receive (one whose process died) left in
    /// `work_dir`, as listed in its [`Self::MARKER`]; returns the files
    /// removed. Fails if a receive into `work_dir` is running. [`Self::accept`]
    /// does this itself.
    pub fn clean_unfinished(work_dir: &Path) -> Result<Vec<PathBuf>, VmMigrationError> {
        let marker = work_dir.join(Self::MARKER);
        match std::fs::symlink_metadata(&marker) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(VmMigrationError::io(
                    format!("inspecting {}", marker.display()),
                    e,
                ))
            }
        }
        let (mut files, removed) = ReceiveFiles::start(work_dir)?;
        files.finish()?;
        Ok(removed)
    }

    /// Receives a VM over `link` and restores it here, resuming it as
    /// `options.resume` says. Returns with the VM running.
    ///
    /// The VM is restored paused before this side asks for authority
    /// (ReadyToRun) and resumed only after the source's Commit. If anything
    /// fails before it runs here (the receive, the restore
    /// ([`VmMigrationError::Restore`]), no Commit within the link timeout, the
    /// resume), the handover is declined or abandoned, the source keeps (and
    /// resumes) the VM, and the files this receive created are removed;
    /// files found in the work directory are left alone.
    pub fn accept<L: Link>(
        link: L,
        options: DestinationOptions,
    ) -> Result<IncomingVm, VmMigrationError> {
        let work_dir = options.work_dir.clone();
        let (mut files, stale) = ReceiveFiles::start(&work_dir)?;
        if !stale.is_empty() {
            tracing::warn!(
                dir = %work_dir.display(),
                files = ?stale,
                "removed the files of an unfinished earlier receive"
            );
        }
        let observer = options.observer.clone();
        let tell = |p: VmPhase| {
            if let Some(o) = &observer {
                o(p);
            }
        };
        let session = MigrationDestination::accept_observed(
            link,
            &options.migration,
            observer.clone().map(engine_observer),
            |info| make_device(&mut files, info),
        )?;
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
        let travelling: Vec<(String, PathBuf)> = session
            .devices()
            .iter()
            .filter_map(|(i, _)| i.name.strip_prefix(FILE_PREFIX))
            .map(|n| (n.to_string(), work_dir.join(travelling_file(n))))
            .collect();
        let memory_file = options.memory_file();
        // The handover (see `drafter_storage::migrator`): everything the VM
        // needs is made ready while the source keeps authority, the VM is
        // restored paused, and it resumes only after Commit arrived. Until
        // then any failure declines the handover (the source resumes its
        // VM) and drops `files`, which removes what this receive made.
        let decline = |e: VmMigrationError| {
            session.decline(&e.to_string());
            e
        };
        // The restore starts at the offer, while the final dirty blocks are
        // still arriving (off the downtime's critical path): reading the
        // state fetches its blocks first, and nothing the restore does reads
        // guest memory, which the tail keeps writing into the shared memory
        // file. The VM stays paused until every block is here (after
        // complete) or runs on fetched pages (at authority).
        session.wait_offer()?;
        tell(VmPhase::Restore);
        if let Resume::AtAuthority = options.resume {
            fetch_all(&drives, options.fetch_concurrency).map_err(decline)?;
        }
        let start = Instant::now();
        // The drives are put in place before the restore (the VM's
        // configuration names them). The state and memory are restored from
        // their partial files, renamed only once the VM runs here: a
        // declined handover leaves a state.bin or memory.bin found here
        // alone.
        let prepared = (|| {
            let frame = StateFrame::read_from(&*state)?;
            let state_path = files.write_partial(STATE_FILE, &frame.state)?;
            for (name, _) in &drives {
                files.commit(&drive_file(name))?;
            }
            Ok::<_, VmMigrationError>((frame, state_path))
        })();
        let (frame, state_path) = prepared.map_err(decline)?;
        let restore_memory = match options.resume {
            Resume::AfterComplete => {
                RestoreMemory::Shared(work_dir.join(format!("{MEMORY_FILE}{PARTIAL}")))
            }
            Resume::AtAuthority => {
                RestoreMemory::Userfault(Box::new(LazyPageProvider::new(memory.clone())))
            }
        };
        let mut vmm = restore(
            &work_dir,
            &state_path,
            memory.size(),
            &drives,
            restore_memory,
            options.console,
            HostSide {
                netns: options.netns.as_deref(),
                serial: options.serial.as_ref(),
            },
        )
        .map_err(|e| decline(VmMigrationError::Restore(Box::new(e))))?;
        let restore_millis = start.elapsed().as_secs_f64() * 1e3;
        if let Resume::AfterComplete = options.resume {
            // Drives and memory complete before the VM may run here (the
            // restored VM is dropped, paused, if the transfer fails).
            session.wait_received()?;
        }
        // The VM is restored and paused: ask for authority. Without Commit
        // (within the link timeout) it must not run here.
        tell(VmPhase::ReadyToRun);
        if let Err(e) = session.ready_to_run() {
            vmm.stop();
            return Err(e.into());
        }
        if let Err(e) = vmm.resume() {
            // It never ran here: the source resumes its own.
            vmm.stop();
            return Err(decline(VmMigrationError::Restore(Box::new(e.into()))));
        }
        // The VM runs here now, whatever happens to the link or the files:
        // nothing from here on stops it.
        if let Err(e) = session.running() {
            tracing::warn!(error = %e, "the source may not have heard that the VM runs here");
        }
        // The drives (the guest writes them from now on) and the state are
        // the running VM's: kept whatever happens to the rest of the
        // transfer (at authority, memory is still arriving).
        for (name, _) in &drives {
            if let Err(e) = files.keep(&drive_file(name)) {
                tracing::error!(error = %e, "cannot keep a drive of the VM running here");
            }
        }
        if let Err(e) = files
            .commit(STATE_FILE)
            .and_then(|_| files.keep(STATE_FILE))
        {
            tracing::error!(error = %e, "cannot keep the state of the VM running here");
        }
        let mut keep = |name: &str| {
            if let Err(e) = files.commit(name) {
                tracing::error!(error = %e, "cannot give a received file its name");
            }
        };
        let (session, storage, files) = match options.resume {
            Resume::AfterComplete => {
                // Every block is here: the files are the VM's now (the
                // mapping of the renamed memory file is the same file).
                keep(MEMORY_FILE);
                for (name, _) in &travelling {
                    keep(&travelling_file(name));
                }
                if let Err(e) = files.finish() {
                    tracing::error!(error = %e, "cannot finish the receive's file list");
                }
                let storage = session.wait_complete().unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "the link failed after the VM resumed here");
                    Default::default()
                });
                (None, storage, None)
            }
            Resume::AtAuthority => (Some(session), Default::default(), Some(files)),
        };
        let resumed = match options.resume {
            Resume::AfterComplete => "after-complete",
            Resume::AtAuthority => "at-authority",
        };
        if options.resume == Resume::AtAuthority {
            tell(VmPhase::PostCopyFetch);
        }
        // A state from a package (a registry) was never paused: no downtime.
        let downtime = frame
            .paused()
            .and_then(|at| SystemTime::now().duration_since(at).ok())
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
            files,
            travelling,
        })
    }
}

/// Makes every block of the drives present (the VMM reads and writes drive
/// files directly, not through the lazy device), with up to `concurrency`
/// fetches in flight (each waits for its block: one round trip). Once a
/// block is present, data still arriving for it is dropped, so the
/// source's tail never overwrites what the guest writes here after it
/// resumed.
fn fetch_all(
    drives: &[(String, Arc<LazyDevice>)],
    concurrency: usize,
) -> Result<(), VmMigrationError> {
    for (_, d) in drives {
        let missing = d.missing_blocks();
        if missing == 0 {
            continue;
        }
        let workers = concurrency
            .clamp(1, MAX_FETCH_WORKERS)
            .min(usize::try_from(missing).unwrap_or(usize::MAX));
        let next = std::sync::atomic::AtomicU64::new(0);
        let fetch = || -> Result<(), VmMigrationError> {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= d.block_count() {
                    return Ok(());
                }
                if !d.is_present(i) {
                    d.ensure_present(i)?;
                }
            }
        };
        std::thread::scope(|s| {
            let handles: Vec<_> = (1..workers).map(|_| s.spawn(fetch)).collect();
            let mut result = fetch();
            for h in handles {
                let r = h.join().unwrap_or_else(|_| {
                    Err(VmMigrationError::io(
                        "fetching drive blocks",
                        std::io::Error::other("a fetch thread panicked"),
                    ))
                });
                result = result.and(r);
            }
            result
        })?;
    }
    Ok(())
}

/// What the restored VM takes from this host instead of the received state.
struct HostSide<'a> {
    /// Namespace of the tap.
    netns: Option<&'a str>,
    /// Console input and output.
    serial: Option<&'a SerialConfig>,
}

/// Restores the VM from the received state file; it stays paused. The
/// state is pointed at this host first: drives in the work directory, the
/// vsock socket there too, the tap in `host.netns` and the console as
/// `host.serial` say if given.
fn restore(
    work_dir: &Path,
    state_path: &Path,
    memory_size: u64,
    drives: &[(String, Arc<LazyDevice>)],
    memory: RestoreMemory,
    console: Option<ConsoleOut>,
    host: HostSide<'_>,
) -> Result<Vmm, VmMigrationError> {
    let mut snap: Snapshot =
        persist::read_state_file(state_path).map_err(drafter_vmm::Error::from)?;
    if snap.memory_size != memory_size {
        return Err(VmMigrationError::MemoryFileSize {
            path: work_dir.join(MEMORY_FILE),
            actual: memory_size,
            expected: snap.memory_size,
        });
    }
    for d in &mut snap.config.drives {
        if !drives.iter().any(|(n, _)| *n == d.name) {
            return Err(VmMigrationError::MissingDevice(format!(
                "{DRIVE_PREFIX}{}",
                d.name
            )));
        }
        d.path = drive_path(work_dir, &d.name);
    }
    if let Some(v) = &mut snap.config.vsock {
        v.uds_path = work_dir.join(VSOCK_FILE);
    }
    if let (Some(net), Some(ns)) = (&mut snap.config.net, host.netns) {
        net.netns = (!ns.is_empty()).then(|| ns.to_string());
    }
    if let Some(serial) = host.serial {
        snap.config.serial = serial.clone();
    }
    persist::write_state_file(state_path, &snap).map_err(drafter_vmm::Error::from)?;
    Ok(Vmm::restore(state_path, memory, console)?)
}
