//! COM1: a 16550A UART (vm-superio) whose output goes to any writer and whose
//! input, only when asked, comes from a reader such as stdin.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1 base PIO port.
pub const COM1_PIO_BASE: u16 = 0x3f8;
/// COM1 PIO span (8 registers).
pub const COM1_PIO_SIZE: u16 = 8;
/// COM1 IRQ line.
pub const COM1_IRQ: u32 = 4;

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Saved state is not a valid UART state.
    #[error("bad serial state: {0}")]
    BadState(String),
    /// An OS call failed.
    #[error("serial I/O: {0}")]
    Io(#[from] io::Error),
}

/// Signals the input forwarder when the guest drained the receive FIFO.
struct InputSpace(Arc<EventFd>);

impl SerialEvents for InputSpace {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// The UART's interrupt line (an irqfd EventFd). While held, an interrupt is
/// remembered instead of signalled: a restored UART re-raises the interrupt it
/// had pending when saved, and that must reach KVM only once the saved
/// interrupt-controller state is in place, or the restore wipes it.
struct IrqLine {
    evt: EventFd,
    held: Cell<bool>,
    deferred: Cell<bool>,
}

impl IrqLine {
    fn new(evt: EventFd, held: bool) -> Self {
        Self {
            evt,
            held: Cell::new(held),
            deferred: Cell::new(false),
        }
    }

    /// Stops holding; signals an interrupt raised while held.
    fn release(&self) -> io::Result<()> {
        self.held.set(false);
        if self.deferred.get() {
            self.evt.write(1)?;
            self.deferred.set(false);
        }
        Ok(())
    }
}

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        if self.held.get() {
            self.deferred.set(true);
            Ok(())
        } else {
            self.evt.write(1)
        }
    }
}

type Uart = Serial<IrqLine, InputSpace, Box<dyn Write + Send>>;

/// Saved UART registers and pending input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes in the receive FIFO.
    pub in_buffer: Vec<u8>,
}

/// The COM1 serial port. Put it behind a `Mutex` on the PIO bus; the optional
/// input forwarder thread shares it.
pub struct SerialDevice {
    uart: Uart,
    space: Arc<EventFd>,
}

impl SerialDevice {
    /// A UART writing guest output to `out` and interrupting through `irq_evt`
    /// (register it as an irqfd for [`COM1_IRQ`]).
    pub fn new(irq_evt: EventFd, out: Box<dyn Write + Send>) -> io::Result<Self> {
        let space = Arc::new(EventFd::new(0)?);
        let uart =
            Serial::with_events(IrqLine::new(irq_evt, false), InputSpace(space.clone()), out);
        Ok(Self { uart, space })
    }

    /// Rebuilds the UART from a snapshot. Its interrupt line is held: an
    /// interrupt pending in the saved state (shown by its IIR) is signalled by
    /// [`SerialDevice::resume`], once the VM's interrupt controllers are restored.
    pub fn restore(
        irq_evt: EventFd,
        out: Box<dyn Write + Send>,
        snap: &SerialSnapshot,
    ) -> Result<Self, SerialError> {
        let space = Arc::new(EventFd::new(0)?);
        let state = SerialState {
            baud_divisor_low: snap.baud_divisor_low,
            baud_divisor_high: snap.baud_divisor_high,
            interrupt_enable: snap.interrupt_enable,
            interrupt_identification: snap.interrupt_identification,
            line_control: snap.line_control,
            line_status: snap.line_status,
            modem_control: snap.modem_control,
            modem_status: snap.modem_status,
            scratch: snap.scratch,
            in_buffer: snap.in_buffer.clone(),
        };
        let uart = Serial::from_state(
            &state,
            IrqLine::new(irq_evt, true),
            InputSpace(space.clone()),
            out,
        )
        .map_err(|e| SerialError::BadState(format!("{e:?}")))?;
        Ok(Self { uart, space })
    }

