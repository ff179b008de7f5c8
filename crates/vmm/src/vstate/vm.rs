//! The VM file descriptor: memory slots, in-kernel irqchip and PIT, kvmclock,
//! dirty log, irqfd and ioeventfd registration.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clock_data, kvm_enable_cap, kvm_irqchip, kvm_pit_config,
    kvm_pit_state2, kvm_userspace_memory_region, CpuId, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CLOCK_TSC_STABLE, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

// kvm-ioctls has no wrapper for KVM_CLEAR_DIRTY_LOG (kvm-ioctls 0.25).
mod ioctls {
    #![allow(missing_docs)]
    use super::*;
    vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
}
use ioctls::KVM_CLEAR_DIRTY_LOG;

/// Address of the TSS KVM needs on Intel hosts (three pages below the BIOS area).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors of VM-level KVM calls.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// The host KVM lacks a capability the VMM needs.
    #[error("host KVM lacks the {0} capability")]
    MissingCap(&'static str),
    /// A KVM ioctl on the VM failed.
    #[error("KVM {what} failed: {err}")]
    Ioctl {
        /// Which call failed.
        what: &'static str,
        /// The errno.
        err: kvm_ioctls::Error,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Ioctl { what, err }
}

/// One KVM memory slot backing one guest memory region.
#[derive(Debug, Clone, Copy)]
pub struct MemSlot {
    /// KVM slot number.
    pub slot: u32,
    /// Guest physical start address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the mapping backing the slot.
    pub host_addr: u64,
}

/// VM-wide KVM state saved in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// Slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// i8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// A KVM VM with in-kernel irqchip and PIT.
///
/// Dirty logging is off until [`Vm::set_dirty_logging`] turns it on (a
/// migration): while it is on, KVM maps guest memory in 4 KiB pages and
/// write-protects every page it reports, which costs the guest a write
/// fault per page and round of reports. Where the host has
/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, reading the log and re-protecting the
/// reported pages are two steps (`KVM_GET_DIRTY_LOG`, `KVM_CLEAR_DIRTY_LOG`),
/// as QEMU does.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    slots: Vec<MemSlot>,
    dirty_logging: bool,
    manual_protect: bool,
}

