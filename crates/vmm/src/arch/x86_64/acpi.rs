//! Minimal ACPI tables (RSDP, XSDT, FADT + FACS, DSDT with `_S5`, MADT): they tell
//! the guest about every vCPU (kernels without MP-table parsing need the MADT) and
//! give it a PM1 control register, so a guest `poweroff` reaches the VMM as a port
//! write instead of halting forever.
//!
//! The FADT is deliberately *not* hardware-reduced: Linux drops the legacy ISA
//! IRQ mappings on hardware-reduced platforms, and COM1 and the virtio-mmio
//! devices use plain IOAPIC lines.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_ADDR, IOAPIC_ADDR};
use crate::bus::BusDevice;
use crate::memory::GuestMemory;

/// Where the RSDP lives (inside the BIOS area the guest scans).
pub const RSDP_ADDR: u64 = 0x000e_0000;
/// I/O ports of the PM1a event block (status + enable, 4 bytes) followed by the
/// PM1a control block (2 bytes).
pub const PM1_PORT: u16 = 0x600;
/// Length of the PM1 register range on the bus.
pub const PM1_LEN: u64 = 6;
const PM1_CNT_OFFSET: u64 = 4;
/// SLP_TYP the DSDT's `_S5` package announces.
const S5_SLP_TYP: u16 = 5;
const SLP_EN: u16 = 1 << 13;
const SCI_IRQ: u16 = 9;

const OEM_ID: &[u8; 6] = b"DRAFTR";
const OEM_TABLE_ID: &[u8; 8] = b"MICROVM ";

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// An SDT: 36-byte header then `body`; length and checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0);
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"DRFT");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure for an I/O port register `bits` wide.
fn gas_io(port: u16, bits: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O space
    g[1] = bits;
    g[3] = if bits > 16 { 3 } else { 2 }; // dword / word access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn fadt(dsdt: u64, facs: u64) -> Vec<u8> {
    let mut b = vec![0u8; 276 - 36];
    let at = |off: usize| off - 36;
    b[at(36)..at(40)].copy_from_slice(&(facs as u32).to_le_bytes());
    b[at(40)..at(44)].copy_from_slice(&(dsdt as u32).to_le_bytes());
    b[at(46)..at(48)].copy_from_slice(&SCI_IRQ.to_le_bytes());
    // SMI_CMD stays 0: the platform is always in ACPI mode.
    b[at(56)..at(60)].copy_from_slice(&u32::from(PM1_PORT).to_le_bytes());
    b[at(64)..at(68)].copy_from_slice(&u32::from(PM1_PORT + PM1_CNT_OFFSET as u16).to_le_bytes());
    b[at(88)] = 4; // PM1_EVT_LEN
    b[at(89)] = 2; // PM1_CNT_LEN
                   // IAPC_BOOT_ARCH: 8042 present, no VGA, no CMOS RTC.
    b[at(109)..at(111)].copy_from_slice(&((1u16 << 1) | (1 << 2) | (1 << 5)).to_le_bytes());
    // Flags: WBINVD works; power and sleep buttons are not fixed features.
    let flags: u32 = 1 | (1 << 4) | (1 << 5);
    b[at(112)..at(116)].copy_from_slice(&flags.to_le_bytes());
    b[at(132)..at(140)].copy_from_slice(&facs.to_le_bytes());
    b[at(140)..at(148)].copy_from_slice(&dsdt.to_le_bytes());
    b[at(148)..at(160)].copy_from_slice(&gas_io(PM1_PORT, 32));
    b[at(172)..at(184)].copy_from_slice(&gas_io(PM1_PORT + PM1_CNT_OFFSET as u16, 16));
    b[at(268)..at(276)].copy_from_slice(b"DRAFTER\0");
    sdt(b"FACP", 6, &b)
}

fn facs() -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&64u32.to_le_bytes());
    f[32] = 2; // version
    f
}

/// AML PkgLength for `content` bytes that follow it (the encoding counts itself).
fn pkg_length(content: usize) -> Vec<u8> {
    if content + 1 < 64 {
        vec![(content + 1) as u8]
    } else {
        let len = content + 2;
        vec![0x40 | (len & 0x0f) as u8, (len >> 4) as u8]
    }
}