    /// The UART's registers and pending input.
    pub fn save(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// The interrupt EventFd.
    pub fn irq_evt(&self) -> &EventFd {
        &self.uart.interrupt_evt().evt
    }

    /// Lets interrupts through to the guest after [`SerialDevice::restore`],
    /// signalling one that was pending when saved (or raised since). A no-op
    /// otherwise.
    pub fn resume(&mut self) -> io::Result<()> {
        self.uart.interrupt_evt().release()
    }

    /// Guest `in` at `COM1_PIO_BASE + offset`.
    pub fn read(&mut self, offset: u16) -> u8 {
        self.uart.read(offset as u8)
    }

    /// Guest `out` at `COM1_PIO_BASE + offset`. Output is flushed per byte so a
    /// console stays live.
    pub fn write(&mut self, offset: u16, value: u8) {
        if let Err(e) = self.uart.write(offset as u8, value) {
            tracing::warn!("serial: {e:?}");
        }
        if offset == 0 {
            let _ = self.uart.writer_mut().flush();
        }
    }

    /// Puts as much of `input` into the receive FIFO as fits; returns how many bytes.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let n = input.len().min(self.uart.fifo_capacity());
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&input[..n]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial: input dropped: {e:?}");
                0
            }
        }
    }

    /// Forwards `input` (e.g. stdin) to the guest on a thread, as fast as the
    /// guest drains the FIFO (woken by the UART, no polling). The thread ends at
    /// end of input.
    pub fn spawn_input_forwarder(
        serial: Arc<Mutex<SerialDevice>>,
        mut input: impl Read + Send + 'static,
    ) -> io::Result<std::thread::JoinHandle<()>> {
        let space = match serial.lock() {
            Ok(s) => s.space.clone(),
            Err(_) => return Err(io::Error::other("serial device lock poisoned")),
        };
        std::thread::Builder::new()
            .name("serial-input".into())
            .spawn(move || {
                let mut buf = [0u8; 256];
                loop {
                    let n = match input.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::warn!("serial: input ended: {e}");
                            return;
                        }
                    };
                    let mut pending = &buf[..n];
                    while !pending.is_empty() {
                        let sent = match serial.lock() {
                            Ok(mut s) => s.enqueue_input(pending),
                            Err(_) => return,
                        };
                        pending = &pending[sent..];
                        if !pending.is_empty() && space.read().is_err() {
                            return;
                        }
                    }
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const IER: u16 = 1;
    const LCR: u16 = 3;
    const LSR: u16 = 5;
    const SCR: u16 = 7;

    #[test]
    fn guest_output_reaches_the_writer_and_interrupts() {
        let sink = Sink::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone())).unwrap();
        s.write(IER, 0x02); // THR empty interrupt
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(s.read(2) & 0x0f, 0x02, "IIR reports THR empty");
        assert!(irq.read().is_err(), "no interrupt pending after IIR read");
        for b in b"marker\n" {
            s.write(0, *b);
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"marker\n");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn input_forwarder_feeds_more_than_a_fifo_in_order() {
        let irq = EventFd::new(0).unwrap();
        let dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(io::sink())).unwrap();
        let serial = Arc::new(Mutex::new(dev));
        serial.lock().unwrap().write(IER, 0x01); // received-data interrupt
        let input: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
        let fwd =
            SerialDevice::spawn_input_forwarder(serial.clone(), io::Cursor::new(input.clone()))
                .unwrap();
        let mut got = Vec::new();
        while got.len() < input.len() {
            irq.read().unwrap(); // blocks until the UART raises its interrupt
            let mut s = serial.lock().unwrap();
            while s.read(LSR) & 1 != 0 {
                got.push(s.read(0));
            }
        }
        fwd.join().unwrap();
        assert_eq!(got, input);
    }

    #[test]
    fn a_restored_pending_interrupt_is_signalled_on_resume_only() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(io::sink())).unwrap();
        s.write(IER, 0x02); // THR empty interrupt, not yet taken by the guest
        assert_eq!(irq.read().unwrap(), 1);
        let snap = s.save();
        assert_eq!(snap.interrupt_identification & 0x0f, 0x02);

        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut r =
            SerialDevice::restore(irq.try_clone().unwrap(), Box::new(io::sink()), &snap).unwrap();
        assert!(irq.read().is_err(), "interrupt signalled during restore");
        // Input arriving before the VM runs is held too.
        r.write(IER, 0x03);
        r.enqueue_input(b"x");
        assert!(irq.read().is_err(), "interrupt signalled before resume");
        r.resume().unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(r.read(2) & 0x01, 0, "IIR shows the pending interrupt");
        // Nothing more to signal; from now on interrupts go straight through.
        r.resume().unwrap();
        assert!(irq.read().is_err());
        assert_eq!(r.read(0), b'x');
        r.enqueue_input(b"y");
        assert_eq!(irq.read().unwrap(), 1);

        // A restored UART without a pending interrupt signals nothing on resume.
        let quiet = SerialDevice::new(EventFd::new(EFD_NONBLOCK).unwrap(), Box::new(io::sink()))
            .unwrap()
            .save();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut q =
            SerialDevice::restore(irq.try_clone().unwrap(), Box::new(io::sink()), &quiet).unwrap();
        q.resume().unwrap();
        assert!(irq.read().is_err());
    }

    #[test]
    fn state_survives_save_and_restore() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(io::sink())).unwrap();
        s.write(LCR, 0x1b);
        s.write(SCR, 0x42);
        s.enqueue_input(b"abc");
        let snap = s.save();
        assert_eq!(snap.in_buffer, b"abc");
        let mut r = SerialDevice::restore(irq, Box::new(io::sink()), &snap).unwrap();
        assert_eq!(r.read(LCR), 0x1b);
        assert_eq!(r.read(SCR), 0x42);
        assert_eq!(r.read(0), b'a');
        let mut bad = snap.clone();
        bad.in_buffer = vec![0; 1000];
        let irq2 = EventFd::new(EFD_NONBLOCK).unwrap();
        assert!(SerialDevice::restore(irq2, Box::new(io::sink()), &bad).is_err());
    }
}
