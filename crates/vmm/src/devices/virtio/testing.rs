//! Test support: a minimal virtio driver that lays real split virtqueues and
//! descriptor chains out in guest memory and drives a device through the
//! virtio-mmio registers, as the Linux driver does.

use std::os::fd::AsRawFd;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::status;
use super::{IrqTrigger, MmioTransport, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemory;

/// Guest memory size used by device tests.
pub const MEM_SIZE: usize = 16 << 20;
/// First guest address free for data buffers (queues live below it).
pub const DATA_START: u64 = 0x10_0000;

/// Guest memory with a dirty bitmap, as the VMM builds it.
pub fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// One driver-side virtqueue.
pub struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

/// A descriptor to put in a chain: guest address, length, device-writable?
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }
    /// A device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }
}

/// A virtio driver in a test.
pub struct TestDriver {
    /// Guest memory shared with the device.
    pub mem: GuestMemory,
    /// The transport under test.
    pub transport: MmioTransport,
    irq_evt: EventFd,
    /// Driver-side queues.
    pub queues: Vec<DriverQueue>,
}

impl TestDriver {
    /// Wraps `device` in a transport and runs the driver init sequence, accepting
    /// every offered feature, with `queue_size` entries per queue.
    pub fn new(device: Box<dyn VirtioDevice>, queue_size: u16) -> Self {
        Self::with_memory(device, queue_size, guest_memory())
    }

    /// Like [`TestDriver::new`] on the given memory.
    pub fn with_memory(device: Box<dyn VirtioDevice>, queue_size: u16, mem: GuestMemory) -> Self {
        let irq_evt = EventFd::new(0).unwrap();
        let irq = IrqTrigger::from_eventfd(irq_evt.try_clone().unwrap());
        let transport = MmioTransport::with_irq(device, mem.clone(), irq).unwrap();
        let mut d = Self {
            mem,
            transport,
            irq_evt,
            queues: Vec::new(),
        };
        d.init(queue_size);
        d
    }

    /// Restores a transport from `state` around `device` (fresh memory copy is
    /// the caller's) and resumes it, as the VMM does when the restored VM runs.
    pub fn restored(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        state: &super::MmioState,
        queues: Vec<DriverQueue>,
    ) -> Self {
        let irq_evt = EventFd::new(0).unwrap();
        let irq = IrqTrigger::from_eventfd(irq_evt.try_clone().unwrap());
        let mut transport = MmioTransport::restore(device, mem.clone(), irq, state).unwrap();
        transport.resume().unwrap();
        Self {
            mem,
            transport,
            irq_evt,
            queues,
        }
    }

    /// Hands over the driver-side queue bookkeeping (for a restore test).
    pub fn take_queues(&mut self) -> Vec<DriverQueue> {
        std::mem::take(&mut self.queues)
    }

