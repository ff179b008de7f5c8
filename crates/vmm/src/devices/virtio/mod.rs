//! Virtio devices: the [`VirtioDevice`] trait each device model implements, the
//! interrupt line ([`IrqTrigger`]) it shares with its transport, the virtio-mmio
//! transport ([`MmioTransport`]) and the saved-state types used for snapshots.

pub mod block;
pub mod mmio;
pub mod net;
pub mod vsock;

mod engine;
mod irq;
mod state;
#[cfg(test)]
pub(crate) mod testing;

use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

#[doc(hidden)]
pub use engine::run_engines_inline;
pub use irq::{IrqTrigger, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
pub use mmio::{MmioState, MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
pub use state::{DeviceState, QueueSnapshot};
pub use virtio_queue::Queue;

/// Feature bit `VIRTIO_F_VERSION_1`: the device is a modern (virtio 1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Virtio device type of a network card.
pub const TYPE_NET: u32 = 1;
/// Virtio device type of a block device.
pub const TYPE_BLOCK: u32 = 2;
/// Virtio device type of a vsock device.
pub const TYPE_VSOCK: u32 = 19;

/// Why a device could not be activated or restored.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The driver set up a different number of queues than the device has.
    #[error("device expects {expected} queues, driver set up {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues handed to `activate`.
        got: usize,
    },
    /// The device was asked to activate twice without a reset in between.
    #[error("device is already active")]
    AlreadyActive,
    /// The device's backend (file, tap, socket) is gone, e.g. after a failed reset.
    #[error("device backend is not available")]
    NoBackend,
    /// Saved state belongs to another kind of device or is inconsistent.
    #[error("bad saved device state: {0}")]
    BadState(String),
    /// Starting the device's I/O thread or an OS call failed.
    #[error("device I/O setup failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A virtio device model, driven by a transport such as [`MmioTransport`].
///
/// The transport negotiates features and collects queue addresses; once the driver
/// sets DRIVER_OK it calls [`VirtioDevice::activate`], after which the device
/// processes its queues on its own I/O thread. For a snapshot the transport calls
/// [`VirtioDevice::quiesce`] (the I/O thread stops and the live queues come back),
/// saves them together with [`VirtioDevice::save`], and either [`VirtioDevice::resume`]s
/// or drops the device.
pub trait VirtioDevice: Send {
    /// Virtio device type ([`TYPE_BLOCK`], [`TYPE_NET`], [`TYPE_VSOCK`]).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers (always includes [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space at `offset`; bytes outside it read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (most devices ignore this).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device: it now owns `queues` (configured by the driver), is woken
    /// by `queue_evts` (one per queue) and interrupts the guest through `irq`.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        irq: IrqTrigger,
    ) -> Result<(), DeviceError>;
    /// Whether the device is activated (running or quiesced).
    fn is_activated(&self) -> bool;
    /// Stops the I/O thread (if running) and returns the live queues, with the
    /// indices the device reached. `None` when not activated.
    fn quiesce(&mut self) -> Option<Vec<Queue>>;
    /// Restarts the I/O thread after [`VirtioDevice::quiesce`].
    fn resume(&mut self) -> Result<(), DeviceError>;
    /// Device reset by the driver: stop I/O, forget the queues, keep the backend.
    fn reset(&mut self);
    /// Device-specific state for a snapshot (call after `quiesce`).
    fn save(&self) -> DeviceState;
    /// Applies saved device-specific state to a freshly built device, before `activate`.
    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError>;
}

/// Copies `src` (a device's config space) into `data` at `offset`; bytes past the end read 0.
pub(crate) fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= src.len() {
        return;
    }
    let n = data.len().min(src.len() - start);
    data[..n].copy_from_slice(&src[start..start + n]);
}
