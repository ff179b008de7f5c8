//! Guest RAM and writable drives as sources of dirty pages for the
//! migration engine.

use std::sync::{Arc, Mutex};

use drafter_storage::DirtySource;

use super::guest_memory::Harvests;
use drafter_vmm::devices::virtio::block::DIRTY_BLOCK_SIZE;
use drafter_vmm::{DirtyPages, Vmm};

/// Page granularity of the VMM's dirty reports.
const PAGE: u64 = 4096;

/// A [`DirtySource`] over a shared [`Vmm`]: each call takes (and resets) the
/// pages written since the previous one — KVM's dirty log OR'd with the
/// VMM's own device writes — as page indices in the memory file layout.
///
/// The VMM lock is held only for the dirty-log ioctls.
#[derive(Clone)]
pub struct VmMemoryDirtySource {
    vmm: Arc<Mutex<Vmm>>,
    harvests: Harvests,
}

impl VmMemoryDirtySource {
    /// Dirty pages of `vmm`'s guest RAM.
    pub fn new(vmm: Arc<Mutex<Vmm>>) -> Self {
        VmMemoryDirtySource {
            vmm,
            harvests: Harvests::default(),
        }
    }

    /// Counts each take in `harvests` (see
    /// [`super::GuestMemoryDevice::skip_untouched_pages`]).
    pub fn with_harvests(mut self, harvests: Harvests) -> Self {
        self.harvests = harvests;
        self
    }
}

impl DirtySource for VmMemoryDirtySource {
    fn page_size(&self) -> u64 {
        PAGE
    }

    fn take_dirty_pages(&self) -> std::io::Result<Vec<u64>> {
        let pages = {
            let _harvest = self.harvests.begin();
            let vmm = self.vmm.lock().unwrap_or_else(|p| p.into_inner());
            vmm.dirty_pages()
        }
        .map_err(|e| std::io::Error::other(format!("guest dirty pages: {e}")))?;
        Ok(page_indices(&pages))
    }
}

/// A [`DirtySource`] over a writable drive of a shared [`Vmm`]: each call
/// takes (and resets) the blocks the guest wrote through the VMM's
/// virtio-blk device since the previous one
/// ([`Vmm::drive_dirty_blocks`]), as [`DIRTY_BLOCK_SIZE`] page indices of
/// the drive file. A write is marked only after it reached the file, so an
/// engine read that missed it is followed by a dirty page; once the VM is
/// paused no write is in flight, so the final take is complete.
///
/// The VMM lock is held only to take the bitmap.
#[derive(Clone)]
pub struct VmDriveDirtySource {
    vmm: Arc<Mutex<Vmm>>,
    drive: String,
}

impl VmDriveDirtySource {
    /// Dirty blocks of `vmm`'s drive called `drive`.
    pub fn new(vmm: Arc<Mutex<Vmm>>, drive: impl Into<String>) -> Self {
        VmDriveDirtySource {
            vmm,
            drive: drive.into(),
        }
    }
}

impl DirtySource for VmDriveDirtySource {
    fn page_size(&self) -> u64 {
        DIRTY_BLOCK_SIZE
    }

    fn take_dirty_pages(&self) -> std::io::Result<Vec<u64>> {
        let vmm = self.vmm.lock().unwrap_or_else(|p| p.into_inner());
        vmm.drive_dirty_blocks(&self.drive).map_err(|e| {
            std::io::Error::other(format!("dirty blocks of drive {:?}: {e}", self.drive))
        })
    }
}

/// Converts per-region bitmaps into ascending page indices of the memory
/// file layout (regions concatenated in address order).
pub fn page_indices(pages: &DirtyPages) -> Vec<u64> {
    let mut out = Vec::new();
    for r in &pages.regions {
        let first = r.file_offset / PAGE;
        let count = r.size / PAGE;
        for (wi, word) in r.bitmap.iter().enumerate() {
            let mut w = *word;
            while w != 0 {
                let page = wi as u64 * 64 + u64::from(w.trailing_zeros());
                w &= w - 1;
                if page < count {
                    out.push(first + page);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use drafter_vmm::dirty::RegionDirty;

    #[test]
    fn bitmaps_become_file_layout_page_indices() {
        // Two regions, as below and above the 32-bit PCI hole: the second
        // starts at guest 4 GiB but right after the first in the file.
        let pages = DirtyPages {
            regions: vec![
                RegionDirty {
                    guest_addr: 0,
                    file_offset: 0,
                    size: 100 * PAGE,
                    bitmap: vec![1 | 1 << 63, 1 << 35 | 1 << 36 | 1 << 40],
                },
                RegionDirty {
                    guest_addr: 4 << 30,
                    file_offset: 100 * PAGE,
                    size: 64 * PAGE,
                    bitmap: vec![1 << 2],
                },
            ],
        };
        // Page 104 of region one (bit 40 of word 1) lies past its end: ignored.
        assert_eq!(page_indices(&pages), vec![0, 63, 99, 102]);
        assert!(page_indices(&DirtyPages::default()).is_empty());
    }
}
