//! The virtio-blk I/O thread.

use std::fs::File;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::request::{self, Disk};
use super::DriveDirtyLog;
use crate::devices::virtio::engine::Engine;
use crate::devices::virtio::{IrqTrigger, VIRTIO_MMIO_INT_VRING};
use crate::memory::GuestMemory;

const TOKEN_QUEUE: u64 = 0;
const TOKEN_STOP: u64 = 1;

/// Everything the block I/O thread owns.
pub(super) struct BlockEngine {
    pub mem: GuestMemory,
    pub queue: Queue,
    pub queue_evt: EventFd,
    pub irq: IrqTrigger,
    pub file: File,
    pub dirty: DriveDirtyLog,
    pub read_only: bool,
    pub capacity_sectors: u64,
    pub id: String,
}

impl BlockEngine {
    /// Completes every available request; interrupts the guest if any completed.
    pub fn process_queue(&mut self) {
        let mut completed = false;
        while let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let mut disk = Disk {
                file: &mut self.file,
                dirty: &self.dirty,
                read_only: self.read_only,
                capacity_sectors: self.capacity_sectors,
                id: &self.id,
            };
            let used = request::execute(&self.mem, chain, &mut disk);
            if let Err(e) = self.queue.add_used(&self.mem, head, used) {
                tracing::error!(drive = %self.id, "virtio-blk: cannot complete request: {e}");
            }
            completed = true;
        }
        if completed {
            let notify = self.queue.needs_notification(&self.mem).unwrap_or(true);
            if notify {
                if let Err(e) = self.irq.trigger(VIRTIO_MMIO_INT_VRING) {
                    tracing::error!(drive = %self.id, "virtio-blk: cannot interrupt guest: {e}");
                }
            }
        }
    }
}

impl Engine for BlockEngine {
    fn run(&mut self, stop: &EventFd) {
        let epoll = match setup_epoll(&self.queue_evt, stop) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(drive = %self.id, "virtio-blk: epoll setup failed: {e}");
                return;
            }
        };
        // Requests may have been queued while the thread was not running.
        self.process_queue();
        let mut events = [EpollEvent::default(); 4];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(drive = %self.id, "virtio-blk: epoll wait failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => return,
                    TOKEN_QUEUE => {
                        let _ = self.queue_evt.read();
                        self.process_queue();
                    }
                    _ => {}
                }
            }
        }
    }

    fn queues(&self) -> &[Queue] {
        std::slice::from_ref(&self.queue)
    }
}

fn setup_epoll(queue_evt: &EventFd, stop: &EventFd) -> std::io::Result<Epoll> {
    use std::os::fd::AsRawFd;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        queue_evt.as_raw_fd(),
        EpollEvent::new(EventSet::IN, TOKEN_QUEUE),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, TOKEN_STOP),
    )?;
    Ok(epoll)
}
