//! Guest RAM as a read-only block device, read through the VMM's own mapping.
//!
//! The migration engine reads guest memory here rather than through a
//! memory file, so any backend migrates: anonymous memory (a booted VM),
//! a MAP_SHARED file, or a userfaultfd-backed VM that resumed at authority
//! (a page not fetched yet faults in through the handler as the engine reads
//! it). Reads race with a running guest, as with any pre-copy: the dirty log
//! reports every page written after it was read.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use drafter_storage::error::Result;
use drafter_storage::{BlockDevice, StorageError};
use drafter_vmm::memory::GuestMemory;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

/// One guest RAM region in the memory file layout.
#[derive(Debug, Clone, Copy)]
struct Span {
    file_offset: u64,
    guest_addr: u64,
    len: u64,
}

/// Guest RAM, regions concatenated in address order (the memory file
/// layout), readable as a block device. Writes are refused: only the guest
/// writes its memory.
pub struct GuestMemoryDevice {
    memory: GuestMemory,
    spans: Vec<Span>,
    size: u64,
    block_size: u32,
    /// `/proc/self/pagemap`, when untouched pages read as zero.
    pagemap: Option<File>,
    /// Harvests of the dirty log that reports this memory's writes.
    harvests: Harvests,
    /// The last window of pagemap entries read.
    window: Mutex<Option<Window>>,
}

/// Counts the harvests of a dirty log: odd while one is in progress. A
/// page seen untouched stays safe to send as zeros until the next harvest
/// begins: any write after the look is reported by that harvest, and its
/// page is sent again. After it, the look may be stale.
#[derive(Clone, Default)]
pub struct Harvests(Arc<AtomicU64>);

/// A harvest in progress; ends when dropped.
pub struct Harvesting<'a>(&'a Harvests);

impl Harvests {
    /// Marks a harvest as begun, until the returned guard is dropped.
    pub fn begin(&self) -> Harvesting<'_> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Harvesting(self)
    }

    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl Drop for Harvesting<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Pagemap entries of consecutive host pages, read while no harvest ran.
struct Window {
    /// The harvest count when read (even).
    harvests: u64,
    /// Host page number of the first entry.
    first: u64,
    /// Whether each page was untouched.
    untouched: Vec<bool>,
}

/// Pagemap entries read at once (16 MiB of guest RAM, 32 KiB of entries):
/// one system call per window instead of one per block.
const WINDOW_PAGES: u64 = 4096;

/// Page size of the host mappings and of `/proc/self/pagemap` entries.
const PAGE: u64 = 4096;
/// Pagemap entry bits: the page is mapped, or swapped out (or migrating).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

impl GuestMemoryDevice {
    /// Guest RAM of `memory` in blocks of `block_size` bytes.
    pub fn new(memory: GuestMemory, block_size: u32) -> Result<Self, StorageError> {
        drafter_storage::device::validate_block_size(block_size)?;
        let mut spans = Vec::new();
        let mut size = 0u64;
        for r in memory.iter() {
            spans.push(Span {
                file_offset: size,
                guest_addr: r.start_addr().0,
                len: r.len(),
            });
            size += r.len();
        }
        Ok(GuestMemoryDevice {
            memory,
            spans,
            size,
            block_size,
            pagemap: None,
            harvests: Harvests::default(),
            window: Mutex::new(None),
        })
    }

    /// Reads pages this process never touched (neither mapped nor swapped
    /// out, per `/proc/self/pagemap`) as zeros without faulting them in.
    /// Only for memory whose untouched pages are zero (anonymous RAM, see
    /// [`drafter_vmm::Vmm::untouched_memory_is_zero`]): an idle guest's
    /// free memory is then neither copied nor mapped (the zero page) by the
    /// full pass. `harvests` must count the harvests of the dirty log that
    /// reports every write to this memory (see
    /// [`super::VmMemoryDirtySource::with_harvests`]): pagemap entries are
    /// read a window at a time and reused until the next harvest begins.
    /// Without a readable pagemap every page is read.
    pub fn skip_untouched_pages(mut self, harvests: Harvests) -> Self {
        match File::open("/proc/self/pagemap") {
            Ok(f) => self.pagemap = Some(f),
            Err(e) => tracing::debug!("no /proc/self/pagemap, reading every page: {e}"),
        }
        self.harvests = harvests;
        self
    }

