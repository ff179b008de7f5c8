//! A device held in memory.

use std::sync::RwLock;

use super::{block_len, check_range, spans, validate_block_size, BlockDevice};
use crate::error::{Result, StorageError};

/// A zero-filled device in memory; each block has its own lock so writers of
/// different blocks never contend.
pub struct MemoryDevice {
    size: u64,
    block_size: u32,
    blocks: Vec<RwLock<Box<[u8]>>>,
}

impl MemoryDevice {
    /// Creates a zero-filled device of `size` bytes.
    pub fn new(size: u64, block_size: u32) -> Result<Self> {
        validate_block_size(block_size)?;
        let n = super::block_count(size, block_size);
        let blocks = (0..n)
            .map(|i| RwLock::new(vec![0u8; block_len(size, block_size, i)].into_boxed_slice()))
            .collect();
        Ok(MemoryDevice {
            size,
            block_size,
            blocks,
        })
    }

    fn block(&self, i: u64) -> Result<&RwLock<Box<[u8]>>> {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.blocks.get(i))
            .ok_or(StorageError::OutOfRange {
                offset: i * u64::from(self.block_size),
                len: 0,
                size: self.size,
            })
    }
}

fn poisoned() -> StorageError {
    StorageError::io(
        "memory device",
        std::io::Error::other("a writer panicked while holding a block"),
    )
}

impl BlockDevice for MemoryDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len(), self.size)?;
        for s in spans(offset, buf.len(), self.block_size) {
            let block = self.block(s.block)?.read().map_err(|_| poisoned())?;
            buf[s.buf_start..s.buf_start + s.len]
                .copy_from_slice(&block[s.in_block..s.in_block + s.len]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len(), self.size)?;
        for s in spans(offset, buf.len(), self.block_size) {
            let mut block = self.block(s.block)?.write().map_err(|_| poisoned())?;
            block[s.in_block..s.in_block + s.len]
                .copy_from_slice(&buf[s.buf_start..s.buf_start + s.len]);
        }
        Ok(())
    }

    fn write_block_with(
        &self,
        index: u64,
        fill: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
    ) -> Result<()> {
        let mut block = self.block(index)?.write().map_err(|_| poisoned())?;
        fill(&mut block).map_err(|e| StorageError::io("block data source", e))
    }

    fn known_zero(&self, index: u64) -> bool {
        self.block(index)
            .ok()
            .and_then(|b| b.read().ok().map(|b| super::is_zero(&b)))
            .unwrap_or(false)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_writes_across_blocks_and_rejects_out_of_range() {
        let d = MemoryDevice::new(10_000, 4096).unwrap();
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        d.write_at(&data, 3000).unwrap();
        let mut back = vec![0u8; 5000];
        d.read_at(&mut back, 3000).unwrap();
        assert_eq!(back, data);
        let mut one = [9u8; 1];
        d.read_at(&mut one, 2999).unwrap();
        assert_eq!(one, [0]);
        assert!(d.write_at(&[1, 2], 9999).is_err());
        assert!(d.read_at(&mut [0u8; 1], u64::MAX).is_err());
    }
}
