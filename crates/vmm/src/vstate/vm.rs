//! The VM file descriptor: memory slots, in-kernel irqchip and PIT, kvmclock,
//! dirty log, irqfd and ioeventfd registration.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    CpuId, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

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
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    slots: Vec<MemSlot>,
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
        Ok(Vm {
            kvm,
            fd,
            slots: Vec::new(),
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

    /// Registers every region of `mem` as a KVM memory slot with dirty logging on.
    pub fn register_memory(&mut self, mem: &GuestMemory) -> Result<(), VmError> {
        for region in mem.iter() {
            let slot = self.slots.len() as u32;
            let guest_addr = region.start_addr().0;
            let size = region.len();
            let userspace_addr = region.as_ptr() as u64;
            let mr = kvm_userspace_memory_region {
                slot,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: guest_addr,
                memory_size: size,
                userspace_addr,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the caller
            // keeps alive (the VMM holds a clone of the GuestMemory for the VM's whole
            // life), and regions never overlap.
            unsafe { self.fd.set_user_memory_region(mr) }
                .map_err(ioctl("SET_USER_MEMORY_REGION"))?;
            self.slots.push(MemSlot {
                slot,
                guest_addr,
                size,
            });
        }
        Ok(())
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
    /// bit per 4 KiB page written by the guest since the last call.
    pub fn take_dirty_log(&self) -> Result<Vec<(MemSlot, Vec<u64>)>, VmError> {
        self.slots
            .iter()
            .map(|s| {
                self.fd
                    .get_dirty_log(s.slot, s.size as usize)
                    .map(|bits| (*s, bits))
                    .map_err(ioctl("GET_DIRTY_LOG"))
            })
            .collect()
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
