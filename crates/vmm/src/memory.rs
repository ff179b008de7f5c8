//! Guest memory: the type every part of the VMM shares, and its backends
//! (anonymous, file MAP_SHARED, file MAP_PRIVATE, userfaultfd).
//!
//! The *memory file layout* is the concatenation of the guest RAM regions in
//! address order; a memory file and [`PageProvider`] offsets use it.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes as _, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
};

use crate::arch::x86_64::layout::ram_ranges;

pub use crate::uffd::{PageProvider, UffdHandler};

/// Guest memory as every part of the VMM sees it. The [`AtomicBitmap`] records
/// every page the VMM itself writes (virtio-blk reads, net RX, vsock RX), which is
/// OR'd with KVM's dirty log to report dirty memory.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Granularity of dirty tracking.
pub const PAGE_SIZE: u64 = 4096;

/// Where guest memory lives.
pub enum MemoryBackend {
    /// Anonymous private memory.
    Anonymous,
    /// A file mapped MAP_SHARED: guest memory *is* the file. Created (sparse) at the
    /// right size if missing or empty.
    SharedFile(PathBuf),
    /// A file mapped MAP_PRIVATE: pages load lazily from it, writes stay private.
    PrivateFile(PathBuf),
    /// Anonymous memory whose missing pages a [`PageProvider`] supplies on fault.
    Userfault(Box<dyn PageProvider>),
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => write!(f, "Anonymous"),
            Self::SharedFile(p) => write!(f, "SharedFile({})", p.display()),
            Self::PrivateFile(p) => write!(f, "PrivateFile({})", p.display()),
            Self::Userfault(_) => write!(f, "Userfault"),
        }
    }
}

/// Guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The memory file could not be opened or sized.
    #[error("memory file {path}: {err}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        err: std::io::Error,
    },
    /// The memory file has the wrong size for the VM.
    #[error("memory file {path} holds {actual} bytes, the VM needs {expected}")]
    WrongSize {
        /// The file.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The VM's memory size.
        expected: u64,
    },
    /// mmap failed.
    #[error("cannot map guest memory: {0}")]
    Mmap(String),
    /// Memory size is zero or not a multiple of 4 KiB.
    #[error("invalid memory size {0} bytes (must be a non-zero multiple of 4 KiB)")]
    BadSize(u64),
    /// userfaultfd setup failed.
    #[error("userfaultfd: {0}")]
    Uffd(String),
    /// msync failed.
    #[error("msync of guest memory failed: {0}")]
    Msync(std::io::Error),
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> MemoryError + '_ {
    move |err| MemoryError::File {
        path: path.to_path_buf(),
        err,
    }
}

/// Guest memory plus what keeps its backend alive.
pub struct Memory {
    /// The guest memory.
    pub guest: GuestMemory,
    /// Whether the memory is a MAP_SHARED file (so `msync` writes it back).
    pub shared_file: Option<PathBuf>,
    /// The userfaultfd handler thread, when pages are served on demand.
    pub uffd: Option<UffdHandler>,
    /// Whether a page the process never touched reads as zero: anonymous
    /// private RAM, not a file's pages nor pages a provider still owes.
    pub untouched_is_zero: bool,
}

impl Memory {
    /// Total guest RAM in bytes.
    pub fn size(&self) -> u64 {
        self.guest.iter().map(|r| r.len()).sum()
    }

    /// Writes dirty pages of a MAP_SHARED file backend back to the file (no-op for
    /// other backends).
    pub fn msync(&self) -> Result<(), MemoryError> {
        if self.shared_file.is_none() {
            return Ok(());
        }
        for r in self.guest.iter() {
            // SAFETY: the pointer and length describe a live mapping owned by
            // `self.guest`; msync only flushes it and never invalidates it.
            let rc = unsafe { libc::msync(r.as_ptr().cast(), r.len() as usize, libc::MS_SYNC) };
            if rc != 0 {
                return Err(MemoryError::Msync(std::io::Error::last_os_error()));
            }
        }
        Ok(())
    }
}

fn region(
    base: u64,
    size: u64,
    flags: i32,
    file: Option<(&File, u64)>,
) -> Result<GuestRegionMmap<AtomicBitmap>, MemoryError> {
    let size_usize = size as usize;
    let bitmap = AtomicBitmap::new(
        size_usize,
        const { std::num::NonZeroUsize::new(PAGE_SIZE as usize).unwrap() },
    );
    let mut b = MmapRegionBuilder::new_with_bitmap(size_usize, bitmap)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags);
    if let Some((f, off)) = file {
        let clone = f
            .try_clone()
            .map_err(|e| MemoryError::Mmap(e.to_string()))?;
        b = b.with_file_offset(FileOffset::new(clone, off));
    }
    let mapping = b.build().map_err(|e| MemoryError::Mmap(e.to_string()))?;
    GuestRegionMmap::new(mapping, GuestAddress(base))
        .ok_or_else(|| MemoryError::Mmap("region overflows the address space".into()))
}

/// Whether a backend's untouched pages read as zero.
enum BackendKind {
    Anonymous,
    Other,
}