    /// For each page of `len` bytes at `addr` (page-aligned, within one
    /// region): whether it was never touched, from the cached window when
    /// no harvest began since it was read. `None` if the pagemap cannot say.
    fn untouched(&self, pm: &File, addr: GuestAddress, len: usize) -> Option<Vec<bool>> {
        let hva = self.memory.get_host_address(addr).ok()? as u64;
        let (first, pages) = (hva / PAGE, len as u64 / PAGE);
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(win) = w.as_ref() {
            let end = win.first + win.untouched.len() as u64;
            if win.harvests == self.harvests.now() && first >= win.first && first + pages <= end {
                let at = (first - win.first) as usize;
                return Some(win.untouched[at..at + pages as usize].to_vec());
            }
        }
        // The window runs to the end of the region, at most WINDOW_PAGES.
        let region_end = self
            .memory
            .find_region(addr)
            .map(|r| r.start_addr().0 + r.len())?;
        let left = (region_end.checked_sub(addr.0)? / PAGE).max(pages);
        let count = pages.max(WINDOW_PAGES.min(left));
        let before = self.harvests.now();
        let untouched = pagemap_untouched(pm, first, count)?;
        if before.is_multiple_of(2) && self.harvests.now() == before {
            let head = untouched[..pages as usize].to_vec();
            *w = Some(Window {
                harvests: before,
                first,
                untouched,
            });
            return Some(head);
        }
        *w = None;
        Some(untouched[..pages as usize].to_vec())
    }

    /// Reads `buf.len()` bytes at guest address `addr`, zero-filling the
    /// whole pages that were never touched.
    fn read_guest(&self, buf: &mut [u8], addr: GuestAddress) -> Result<()> {
        let err = |e: String| StorageError::io("reading guest memory", std::io::Error::other(e));
        let untouched = match &self.pagemap {
            Some(pm) if addr.0.is_multiple_of(PAGE) && (buf.len() as u64).is_multiple_of(PAGE) => {
                self.untouched(pm, addr, buf.len())
            }
            _ => None,
        };
        let Some(untouched) = untouched else {
            return self
                .memory
                .read_slice(buf, addr)
                .map_err(|e| err(e.to_string()));
        };
        let mut i = 0usize;
        while i < untouched.len() {
            // A run of pages of the same kind: one copy or one fill.
            let kind = untouched[i];
            let mut j = i;
            while j < untouched.len() && untouched[j] == kind {
                j += 1;
            }
            let (from, to) = (i * PAGE as usize, j * PAGE as usize);
            if kind {
                buf[from..to].fill(0);
            } else {
                self.memory
                    .read_slice(&mut buf[from..to], addr.unchecked_add(from as u64))
                    .map_err(|e| err(e.to_string()))?;
            }
            i = j;
        }
        Ok(())
    }
}

/// Whether each of `count` host pages from page number `first` was never
/// touched (neither present nor swapped). `None` if the pagemap cannot say.
fn pagemap_untouched(pm: &File, first: u64, count: u64) -> Option<Vec<bool>> {
    let mut raw = vec![0u8; usize::try_from(count).ok()? * 8];
    pm.read_exact_at(&mut raw, first * 8).ok()?;
    Some(
        raw.chunks_exact(8)
            .map(|e| {
                let v = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
                v & (PM_PRESENT | PM_SWAPPED) == 0
            })
            .collect(),
    )
}

fn out_of_range(offset: u64, len: usize, size: u64) -> StorageError {
    StorageError::io(
        "guest memory",
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("read of {len} bytes at {offset} is beyond guest RAM ({size} bytes)"),
        ),
    )
}

