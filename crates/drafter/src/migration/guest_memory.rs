//! Guest RAM as a read-only block device, read through the VMM's own mapping.
//!
//! The migration engine reads guest memory here rather than through a
//! memory file, so any backend migrates: anonymous memory (a booted VM),
//! a MAP_SHARED file, or a userfaultfd-backed VM that resumed at authority
//! (a page not fetched yet faults in through the handler as the engine reads
//! it). Reads race with a running guest, as with any pre-copy: the dirty log
//! reports every page written after it was read.

use drafter_storage::error::Result;
use drafter_storage::{BlockDevice, StorageError};
use drafter_vmm::memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

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
}

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
        })
    }
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
            self.memory
                .read_slice(&mut buf[done..done + n], addr)
                .map_err(|e| StorageError::io("reading guest memory", std::io::Error::other(e)))?;
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
}