/// `Device (Vnnn) { _HID "LNRO0005", _UID n, _CRS { Memory32Fixed, Interrupt } }`:
/// how Linux discovers a virtio-mmio device through ACPI.
fn virtio_device(index: usize, base: u64, gsi: u32) -> Vec<u8> {
    let mut crs = Vec::new();
    crs.extend_from_slice(&[0x86, 0x09, 0x00, 0x01]); // Memory32Fixed, read-write
    crs.extend_from_slice(&(base as u32).to_le_bytes());
    crs.extend_from_slice(&0x1000u32.to_le_bytes());
    crs.extend_from_slice(&[0x89, 0x06, 0x00, 0x03, 0x01]); // Interrupt: consumer, edge, high
    crs.extend_from_slice(&gsi.to_le_bytes());
    crs.extend_from_slice(&[0x79, 0x00]); // end tag
    let mut body = Vec::new();
    body.extend_from_slice(format!("V{index:03}").as_bytes());
    body.extend_from_slice(b"\x08_HID\x0dLNRO0005\x00");
    body.extend_from_slice(&[0x08, b'_', b'U', b'I', b'D', 0x0a, index as u8]);
    body.extend_from_slice(&[0x08, b'_', b'C', b'R', b'S', 0x11]);
    let mut buf = vec![0x0a, crs.len() as u8];
    buf.extend_from_slice(&crs);
    body.extend_from_slice(&pkg_length(buf.len()));
    body.extend_from_slice(&buf);
    let mut dev = vec![0x5b, 0x82];
    dev.extend_from_slice(&pkg_length(body.len()));
    dev.extend_from_slice(&body);
    dev
}

fn dsdt(virtio: &[(u64, u32)]) -> Vec<u8> {
    // Name (_S5_, Package (2) { 5, 0 })
    let mut aml = vec![
        0x08,
        b'_',
        b'S',
        b'5',
        b'_',
        0x12,
        0x05,
        0x02,
        0x0a,
        S5_SLP_TYP as u8,
        0x00,
    ];
    if !virtio.is_empty() {
        // Scope (\_SB) { devices }
        let mut sb = b"\\_SB_".to_vec();
        for (i, (base, gsi)) in virtio.iter().enumerate() {
            sb.extend_from_slice(&virtio_device(i, *base, *gsi));
        }
        aml.push(0x10);
        aml.extend_from_slice(&pkg_length(sb.len()));
        aml.extend_from_slice(&sb);
    }
    sdt(b"DSDT", 2, &aml)
}

fn madt(num_cpus: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PC-AT compatible dual 8259s
    for cpu in 0..num_cpus {
        b.extend_from_slice(&[0, 8, cpu, cpu]);
        b.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    b.extend_from_slice(&[1, 12, num_cpus + 1, 0]);
    b.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    sdt(b"APIC", 5, &b)
}

/// Builds all tables for `num_cpus` and the virtio-mmio devices `(base, gsi)`,
/// laid out from [`RSDP_ADDR`]; returns the bytes to write there.
pub fn build(num_cpus: u8, virtio: &[(u64, u32)]) -> Vec<u8> {
    let align = |v: usize| (v + 15) & !15;
    let facs_off = 64;
    let dsdt_off = facs_off + 64;
    let dsdt = dsdt(virtio);
    let fadt_off = align(dsdt_off + dsdt.len());
    let fadt = fadt(RSDP_ADDR + dsdt_off as u64, RSDP_ADDR + facs_off as u64);
    let madt_off = align(fadt_off + fadt.len());
    let madt = madt(num_cpus);
    let xsdt_off = align(madt_off + madt.len());
    let mut xbody = Vec::new();
    xbody.extend_from_slice(&(RSDP_ADDR + fadt_off as u64).to_le_bytes());
    xbody.extend_from_slice(&(RSDP_ADDR + madt_off as u64).to_le_bytes());
    let xsdt = sdt(b"XSDT", 1, &xbody);

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0);
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // ACPI 2.0+
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&(RSDP_ADDR + xsdt_off as u64).to_le_bytes());
    rsdp.extend_from_slice(&[0, 0, 0, 0]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);

    let mut out = vec![0u8; xsdt_off + xsdt.len()];
    out[..36].copy_from_slice(&rsdp);
    out[facs_off..facs_off + 64].copy_from_slice(&facs());
    out[dsdt_off..dsdt_off + dsdt.len()].copy_from_slice(&dsdt);
    out[fadt_off..fadt_off + fadt.len()].copy_from_slice(&fadt);
    out[madt_off..madt_off + madt.len()].copy_from_slice(&madt);
    out[xsdt_off..].copy_from_slice(&xsdt);
    out
}