/// Creates `mem_size` bytes of guest RAM on `backend`.
pub fn create(mem_size: u64, backend: MemoryBackend) -> Result<Memory, MemoryError> {
    if mem_size == 0 || !mem_size.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::BadSize(mem_size));
    }
    let ranges = ram_ranges(mem_size);
    let mut shared_file = None;
    let mut provider = None;
    let backend_kind = match backend {
        MemoryBackend::Anonymous => BackendKind::Anonymous,
        _ => BackendKind::Other,
    };
    let (file, flags) = match backend {
        MemoryBackend::Anonymous => (
            None,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        ),
        MemoryBackend::Userfault(p) => {
            provider = Some(p);
            (
                None,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
        }
        MemoryBackend::SharedFile(path) => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(file_err(&path))?;
            let len = f.metadata().map_err(file_err(&path))?.len();
            if len == 0 {
                f.set_len(mem_size).map_err(file_err(&path))?;
            } else if len != mem_size {
                return Err(MemoryError::WrongSize {
                    path,
                    actual: len,
                    expected: mem_size,
                });
            }
            shared_file = Some(path);
            (Some(f), libc::MAP_SHARED | libc::MAP_NORESERVE)
        }
        MemoryBackend::PrivateFile(path) => {
            let f = File::open(&path).map_err(file_err(&path))?;
            let len = f.metadata().map_err(file_err(&path))?.len();
            if len != mem_size {
                return Err(MemoryError::WrongSize {
                    path,
                    actual: len,
                    expected: mem_size,
                });
            }
            (Some(f), libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        }
    };
    let mut regions = Vec::new();
    let mut file_off = 0u64;
    for (base, size) in ranges {
        let r = region(base, size, flags, file.as_ref().map(|f| (f, file_off)))?;
        regions.push(r);
        file_off += size;
    }
    let guest = GuestMemory::from_regions(regions).map_err(|e| MemoryError::Mmap(e.to_string()))?;
    let uffd = match provider {
        Some(p) => Some(UffdHandler::start(&guest, p)?),
        None => None,
    };
    Ok(Memory {
        guest,
        shared_file,
        uffd,
        untouched_is_zero: matches!(backend_kind, BackendKind::Anonymous),
    })
}

/// Writes all guest memory to `path` in the memory file layout (sparse: all-zero
/// pages become holes).
pub fn dump(mem: &GuestMemory, path: &Path) -> Result<(), MemoryError> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = File::create(path).map_err(file_err(path))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    f.set_len(total).map_err(file_err(path))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut file_off = 0u64;
    for r in mem.iter() {
        let mut done = 0u64;
        while done < r.len() {
            let n = (r.len() - done).min(buf.len() as u64) as usize;
            let chunk = &mut buf[..n];
            r.read_slice(chunk, vm_memory::MemoryRegionAddress(done))
                .map_err(|e| MemoryError::Mmap(e.to_string()))?;
            for (i, page) in chunk.chunks(PAGE_SIZE as usize).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    let at = file_off + done + (i as u64) * PAGE_SIZE;
                    f.seek(SeekFrom::Start(at)).map_err(file_err(path))?;
                    f.write_all(page).map_err(file_err(path))?;
                }
            }
            done += n as u64;
        }
        file_off += r.len();
    }
    f.sync_all().map_err(file_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn shared_file_memory_is_the_file_after_msync() {
        let dir = std::env::temp_dir().join(format!("vmm-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let path = dir.join("shared");
        let _ = std::fs::remove_file(&path);
        let m = create(1 << 20, MemoryBackend::SharedFile(path.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        m.guest
            .write_slice(b"drafter", GuestAddress(0x8000))
            .unwrap_or_else(|e| panic!("{e}"));
        m.msync().unwrap_or_else(|e| panic!("{e}"));
        let bytes = std::fs::read(&path).unwrap_or_default();
        assert_eq!(bytes.len(), 1 << 20);
        assert_eq!(&bytes[0x8000..0x8007], b"drafter");

        // A private mapping of the same file sees the content but keeps its writes.
        let p = create(1 << 20, MemoryBackend::PrivateFile(path.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut got = [0u8; 7];
        p.guest
            .read_slice(&mut got, GuestAddress(0x8000))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got, b"drafter");
        p.guest
            .write_slice(b"private", GuestAddress(0x8000))
            .unwrap_or_else(|e| panic!("{e}"));
        let bytes = std::fs::read(&path).unwrap_or_default();
        assert_eq!(&bytes[0x8000..0x8007], b"drafter");

        // The wrong size is refused.
        assert!(matches!(
            create(2 << 20, MemoryBackend::PrivateFile(path.clone())),
            Err(MemoryError::WrongSize { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn dump_writes_the_memory_file_layout() {
        let m = create(1 << 20, MemoryBackend::Anonymous).unwrap_or_else(|e| panic!("{e}"));
        m.guest
            .write_slice(&[0xab; 10], GuestAddress(0x3000))
            .unwrap_or_else(|e| panic!("{e}"));
        let path = std::env::temp_dir().join(format!("vmm-dump-{}", std::process::id()));
        dump(&m.guest, &path).unwrap_or_else(|e| panic!("{e}"));
        let bytes = std::fs::read(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        assert_eq!(bytes.len(), 1 << 20);
        assert_eq!(&bytes[0x3000..0x300a], &[0xab; 10]);
        assert!(bytes[..0x3000].iter().all(|b| *b == 0));
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(
            create(0, MemoryBackend::Anonymous),
            Err(MemoryError::BadSize(0))
        ));
        assert!(matches!(
            create(4097, MemoryBackend::Anonymous),
            Err(MemoryError::BadSize(4097))
        ));
    }
}