impl Vm {
    /// Opens `/dev/kvm`, creates the VM, its in-kernel irqchip (PIC + IOAPIC) and PIT.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, name) in [
            (Cap::Irqchip, "IRQCHIP"),
            (Cap::Irqfd, "IRQFD"),
            (Cap::Ioeventfd, "IOEVENTFD"),
            (Cap::UserMemory, "USER_MEMORY"),
            (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(ioctl("CREATE_VM"))?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(ioctl("SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("CREATE_PIT2"))?;
        let manual_protect = fd.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))
            as u32
            & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            != 0
            && {
                let mut cap = kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    ..Default::default()
                };
                cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
                fd.enable_cap(&cap).is_ok()
            };
        Ok(Vm {
            kvm,
            fd,
            slots: Vec::new(),
            dirty_logging: false,
            manual_protect,
        })
    }

    /// The system `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The memory slots registered so far.
    pub fn slots(&self) -> &[MemSlot] {
        &self.slots
    }

    /// Registers every region of `mem` as a KVM memory slot (dirty logging
    /// as set by [`Vm::set_dirty_logging`], off at first).
    pub fn register_memory(&mut self, mem: &GuestMemory) -> Result<(), VmError> {
        for region in mem.iter() {
            let slot = MemSlot {
                slot: self.slots.len() as u32,
                guest_addr: region.start_addr().0,
                size: region.len(),
                host_addr: region.as_ptr() as u64,
            };
            self.set_slot(&slot, self.dirty_logging)?;
            self.slots.push(slot);
        }
        Ok(())
    }

    /// (Re-)registers `slot` with dirty logging `on` or off.
    fn set_slot(&self, slot: &MemSlot, on: bool) -> Result<(), VmError> {
        let mr = kvm_userspace_memory_region {
            slot: slot.slot,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: slot.guest_addr,
            memory_size: slot.size,
            userspace_addr: slot.host_addr,
        };
        // SAFETY: `host_addr` is a live mapping of a region of the GuestMemory
        // the VMM holds for the VM's whole life, `size` bytes long; regions
        // never overlap. Re-registering a slot changes only its flags.
        unsafe { self.fd.set_user_memory_region(mr) }.map_err(ioctl("SET_USER_MEMORY_REGION"))
    }

    /// Turns KVM's dirty log on or off for every slot (vCPUs may run). Once
    /// on, [`Vm::take_dirty_log`] reports the pages written since it was
    /// turned on or last called; off, it reports nothing.
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<(), VmError> {
        if on == self.dirty_logging {
            return Ok(());
        }
        for s in &self.slots {
            self.set_slot(s, on)?;
        }
        self.dirty_logging = on;
        Ok(())
    }

    /// Whether KVM's dirty log is on.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging
    }

    /// CPUID leaves the host KVM supports, without creating a VM.
    pub fn host_supported_cpuid() -> Result<CpuId, VmError> {
        Kvm::new()
            .map_err(VmError::OpenKvm)?
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("GET_SUPPORTED_CPUID"))
    }

    /// CPUID leaves the host KVM supports.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("GET_SUPPORTED_CPUID"))
    }

    /// Indices of the MSRs KVM can save and restore.
    pub fn msr_index_list(&self) -> Result<Vec<u32>, VmError> {
        Ok(self
            .kvm
            .get_msr_index_list()
            .map_err(ioctl("GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec())
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu_fd(&self, id: u64) -> Result<VcpuFd, VmError> {
        self.fd.create_vcpu(id).map_err(ioctl("CREATE_VCPU"))
    }

    /// Signals interrupt `gsi` whenever `evt` is written.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(ioctl("IRQFD"))
    }

    /// Makes a guest write to MMIO `addr` (matching `datamatch` when given) signal `evt`
    /// in the kernel instead of exiting to the VMM.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: Option<u32>,
    ) -> Result<(), VmError> {
        let res = match datamatch {
            Some(d) => self
                .fd
                .register_ioevent(evt, &IoEventAddress::Mmio(addr), d),
            None => {
                self.fd
                    .register_ioevent(evt, &IoEventAddress::Mmio(addr), kvm_ioctls::NoDatamatch)
            }
        };
        res.map_err(ioctl("IOEVENTFD"))
    }

    /// Reads and clears KVM's dirty log: for every slot, its guest address and one
    /// bit per 4 KiB page written by the guest since the last call (all zero
    /// while dirty logging is off).
    pub fn take_dirty_log(&self) -> Result<Vec<(MemSlot, Vec<u64>)>, VmError> {
        self.slots
            .iter()
            .map(|s| {
                if !self.dirty_logging {
                    return Ok((*s, vec![0; (s.size / 4096).div_ceil(64) as usize]));
                }
                let mut bits = self
                    .fd
                    .get_dirty_log(s.slot, s.size as usize)
                    .map_err(ioctl("GET_DIRTY_LOG"))?;
                if self.manual_protect {
                    self.clear_dirty_log(s, &mut bits)?;
                }
                Ok((*s, bits))
            })
            .collect()
    }

    /// Write-protects again the pages of `slot` set in `bits` and clears
    /// them in KVM's log (manual protect mode), so that the next write to
    /// one of them is reported. Runs before the caller reads those pages,
    /// so a write racing with it is either in what the caller reads or in
    /// the next report.
    fn clear_dirty_log(&self, slot: &MemSlot, bits: &mut [u64]) -> Result<(), VmError> {
        if bits.iter().all(|w| *w == 0) {
            return Ok(());
        }
        let pages = slot.size / 4096;
        let mut clear = kvm_clear_dirty_log {
            slot: slot.slot,
            // The whole slot: KVM wants a multiple of 64 pages unless the
            // range ends at the slot's end, which it does.
            num_pages: u32::try_from(pages).map_err(|_| VmError::Ioctl {
                what: "CLEAR_DIRTY_LOG",
                err: kvm_ioctls::Error::new(libc::E2BIG),
            })?,
            first_page: 0,
            ..Default::default()
        };
        clear.__bindgen_anon_1.dirty_bitmap = bits.as_mut_ptr().cast();
        // SAFETY: `clear` names a registered slot and points at a bitmap of
        // at least `num_pages` bits that stays alive for the call; KVM only
        // reads it.
        let r =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if r < 0 {
            return Err(VmError::Ioctl {
                what: "CLEAR_DIRTY_LOG",
                err: kvm_ioctls::Error::last(),
            });
        }
        Ok(())
    }

    /// Saves PIC, IOAPIC, PIT and kvmclock state (vCPUs must be paused).
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd.get_irqchip(&mut c).map_err(ioctl("GET_IRQCHIP"))?;
            Ok(c)
        };
        let mut clock = self.fd.get_clock().map_err(ioctl("GET_CLOCK"))?;
        // Only the clock value is restored; the flags describe the source host.
        clock.flags = 0;
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(ioctl("GET_PIT2"))?,
            clock,
        })
    }

    /// Restores state saved by [`Vm::save_state`] (before any vCPU runs).
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        self.fd.set_pit2(&state.pit).map_err(ioctl("SET_PIT2"))?;
        let mut clock = state.clock;
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        self.fd.set_clock(&clock).map_err(ioctl("SET_CLOCK"))?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd.set_irqchip(chip).map_err(ioctl("SET_IRQCHIP"))?;
        }
        Ok(())
    }
}
