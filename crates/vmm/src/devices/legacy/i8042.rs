//! The i8042 keyboard controller, only as far as the guest's reset request
//! (command 0xFE on port 0x64), which Linux uses for `reboot`.

use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;

/// First PIO port of the i8042 (data port 0x60; the command port is 0x64).
pub const I8042_PIO_BASE: u16 = 0x60;
/// Span of the i8042's PIO ports (0x60..=0x64).
pub const I8042_PIO_SIZE: u16 = 5;

/// The i8042 controller; its reset request is written to an EventFd the VMM
/// watches to end the VM as "reboot". Suggested kernel command-line arguments:
/// `i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd`.
#[derive(Debug)]
pub struct I8042 {
    inner: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller signalling resets on `reset_evt`.
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            inner: I8042Device::new(EventFdTrigger::new(reset_evt)),
        }
    }

    /// The reset EventFd.
    pub fn reset_evt(&self) -> &EventFd {
        self.inner.reset_evt().eventfd()
    }

    /// Guest `in` at `I8042_PIO_BASE + offset`.
    pub fn read(&mut self, offset: u16) -> u8 {
        self.inner.read(offset as u8)
    }

    /// Guest `out` at `I8042_PIO_BASE + offset`.
    pub fn write(&mut self, offset: u16, value: u8) {
        if let Err(e) = self.inner.write(offset as u8, value) {
            tracing::error!("i8042: cannot signal reset request: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn reset_command_signals_the_reset_event() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        // Other writes and reads do not reset.
        dev.write(0, 0xFE);
        dev.write(4, 0xAA);
        assert_eq!(dev.read(4), 0);
        assert!(evt.read().is_err(), "no reset expected yet");
        dev.write(4, 0xFE);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
