//! Fixed-size block devices: the [`BlockDevice`] trait and its backends.

mod cow;
mod file;
mod memory;

pub use cow::CowOverlay;
pub use file::FileDevice;
pub use memory::MemoryDevice;

use crate::error::{Result, StorageError};

/// Default block size (64 KiB), as in the Go Drafter.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// Smallest accepted block size.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest accepted block size.
pub const MAX_BLOCK_SIZE: u32 = 4 * 1024 * 1024;

/// A fixed-size device addressed by byte offset and transferred in blocks.
///
/// All methods take `&self`: implementations are safe to use from many threads at
/// once (a VMM's I/O threads, a migration, writers in tests).
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Block size in bytes (a power of two).
    fn block_size(&self) -> u32;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes previous writes durable.
    fn flush(&self) -> Result<()>;

    /// Writes the whole block `index`, its bytes produced by `fill` — straight
    /// into the device's storage where the backend can (zero-copy receive).
    /// If `fill` fails the block's contents are unspecified.
    fn write_block_with(
        &self,
        index: u64,
        fill: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
    ) -> Result<()> {
        let len = block_len(self.size(), self.block_size(), index);
        let mut buf = vec![0u8; len];
        fill(&mut buf).map_err(|e| StorageError::io("block data source", e))?;
        self.write_at(&buf, index * u64::from(self.block_size()))
    }

    /// True only if block `index` certainly reads as zeros and this could be
    /// told cheaply (a hole in a sparse file, an in-place scan of memory);
    /// false means "unknown". Lets the sender skip copying zero blocks.
    fn known_zero(&self, _index: u64) -> bool {
        false
    }

    /// Number of blocks (the last one may be short).
    fn block_count(&self) -> u64 {
        block_count(self.size(), self.block_size())
    }
}

/// Checks that `bs` is an accepted block size.
pub fn validate_block_size(bs: u32) -> Result<()> {
    if bs.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        Ok(())
    } else {
        Err(StorageError::InvalidBlockSize(bs))
    }
}

/// Number of blocks of size `bs` needed to cover `size` bytes.
pub fn block_count(size: u64, bs: u32) -> u64 {
    size.div_ceil(u64::from(bs))
}

/// Length in bytes of block `index` of a device (the last block may be short).
pub fn block_len(size: u64, bs: u32, index: u64) -> usize {
    let start = index * u64::from(bs);
    // A block is at most MAX_BLOCK_SIZE long, so this fits a usize.
    size.saturating_sub(start).min(u64::from(bs)) as usize
}

/// Returns an error unless `offset..offset+len` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: usize, size: u64) -> Result<()> {
    let len = len as u64;
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(StorageError::OutOfRange { offset, len, size }),
    }
}

/// One block-sized piece of a byte range: block index, offset inside the block,
/// and the matching range inside the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub block: u64,
    pub in_block: usize,
    pub buf_start: usize,
    pub len: usize,
}

/// Splits `offset..offset+len` into per-block spans.
pub(crate) fn spans(offset: u64, len: usize, bs: u32) -> impl Iterator<Item = Span> {
    let bs64 = u64::from(bs);
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let pos = offset + done as u64;
        let block = pos / bs64;
        let in_block = (pos % bs64) as usize;
        let n = (bs as usize - in_block).min(len - done);
        let span = Span {
            block,
            in_block,
            buf_start: done,
            len: n,
        };
        done += n;
        Some(span)
    })
}

/// True if every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let chunks = data.chunks_exact(16);
    let rest = chunks.remainder();
    chunks
        .map(|c| {
            let mut w = [0u8; 16];
            w.copy_from_slice(c);
            u128::from_ne_bytes(w)
        })
        .all(|w| w == 0)
        && rest.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_range_exactly() {
        let s: Vec<Span> = spans(4000, 10000, 4096).collect();
        assert_eq!(s.len(), 4);
        assert_eq!(
            s[0],
            Span {
                block: 0,
                in_block: 4000,
                buf_start: 0,
                len: 96
            }
        );
        assert_eq!(s[1].block, 1);
        assert_eq!(s[1].len, 4096);
        assert_eq!(
            s[3],
            Span {
                block: 3,
                in_block: 0,
                buf_start: 96 + 8192,
                len: 10000 - 96 - 8192
            }
        );
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[17] = 3;
        assert!(!is_zero(&v));
    }

    #[test]
    fn block_sizes_validated() {
        assert!(validate_block_size(4096).is_ok());
        assert!(validate_block_size(65536).is_ok());
        assert!(validate_block_size(3000).is_err());
        assert!(validate_block_size(256).is_err());
        assert!(validate_block_size(8 << 20).is_err());
        assert_eq!(block_len(10_000, 4096, 2), 10_000 - 8192);
        assert_eq!(block_count(10_000, 4096), 3);
    }
}
