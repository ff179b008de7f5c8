//! A copy-on-write overlay over a read-only base device.
//!
//! Written blocks live in an overlay file; a state file holds a bitmap of the
//! blocks that are local. Reads of other blocks fall through to the base. The
//! state file is updated as blocks become local and fsynced by
//! [`BlockDevice::flush`], so a reopened overlay has the same contents.
//!
//! State file layout (little endian): magic `DRCOWST1` (8 bytes), device size
//! (u64), block size (u32), reserved (u32), then one bit per block.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use super::{block_count, block_len, check_range, spans, validate_block_size, BlockDevice};
use crate::error::{Result, StorageError};

const MAGIC: &[u8; 8] = b"DRCOWST1";
const HEADER: u64 = 24;
const STRIPES: usize = 64;

/// Copy-on-write overlay: base device + overlay file + persistent bitmap.
pub struct CowOverlay {
    base: Arc<dyn BlockDevice>,
    overlay: File,
    state: File,
    state_path: PathBuf,
    size: u64,
    block_size: u32,
    local: Vec<AtomicU8>,
    /// Serialises read-modify-write of one block (partial writes).
    stripes: Vec<Mutex<()>>,
    /// Serialises bitmap persistence so bytes are never written out of order.
    state_lock: Mutex<()>,
}

impl CowOverlay {
    /// Opens (or creates) an overlay over `base`. An existing state file must
    /// describe the same size and block size, or this fails with
    /// [`StorageError::CorruptState`].
    pub fn open(
        base: Arc<dyn BlockDevice>,
        overlay: impl AsRef<Path>,
        state: impl AsRef<Path>,
        block_size: u32,
    ) -> Result<Self> {
        validate_block_size(block_size)?;
        let size = base.size();
        let blocks = block_count(size, block_size);
        let (overlay, state) = (overlay.as_ref(), state.as_ref());
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .map_err(|e| StorageError::io(p.display().to_string(), e))
        };
        let overlay_file = open(overlay)?;
        let state_file = open(state)?;
        let corrupt = |reason: String| StorageError::CorruptState {
            path: state.display().to_string(),
            reason,
        };
        let bitmap_len = blocks.div_ceil(8);
        let state_len = state_file
            .metadata()
            .map_err(|e| StorageError::io(state.display().to_string(), e))?
            .len();
        let mut bitmap = vec![0u8; bitmap_len as usize];
        if state_len == 0 {
            let mut header = Vec::with_capacity(HEADER as usize);
            header.extend_from_slice(MAGIC);
            header.extend_from_slice(&size.to_le_bytes());
            header.extend_from_slice(&block_size.to_le_bytes());
            header.extend_from_slice(&0u32.to_le_bytes());
            header.extend_from_slice(&bitmap);
            state_file
                .write_all_at(&header, 0)
                .map_err(|e| StorageError::io(state.display().to_string(), e))?;
        } else {
            if state_len != HEADER + bitmap_len {
                return Err(corrupt(format!(
                    "length {state_len}, expected {}",
                    HEADER + bitmap_len
                )));
            }
            let mut header = [0u8; HEADER as usize];
            state_file
                .read_exact_at(&mut header, 0)
                .map_err(|e| StorageError::io(state.display().to_string(), e))?;
            if &header[..8] != MAGIC {
                return Err(corrupt("bad magic".into()));
            }
            let mut u64b = [0u8; 8];
            u64b.copy_from_slice(&header[8..16]);
            let mut u32b = [0u8; 4];
            u32b.copy_from_slice(&header[16..20]);
            let (s, bs) = (u64::from_le_bytes(u64b), u32::from_le_bytes(u32b));
            if s != size || bs != block_size {
                return Err(corrupt(format!(
                    "describes {s} bytes in {bs}-byte blocks, base has {size} bytes in {block_size}-byte blocks"
                )));
            }
            state_file
                .read_exact_at(&mut bitmap, HEADER)
                .map_err(|e| StorageError::io(state.display().to_string(), e))?;
            let spare_bits = (bitmap_len * 8 - blocks) as u32;
            if spare_bits > 0 && bitmap.last().is_some_and(|b| b >> (8 - spare_bits) != 0) {
                return Err(corrupt("bits set past the last block".into()));
            }
        }
        overlay_file
            .set_len(size)
            .map_err(|e| StorageError::io(overlay.display().to_string(), e))?;
        Ok(CowOverlay {
            base,
            overlay: overlay_file,
            state: state_file,
            state_path: state.to_path_buf(),
            size,
            block_size,
            local: bitmap.into_iter().map(AtomicU8::new).collect(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            state_lock: Mutex::new(()),
        })
    }

    /// True if block `index` has been written locally.
    pub fn is_local(&self, index: u64) -> bool {
        let (byte, bit) = ((index / 8) as usize, index % 8);
        self.local
            .get(byte)
            .is_some_and(|b| b.load(Ordering::Acquire) & (1 << bit) != 0)
    }

