//! virtio-blk over a raw disk file: read, write, flush and GET_ID, with a
//! read-only mode. Requests are validated; a bad request gets an IOERR status.
//!
//! Every guest write is recorded in the drive's [`DriveDirtyLog`] once it
//! reached the file, so live migration can re-send what the guest changed.
//! Requests run on the device's own I/O thread (woken by the queue's
//! ioeventfd), one at a time, each to completion; quiescing the device
//! (what [`crate::Vmm::pause`] does after the vCPUs stopped) joins that
//! thread, so once the VM is paused no request is in flight and every
//! completed write is in the log. Requests the guest queued but the thread
//! had not popped stay in the ring (guest memory) and run on resume.

mod dirty;
mod engine;
mod request;

pub use dirty::{DriveDirtyLog, DIRTY_BLOCK_SIZE};

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::engine::EngineSlot;
use super::{
    read_config_bytes, DeviceError, DeviceState, IrqTrigger, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemory;
use engine::BlockEngine;

/// Size of a virtio-blk sector.
pub const SECTOR_SIZE: u64 = 512;
/// Length of a GET_ID answer (the drive name, NUL padded).
pub const ID_LEN: usize = 20;
/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;

/// Why a block device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk file cannot be opened.
    #[error("cannot open drive {id:?} at {path}: {source}")]
    Open {
        /// Drive name.
        id: String,
        /// Disk file.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The disk file's size cannot be read.
    #[error("cannot read the size of drive {id:?}: {source}")]
    Size {
        /// Drive name.
        id: String,
        /// OS error.
        source: std::io::Error,
    },
}

/// Snapshot state of a virtio-blk device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Drive name.
    pub drive_id: String,
    /// Disk size in sectors when saved (a restore refuses another size).
    pub capacity_sectors: u64,
    /// Read-only flag.
    pub read_only: bool,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// A virtio-blk device backed by a raw file.
pub struct Block {
    id: String,
    read_only: bool,
    capacity_sectors: u64,
    acked_features: u64,
    file: Option<File>,
    dirty: DriveDirtyLog,
    slot: EngineSlot<BlockEngine>,
}

impl Block {
    /// Opens the disk file at `path` (read-only if `read_only`) as drive `id`.
    /// A trailing partial sector is not visible to the guest.
    pub fn new(id: &str, path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                id: id.to_string(),
                path: path.to_path_buf(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| BlockError::Size {
                id: id.to_string(),
                source,
            })?
            .len();
        Ok(Self {
            id: id.to_string(),
            read_only,
            capacity_sectors: len / SECTOR_SIZE,
            acked_features: 0,
            file: Some(file),
            dirty: DriveDirtyLog::new((len / SECTOR_SIZE) * SECTOR_SIZE),
            slot: EngineSlot::new(format!("blk-{id}")),
        })
    }

    /// Drive name (the GET_ID answer).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// The log of blocks the guest wrote (shared: take it before the device
    /// is handed to its transport).
    pub fn dirty_log(&self) -> DriveDirtyLog {
        self.dirty.clone()
    }

    fn config_space(&self) -> [u8; 8] {
        self.capacity_sectors.to_le_bytes()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn avail_features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | (1 << VIRTIO_BLK_F_FLUSH);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(drive = %self.id, offset, "virtio-blk: config write ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        mut queues: Vec<Queue>,
        mut queue_evts: Vec<EventFd>,
        irq: IrqTrigger,
    ) -> Result<(), DeviceError> {
        if self.slot.is_active() {
            return Err(DeviceError::AlreadyActive);
        }
        if queues.len() != 1 || queue_evts.len() != 1 {
            return Err(DeviceError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let file = self.file.take().ok_or(DeviceError::NoBackend)?;
        let engine = BlockEngine {
            mem,
            queue: queues.remove(0),
            queue_evt: queue_evts.remove(0),
            irq,
            file,
            dirty: self.dirty.clone(),
            read_only: self.read_only,
            capacity_sectors: self.capacity_sectors,
            id: self.id.clone(),
        };
        self.slot.start(engine).map_err(DeviceError::Io)
    }

    fn is_activated(&self) -> bool {
        self.slot.is_active()
    }

    fn quiesce(&mut self) -> Option<Vec<Queue>> {
        self.slot.pause()
    }

    fn resume(&mut self) -> Result<(), DeviceError> {
        self.slot.resume().map_err(DeviceError::Io)
    }

    fn reset(&mut self) {
        if let Some(engine) = self.slot.take() {
            self.file = Some(engine.file);
        }
        self.acked_features = 0;
    }

    fn save(&self) -> DeviceState {
        DeviceState::Block(BlockState {
            drive_id: self.id.clone(),
            capacity_sectors: self.capacity_sectors,
            read_only: self.read_only,
            acked_features: self.acked_features,
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::Block(s) = state else {
            return Err(DeviceError::BadState("not a block device state".into()));
        };
        if s.capacity_sectors != self.capacity_sectors {
            return Err(DeviceError::BadState(format!(
                "drive {:?} had {} sectors when saved, its file now has {}",
                self.id, s.capacity_sectors, self.capacity_sectors
            )));
        }
        if s.read_only != self.read_only {
            return Err(DeviceError::BadState(format!(
                "drive {:?} read-only flag differs from the snapshot",
                self.id
            )));
        }
        self.acked_features = s.acked_features;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
