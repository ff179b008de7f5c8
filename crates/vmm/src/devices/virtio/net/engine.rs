//! The virtio-net I/O thread: guest TX frames to the tap, tap frames to guest RX buffers.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::tap::{Tap, VNET_HDR_LEN};
use crate::devices::virtio::engine::Engine;
use crate::devices::virtio::{IrqTrigger, VIRTIO_MMIO_INT_VRING};
use crate::memory::GuestMemory;

const RXQ: usize = 0;
const TXQ: usize = 1;
const TOKEN_STOP: u64 = 0;
const TOKEN_RXQ: u64 = 1;
const TOKEN_TXQ: u64 = 2;
const TOKEN_TAP: u64 = 3;
/// Largest frame with its virtio-net header (64 KiB GSO frame + header).
const MAX_FRAME: usize = 65_562;

/// Everything the net I/O thread owns.
pub(super) struct NetEngine {
    mem: GuestMemory,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    irq: IrqTrigger,
    pub tap: Tap,
    /// A frame read from the tap that waits for a guest RX buffer.
    rx_frame: Vec<u8>,
    /// Length of the frame in `rx_frame`; 0 when none is pending.
    rx_len: usize,
    tap_readable: bool,
    tx_frame: Vec<u8>,
    interrupt: bool,
}

impl NetEngine {
    pub fn new(
        mem: GuestMemory,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        irq: IrqTrigger,
        tap: Tap,
    ) -> Self {
        Self {
            mem,
            queues,
            queue_evts,
            irq,
            tap,
            rx_frame: vec![0u8; MAX_FRAME],
            rx_len: 0,
            tap_readable: true,
            tx_frame: Vec::with_capacity(MAX_FRAME),
            interrupt: false,
        }
    }

    fn process_tx(&mut self) {
        while let Some(chain) = self.queues[TXQ].pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            self.tx_frame.clear();
            let ok = match chain.reader(&self.mem) {
                Ok(r) if r.available_bytes() <= MAX_FRAME && r.available_bytes() > VNET_HDR_LEN => {
                    let mut r = r;
                    r.read_to_end(&mut self.tx_frame).is_ok()
                }
                _ => false,
            };
            if ok {
                // A tap write is one whole frame; a full tap queue drops it, as a wire would.
                if let Err(e) = (&mut self.tap.file()).write(&self.tx_frame) {
                    tracing::debug!("virtio-net: tap write dropped a frame: {e}");
                }
            } else {
                tracing::warn!("virtio-net: malformed TX chain dropped");
            }
            if let Err(e) = self.queues[TXQ].add_used(&self.mem, head, 0) {
                tracing::error!("virtio-net: cannot return TX buffer: {e}");
            }
            self.interrupt = true;
        }
    }

    fn process_rx(&mut self) {
        loop {
            if self.rx_len == 0 {
                if !self.tap_readable {
                    return;
                }
                match (&mut self.tap.file()).read(&mut self.rx_frame) {
                    Ok(n) if n > VNET_HDR_LEN => {
                        // virtio_net_hdr_v1.num_buffers: one buffer per frame.
                        self.rx_frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                        self.rx_len = n;
                    }
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.tap_readable = false;
                        return;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!("virtio-net: tap read failed: {e}");
                        self.tap_readable = false;
                        return;
                    }
                }
            }
            let Some(chain) = self.queues[RXQ].pop_descriptor_chain(&self.mem) else {
                // Wait for the guest to add RX buffers (RX queue notification).
                return;
            };
            let head = chain.head_index();
            let frame = &self.rx_frame[..self.rx_len];
            let len = match chain.writer(&self.mem) {
                Ok(mut w) if w.available_bytes() >= frame.len() => match w.write_all(frame) {
                    Ok(()) => frame.len() as u32,
                    Err(_) => 0,
                },
                _ => {
                    tracing::debug!("virtio-net: RX buffer too small or bad, frame dropped");
                    0
                }
            };
            if let Err(e) = self.queues[RXQ].add_used(&self.mem, head, len) {
                tracing::error!("virtio-net: cannot return RX buffer: {e}");
            }
            self.interrupt = true;
            self.rx_len = 0;
        }
    }

    fn signal(&mut self) {
        if self.interrupt {
            self.interrupt = false;
            if let Err(e) = self.irq.trigger(VIRTIO_MMIO_INT_VRING) {
                tracing::error!("virtio-net: cannot interrupt guest: {e}");
            }
        }
    }
}

impl Engine for NetEngine {
    fn run(&mut self, stop: &EventFd) {
        let epoll = match setup_epoll(&self.queue_evts, stop, &self.tap) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("virtio-net: epoll setup failed: {e}");
                return;
            }
        };
        self.tap_readable = true;
        self.process_tx();
        self.process_rx();
        self.signal();
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-net: epoll wait failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => return,
                    TOKEN_RXQ => {
                        let _ = self.queue_evts[RXQ].read();
                    }
                    TOKEN_TXQ => {
                        let _ = self.queue_evts[TXQ].read();
                        self.process_tx();
                    }
                    TOKEN_TAP => self.tap_readable = true,
                    _ => {}
                }
            }
            self.process_rx();
            self.signal();
        }
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }
}

fn setup_epoll(queue_evts: &[EventFd], stop: &EventFd, tap: &Tap) -> io::Result<Epoll> {
    let epoll = Epoll::new()?;
    let add =
        |fd, events, token| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token));
    add(stop.as_raw_fd(), EventSet::IN, TOKEN_STOP)?;
    add(queue_evts[RXQ].as_raw_fd(), EventSet::IN, TOKEN_RXQ)?;
    add(queue_evts[TXQ].as_raw_fd(), EventSet::IN, TOKEN_TXQ)?;
    add(
        tap.file().as_raw_fd(),
        EventSet::IN | EventSet::EDGE_TRIGGERED,
        TOKEN_TAP,
    )?;
    Ok(epoll)
}