    /// Number of blocks written locally.
    pub fn local_blocks(&self) -> u64 {
        self.local
            .iter()
            .map(|b| u64::from(b.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    fn mark_local(&self, index: u64) -> Result<()> {
        let (byte, bit) = ((index / 8) as usize, index % 8);
        let Some(cell) = self.local.get(byte) else {
            return Ok(());
        };
        if cell.load(Ordering::Acquire) & (1 << bit) != 0 {
            return Ok(());
        }
        let _g = self.state_lock.lock().map_err(|_| lock_err())?;
        let v = cell.fetch_or(1 << bit, Ordering::AcqRel) | (1 << bit);
        self.state
            .write_all_at(&[v], HEADER + byte as u64)
            .map_err(|e| StorageError::io(self.state_path.display().to_string(), e))
    }

    fn overlay_err(&self, e: std::io::Error) -> StorageError {
        StorageError::io(format!("overlay of {}", self.state_path.display()), e)
    }
}

fn lock_err() -> StorageError {
    StorageError::io("cow overlay", std::io::Error::other("lock poisoned"))
}

impl BlockDevice for CowOverlay {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len(), self.size)?;
        let bs = u64::from(self.block_size);
        for s in spans(offset, buf.len(), self.block_size) {
            let dst = &mut buf[s.buf_start..s.buf_start + s.len];
            let pos = s.block * bs + s.in_block as u64;
            if self.is_local(s.block) {
                self.overlay
                    .read_exact_at(dst, pos)
                    .map_err(|e| self.overlay_err(e))?;
            } else {
                self.base.read_at(dst, pos)?;
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len(), self.size)?;
        let bs = u64::from(self.block_size);
        for s in spans(offset, buf.len(), self.block_size) {
            let src = &buf[s.buf_start..s.buf_start + s.len];
            let start = s.block * bs;
            let full = block_len(self.size, self.block_size, s.block);
            let _g = self.stripes[(s.block % STRIPES as u64) as usize]
                .lock()
                .map_err(|_| lock_err())?;
            if self.is_local(s.block) || s.len == full {
                self.overlay
                    .write_all_at(src, start + s.in_block as u64)
                    .map_err(|e| self.overlay_err(e))?;
            } else {
                let mut block = vec![0u8; full];
                self.base.read_at(&mut block, start)?;
                block[s.in_block..s.in_block + s.len].copy_from_slice(src);
                self.overlay
                    .write_all_at(&block, start)
                    .map_err(|e| self.overlay_err(e))?;
            }
            self.mark_local(s.block)?;
        }
        Ok(())
    }

    fn known_zero(&self, index: u64) -> bool {
        !self.is_local(index) && self.base.known_zero(index)
    }

    fn flush(&self) -> Result<()> {
        self.overlay.sync_data().map_err(|e| self.overlay_err(e))?;
        self.state
            .sync_data()
            .map_err(|e| StorageError::io(self.state_path.display().to_string(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::FileDevice;

    #[test]
    fn overlay_reopens_with_same_contents_and_leaves_base_alone() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = dir.path().join("base");
        let base_bytes: Vec<u8> = (0..5 * 4096 + 10).map(|i| (i % 253) as u8 + 1).collect();
        std::fs::write(&base_path, &base_bytes).unwrap();
        let (ov, st) = (dir.path().join("ov"), dir.path().join("st"));
        let open = || {
            let base = Arc::new(FileDevice::open_read_only(&base_path, 4096).unwrap());
            CowOverlay::open(base, &ov, &st, 4096).unwrap()
        };
        let mut expected = base_bytes.clone();
        {
            let c = open();
            c.write_at(&[7u8; 100], 4000).unwrap(); // partial in blocks 0 and 1
            expected[4000..4100].fill(7);
            c.write_at(&[9u8; 4096], 3 * 4096).unwrap(); // whole block 3
            expected[3 * 4096..4 * 4096].fill(9);
            c.write_at(&[5u8; 3], 5 * 4096 + 7).unwrap(); // short last block
            expected[5 * 4096 + 7..5 * 4096 + 10].fill(5);
            assert_eq!(c.local_blocks(), 4);
            c.flush().unwrap();
        }
        let c = open();
        assert!(c.is_local(0) && c.is_local(1) && c.is_local(3) && c.is_local(5));
        assert!(!c.is_local(2) && !c.is_local(4));
        let mut back = vec![0u8; expected.len()];
        c.read_at(&mut back, 0).unwrap();
        assert_eq!(back, expected);
        assert_eq!(std::fs::read(&base_path).unwrap(), base_bytes);
    }

    #[test]
    fn mismatched_or_corrupt_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base: Arc<dyn BlockDevice> =
            Arc::new(crate::device::MemoryDevice::new(8192, 4096).unwrap());
        let (ov, st) = (dir.path().join("ov"), dir.path().join("st"));
        CowOverlay::open(base.clone(), &ov, &st, 4096).unwrap();
        let other: Arc<dyn BlockDevice> =
            Arc::new(crate::device::MemoryDevice::new(8192, 4096).unwrap());
        assert!(matches!(
            CowOverlay::open(other, &ov, &st, 2048),
            Err(StorageError::CorruptState { .. })
        ));
        std::fs::write(&st, b"garbage garbage garbage!!").unwrap();
        assert!(matches!(
            CowOverlay::open(base, &ov, &st, 4096),
            Err(StorageError::CorruptState { .. })
        ));
    }
}
