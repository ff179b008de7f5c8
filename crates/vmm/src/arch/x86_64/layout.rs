//! Guest physical memory layout (Firecracker-compatible low-memory map).

/// GDT location.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT location (empty IDT).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` location.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (initramfs) location.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map location.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux zero page (`boot_params`) location.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (identity maps the first GiB with 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line location.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line size including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area; usable RAM below 1 MiB ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the MP table lives (inside the EBDA).
pub const MPTABLE_START: u64 = EBDA_START;
/// First address above the legacy hole; kernels load here.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (virtio-mmio windows, IOAPIC, LAPIC).
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap; RAM beyond the gap continues here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio window.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// IOAPIC base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC base.
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// First GSI handed to virtio devices.
pub const FIRST_VIRTIO_GSI: u32 = 5;
/// Last usable IOAPIC GSI.
pub const LAST_GSI: u32 = 23;
/// COM1 I/O port base.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 IRQ.
pub const COM1_IRQ: u32 = 4;

/// Guest RAM ranges `(start, size)` for `mem_size` bytes of RAM: below the MMIO
/// gap, and the remainder above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_mmio_gap() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (0, MMIO_GAP_START));
        assert_eq!(r[1].0, MMIO_GAP_END);
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }
}
