//! One vCPU: its KVM fd, boot setup, state save/restore and a single `KVM_RUN`
//! step that dispatches I/O exits to the buses.
//!
//! Pausing uses a real-time signal: [`kick_signal`]'s handler sets the running
//! vCPU's `immediate_exit` flag, so a `KVM_RUN` in progress returns `EINTR` and one
//! about to start returns at once — no polling and no lost wake-ups.

use std::cell::Cell;
use std::sync::OnceLock;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

use super::vm::{Vm, VmError};
use crate::arch::x86_64::{cpuid, regs};
use crate::bus::Bus;

/// Errors of vCPU-level KVM calls.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl on the vCPU failed.
    #[error("KVM {what} on vCPU failed: {err}")]
    Ioctl {
        /// Which call failed.
        what: &'static str,
        /// The errno.
        err: kvm_ioctls::Error,
    },
    /// A FAM structure (CPUID or MSR list) was too large.
    #[error("{0} list too large for KVM")]
    TooLarge(&'static str),
    /// Creating the vCPU failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The pause signal could not be set up.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// KVM refused to restore a saved MSR (KVM_SET_MSRS stops at the first one
    /// it refuses, so the MSRs after it would not be restored either).
    #[error(
        "vCPU {vcpu}: KVM refused to restore MSR {index:#x} \
         ({restored} of {total} saved MSRs restored)"
    )]
    MsrRefused {
        /// The vCPU's index.
        vcpu: u8,
        /// The refused MSR.
        index: u32,
        /// How many of the saved MSRs were restored before it.
        restored: usize,
        /// How many MSRs the snapshot holds for this vCPU.
        total: usize,
    },
    /// The snapshot's TSC frequency could not be set and the host's differs
    /// from it by more than [`TSC_KHZ_TOLERANCE_PPM`].
    #[error(
        "vCPU {vcpu}: cannot set the TSC to the snapshot's {saved_khz} kHz \
         (host TSC: {}; more than {TSC_KHZ_TOLERANCE_PPM} ppm off): {err}",
        host_khz.map_or_else(|| "unknown".to_string(), |k| format!("{k} kHz"))
    )]
    TscFrequency {
        /// The vCPU's index.
        vcpu: u8,
        /// The TSC frequency in the snapshot.
        saved_khz: u32,
        /// The host's TSC frequency, if KVM reports one.
        host_khz: Option<u32>,
        /// Why KVM_SET_TSC_KHZ failed.
        err: kvm_ioctls::Error,
    },
}

/// IA32_TSC: the guest's time stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE: the LAPIC timer's deadline, in guest TSC ticks.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Largest difference, in parts per million, between the host's TSC frequency
/// and a snapshot's at which a failed `KVM_SET_TSC_KHZ` is only a warning.
///
/// 250 ppm is KVM's own default `tsc_tolerance_ppm`: within it, KVM itself
/// does not scale the TSC and runs the guest at the host rate. A guest clock
/// that runs 250 ppm (about 22 s a day) off is within what NTP disciplines
/// (up to 500 ppm), and the same CPU model's calibrated TSC frequency differs
/// between hosts by far less. Beyond it, guest time would visibly drift, so
/// restore fails instead.
pub const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// Whether a host TSC of `host_khz` is within [`TSC_KHZ_TOLERANCE_PPM`] of a
/// snapshot's `saved_khz`.
pub fn tsc_within_tolerance(saved_khz: u32, host_khz: u32) -> bool {
    let diff = u64::from(saved_khz.abs_diff(host_khz));
    diff * 1_000_000 <= TSC_KHZ_TOLERANCE_PPM * u64::from(saved_khz)
}

fn msr_rank(index: u32) -> u8 {
    match index {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    }
}

/// The order MSRs are saved and restored in: IA32_TSC first, IA32_TSC_DEADLINE
/// last, every other MSR in between in the order given (KVM's
/// `KVM_GET_MSR_INDEX_LIST` order); duplicates are dropped.
///
/// KVM arms the LAPIC timer from a TSC-deadline write against the guest TSC at
/// that moment, so the deadline must be written after the TSC it is relative
/// to, or the timer fires at a time computed against the new process's TSC.
pub fn msr_save_order(indices: &[u32]) -> Vec<u32> {
    let mut seen = std::collections::HashSet::with_capacity(indices.len());
    let mut out: Vec<u32> = indices
        .iter()
        .copied()
        .filter(|i| seen.insert(*i))
        .collect();
    out.sort_by_key(|&i| msr_rank(i));
    out
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |err| VcpuError::Ioctl { what, err }
}

/// Everything KVM holds for one vCPU, in a snapshot.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Saved MSRs (TSC and kvmclock included).
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Multiprocessing state (running, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// TSC frequency, when the host reports a stable one.
    pub tsc_khz: Option<u32>,
}

