//! The interrupt line between a virtio device and the guest.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Interrupt-status bit: the device added buffers to a used ring.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// Interrupt-status bit: the device configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// A device's interrupt: the InterruptStatus register bits plus the [`EventFd`]
/// the VMM core registers as a KVM irqfd for the device's GSI. Cheap to clone;
/// clones share the status and the EventFd.
#[derive(Clone, Debug)]
pub struct IrqTrigger {
    status: Arc<AtomicU32>,
    evt: Arc<EventFd>,
}

impl IrqTrigger {
    /// A trigger with a fresh non-blocking EventFd.
    pub fn new() -> io::Result<Self> {
        Ok(Self::from_eventfd(EventFd::new(EFD_NONBLOCK)?))
    }

    /// A trigger signalling through an existing EventFd.
    pub fn from_eventfd(evt: EventFd) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            evt: Arc::new(evt),
        }
    }

    /// The EventFd to register as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Sets `bits` in the interrupt status and signals the guest.
    pub fn trigger(&self, bits: u32) -> io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// Current InterruptStatus register value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits` from the status.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Replaces the status (device reset, restore).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}