    /// Reads a 32-bit register.
    pub fn reg(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a 32-bit register.
    pub fn set_reg(&mut self, offset: u64, v: u32) {
        self.transport.write(offset, &v.to_le_bytes());
    }

    fn init(&mut self, queue_size: u16) {
        assert_eq!(self.reg(0), 0x7472_6976);
        assert_eq!(self.reg(4), 2);
        self.set_reg(0x70, status::ACKNOWLEDGE);
        self.set_reg(0x70, status::ACKNOWLEDGE | status::DRIVER);
        self.set_reg(0x14, 0);
        let lo = self.reg(0x10);
        self.set_reg(0x14, 1);
        let hi = self.reg(0x10);
        let features = u64::from(lo) | (u64::from(hi) << 32);
        assert_ne!(features & VIRTIO_F_VERSION_1, 0);
        self.set_reg(0x24, 0);
        self.set_reg(0x20, features as u32);
        self.set_reg(0x24, 1);
        self.set_reg(0x20, (features >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.set_reg(0x70, s);
        assert_eq!(self.reg(0x70), s, "device refused features");
        let nq = self.transport.device().queue_max_sizes().len();
        let mut base = 0x1000u64;
        for i in 0..nq {
            self.set_reg(0x30, i as u32);
            let max = self.reg(0x34) as u16;
            let size = queue_size.min(max);
            let desc = base;
            let avail = desc + 16 * u64::from(size);
            let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
            base = (used + 6 + 8 * u64::from(size) + 0xfff) & !0xfff;
            assert!(base < DATA_START);
            self.set_reg(0x38, u32::from(size));
            self.set_reg(0x80, desc as u32);
            self.set_reg(0x84, (desc >> 32) as u32);
            self.set_reg(0x90, avail as u32);
            self.set_reg(0x94, (avail >> 32) as u32);
            self.set_reg(0xa0, used as u32);
            self.set_reg(0xa4, (used >> 32) as u32);
            self.set_reg(0x44, 1);
            assert_eq!(self.reg(0x44), 1);
            self.queues.push(DriverQueue {
                size,
                desc,
                avail,
                used,
                next_desc: 0,
                avail_idx: 0,
                last_used: 0,
            });
        }
        self.set_reg(0x70, s | status::DRIVER_OK);
        assert_eq!(self.reg(0x70), s | status::DRIVER_OK);
    }

    /// Writes a chain of `bufs` into queue `q`'s descriptor table and makes it
    /// available (without notifying). Returns the head index.
    pub fn add_chain(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let dq = &mut self.queues[q];
        let head = dq.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % dq.size;
            let mut flags = 0u16;
            if b.write {
                flags |= 2;
            }
            let next = (idx + 1) % dq.size;
            if i + 1 < bufs.len() {
                flags |= 1;
            }
            let at = dq.desc + 16 * u64::from(idx);
            self.mem
                .write_obj(b.addr.to_le(), GuestAddress(at))
                .unwrap();
            self.mem
                .write_obj(b.len.to_le(), GuestAddress(at + 8))
                .unwrap();
            self.mem
                .write_obj(flags.to_le(), GuestAddress(at + 12))
                .unwrap();
            self.mem
                .write_obj(next.to_le(), GuestAddress(at + 14))
                .unwrap();
        }
        dq.next_desc = (head + bufs.len() as u16) % dq.size;
        let slot = dq.avail + 4 + 2 * u64::from(dq.avail_idx % dq.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(dq.avail_idx.to_le(), GuestAddress(dq.avail + 2))
            .unwrap();
        head
    }

    /// Raw access to a descriptor slot (for building malformed chains).
    pub fn write_desc(&mut self, q: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.queues[q].desc + 16 * u64::from(idx);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Makes descriptor `head` available in queue `q` (after `write_desc`).
    pub fn make_available(&mut self, q: usize, head: u16) {
        let dq = &mut self.queues[q];
        let slot = dq.avail + 4 + 2 * u64::from(dq.avail_idx % dq.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(dq.avail_idx, GuestAddress(dq.avail + 2))
            .unwrap();
    }

    /// QueueNotify for queue `q`.
    pub fn kick(&mut self, q: usize) {
        self.set_reg(0x50, q as u32);
    }

    /// The next used element `(id, len)` of queue `q`, if the device produced one.
    pub fn try_used(&mut self, q: usize) -> Option<(u32, u32)> {
        let dq = &mut self.queues[q];
        let idx: u16 = self.mem.read_obj(GuestAddress(dq.used + 2)).unwrap();
        if idx == dq.last_used {
            return None;
        }
        let at = dq.used + 4 + 8 * u64::from(dq.last_used % dq.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        dq.last_used = dq.last_used.wrapping_add(1);
        Some((id, len))
    }

    /// Waits (on the device's interrupt, 10 s limit) for the next used element of queue `q`.
    pub fn wait_used(&mut self, q: usize) -> (u32, u32) {
        loop {
            if let Some(u) = self.try_used(q) {
                return u;
            }
            self.wait_irq();
        }
    }

    /// Blocks until the device interrupts (panics after 10 s) and acks it.
    pub fn wait_irq(&mut self) {
        let mut pfd = libc::pollfd {
            fd: self.irq_evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(n, 1, "device did not interrupt within 10 s");
        let _ = self.irq_evt.read();
        let st = self.reg(0x60);
        self.set_reg(0x64, st);
    }
}

/// A fresh path under the temp dir, unique per process and call.
pub fn temp_path(name: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("drafter-dev-{}-{n}-{name}", std::process::id()))
}

/// Whether the VMM-side dirty bitmap has the page holding `addr` marked.
pub fn page_dirty(mem: &GuestMemory, addr: u64) -> bool {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};
    let region = mem.find_region(GuestAddress(addr)).unwrap();
    region
        .bitmap()
        .dirty_at((addr - region.start_addr().0) as usize)
}

/// Clears the VMM-side dirty bitmap.
pub fn clear_dirty(mem: &GuestMemory) {
    use vm_memory::GuestMemoryBackend as _;
    for r in mem.iter() {
        let region: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = r;
        region.bitmap().reset();
    }
}