impl BlockDevice for GuestMemoryDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| out_of_range(offset, buf.len(), self.size))?;
        let mut done = 0usize;
        for s in &self.spans {
            let (start, stop) = (s.file_offset, s.file_offset + s.len);
            let from = (offset + done as u64).max(start);
            if from >= stop || from >= end {
                continue;
            }
            let n = (stop.min(end) - from) as usize;
            let addr = GuestAddress(s.guest_addr + (from - start));
            self.read_guest(&mut buf[done..done + n], addr)?;
            done += n;
        }
        if done == buf.len() {
            Ok(())
        } else {
            Err(out_of_range(offset, buf.len(), self.size))
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Err(StorageError::io(
            "guest memory",
            std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "refusing to write {} bytes at {offset}: only the guest writes its memory",
                    buf.len()
                ),
            ),
        ))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drafter_vmm::memory::{create, MemoryBackend};

    #[test]
    fn reads_follow_the_memory_file_layout_and_writes_are_refused() {
        let mem = create(8 << 20, MemoryBackend::Anonymous).unwrap_or_else(|e| panic!("{e}"));
        mem.guest
            .write_slice(&[7u8; 5000], GuestAddress(4096 * 3 - 10))
            .unwrap_or_else(|e| panic!("{e}"));
        let dev = GuestMemoryDevice::new(mem.guest.clone(), 4096).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(dev.size(), 8 << 20);
        let mut buf = vec![0u8; 3 * 4096];
        dev.read_at(&mut buf, 2 * 4096)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(buf[..4086].iter().all(|b| *b == 0));
        assert!(buf[4086..9086].iter().all(|b| *b == 7));
        assert!(buf[9086..].iter().all(|b| *b == 0));
        assert!(dev.read_at(&mut buf, (8 << 20) - 4096).is_err());
        assert!(dev.write_at(&buf, 0).is_err());
    }

    /// Whether the page at `addr` of `mem` is mapped in this process.
    fn mapped(mem: &GuestMemory, addr: u64) -> bool {
        let pm = File::open("/proc/self/pagemap").unwrap_or_else(|e| panic!("{e}"));
        let hva = mem
            .get_host_address(GuestAddress(addr))
            .unwrap_or_else(|e| panic!("{e}")) as u64;
        pagemap_untouched(&pm, hva / PAGE, 1)
            .unwrap_or_else(|| panic!("pagemap unreadable"))
            .first()
            == Some(&false)
    }

    #[test]
    fn untouched_pages_read_as_zero_without_being_faulted_in() {
        let mem = create(16 << 20, MemoryBackend::Anonymous).unwrap_or_else(|e| panic!("{e}"));
        assert!(mem.untouched_is_zero);
        // Pages 3 and 4 written (page 4 only partly), the rest never touched.
        mem.guest
            .write_slice(&[9u8; 4096 + 100], GuestAddress(3 * 4096))
            .unwrap_or_else(|e| panic!("{e}"));
        let plain =
            GuestMemoryDevice::new(mem.guest.clone(), 65536).unwrap_or_else(|e| panic!("{e}"));
        let skipping = GuestMemoryDevice::new(mem.guest.clone(), 65536)
            .unwrap_or_else(|e| panic!("{e}"))
            .skip_untouched_pages(Harvests::default());
        let mut a = vec![0xffu8; 1 << 20];
        skipping
            .read_at(&mut a, 0)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(a[..3 * 4096].iter().all(|b| *b == 0));
        assert!(a[3 * 4096..4 * 4096 + 100].iter().all(|b| *b == 9));
        assert!(a[4 * 4096 + 100..].iter().all(|b| *b == 0));
        let mut b = vec![0xffu8; 1 << 20];
        plain.read_at(&mut b, 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a, b);
        // Far from the written pages (another huge page), a skipping read
        // leaves untouched pages unmapped; a plain read maps them (the
        // zero page), with the same bytes.
        let far = 8u64 << 20;
        a.fill(0xff);
        skipping
            .read_at(&mut a, far)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(a.iter().all(|b| *b == 0));
        assert!(!mapped(&mem.guest, far + 2 * 4096));
        assert!(mapped(&mem.guest, 3 * 4096));
        b.fill(0xff);
        plain.read_at(&mut b, far).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a, b);
        assert!(mapped(&mem.guest, far + 2 * 4096));
        // File-backed memory is never skipped.
        let dir = std::env::temp_dir().join(format!("gmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("mem");
        std::fs::write(&path, vec![5u8; 1 << 20]).unwrap_or_else(|e| panic!("{e}"));
        let filed =
            create(1 << 20, MemoryBackend::PrivateFile(path)).unwrap_or_else(|e| panic!("{e}"));
        assert!(!filed.untouched_is_zero);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_pagemap_window_serves_reads_until_the_next_harvest_begins() {
        let mem = create(32 << 20, MemoryBackend::Anonymous).unwrap_or_else(|e| panic!("{e}"));
        let harvests = Harvests::default();
        let dev = GuestMemoryDevice::new(mem.guest.clone(), 4096)
            .unwrap_or_else(|e| panic!("{e}"))
            .skip_untouched_pages(harvests.clone());
        let mut buf = vec![0xffu8; 4096];
        dev.read_at(&mut buf, 0).unwrap_or_else(|e| panic!("{e}"));
        assert!(buf.iter().all(|b| *b == 0));
        // The guest writes a page of the window after the look: until a
        // harvest (which reports that write) begins, the window still says
        // untouched, so the engine sends zeros and then the page again.
        mem.guest
            .write_slice(&[5u8; 4096], GuestAddress(7 * 4096))
            .unwrap_or_else(|e| panic!("{e}"));
        dev.read_at(&mut buf, 7 * 4096)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(buf.iter().all(|b| *b == 0), "window reused");
        drop(harvests.begin());
        dev.read_at(&mut buf, 7 * 4096)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(buf.iter().all(|b| *b == 5), "window dropped at the harvest");
        // During a harvest nothing is cached: a look then is used once.
        let during = harvests.begin();
        mem.guest
            .write_slice(&[6u8; 4096], GuestAddress(9 * 4096))
            .unwrap_or_else(|e| panic!("{e}"));
        dev.read_at(&mut buf, 9 * 4096)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(buf.iter().all(|b| *b == 6));
        drop(during);
        // A window stops at its region's end; beyond it a new one is read.
        let last = (32 << 20) - 4096;
        mem.guest
            .write_slice(&[8u8; 4096], GuestAddress(last))
            .unwrap_or_else(|e| panic!("{e}"));
        dev.read_at(&mut buf, last)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(buf.iter().all(|b| *b == 8));
    }
}
