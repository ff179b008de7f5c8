//! The public VMM API: build a VM from a [`VmConfig`] (or restore one from a
//! snapshot), run, pause, resume, snapshot, report dirty pages, msync, stop and
//! wait for the guest's end.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::cpu_template::{CpuTemplate, CpuTemplateError};
use crate::arch::x86_64::cpuid;
use crate::boot::{self, BootError};
use crate::bus::Bus;
use crate::config::VmConfig;
use crate::device_manager::{ConsoleOut, DeviceManager, DevicesState};
use crate::dirty::{merge, DirtyPages, RegionDirty};
use crate::memory::{self, GuestMemory, Memory, MemoryBackend, MemoryError, PageProvider};
use crate::persist::{self, StateFileError};
use crate::throttle::{Throttler, VcpuThrottle};
use crate::vcpu_thread::{ExitStatus, VcpuHandle, VcpuThreadError};
use crate::vstate::{Vcpu, VcpuError, VcpuState, Vm, VmError, VmState};

/// Errors of the VMM API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The jail's cgroup limits could not be applied (see `drafter_jail`).
    #[error(transparent)]
    Jail(#[from] drafter_jail::JailError),
    /// Guest memory setup failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A VM-level KVM call failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU-level KVM call failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A vCPU thread failed.
    #[error(transparent)]
    VcpuThread(#[from] VcpuThreadError),
    /// The kernel could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The state file is unusable.
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    /// The snapshot needs CPU features this host lacks.
    #[error("snapshot needs CPU features this host lacks: {0}")]
    CpuMismatch(String),
    /// The CPU template cannot be given on this host, or the snapshot's
    /// CPUID is not its template's.
    #[error(transparent)]
    CpuTemplate(#[from] CpuTemplateError),
    /// Device setup failed.
    #[error("device setup: {0}")]
    Device(String),
    /// The operation needs a paused VM.
    #[error("the VM must be paused for this")]
    NotPaused,
    /// The VM has already ended.
    #[error("the VM has already ended ({0:?})")]
    Ended(ExitStatus),
}

impl From<crate::device_manager::DeviceSetupError> for Error {
    fn from(e: crate::device_manager::DeviceSetupError) -> Self {
        Error::Device(e.0)
    }
}

/// Everything a snapshot holds besides guest memory.
#[derive(Serialize, Deserialize)]
pub struct Snapshot {
    /// The configuration the VM was built from.
    pub config: VmConfig,
    /// Guest RAM size in bytes.
    pub memory_size: u64,
    /// PIC, IOAPIC, PIT and kvmclock.
    pub vm: VmState,
    /// Every vCPU.
    pub vcpus: Vec<VcpuState>,
    /// Devices.
    pub devices: DevicesState,
}

/// Where restored guest memory comes from.
pub enum RestoreMemory {
    /// Map the memory file MAP_PRIVATE: pages load lazily, writes stay private.
    Private(PathBuf),
    /// Map the memory file MAP_SHARED: guest memory is the file (`msync` writes it back).
    Shared(PathBuf),
    /// Anonymous memory filled on demand by a page provider (userfaultfd).
    Userfault(Box<dyn PageProvider>),
}

/// Run-time options that are not part of the VM's configuration.
#[derive(Default)]
pub struct BuildOptions {
    /// Guest console sink; defaults to stdout (or nothing, per the config).
    pub console: Option<ConsoleOut>,
    /// Back guest memory with this file, MAP_SHARED, instead of anonymous memory.
    pub shared_memory_file: Option<PathBuf>,
    /// Boot this flat 64-bit program instead of the configured kernel.
    pub flat_program: Option<Vec<u8>>,
}

/// Waits for a VM's end from any thread.
#[derive(Clone, Default)]
pub struct ExitWaiter(Arc<(Mutex<Option<ExitStatus>>, Condvar)>);

impl ExitWaiter {
    fn set(&self, status: ExitStatus) {
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(status);
        }
        cv.notify_all();
    }

    /// How the VM ended, if it has.
    pub fn get(&self) -> Option<ExitStatus> {
        self.0 .0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Blocks until the VM ends.
    pub fn wait(&self) -> ExitStatus {
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(s) = g.as_ref() {
                return s.clone();
            }
            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Blocks until the VM ends or `timeout` passes.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let (m, cv) = &*self.0;
        let g = m.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = cv
            .wait_timeout_while(g, timeout, |s| s.is_none())
            .unwrap_or_else(|p| p.into_inner());
        g.clone()
    }
}

fn spawn_exit_forwarder(rx: Receiver<ExitStatus>, waiter: ExitWaiter) -> Result<(), Error> {
    std::thread::Builder::new()
        .name("vm-exit".into())
        .spawn(move || {
            // Every sender (vCPU threads, the reset watcher) is gone only once the
            // VM is torn down; the first message is the guest's end.
            let status = rx
                .recv()
                .unwrap_or_else(|_| ExitStatus::Error("all vCPU threads are gone".into()));
            waiter.set(status);
        })
        .map(|_| ())
        .map_err(|e| Error::Device(format!("cannot start exit watcher: {e}")))
}

/// One running (or paused) VM.
pub struct Vmm {
    config: VmConfig,
    vm: Vm,
    memory: Memory,
    vcpus: Vec<VcpuHandle>,
    devices: DeviceManager,
    exit: ExitWaiter,
    msr_indices: Arc<Vec<u32>>,
    paused: bool,
    ended: Option<ExitStatus>,
    throttle: Arc<VcpuThrottle>,
    throttler: Option<Throttler>,
}

fn console_for(config: &VmConfig, console: Option<ConsoleOut>) -> ConsoleOut {
    match console {
        Some(c) => c,
        None if config.serial.stdout => Box::new(std::io::stdout()),
        None => Box::new(std::io::sink()),
    }
}

fn validate(config: &VmConfig) -> Result<(), Error> {
    if config.vcpus == 0 || config.vcpus > crate::arch::x86_64::mptable::MAX_CPUS {
        return Err(Error::Config(format!(
            "vcpus must be 1..={}, got {}",
            crate::arch::x86_64::mptable::MAX_CPUS,
            config.vcpus
        )));
    }
    if config.memory_mib < 16 || config.memory_mib > 1 << 20 {
        return Err(Error::Config(format!(
            "memory_mib must be 16..=1048576, got {}",
            config.memory_mib
        )));
    }
    Ok(())
}

/// The pieces every VM has: KVM VM, memory, devices, buses.
struct Platform {
    vm: Vm,
    memory: Memory,
    devices: DeviceManager,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exits_tx: Sender<ExitStatus>,
    exits_rx: Receiver<ExitStatus>,
}

fn platform(
    memory: Memory,
    config: &VmConfig,
    console: ConsoleOut,
    saved: Option<&DevicesState>,
) -> Result<Platform, Error> {
    let mut vm = Vm::new()?;
    vm.register_memory(&memory.guest)?;
    let (exits_tx, exits_rx) = channel();
    if let Some(uffd) = &memory.uffd {
        // A guest page that cannot be fetched ends the VM.
        let tx = exits_tx.clone();
        uffd.on_failure(move |f| {
            let _ = tx.send(ExitStatus::Error(f.to_string()));
        });
    }
    let mut buses = crate::bus::Buses::default();
    let devices = DeviceManager::build(
        &vm,
        &memory.guest,
        config,
        console,
        exits_tx.clone(),
        saved,
        &mut buses,
    )?;
    Ok(Platform {
        vm,
        memory,
        devices,
        pio: Arc::new(buses.pio),
        mmio: Arc::new(buses.mmio),
        exits_tx,
        exits_rx,
    })
}

impl Vmm {
    /// Checks that this host's KVM can give `template` (what [`Vmm::boot`]
    /// and [`Vmm::restore`] check too), so a caller can refuse it before
    /// doing any work; the error names the missing features.
    pub fn check_cpu_template(template: CpuTemplate) -> Result<(), Error> {
        if template == CpuTemplate::None {
            return Ok(());
        }
        let host = Vm::host_supported_cpuid()?;
        template.apply(&mut host.as_slice().to_vec())?;
        Ok(())
    }

    /// Builds a VM from `config` and starts it running.
    pub fn boot(config: VmConfig, opts: BuildOptions) -> Result<Vmm, Error> {
        validate(&config)?;
        // In a jail, the VM's cgroup gets its limits before guest memory
        // exists (a no-op elsewhere).
        drafter_jail::apply_vm_limits(config.memory_mib << 20, u32::from(config.vcpus))?;
        crate::heap::keep_heap_mapped();
        let backend = match &opts.shared_memory_file {
            Some(p) => MemoryBackend::SharedFile(p.clone()),
            None => MemoryBackend::Anonymous,
        };
        let memory = memory::create(config.memory_mib << 20, backend)?;
        let console = console_for(&config, opts.console);
        let p = platform(memory, &config, console, None)?;
        let cmdline = boot::cmdline(&config.boot_args)?;
        let entry = match &opts.flat_program {
            Some(code) => boot::load_flat(&p.memory.guest, code, config.vcpus)?,
            None => boot::load(
                &p.memory.guest,
                &config.kernel,
                config.initramfs.as_deref(),
                &cmdline,
                config.vcpus,
                p.devices.mmio_devices(),
            )?,
        };
        let mut supported = p.vm.supported_cpuid()?.as_slice().to_vec();
        config.cpu_template.apply(&mut supported)?;
        let tsc_deadline =
            p.vm.kvm()
                .check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        let mut vcpus = Vec::new();
        for i in 0..config.vcpus {
            let mut v = Vcpu::new(&p.vm, i)?;
            let boot_entry = (i == 0).then_some((entry.addr, entry.mode));
            v.configure_boot(&supported, config.vcpus, tsc_deadline, boot_entry)?;
            vcpus.push(v);
        }
        Self::assemble(config, p, vcpus, false)
    }

    /// Restores a VM from a state file and memory; it starts paused — call
    /// [`Vmm::resume`]. `console` defaults as for [`Vmm::boot`]. Restoring has
    /// no side effects on the guest: devices start their I/O, and interrupts
    /// pending at snapshot time are signalled again, when the VM is first
    /// resumed, after the interrupt controllers and vCPUs are restored.
    pub fn restore(
        state_path: &Path,
        memory: RestoreMemory,
        console: Option<ConsoleOut>,
    ) -> Result<Vmm, Error> {
        let snap: Snapshot = persist::read_state_file(state_path)?;
        validate(&snap.config)?;
        crate::heap::keep_heap_mapped();
        if snap.vcpus.len() != usize::from(snap.config.vcpus) {
            return Err(Error::Config(format!(
                "state file has {} vCPUs, its configuration says {}",
                snap.vcpus.len(),
                snap.config.vcpus
            )));
        }
        drafter_jail::apply_vm_limits(snap.memory_size, u32::from(snap.config.vcpus))?;
        let backend = match memory {
            RestoreMemory::Private(p) => MemoryBackend::PrivateFile(p),
            RestoreMemory::Shared(p) => MemoryBackend::SharedFile(p),
            RestoreMemory::Userfault(p) => MemoryBackend::Userfault(p),
        };
        let mem = memory::create(snap.memory_size, backend)?;
        let console = console_for(&snap.config, console);
        let p = platform(mem, &snap.config, console, Some(&snap.devices))?;
        let host = p.vm.supported_cpuid()?;
        // The snapshot's template must be one this host can give, and the
        // saved CPUID (what the guest has seen and is given again) that
        // template's.
        snap.config
            .cpu_template
            .apply(&mut host.as_slice().to_vec())?;
        for v in &snap.vcpus {
            snap.config.cpu_template.check_saved(&v.cpuid)?;
            if let Some(missing) = cpuid::missing_features(&v.cpuid, host.as_slice()) {
                return Err(Error::CpuMismatch(missing));
            }
        }
        p.vm.restore_state(&snap.vm)?;
        let mut vcpus = Vec::new();
        for (i, state) in snap.vcpus.iter().enumerate() {
            let mut v = Vcpu::new(&p.vm, i as u8)?;
            v.restore_state(state)?;
            vcpus.push(v);
        }
        Self::assemble(snap.config, p, vcpus, true)
    }

    fn assemble(
        config: VmConfig,
        p: Platform,
        vcpus: Vec<Vcpu>,
        paused: bool,
    ) -> Result<Vmm, Error> {
        let msr_indices = Arc::new(p.vm.msr_index_list()?);
        let throttle = VcpuThrottle::new(vcpus.len());
        let mut handles = Vec::new();
        for v in vcpus {
            handles.push(VcpuHandle::spawn(
                v,
                p.pio.clone(),
                p.mmio.clone(),
                p.exits_tx.clone(),
                paused,
                throttle.clone(),
            )?);
        }
        if config.serial.stdin {
            let serial = p.devices.serial().clone();
            crate::devices::legacy::SerialDevice::spawn_input_forwarder(serial, std::io::stdin())
                .map_err(|e| Error::Device(format!("serial input: {e}")))?;
        }
        let exit = ExitWaiter::default();
        spawn_exit_forwarder(p.exits_rx, exit.clone())?;
        Ok(Vmm {
            config,
            vm: p.vm,
            memory: p.memory,
            vcpus: handles,
            devices: p.devices,
            exit,
            msr_indices,
            paused,
            ended: None,
            throttle,
            throttler: None,
        })
    }

    /// The configuration the VM runs with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest memory (for inspection and tests).
    pub fn guest_memory(&self) -> &GuestMemory {
        &self.memory.guest
    }

    /// Whether guest RAM the process never touched reads as zero
    /// (anonymous memory), so a reader may skip pages that are neither
    /// present nor swapped out instead of faulting them in.
    pub fn untouched_memory_is_zero(&self) -> bool {
        self.memory.untouched_is_zero
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Feeds bytes to the guest's serial input.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        self.devices
            .serial()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enqueue_input(bytes)
    }

    fn check_running(&self) -> Result<(), Error> {
        match &self.ended {
            Some(s) => Err(Error::Ended(s.clone())),
            None => Ok(()),
        }
    }

    /// Keeps the vCPUs out of the guest for `percent` (0–99) of every
    /// throttle window ([`crate::throttle::PERIOD`]), slowing a guest that
    /// dirties memory faster than a migration can send it; 0 removes the
    /// throttle. It applies while the VM runs: pausing or stopping the VM
    /// ends it, and on a paused VM only 0 has an effect.
    pub fn set_throttle(&mut self, percent: u8) -> Result<(), Error> {
        if percent == 0 || self.paused || self.ended.is_some() {
            self.throttle.set(0);
            if let Some(mut t) = self.throttler.take() {
                t.stop();
            }
            return Ok(());
        }
        self.throttle.set(percent);
        if self.throttler.is_none() {
            let signal = crate::vstate::vcpu::kick_signal().map_err(Error::from)?;
            self.throttler = Some(
                Throttler::start(self.throttle.clone(), signal)
                    .map_err(|e| Error::Device(format!("cannot start the vCPU throttle: {e}")))?,
            );
        }
        Ok(())
    }

    /// The vCPU throttle in effect, percent (0: none).
    pub fn throttle(&self) -> u8 {
        if self.throttler.is_some() {
            self.throttle.percent()
        } else {
            0
        }
    }

    /// Pauses every vCPU; returns once all have left guest mode. Ends any
    /// throttle ([`Vmm::set_throttle`]).
    pub fn pause(&mut self) -> Result<(), Error> {
        self.check_running()?;
        if self.paused {
            return Ok(());
        }
        let _ = self.set_throttle(0);
        for v in &self.vcpus {
            v.request_pause()?;
        }
        for v in &self.vcpus {
            v.wait_paused()?;
        }
        self.devices.pause();
        self.paused = true;
        Ok(())
    }

    /// Resumes every vCPU, after the devices (first resume after a restore:
    /// starts restored devices and re-signals their pending interrupts).
    pub fn resume(&mut self) -> Result<(), Error> {
        self.check_running()?;
        if !self.paused {
            return Ok(());
        }
        self.devices.resume()?;
        for v in &self.vcpus {
            v.resume()?;
        }
        self.paused = false;
        Ok(())
    }

    /// Writes a snapshot of the paused VM: state to `state_path`, memory to
    /// `memory_path`. With a MAP_SHARED memory file and `memory_path` equal to it,
    /// memory is written back in place with `msync` (the in-place suspend).
    pub fn snapshot(&mut self, state_path: &Path, memory_path: &Path) -> Result<(), Error> {
        let snap = self.capture_state()?;
        let in_place = self
            .memory
            .shared_file
            .as_deref()
            .is_some_and(|f| same_file(f, memory_path));
        if in_place {
            self.memory.msync()?;
        } else {
            memory::dump(&self.memory.guest, memory_path)?;
        }
        persist::write_state_file(state_path, &snap)?;
        Ok(())
    }

    /// Writes only the paused VM's state (vCPUs, interrupt controllers,
    /// devices) to `state_path` and leaves guest memory alone: for callers
    /// that move memory themselves. Live migration reads a MAP_SHARED memory
    /// file through the page cache, so the `msync` of [`Vmm::snapshot`] would
    /// only add downtime.
    pub fn snapshot_state(&mut self, state_path: &Path) -> Result<(), Error> {
        let snap = self.capture_state()?;
        persist::write_state_file(state_path, &snap)?;
        Ok(())
    }

    fn capture_state(&self) -> Result<Snapshot, Error> {
        if !self.paused {
            return Err(Error::NotPaused);
        }
        let mut vcpus = Vec::new();
        for v in &self.vcpus {
            vcpus.push(v.save(self.msr_indices.clone())?);
        }
        Ok(Snapshot {
            config: self.config.clone(),
            memory_size: self.memory.size(),
            vm: self.vm.save_state()?,
            vcpus,
            devices: self.devices.save(),
        })
    }

    /// Writes guest memory back to its MAP_SHARED file (running or paused).
    pub fn msync(&self) -> Result<(), Error> {
        Ok(self.memory.msync()?)
    }

    /// Turns KVM's dirty log on (a migration starts) or off (it ended and
    /// the VM runs here on). While it is off the guest runs without the
    /// write faults logging costs, and [`Vmm::dirty_pages`] reports only the
    /// pages the VMM's devices wrote.
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<(), Error> {
        Ok(self.vm.set_dirty_logging(on)?)
    }

    /// Returns and resets the pages written since the last call: KVM's dirty log
    /// (once [`Vmm::set_dirty_logging`] turned it on) OR'd with pages the
    /// VMM's devices wrote.
    pub fn dirty_pages(&self) -> Result<DirtyPages, Error> {
        let log = self.vm.take_dirty_log()?;
        let mut regions = Vec::new();
        let mut file_offset = 0;
        for (region, (slot, mut bits)) in self.memory.guest.iter().zip(log) {
            let vmm_bits = std::ops::Deref::deref(region).bitmap().get_and_reset();
            merge(&mut bits, &vmm_bits);
            regions.push(RegionDirty {
                guest_addr: slot.guest_addr,
                file_offset,
                size: slot.size,
                bitmap: bits,
            });
            file_offset += region.len();
        }
        Ok(DirtyPages { regions })
    }

    /// Returns and resets the blocks (of
    /// [`DIRTY_BLOCK_SIZE`](crate::devices::virtio::block::DIRTY_BLOCK_SIZE)
    /// bytes, ascending indices into the drive file) the guest wrote to drive
    /// `drive` since the last call. A write is recorded once it reached the
    /// file; after [`Vmm::pause`] no write is in flight, so a call then
    /// returns every write the guest saw complete and not yet taken.
    pub fn drive_dirty_blocks(&self, drive: &str) -> Result<Vec<u64>, Error> {
        self.devices
            .drive_dirty_log(drive)
            .map(|log| log.take())
            .ok_or_else(|| Error::Config(format!("the VM has no drive named {drive:?}")))
    }

    /// A handle to wait for the VM's end from another thread.
    pub fn exit_waiter(&self) -> ExitWaiter {
        self.exit.clone()
    }

    /// Blocks until the guest ends (poweroff, reboot, error), then stops the vCPUs.
    pub fn wait(&mut self) -> ExitStatus {
        if let Some(s) = &self.ended {
            return s.clone();
        }
        let status = self.exit.wait();
        self.finish(status)
    }

    /// Like [`Vmm::wait`], giving up after `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = &self.ended {
            return Some(s.clone());
        }
        let status = self.exit.wait_timeout(timeout)?;
        Some(self.finish(status))
    }

    fn finish(&mut self, status: ExitStatus) -> ExitStatus {
        // First, so that a vCPU failing on the way out cannot change the status.
        self.exit.set(status.clone());
        let _ = self.set_throttle(0);
        if let Some(uffd) = &self.memory.uffd {
            // A vCPU blocked on a guest page the handler cannot fetch leaves
            // KVM_RUN only once the page is abandoned, which is safe only once
            // every vCPU has been kicked out of the guest for good.
            for v in &self.vcpus {
                let _ = v.request_pause();
            }
            uffd.abandon();
        }
        for v in &mut self.vcpus {
            v.exit();
        }
        self.ended = Some(status.clone());
        status
    }

    /// Stops the VM (if still running) and returns how it ended.
    pub fn stop(&mut self) -> ExitStatus {
        match &self.ended {
            Some(s) => s.clone(),
            None => self.finish(ExitStatus::Stopped),
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop();
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}
