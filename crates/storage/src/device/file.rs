//! A device backed by a regular file (or a file that someone else memory-maps).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{check_range, validate_block_size, BlockDevice};
use crate::error::{Result, StorageError};

/// A device stored in a file, accessed with positioned reads and writes.
///
/// pread/pwrite go through the page cache, so the file may at the same time be
/// mapped `MAP_SHARED` by another component (the VMM's guest memory).
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size: u64,
    block_size: u32,
    read_only: bool,
}

impl FileDevice {
    /// Opens an existing file read-write; its length is the device size.
    pub fn open(path: impl AsRef<Path>, block_size: u32) -> Result<Self> {
        Self::open_with(path.as_ref(), block_size, false)
    }

    /// Opens an existing file read-only; writes fail with [`StorageError::ReadOnly`].
    pub fn open_read_only(path: impl AsRef<Path>, block_size: u32) -> Result<Self> {
        Self::open_with(path.as_ref(), block_size, true)
    }

    /// Creates (or truncates) a sparse, zero-filled file of `size` bytes.
    pub fn create(path: impl AsRef<Path>, size: u64, block_size: u32) -> Result<Self> {
        validate_block_size(block_size)?;
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| StorageError::io(path.display().to_string(), e))?;
        file.set_len(size)
            .map_err(|e| StorageError::io(path.display().to_string(), e))?;
        Ok(FileDevice {
            file,
            path: path.to_path_buf(),
            size,
            block_size,
            read_only: false,
        })
    }

    fn open_with(path: &Path, block_size: u32, read_only: bool) -> Result<Self> {
        validate_block_size(block_size)?;
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| StorageError::io(path.display().to_string(), e))?;
        let size = file
            .metadata()
            .map_err(|e| StorageError::io(path.display().to_string(), e))?
            .len();
        Ok(FileDevice {
            file,
            path: path.to_path_buf(),
            size,
            block_size,
            read_only,
        })
    }

    /// Path of the backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: std::io::Error) -> StorageError {
        StorageError::io(self.path.display().to_string(), e)
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len(), self.size)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.err(e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(StorageError::ReadOnly);
        }
        check_range(offset, buf.len(), self.size)?;
        self.file.write_all_at(buf, offset).map_err(|e| self.err(e))
    }

    fn known_zero(&self, index: u64) -> bool {
        use std::os::fd::AsRawFd;
        let bs = u64::from(self.block_size);
        let Some(start) = index.checked_mul(bs).filter(|&s| s < self.size) else {
            return false;
        };
        let end = (start + bs).min(self.size);
        let Ok(off) = libc::off_t::try_from(start) else {
            return false;
        };
        // SAFETY: lseek on our own open file descriptor with a valid whence;
        // it only inspects the file's extent map. SEEK_DATA does not move
        // anything the positioned reads/writes (pread/pwrite) depend on.
        let next = unsafe { libc::lseek(self.file.as_raw_fd(), off, libc::SEEK_DATA) };
        if next < 0 {
            // ENXIO: no data at or after `start` — the rest is a hole.
            return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        }
        u64::try_from(next).is_ok_and(|n| n >= end)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_device_round_trip_and_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let d = FileDevice::create(&p, 3 * 4096 + 100, 4096).unwrap();
        d.write_at(b"hello", 4094).unwrap();
        d.flush().unwrap();
        drop(d);
        let r = FileDevice::open_read_only(&p, 4096).unwrap();
        assert_eq!(r.size(), 3 * 4096 + 100);
        assert_eq!(r.block_count(), 4);
        let mut b = [0u8; 5];
        r.read_at(&mut b, 4094).unwrap();
        assert_eq!(&b, b"hello");
        assert!(matches!(r.write_at(b"x", 0), Err(StorageError::ReadOnly)));
        // Block 2 was never written: a hole (if the filesystem reports holes),
        // and never claimed zero when it holds data.
        assert!(!r.known_zero(1));
        if r.known_zero(2) {
            let mut z = vec![1u8; 4096];
            r.read_at(&mut z, 2 * 4096).unwrap();
            assert!(z.iter().all(|&b| b == 0));
        }
        assert!(r.read_at(&mut b, r.size() - 2).is_err());
    }
}
