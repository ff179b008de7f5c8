//! Dirty tracking: which blocks changed since the last look.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::device::{spans, BlockDevice};
use crate::error::{Result, StorageError};
use crate::volatility::VolatilityMonitor;

/// A set of block indices that can be marked from many threads and taken
/// (returned and cleared) atomically per 64-block word.
pub struct DirtyBitmap {
    words: Vec<AtomicU64>,
    blocks: u64,
}

impl DirtyBitmap {
    /// An empty set over `blocks` blocks.
    pub fn new(blocks: u64) -> Self {
        DirtyBitmap {
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            blocks,
        }
    }

    /// Marks `block` (ignored if out of range).
    pub fn mark(&self, block: u64) {
        if block < self.blocks {
            self.words[(block / 64) as usize].fetch_or(1 << (block % 64), Ordering::AcqRel);
        }
    }

    /// Number of marked blocks.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Returns the marked blocks in ascending order and clears them.
    pub fn take(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                out.push(i as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
        out
    }
}

/// An external source of dirty pages, e.g. the VMM's KVM dirty log for guest
/// memory. Pages are `page_size()` bytes (4 KiB by default) and are folded to
/// the device's block size by [`TrackedDevice`].
pub trait DirtySource: Send + Sync {
    /// Page size in bytes.
    fn page_size(&self) -> u64 {
        4096
    }
    /// Returns the indices of pages written since the previous call, and
    /// resets the source's record of them.
    fn take_dirty_pages(&self) -> io::Result<Vec<u64>>;
}

/// A device wrapper that marks every block written through it dirty and
/// records its volatility; an optional [`DirtySource`] adds writes that
/// bypass it (memory-mapped guest RAM).
pub struct TrackedDevice {
    inner: Arc<dyn BlockDevice>,
    dirty: DirtyBitmap,
    volatility: VolatilityMonitor,
    source: Option<Arc<dyn DirtySource>>,
}

impl TrackedDevice {
    /// Tracks writes to `inner`; volatility forgets writes older than `expiry`.
    pub fn new(inner: Arc<dyn BlockDevice>, expiry: Duration) -> Self {
        TrackedDevice {
            dirty: DirtyBitmap::new(inner.block_count()),
            inner,
            volatility: VolatilityMonitor::new(expiry),
            source: None,
        }
    }

    /// Also takes dirty pages from `source` on every [`Self::take_dirty`].
    pub fn with_dirty_source(mut self, source: Arc<dyn DirtySource>) -> Self {
        self.source = Some(source);
        self
    }

    /// The wrapped device.
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }

    /// Number of blocks currently marked dirty by writes through this wrapper.
    pub fn dirty_count(&self) -> u64 {
        self.dirty.count()
    }

    /// Returns the dirty blocks (ascending, each once) and resets the set,
    /// including pages reported by the dirty source folded to blocks.
    pub fn take_dirty(&self) -> Result<Vec<u64>> {
        if let Some(src) = &self.source {
            let page = src.page_size().max(1);
            let bs = u64::from(self.inner.block_size());
            let pages = src
                .take_dirty_pages()
                .map_err(|e| StorageError::io("dirty page source", e))?;
            for p in pages {
                let block = p.saturating_mul(page) / bs;
                self.volatility.record(block);
                self.dirty.mark(block);
                // A page larger than a block spans several blocks.
                let last = (p.saturating_mul(page).saturating_add(page - 1)) / bs;
                for b in block + 1..=last {
                    self.dirty.mark(b);
                }
            }
        }
        Ok(self.dirty.take())
    }

    /// All blocks, least recently volatile first.
    pub fn send_order(&self) -> Vec<u64> {
        self.volatility.send_order(self.inner.block_count())
    }
}

impl BlockDevice for TrackedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        // Write first, then mark: a concurrent take_dirty that misses the mark
        // sees it next time, and one that sees it reads the new data.
        self.inner.write_at(buf, offset)?;
        for s in spans(offset, buf.len(), self.inner.block_size()) {
            self.dirty.mark(s.block);
            self.volatility.record(s.block);
        }
        Ok(())
    }

    fn known_zero(&self, index: u64) -> bool {
        self.inner.known_zero(index)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemoryDevice;
    use std::sync::Mutex;

    struct Pages(Mutex<Vec<u64>>);
    impl DirtySource for Pages {
        fn take_dirty_pages(&self) -> io::Result<Vec<u64>> {
            Ok(std::mem::take(&mut *self.0.lock().unwrap()))
        }
    }

    #[test]
    fn writes_and_external_pages_fold_to_blocks_and_reset() {
        let mem = Arc::new(MemoryDevice::new(1 << 20, 65536).unwrap());
        let pages = Arc::new(Pages(Mutex::new(vec![0, 1, 17, 255])));
        let t = TrackedDevice::new(mem, Duration::from_secs(1)).with_dirty_source(pages.clone());
        t.write_at(&[1u8; 10], 65530).unwrap(); // blocks 0 and 1
        t.write_at(&[1u8; 1], 5 * 65536).unwrap();
        assert_eq!(t.dirty_count(), 3);
        // pages 0,1 -> block 0; page 17 -> block 1; page 255 -> block 15
        assert_eq!(t.take_dirty().unwrap(), vec![0, 1, 5, 15]);
        assert_eq!(t.take_dirty().unwrap(), Vec::<u64>::new());
        pages.0.lock().unwrap().push(32);
        assert_eq!(t.take_dirty().unwrap(), vec![2]);
    }

    #[test]
    fn concurrent_marks_are_all_taken_once() {
        let bm = Arc::new(DirtyBitmap::new(1000));
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let bm = bm.clone();
                std::thread::spawn(move || {
                    (0..1000).filter(|i| i % 4 == t).for_each(|i| bm.mark(i))
                })
            })
            .collect();
        let mut seen = Vec::new();
        seen.extend(bm.take());
        for h in hs {
            h.join().unwrap();
        }
        seen.extend(bm.take());
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
    }
}