/// Why a `KVM_RUN` step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// An exit was handled; run again.
    Continue,
    /// The kick signal interrupted the vCPU; check for commands.
    Kicked,
    /// The guest asked to power off.
    Poweroff,
    /// The guest reset (reboot request or triple fault).
    Reset,
    /// KVM reported an unrecoverable condition.
    Failed(String),
}

thread_local! {
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_num: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // `try_with` and `Cell::get` are async-signal-safe for a const-initialised
    // thread local: no allocation, no locks.
    let _ = IMMEDIATE_EXIT.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer was set by this thread to the `immediate_exit`
            // byte of its own vCPU's `kvm_run` mapping, which outlives the
            // registration (cleared in `Drop for Vcpu` before unmapping).
            unsafe { std::ptr::write_volatile(p, 1) };
        }
    });
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`; its handler is
/// installed on first use.
pub fn kick_signal() -> Result<libc::c_int, VcpuError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let sig = vmm_sys_util::signal::SIGRTMIN();
    let res = INSTALLED.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(sig, handle_kick).map_err(|e| e.errno())
    });
    match res {
        Ok(()) => Ok(sig),
        Err(errno) => Err(VcpuError::Signal(vmm_sys_util::errno::Error::new(*errno))),
    }
}

/// A vCPU file descriptor and its index.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    registered: bool,
    /// The CPUID given to the vCPU (KVM_GET_CPUID2 may report runtime bits on
    /// some hosts; the snapshot keeps what the guest was promised).
    cpuid: Vec<kvm_cpuid_entry2>,
}

impl Vcpu {
    /// Creates vCPU `index` in `vm`.
    pub fn new(vm: &Vm, index: u8) -> Result<Self, VcpuError> {
        Ok(Vcpu {
            index,
            fd: vm.create_vcpu_fd(u64::from(index))?,
            registered: false,
            cpuid: Vec::new(),
        })
    }

    /// This vCPU's index (= APIC ID).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Gives the vCPU its CPUID (`cpuid`, the supported set after any CPU
    /// template, normalised for `index` of `count`), boot MSRs, FPU and
    /// LAPIC LINT setup; the boot processor also gets `entry` registers.
    pub fn configure_boot(
        &mut self,
        cpuid: &[kvm_cpuid_entry2],
        count: u8,
        tsc_deadline: bool,
        entry: Option<(u64, regs::EntryMode)>,
    ) -> Result<(), VcpuError> {
        let mut entries = cpuid.to_vec();
        cpuid::normalize(&mut entries, self.index, count, tsc_deadline);
        self.set_cpuid(&entries)?;
        let msrs =
            Msrs::from_entries(&regs::boot_msrs()).map_err(|_| VcpuError::TooLarge("MSR"))?;
        self.fd.set_msrs(&msrs).map_err(ioctl("SET_MSRS"))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(ioctl("SET_FPU"))?;
        let mut lapic = self.fd.get_lapic().map_err(ioctl("GET_LAPIC"))?;
        regs::set_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(ioctl("SET_LAPIC"))?;
        if let Some((rip, mode)) = entry {
            let sregs = self.fd.get_sregs().map_err(ioctl("GET_SREGS"))?;
            self.fd
                .set_sregs(&regs::boot_sregs(sregs, mode))
                .map_err(ioctl("SET_SREGS"))?;
            self.fd
                .set_regs(&regs::boot_regs(rip, mode))
                .map_err(ioctl("SET_REGS"))?;
        }
        Ok(())
    }

    fn set_cpuid(&mut self, entries: &[kvm_cpuid_entry2]) -> Result<(), VcpuError> {
        let cpuid = CpuId::from_entries(entries).map_err(|_| VcpuError::TooLarge("CPUID"))?;
        self.fd.set_cpuid2(&cpuid).map_err(ioctl("SET_CPUID2"))?;
        self.cpuid = entries.to_vec();
        Ok(())
    }

    /// General registers (for tests and diagnostics).
    pub fn regs(&self) -> Result<kvm_regs, VcpuError> {
        self.fd.get_regs().map_err(ioctl("GET_REGS"))
    }

    /// One line with what a crash report needs: instruction and stack
    /// pointers, control registers, the IDT and the event KVM had pending.
    fn crash_report(&self) -> String {
        let regs = match self.fd.get_regs() {
            Ok(r) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x}",
                r.rip, r.rsp, r.rflags, r.rax
            ),
            Err(e) => format!("regs unreadable ({e})"),
        };
        let sregs = match self.fd.get_sregs() {
            Ok(s) => format!(
                "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} idt={:#x}/{:#x} cs={:#x}",
                s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.idt.base, s.idt.limit, s.cs.selector
            ),
            Err(e) => format!("sregs unreadable ({e})"),
        };
        let events = match self.fd.get_vcpu_events() {
            Ok(e) => format!(
                "exception injected={} nr={} error_code={:#x} interrupt injected={} nr={}",
                e.exception.injected,
                e.exception.nr,
                e.exception.error_code,
                e.interrupt.injected,
                e.interrupt.nr
            ),
            Err(e) => format!("events unreadable ({e})"),
        };
        format!("{regs} {sregs} {events}")
    }

    /// Reads the MSRs in `indices`, in that order. KVM lists some MSRs it then
    /// refuses to read (e.g. ones the guest's CPUID does not enable): those
    /// are left out of the result (and logged), so that every returned entry
    /// can be written back.
    fn get_msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let mut out = Vec::with_capacity(indices.len());
        let mut skipped = Vec::new();
        let mut rest: Vec<u32> = indices.to_vec();
        while !rest.is_empty() {
            let take = rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES);
            let entries: Vec<kvm_msr_entry> = rest[..take]
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::TooLarge("MSR"))?;
            let n = self.fd.get_msrs(&mut msrs).map_err(ioctl("GET_MSRS"))?;
            out.extend_from_slice(&msrs.as_slice()[..n]);
            // KVM stops at the first MSR it cannot read: skip that one.
            let consumed = if n < take {
                skipped.push(rest[n]);
                n + 1
            } else {
                n
            };
            rest.drain(..consumed);
        }
        if !skipped.is_empty() {
            tracing::debug!(
                "vCPU {}: not saving MSRs KVM lists but cannot read: {skipped:#x?}",
                self.index
            );
        }
        Ok(out)
    }

    /// Writes `entries` (already in [`msr_save_order`]) and fails naming the
    /// first MSR KVM refuses.
    fn set_msrs(&self, entries: &[kvm_msr_entry]) -> Result<(), VcpuError> {
        let mut restored = 0;
        for chunk in entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| VcpuError::TooLarge("MSR"))?;
            let n = self.fd.set_msrs(&msrs).map_err(ioctl("SET_MSRS"))?;
            if let Some(refused) = chunk.get(n) {
                return Err(VcpuError::MsrRefused {
                    vcpu: self.index,
                    index: refused.index,
                    restored: restored + n,
                    total: entries.len(),
                });
            }
            restored += n;
        }
        Ok(())
    }

    /// Saves the vCPU's state; the vCPU must not be running. `msr_indices` lists
    /// the MSRs to save (from `KVM_GET_MSR_INDEX_LIST`); they are saved in
    /// [`msr_save_order`], leaving out the ones KVM cannot read.
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
        let mp_state = self.fd.get_mp_state().map_err(ioctl("GET_MP_STATE"))?;
        let regs = self.fd.get_regs().map_err(ioctl("GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(ioctl("GET_SREGS"))?;
        let xsave = self.fd.get_xsave().map_err(ioctl("GET_XSAVE"))?;
        let xcrs = self.fd.get_xcrs().map_err(ioctl("GET_XCRS"))?;
        let debugregs = self.fd.get_debug_regs().map_err(ioctl("GET_DEBUGREGS"))?;
        let lapic = self.fd.get_lapic().map_err(ioctl("GET_LAPIC"))?;
        let tsc_khz = self.fd.get_tsc_khz().ok();
        let cpuid = self.cpuid.clone();
        let msrs = self.get_msrs(&msr_save_order(msr_indices))?;
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(ioctl("GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            cpuid,
            msrs,
            regs,
            sregs,
            xsave,
            xcrs,
            lapic,
            mp_state,
            events,
            debugregs,
            tsc_khz,
        })
    }

    /// Restores a saved state, in the order KVM requires (CPUID first, events
    /// last). Every saved MSR must be restored, and the saved TSC frequency set
    /// (or the host's be within [`TSC_KHZ_TOLERANCE_PPM`] of it).
    pub fn restore_state(&mut self, s: &VcpuState) -> Result<(), VcpuError> {
        if let Some(khz) = s.tsc_khz {
            let host_khz = self.fd.get_tsc_khz().ok();
            if host_khz != Some(khz) {
                if let Err(err) = self.fd.set_tsc_khz(khz) {
                    match host_khz {
                        Some(host) if tsc_within_tolerance(khz, host) => tracing::warn!(
                            "vCPU {}: cannot set the TSC to the snapshot's {khz} kHz ({err}); \
                             running at the host's {host} kHz, within {TSC_KHZ_TOLERANCE_PPM} ppm",
                            self.index
                        ),
                        _ => {
                            return Err(VcpuError::TscFrequency {
                                vcpu: self.index,
                                saved_khz: khz,
                                host_khz,
                                err,
                            })
                        }
                    }
                }
            }
        }
        self.set_cpuid(&s.cpuid)?;
        self.fd
            .set_mp_state(s.mp_state)
            .map_err(ioctl("SET_MP_STATE"))?;
        self.fd.set_regs(&s.regs).map_err(ioctl("SET_REGS"))?;
        self.fd.set_sregs(&s.sregs).map_err(ioctl("SET_SREGS"))?;
        // SAFETY: `kvm_xsave` is the fixed 4 KiB legacy layout that KVM_SET_XSAVE
        // reads; the VMM never enables dynamic (XSAVE2-sized) features, so KVM
        // reads no more than the struct holds.
        unsafe { self.fd.set_xsave(&s.xsave) }.map_err(ioctl("SET_XSAVE"))?;
        self.fd.set_xcrs(&s.xcrs).map_err(ioctl("SET_XCRS"))?;
        self.fd
            .set_debug_regs(&s.debugregs)
            .map_err(ioctl("SET_DEBUGREGS"))?;
        self.fd.set_lapic(&s.lapic).map_err(ioctl("SET_LAPIC"))?;
        // Snapshots are saved in this order already; sorting (stable) also
        // puts older ones' TSC before their TSC deadline.
        let mut msrs = s.msrs.clone();
        msrs.sort_by_key(|m| msr_rank(m.index));
        self.set_msrs(&msrs)?;
        self.fd
            .set_vcpu_events(&s.events)
            .map_err(ioctl("SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// Points this thread's kick handler at this vCPU. Call on the thread that
    /// will run it, before the first [`Vcpu::run`].
    pub fn bind_to_current_thread(&mut self) {
        let p: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(p));
        self.registered = true;
    }

    /// Runs the guest until the next exit and dispatches port I/O and MMIO to
    /// `pio` and `mmio`.
    pub fn run(&mut self, pio: &Bus, mmio: &Bus) -> RunOutcome {
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                pio.read(u64::from(port), data);
                RunOutcome::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(u64::from(port), data);
                RunOutcome::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    tracing::debug!("unhandled MMIO read at {addr:#x}");
                }
                RunOutcome::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !mmio.write(addr, data) {
                    tracing::debug!("unhandled MMIO write at {addr:#x}");
                }
                RunOutcome::Continue
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => {
                RunOutcome::Continue
            }
            Ok(VcpuExit::Shutdown) => {
                // A triple fault: what the vCPU was doing says whether the
                // guest crashed on its own or ran on memory that is not its.
                tracing::error!(
                    vcpu = self.index,
                    "guest triple fault: {}",
                    self.crash_report()
                );
                RunOutcome::Reset
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => RunOutcome::Poweroff,
                KVM_SYSTEM_EVENT_RESET => RunOutcome::Reset,
                other => RunOutcome::Failed(format!("unexpected system event {other}")),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                RunOutcome::Failed(format!("VM entry failed on CPU {cpu}: reason {reason:#x}"))
            }
            Ok(VcpuExit::InternalError) => {
                RunOutcome::Failed("KVM internal error (emulation failure)".into())
            }
            Ok(other) => RunOutcome::Failed(format!("unhandled vCPU exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR => {
                self.fd.set_kvm_immediate_exit(0);
                RunOutcome::Kicked
            }
            Err(e) if e.errno() == libc::EAGAIN => RunOutcome::Continue,
            Err(e) => RunOutcome::Failed(format!("KVM_RUN failed: {e}")),
        }
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        if self.registered {
            let _ = IMMEDIATE_EXIT.try_with(|c| c.set(std::ptr::null_mut()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_order_puts_the_tsc_first_and_its_deadline_last() {
        let kvm_order = [0x174, 0x6e0, 0x175, 0x10, 0x4b56_4d01, 0x3b, 0xc000_0080];
        assert_eq!(
            msr_save_order(&kvm_order),
            [0x10, 0x174, 0x175, 0x4b56_4d01, 0x3b, 0xc000_0080, 0x6e0]
        );
    }

    #[test]
    fn msr_order_keeps_kvm_order_and_drops_duplicates() {
        assert_eq!(msr_save_order(&[]), Vec::<u32>::new());
        assert_eq!(msr_save_order(&[3, 1, 2]), [3, 1, 2]);
        assert_eq!(
            msr_save_order(&[0x6e0, 5, 0x10, 5, 0x10, 0x6e0]),
            [0x10, 5, 0x6e0]
        );
    }

    #[test]
    fn tsc_tolerance_is_250_ppm_of_the_saved_frequency() {
        assert!(tsc_within_tolerance(2_000_000, 2_000_000));
        assert!(tsc_within_tolerance(2_000_000, 2_000_500));
        assert!(tsc_within_tolerance(2_000_000, 1_999_500));
        assert!(!tsc_within_tolerance(2_000_000, 2_000_501));
        assert!(!tsc_within_tolerance(2_000_000, 1_999_499));
        assert!(!tsc_within_tolerance(2_000_000, 0));
        assert!(tsc_within_tolerance(0, 0));
    }
}