/// Writes the ACPI tables for `num_cpus` and the virtio-mmio devices `(base, gsi)`
/// into guest memory.
pub fn setup(
    mem: &GuestMemory,
    num_cpus: u8,
    virtio: &[(u64, u32)],
) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_slice(&build(num_cpus, virtio), GuestAddress(RSDP_ADDR))
}

/// The PM1 event and control registers: an S5 request powers the VM off.
pub struct SleepControl<F: FnMut() + Send> {
    on_poweroff: F,
}

impl<F: FnMut() + Send> SleepControl<F> {
    /// Calls `on_poweroff` when the guest enters S5.
    pub fn new(on_poweroff: F) -> Self {
        SleepControl { on_poweroff }
    }
}

impl<F: FnMut() + Send> BusDevice for SleepControl<F> {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != PM1_CNT_OFFSET || data.len() < 2 {
            return;
        }
        let v = u16::from_le_bytes([data[0], data[1]]);
        if v & SLP_EN != 0 && (v >> 10) & 0x7 == S5_SLP_TYP {
            (self.on_poweroff)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table_at(all: &[u8], addr: u64) -> &[u8] {
        let off = (addr - RSDP_ADDR) as usize;
        let len = u32::from_le_bytes([all[off + 4], all[off + 5], all[off + 6], all[off + 7]]);
        &all[off..off + len as usize]
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[off..off + 8]);
        u64::from_le_bytes(w)
    }

    #[test]
    fn tables_chain_and_checksum() {
        let all = build(2, &[(0xd000_0000, 5), (0xd000_1000, 6)]);
        assert_eq!(&all[..8], b"RSD PTR ");
        assert_eq!(sum(&all[..20]), 0);
        assert_eq!(sum(&all[..36]), 0);
        let xsdt = table_at(&all, u64_at(&all, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(xsdt), 0);
        let fadt = table_at(&all, u64_at(xsdt, 36));
        let madt = table_at(&all, u64_at(xsdt, 44));
        assert_eq!((&fadt[..4], fadt.len()), (&b"FACP"[..], 276));
        assert_eq!(sum(fadt), 0);
        // Not hardware-reduced (legacy IRQs must stay mapped), PM1 control present.
        assert_eq!(
            u32::from_le_bytes([fadt[112], fadt[113], fadt[114], fadt[115]]) & (1 << 20),
            0
        );
        assert_eq!(
            u32::from_le_bytes([fadt[64], fadt[65], fadt[66], fadt[67]]),
            0x604
        );
        let facs = u64_at(fadt, 132);
        assert_eq!(&all[(facs - RSDP_ADDR) as usize..][..4], b"FACS");
        let dsdt = table_at(&all, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        let text = String::from_utf8_lossy(dsdt);
        assert_eq!(text.matches("LNRO0005").count(), 2);
        assert!(text.contains("V001"));
        assert_eq!(sum(dsdt), 0);
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(sum(madt), 0);
        // Two enabled local APICs, then the IOAPIC.
        assert_eq!(&madt[44..48], &[0, 8, 0, 0]);
        assert_eq!(&madt[52..56], &[0, 8, 1, 1]);
        assert_eq!(&madt[60..62], &[1, 12]);
    }

    #[test]
    fn pkg_length_counts_itself() {
        assert_eq!(pkg_length(10), vec![11]);
        assert_eq!(pkg_length(62), vec![63]);
        // 63 content bytes need two length bytes: 65 = 0x41.
        assert_eq!(pkg_length(63), vec![0x41, 0x04]);
    }

    #[test]
    fn only_an_s5_request_powers_off() {
        let mut hits = 0;
        {
            let mut s = SleepControl::new(|| hits += 1);
            s.write(4, &(S5_SLP_TYP << 10).to_le_bytes()); // no SLP_EN
            s.write(4, &((3 << 10) | SLP_EN).to_le_bytes()); // S3
            s.write(0, &((S5_SLP_TYP << 10) | SLP_EN).to_le_bytes()); // status, not control
            s.write(4, &((S5_SLP_TYP << 10) | SLP_EN).to_le_bytes());
        }
        assert_eq!(hits, 1);
    }
}
