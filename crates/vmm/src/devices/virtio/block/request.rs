//! Parsing, validating and executing one virtio-blk request.
//!
//! A request is a descriptor chain: a 16-byte device-readable header
//! (`type: u32, reserved: u32, sector: u64`), data descriptors (device-writable
//! for reads, device-readable for writes) and a final device-writable status byte.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryBackend as _};

use super::{DriveDirtyLog, ID_LEN, SECTOR_SIZE};
use crate::memory::GuestMemory;

const HEADER_LEN: u32 = 16;

/// The disk as a request sees it.
pub(super) struct Disk<'a> {
    pub file: &'a mut File,
    /// Where completed writes are recorded.
    pub dirty: &'a DriveDirtyLog,
    pub read_only: bool,
    pub capacity_sectors: u64,
    pub id: &'a str,
}

#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("sectors {sector}+{bytes}B beyond the disk end ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        bytes: u64,
        capacity: u64,
    },
    #[error("write to a read-only drive")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("disk I/O: {0}")]
    Io(String),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// Executes the request in `chain`; returns the number of bytes written to
/// guest memory (data + status) for the used ring. Never panics on guest input.
pub(super) fn execute(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    disk: &mut Disk<'_>,
) -> u32 {
    let descs: Vec<Descriptor> = chain.collect();
    let Some((status_desc, rest)) = descs.split_last() else {
        tracing::warn!(drive = %disk.id, "virtio-blk: empty descriptor chain");
        return 0;
    };
    if !status_desc.is_write_only()
        || status_desc.len() == 0
        || !mem.check_range(status_desc.addr(), 1)
    {
        tracing::warn!(drive = %disk.id, "virtio-blk: request without a usable status byte");
        return 0;
    }
    let (status, written) = match run(mem, rest, disk) {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(e) => {
            tracing::debug!(drive = %disk.id, "virtio-blk: {e}");
            (e.status(), 0)
        }
    };
    if mem.write_obj(status, status_desc.addr()).is_err() {
        return 0;
    }
    written.saturating_add(1)
}

fn run(mem: &GuestMemory, descs: &[Descriptor], disk: &mut Disk<'_>) -> Result<u32, RequestError> {
    let (header, data) = descs
        .split_first()
        .ok_or(RequestError::Malformed("no header descriptor"))?;
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Err(RequestError::Malformed("bad header descriptor"));
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(|_| RequestError::Malformed("header outside guest memory"))?;
    let request_type = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&raw[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    for d in data {
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(RequestError::Malformed("data buffer outside guest memory"));
        }
    }

    match request_type {
        VIRTIO_BLK_T_IN => {
            if data.iter().any(|d| !d.is_write_only()) {
                return Err(RequestError::Malformed(
                    "read into a device-readable buffer",
                ));
            }
            let total = checked_span(disk, sector, data)?;
            seek(disk.file, sector)?;
            for d in data {
                mem.read_exact_volatile_from(d.addr(), &mut *disk.file, d.len() as usize)
                    .map_err(|e| RequestError::Io(e.to_string()))?;
            }
            u32::try_from(total).map_err(|_| RequestError::Malformed("request too large"))
        }
        VIRTIO_BLK_T_OUT => {
            if data.iter().any(|d| d.is_write_only()) {
                return Err(RequestError::Malformed(
                    "write from a device-writable buffer",
                ));
            }
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            let total = checked_span(disk, sector, data)?;
            seek(disk.file, sector)?;
            let written = data.iter().try_for_each(|d| {
                mem.write_all_volatile_to(d.addr(), &mut *disk.file, d.len() as usize)
                    .map_err(|e| RequestError::Io(e.to_string()))
            });
            // Only now, with the data in the file (or part of it, on an
            // error): a migration read that missed it sees the mark later.
            disk.dirty.mark(sector * SECTOR_SIZE, total);
            written.map(|()| 0)
        }
        VIRTIO_BLK_T_FLUSH => {
            if !disk.read_only {
                disk.file
                    .sync_data()
                    .map_err(|e| RequestError::Io(e.to_string()))?;
            }
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let d = data
                .first()
                .filter(|d| d.is_write_only())
                .ok_or(RequestError::Malformed("GET_ID without a writable buffer"))?;
            let mut id = [0u8; ID_LEN];
            let name = disk.id.as_bytes();
            let n = name.len().min(ID_LEN);
            id[..n].copy_from_slice(&name[..n]);
            let len = (d.len() as usize).min(ID_LEN);
            mem.write_slice(&id[..len], d.addr())
                .map_err(|_| RequestError::Malformed("GET_ID buffer outside guest memory"))?;
            Ok(len as u32)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Validates that the data buffers cover whole sectors inside the disk; returns their total size.
fn checked_span(disk: &Disk<'_>, sector: u64, data: &[Descriptor]) -> Result<u64, RequestError> {
    let bytes: u64 = data.iter().map(|d| u64::from(d.len())).sum();
    if !bytes.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::Malformed("data length not a multiple of 512"));
    }
    let end = sector.checked_add(bytes / SECTOR_SIZE);
    match end {
        Some(end) if end <= disk.capacity_sectors => Ok(bytes),
        _ => Err(RequestError::OutOfRange {
            sector,
            bytes,
            capacity: disk.capacity_sectors,
        }),
    }
}

fn seek(file: &mut File, sector: u64) -> Result<(), RequestError> {
    // `checked_span` bounded `sector` by the capacity, so this cannot overflow.
    file.seek(SeekFrom::Start(sector * SECTOR_SIZE))
        .map(drop)
        .map_err(|e| RequestError::Io(e.to_string()))
}
