//! Dirty-page reports: KVM's dirty log OR'd with the VMM's own writes, 4 KiB
//! granularity.

use serde::{Deserialize, Serialize};

use crate::memory::PAGE_SIZE;

/// The dirty pages of one guest RAM region.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegionDirty {
    /// Guest physical address of the region.
    pub guest_addr: u64,
    /// Offset of the region in the memory file layout.
    pub file_offset: u64,
    /// Region size in bytes.
    pub size: u64,
    /// One bit per 4 KiB page, LSB first.
    pub bitmap: Vec<u64>,
}

/// A contiguous run of dirty pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyRange {
    /// Guest physical start address.
    pub guest_addr: u64,
    /// Offset in the memory file layout.
    pub file_offset: u64,
    /// Length in bytes (a multiple of 4 KiB).
    pub len: u64,
}

/// Pages written since the previous report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirtyPages {
    /// Per-region bitmaps, in address order.
    pub regions: Vec<RegionDirty>,
}

impl DirtyPages {
    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| r.bitmap.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Whether the page holding guest address `addr` is dirty.
    pub fn is_dirty(&self, addr: u64) -> bool {
        self.regions.iter().any(|r| {
            addr >= r.guest_addr && addr < r.guest_addr + r.size && {
                let page = (addr - r.guest_addr) / PAGE_SIZE;
                r.bitmap
                    .get((page / 64) as usize)
                    .is_some_and(|w| w & (1 << (page % 64)) != 0)
            }
        })
    }

    /// Dirty pages as merged contiguous ranges.
    pub fn ranges(&self) -> Vec<DirtyRange> {
        let mut out: Vec<DirtyRange> = Vec::new();
        for r in &self.regions {
            let pages = r.size / PAGE_SIZE;
            for (wi, w) in r.bitmap.iter().enumerate() {
                let mut w = *w;
                while w != 0 {
                    let bit = u64::from(w.trailing_zeros());
                    w &= w - 1;
                    let page = wi as u64 * 64 + bit;
                    if page >= pages {
                        break;
                    }
                    let off = page * PAGE_SIZE;
                    match out.last_mut() {
                        Some(last)
                            if last.guest_addr + last.len == r.guest_addr + off
                                && last.file_offset + last.len == r.file_offset + off =>
                        {
                            last.len += PAGE_SIZE
                        }
                        _ => out.push(DirtyRange {
                            guest_addr: r.guest_addr + off,
                            file_offset: r.file_offset + off,
                            len: PAGE_SIZE,
                        }),
                    }
                }
            }
        }
        out
    }
}

/// ORs `src` into `dst` word by word (bitmaps of equal length).
pub fn merge(dst: &mut [u64], src: &[u64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= *s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_adjacent_pages() {
        let d = DirtyPages {
            regions: vec![RegionDirty {
                guest_addr: 0,
                file_offset: 0,
                size: 128 * PAGE_SIZE,
                bitmap: vec![0b1110_0001, 1 << 63 | 1],
            }],
        };
        assert_eq!(d.count(), 6);
        let r = d.ranges();
        let got: Vec<(u64, u64)> = r
            .iter()
            .map(|x| (x.guest_addr / PAGE_SIZE, x.len / PAGE_SIZE))
            .collect();
        assert_eq!(got, vec![(0, 1), (5, 3), (64, 1), (127, 1)]);
        assert!(d.is_dirty(6 * PAGE_SIZE + 5));
        assert!(!d.is_dirty(4 * PAGE_SIZE));
    }
}
