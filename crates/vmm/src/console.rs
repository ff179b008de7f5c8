//! COM1 and i8042 hook-up on the port-I/O bus, over `vm-superio`.
//!
//! COM1 raises IRQ 4 through an irqfd EventFd; the i8042's reset request ends the
//! VM as [`ExitStatus::Reboot`].

use std::io::Write;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::vcpu_thread::ExitStatus;

/// Raises an interrupt by writing an irqfd EventFd.
pub struct IrqFdTrigger(pub Arc<EventFd>);

impl Trigger for IrqFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Guest console output sink.
pub type ConsoleOut = Box<dyn Write + Send>;

/// COM1 on the PIO bus.
pub struct SerialPort {
    serial: Serial<IrqFdTrigger, NoEvents, ConsoleOut>,
    irq: Arc<EventFd>,
}

/// Serialisable COM1 registers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SerialPortState {
    regs: [u8; 9],
    pending_input: Vec<u8>,
}

impl SerialPort {
    /// A COM1 writing guest output to `out`, interrupting through `irq`.
    pub fn new(out: ConsoleOut, irq: Arc<EventFd>) -> Self {
        SerialPort {
            serial: Serial::new(IrqFdTrigger(irq.clone()), out),
            irq,
        }
    }

    /// The interrupt EventFd (register as irqfd for GSI 4).
    pub fn irq(&self) -> &Arc<EventFd> {
        &self.irq
    }

    /// Feeds host input to the guest.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Saves the UART registers.
    pub fn save(&self) -> SerialPortState {
        let s = self.serial.state();
        SerialPortState {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            pending_input: s.in_buffer,
        }
    }

    /// Rebuilds a COM1 from saved registers.
    pub fn restore(out: ConsoleOut, irq: Arc<EventFd>, st: &SerialPortState) -> Self {
        let r = st.regs;
        let state = SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: st.pending_input.clone(),
        };
        let serial = Serial::from_state(&state, IrqFdTrigger(irq.clone()), NoEvents, out)
            .unwrap_or_else(|_| Serial::new(IrqFdTrigger(irq.clone()), Box::new(std::io::sink())));
        SerialPort { serial, irq }
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.serial.write(off, *b) {
                tracing::debug!("serial write: {e:?}");
            }
        }
    }
}

/// Ends the VM as a reboot when the guest pulses the reset line.
pub struct ResetTrigger(pub Mutex<Sender<ExitStatus>>);

impl Trigger for ResetTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        let tx = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(ExitStatus::Reboot);
        Ok(())
    }
}

/// The i8042 controller at ports 0x60..0x64 (reset only).
pub struct Keyboard(pub I8042Device<ResetTrigger>);

impl BusDevice for Keyboard {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.0.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            let _ = self.0.write(off, *b);
        }
    }
}
