//! Loading a Linux kernel: bzImage (64-bit boot protocol) or ELF vmlinux (PVH
//! entry when the kernel has the note, else 64-bit entry), initramfs, command
//! line, e820 map / PVH memory map, MP table and boot page tables.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{self, BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::regs::{self, EntryMode};
use crate::arch::x86_64::{acpi, mptable};
use crate::memory::GuestMemory;

/// The kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be read.
    #[error("cannot read {what} {path}: {err}")]
    Read {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// The kernel file is neither an ELF vmlinux nor a bzImage.
    #[error("{path} is not a Linux kernel (neither ELF vmlinux nor bzImage): {reason}")]
    NotAKernel {
        /// The file.
        path: PathBuf,
        /// What the loader said.
        reason: String,
    },
    /// The initramfs does not fit in guest memory.
    #[error("initramfs of {size} bytes does not fit in guest memory above the kernel")]
    InitramfsTooBig {
        /// Its size.
        size: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Boot structures could not be written.
    #[error("cannot write boot structures: {0}")]
    Setup(String),
}

/// Where and how the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPoint {
    /// Entry address.
    pub addr: u64,
    /// Protocol.
    pub mode: EntryMode,
}

/// Builds a kernel command line from `text`, checking the size limit.
pub fn cmdline(text: &str) -> Result<Cmdline, BootError> {
    Cmdline::try_from(text, CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))
}

fn low_ram_end(mem: &GuestMemory) -> u64 {
    mem.iter()
        .next()
        .map(|r| r.start_addr().raw_value() + r.len())
        .unwrap_or(0)
}

fn ram_map(mem: &GuestMemory) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    for r in mem.iter() {
        let start = r.start_addr().raw_value().max(HIMEM_START);
        let end = r.start_addr().raw_value() + r.len();
        if end > start {
            map.push((start, end - start));
        }
    }
    map
}

fn load_kernel(
    mem: &GuestMemory,
    path: &Path,
) -> Result<(EntryPoint, u64, Option<loader::bootparam::setup_header>), BootError> {
    let mut f = File::open(path).map_err(|err| BootError::Read {
        what: "kernel",
        path: path.to_path_buf(),
        err,
    })?;
    let himem = Some(GuestAddress(HIMEM_START));
    match Elf::load(mem, None, &mut f, himem) {
        Ok(r) => {
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryPoint {
                    addr: addr.raw_value(),
                    mode: EntryMode::Pvh,
                },
                _ => EntryPoint {
                    addr: r.kernel_load.raw_value(),
                    mode: EntryMode::Linux64,
                },
            };
            Ok((entry, r.kernel_end, None))
        }
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {
            let r = BzImage::load(mem, None, &mut f, himem).map_err(|e| BootError::NotAKernel {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
            let entry = EntryPoint {
                addr: r.kernel_load.raw_value() + 0x200,
                mode: EntryMode::Linux64,
            };
            Ok((entry, r.kernel_end, r.setup_header))
        }
        Err(e) => Err(BootError::NotAKernel {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

fn load_initramfs(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let read_err = |err| BootError::Read {
        what: "initramfs",
        path: path.to_path_buf(),
        err,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let size = f.metadata().map_err(read_err)?.len();
    let top = low_ram_end(mem).min(0x8000_0000);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(4096 - 1))
        .filter(|a| *a >= kernel_end)
        .ok_or(BootError::InitramfsTooBig { size })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| BootError::Setup(format!("initramfs: {e}")))?;
    Ok((addr, size))
}

fn setup_err(e: impl std::fmt::Display) -> BootError {
    BootError::Setup(e.to_string())
}

fn write_zero_page(
    mem: &GuestMemory,
    header: Option<loader::bootparam::setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = ram_map(mem);
    for (i, (addr, size)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: 1,
        };
    }
    params.e820_entries = map.len() as u8;
    params.acpi_rsdp_addr = acpi::RSDP_ADDR;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(setup_err)
}

fn write_pvh_info(mem: &GuestMemory, initrd: Option<(u64, u64)>) -> Result<(), BootError> {
    let map = ram_map(mem);
    let mut memmap = Vec::new();
    for (addr, size) in &map {
        memmap.extend_from_slice(&addr.to_le_bytes());
        memmap.extend_from_slice(&size.to_le_bytes());
        memmap.extend_from_slice(&1u32.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    mem.write_slice(&memmap, GuestAddress(PVH_MEMMAP_START))
        .map_err(setup_err)?;
    if let Some((addr, size)) = initrd {
        let mut m = Vec::new();
        m.extend_from_slice(&addr.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m.extend_from_slice(&0u64.to_le_bytes());
        m.extend_from_slice(&0u64.to_le_bytes());
        mem.write_slice(&m, GuestAddress(PVH_MODLIST_START))
            .map_err(setup_err)?;
    }
    let mut info = Vec::new();
    info.extend_from_slice(&0x336e_c578u32.to_le_bytes()); // magic
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&u32::from(initrd.is_some()).to_le_bytes());
    info.extend_from_slice(
        &(if initrd.is_some() {
            PVH_MODLIST_START
        } else {
            0
        })
        .to_le_bytes(),
    );
    info.extend_from_slice(&CMDLINE_START.to_le_bytes());
    info.extend_from_slice(&acpi::RSDP_ADDR.to_le_bytes());
    info.extend_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    info.extend_from_slice(&(map.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&info, GuestAddress(PVH_INFO_START))
        .map_err(setup_err)
}

/// Loads `kernel` (and `initramfs`) into `mem` with `cmdline` and writes every
/// boot structure for `num_cpus` vCPUs and the virtio-mmio devices `(base, gsi)`
/// (announced through ACPI). Returns the boot vCPU's entry point.
pub fn load(
    mem: &GuestMemory,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &Cmdline,
    num_cpus: u8,
    virtio: &[(u64, u32)],
) -> Result<EntryPoint, BootError> {
    let (entry, kernel_end, header) = load_kernel(mem, kernel)?;
    let initrd = initramfs
        .map(|p| load_initramfs(mem, p, kernel_end))
        .transpose()?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();
    match entry.mode {
        EntryMode::Linux64 => write_zero_page(mem, header, cmdline_len, initrd)?,
        EntryMode::Pvh => write_pvh_info(mem, initrd)?,
    }
    mptable::setup(mem, num_cpus).map_err(setup_err)?;
    acpi::setup(mem, num_cpus, virtio).map_err(setup_err)?;
    regs::write_boot_tables(mem, entry.mode).map_err(setup_err)?;
    Ok(entry)
}

/// Loads a flat 64-bit binary at `HIMEM_START` and prepares long mode with
/// identity paging, as for a 64-bit Linux entry (used for tiny test guests and
/// firmware-less programs). Returns the entry point.
pub fn load_flat(mem: &GuestMemory, code: &[u8], num_cpus: u8) -> Result<EntryPoint, BootError> {
    mem.write_slice(code, GuestAddress(HIMEM_START))
        .map_err(setup_err)?;
    mptable::setup(mem, num_cpus).map_err(setup_err)?;
    regs::write_boot_tables(mem, EntryMode::Linux64).map_err(setup_err)?;
    Ok(EntryPoint {
        addr: HIMEM_START,
        mode: EntryMode::Linux64,
    })
}
