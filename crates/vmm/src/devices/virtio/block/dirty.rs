//! Which blocks of a drive the guest wrote: the dirty log live migration
//! reads to re-send a writable drive's changed blocks.
//!
//! The I/O thread marks a request's blocks only after its write to the disk
//! file returned, and a reader takes (and resets) the marks with one atomic
//! swap per word. So a migration engine that reads a block from the file
//! concurrently with a guest write either reads the new data or finds the
//! block marked in a later [`DriveDirtyLog::take`] (the mark comes after
//! the data reached the file's page cache).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Granularity of the drive dirty log in bytes.
pub const DIRTY_BLOCK_SIZE: u64 = 4096;

/// A shared bitmap of a drive's written [`DIRTY_BLOCK_SIZE`] blocks. Clones
/// share the same bitmap.
#[derive(Clone, Debug)]
pub struct DriveDirtyLog {
    inner: Arc<Bits>,
}

#[derive(Debug)]
struct Bits {
    words: Box<[AtomicU64]>,
    blocks: u64,
}

impl DriveDirtyLog {
    /// A clean log for a drive of `size` bytes (a trailing partial block
    /// counts as a block).
    pub fn new(size: u64) -> Self {
        let blocks = size.div_ceil(DIRTY_BLOCK_SIZE);
        let words = (0..blocks.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        DriveDirtyLog {
            inner: Arc::new(Bits { words, blocks }),
        }
    }

    /// Number of blocks the log covers.
    pub fn block_count(&self) -> u64 {
        self.inner.blocks
    }

    /// Marks the blocks holding bytes `offset..offset + len` (clipped to the
    /// drive). Call after the bytes reached the file.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / DIRTY_BLOCK_SIZE;
        let last = (offset.saturating_add(len - 1) / DIRTY_BLOCK_SIZE)
            .min(self.inner.blocks.saturating_sub(1));
        for block in first..=last {
            if block >= self.inner.blocks {
                break;
            }
            let (word, bit) = ((block / 64) as usize, block % 64);
            if let Some(w) = self.inner.words.get(word) {
                w.fetch_or(1 << bit, Ordering::SeqCst);
            }
        }
    }

    /// Returns the blocks marked since the previous call (ascending) and
    /// resets them.
    pub fn take(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (wi, w) in self.inner.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::SeqCst);
            while bits != 0 {
                let block = wi as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                if block < self.inner.blocks {
                    out.push(block);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_the_blocks_a_span_touches_and_take_resets() {
        let log = DriveDirtyLog::new(100 * DIRTY_BLOCK_SIZE + 512);
        assert_eq!(log.block_count(), 101);
        log.mark(0, 1);
        log.mark(DIRTY_BLOCK_SIZE - 512, 1024); // straddles blocks 0 and 1
        log.mark(64 * DIRTY_BLOCK_SIZE, DIRTY_BLOCK_SIZE);
        log.mark(100 * DIRTY_BLOCK_SIZE, 512); // the partial last block
        log.mark(500 * DIRTY_BLOCK_SIZE, 512); // past the end: ignored
        log.mark(7 * DIRTY_BLOCK_SIZE, 0); // empty: nothing
        assert_eq!(log.take(), vec![0, 1, 64, 100]);
        assert!(log.take().is_empty());
        log.mark(u64::MAX - 10, 100);
        assert!(log.take().is_empty());
    }
}
