//! virtio-vsock in Firecracker's hybrid form.
//!
//! * Host → guest: a host program connects to the Unix socket at `uds_path`,
//!   writes `CONNECT <port>\n`, and once the guest accepts gets `OK <hostport>\n`;
//!   the stream is then bridged to the guest's `<port>`.
//! * Guest → host: a guest connection to host (CID 2) port `P` becomes a Unix
//!   connection to `<uds_path>_<P>`; the guest sees a reset if nothing listens.
//!
//! Credit-based flow control bounds buffering in both directions (a guest that
//! ignores its credit is reset). At most 1024 connections are open at once (a
//! guest request beyond that is reset), and a guest that sends without taking
//! the control replies it is owed is held back rather than queued for. After a
//! snapshot restore every connection is gone: the device sends
//! VIRTIO_VSOCK_EVENT_TRANSPORT_RESET so guest sockets close; guest listeners survive.

mod conn;
mod engine;
pub mod packet;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::engine::EngineSlot;
use super::{
    read_config_bytes, DeviceError, DeviceState, IrqTrigger, VirtioDevice, TYPE_VSOCK,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemory;
use engine::{Endpoint, VsockEngine};
pub use packet::DEFAULT_GUEST_CID;

/// Size of each of the three queues (rx, tx, event).
pub const QUEUE_SIZE: u16 = 256;

/// Why a vsock device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0, 1, 2 and u32::MAX are reserved.
    #[error("invalid guest CID {0} (must be 3 or more)")]
    BadCid(u64),
    /// The Unix socket cannot be created.
    #[error("cannot listen on vsock socket {path}: {source}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
}

/// A connection as recorded in a snapshot (informational: connections do not
/// survive a restore).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConnSnapshot {
    /// Host-side port.
    pub host_port: u32,
    /// Guest-side port.
    pub guest_port: u32,
    /// Whether it was established.
    pub established: bool,
}

/// Snapshot state of a vsock device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// Guest CID.
    pub guest_cid: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Connections open at snapshot time.
    pub connections: Vec<VsockConnSnapshot>,
}

/// The vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Option<UnixListener>,
    acked_features: u64,
    reset_pending: bool,
    slot: EngineSlot<VsockEngine>,
}

impl Vsock {
    /// A device for guest `guest_cid`, listening for host clients on `uds_path`
    /// (a stale socket file there is replaced).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if guest_cid < 3 || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::BadCid(guest_cid));
        }
        let listen_err = |source| VsockError::Listen {
            path: uds_path.to_path_buf(),
            source,
        };
        match std::fs::remove_file(uds_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(listen_err(e)),
        }
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener: Some(listener),
            acked_features: 0,
            reset_pending: false,
            slot: EngineSlot::new("vsock"),
        })
    }

    /// Guest CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Path of the host-side Unix socket.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "vsock: config write ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        irq: IrqTrigger,
    ) -> Result<(), DeviceError> {
        if self.slot.is_active() {
            return Err(DeviceError::AlreadyActive);
        }
        if queues.len() != 3 || queue_evts.len() != 3 {
            return Err(DeviceError::QueueCount {
                expected: 3,
                got: queues.len(),
            });
        }
        let listener = self.listener.take().ok_or(DeviceError::NoBackend)?;
        let engine = match VsockEngine::new(
            mem,
            queues,
            queue_evts,
            irq,
            Endpoint {
                guest_cid: self.guest_cid,
                uds_path: self.uds_path.clone(),
                listener,
            },
            self.reset_pending,
        ) {
            Ok(e) => e,
            Err(e) => return Err(DeviceError::Io(e)),
        };
        self.reset_pending = false;
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
            self.listener = Some(engine.listener);
        }
        self.acked_features = 0;
    }

    fn save(&self) -> DeviceState {
        let connections = self
            .slot
            .paused()
            .map(|e| {
                e.connections()
                    .into_iter()
                    .map(|(host_port, guest_port, established)| VsockConnSnapshot {
                        host_port,
                        guest_port,
                        established,
                    })
                    .collect()
            })
            .unwrap_or_default();
        DeviceState::Vsock(VsockState {
            guest_cid: self.guest_cid,
            acked_features: self.acked_features,
            connections,
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::Vsock(s) = state else {
            return Err(DeviceError::BadState("not a vsock device state".into()));
        };
        if s.guest_cid != self.guest_cid {
            return Err(DeviceError::BadState(format!(
                "snapshot has guest CID {}, device configured with {}",
                s.guest_cid, self.guest_cid
            )));
        }
        self.acked_features = s.acked_features;
        // Host connections did not survive: tell the guest once it runs.
        self.reset_pending = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
