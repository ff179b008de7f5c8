//! Serializable snapshot state of virtio queues and devices.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::block::BlockState;
use super::net::NetState;
use super::vsock::VsockState;
use super::DeviceError;

/// One virtqueue as saved in a snapshot: its configuration and the ring positions
/// the device reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Size chosen by the driver.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest address of the used (device) ring.
    pub used_ring: u64,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx: bool,
}

impl From<&Queue> for QueueSnapshot {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

impl QueueSnapshot {
    /// Rebuilds the queue, validating sizes and alignments.
    pub fn to_queue(&self) -> Result<Queue, DeviceError> {
        let q = Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| DeviceError::BadState(format!("queue: {e}")))?;
        debug_assert_eq!(q.max_size(), self.max_size);
        Ok(q)
    }
}

/// Device-specific snapshot state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// virtio-blk.
    Block(BlockState),
    /// virtio-net.
    Net(NetState),
    /// virtio-vsock.
    Vsock(VsockState),
}

/// Copies a queue (virtio-queue's `Queue` is not `Clone`); its state is always
/// valid because the setters reject invalid values.
pub(crate) fn duplicate_queue(q: &Queue) -> Queue {
    match Queue::try_from(q.state()) {
        Ok(copy) => copy,
        Err(e) => {
            tracing::error!("cannot copy virtqueue state: {e}");
            Queue::new(q.max_size()).unwrap_or_else(|_| unreachable_queue())
        }
    }
}

fn unreachable_queue() -> Queue {
    // 256 is a valid power-of-two queue size, so this cannot fail.
    Queue::new(256).unwrap_or_else(|_| unreachable!("256 is a valid queue size"))
}
