//! Legacy PC devices: COM1 serial and the i8042 keyboard controller (reset only).

mod i8042;
mod serial;

pub use i8042::{I8042, I8042_PIO_BASE, I8042_PIO_SIZE};
pub use serial::{
    SerialDevice, SerialError, SerialSnapshot, COM1_IRQ, COM1_PIO_BASE, COM1_PIO_SIZE,
};

use vmm_sys_util::eventfd::EventFd;

/// An [`EventFd`] usable as a `vm_superio` interrupt/reset line.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The wrapped EventFd (register it as an irqfd, or wait on it).
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
