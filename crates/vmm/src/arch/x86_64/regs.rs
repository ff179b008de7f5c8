//! Boot-time register, MSR, FPU, LAPIC and page-table setup for the BSP and APs.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{gdt_entry, segment_from_gdt};
use super::layout::*;
use crate::memory::GuestMemory;

/// How the first vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit Linux boot protocol: long mode, paging on, `rsi` = zero page.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, `rbx` = `hvm_start_info`.
    Pvh,
}

/// Guest memory could not hold the boot structures.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {what} to guest memory at {addr:#x}")]
pub struct SetupError {
    /// Which structure.
    pub what: &'static str,
    /// Where.
    pub addr: u64,
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

fn gdt_for(mode: EntryMode) -> [u64; 4] {
    match mode {
        EntryMode::Linux64 => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xa09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x808b, 0, 0xfffff),
        ],
        EntryMode::Pvh => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xc09b, 0, 0xffff_ffff),
            gdt_entry(0xc093, 0, 0xffff_ffff),
            gdt_entry(0x008b, 0, 0x67),
        ],
    }
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemory,
    val: T,
    addr: u64,
    what: &'static str,
) -> Result<(), SetupError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|_| SetupError { what, addr })
}

/// Writes the boot GDT and an empty IDT; for [`EntryMode::Linux64`] also the
/// identity-mapped page tables covering the first GiB.
pub fn write_boot_tables(mem: &GuestMemory, mode: EntryMode) -> Result<(), SetupError> {
    for (i, e) in gdt_for(mode).iter().enumerate() {
        write(mem, *e, BOOT_GDT_START + 8 * i as u64, "GDT")?;
    }
    write(mem, 0u64, BOOT_IDT_START, "IDT")?;
    if mode == EntryMode::Linux64 {
        write(mem, PDPTE_START | 0x03, PML4_START, "PML4")?;
        write(mem, PDE_START | 0x03, PDPTE_START, "PDPTE")?;
        for i in 0..512u64 {
            write(mem, (i << 21) | 0x83, PDE_START + i * 8, "PDE")?;
        }
    }
    Ok(())
}

/// Special registers for entering the kernel in `mode`, starting from the vCPU's
/// current `sregs` (so KVM's defaults for the remaining fields survive).
pub fn boot_sregs(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    let gdt = gdt_for(mode);
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Linux64 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// General registers for entering at `entry` in `mode`.
pub fn boot_regs(entry: u64, mode: EntryMode) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        EntryMode::Pvh => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// FPU state at reset (x87 control word and MXCSR defaults).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(0x174, 0),               // IA32_SYSENTER_CS
        e(0x175, 0),               // IA32_SYSENTER_ESP
        e(0x176, 0),               // IA32_SYSENTER_EIP
        e(0xc000_0081, 0),         // STAR
        e(0xc000_0083, 0),         // CSTAR
        e(0xc000_0102, 0),         // KERNEL_GS_BASE
        e(0xc000_0084, 0),         // SYSCALL_MASK
        e(0xc000_0082, 0),         // LSTAR
        e(0x10, 0),                // IA32_TSC
        e(0x1a0, 1),               // IA32_MISC_ENABLE: fast strings
        e(0x2ff, (1 << 11) | 0x6), // MTRRdefType: enabled, write-back
    ]
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn get_reg(lapic: &kvm_lapic_state, off: usize) -> u32 {
    let b = &lapic.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_reg(lapic: &mut kvm_lapic_state, off: usize, val: u32) {
    for (i, b) in val.to_le_bytes().iter().enumerate() {
        lapic.regs[off + i] = *b as _;
    }
}

/// Routes LINT0 as ExtINT (legacy PIC) and LINT1 as NMI, as a PC BIOS would.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let lvt0 = get_reg(lapic, APIC_LVT0);
    set_reg(lapic, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lvt1 = get_reg(lapic, APIC_LVT1);
    set_reg(lapic, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_delivery_modes_are_set() {
        let mut l = kvm_lapic_state::default();
        set_reg(&mut l, APIC_LVT0, 0x0001_0000);
        set_lint(&mut l);
        assert_eq!(get_reg(&l, APIC_LVT0), 0x0001_0700);
        assert_eq!(get_reg(&l, APIC_LVT1), 0x400);
    }

    #[test]
    fn long_mode_sregs_enable_paging() {
        let s = boot_sregs(kvm_sregs::default(), EntryMode::Linux64);
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_eq!(s.cs.l, 1);
        let p = boot_sregs(kvm_sregs::default(), EntryMode::Pvh);
        assert_eq!(p.cr0 & X86_CR0_PG, 0);
        assert_eq!(p.cs.db, 1);
    }
}
