//! Virtio descriptor chains over guest memory, as a hostile guest driver
//! lays them out, processed by the real virtio-blk, virtio-net and
//! virtio-vsock devices behind the real virtio-mmio transport. The devices'
//! I/O engines run on this thread (`run_engines_inline`), so every input is
//! processed deterministically before the next. Input layout: see
//! `virtio_layout.rs`.
#![no_main]

#[path = "virtio_layout.rs"]
mod layout;

use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::PathBuf;
use std::sync::OnceLock;

use drafter_vmm::devices::virtio::block::Block;
use drafter_vmm::devices::virtio::net::{Net, Tap};
use drafter_vmm::devices::virtio::vsock::Vsock;
use drafter_vmm::devices::virtio::{run_engines_inline, IrqTrigger, MmioTransport, VirtioDevice};
use drafter_vmm::memory::GuestMemory;
use layout::*;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;

/// Guest port with a host service listening (the agent's port).
const SERVICE_PORT: u32 = 26;

/// The scratch directory (disk file, vsock sockets) and the host service.
fn scratch() -> &'static (PathBuf, UnixListener) {
    static DIR: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    DIR.get_or_init(|| {
        run_engines_inline(true);
        let dir = tempfile::tempdir().expect("scratch dir").keep();
        std::fs::write(dir.join("disk"), vec![0x5au8; 64 << 10]).expect("disk file");
        let service = UnixListener::bind(dir.join(format!("vsock.sock_{SERVICE_PORT}")))
            .expect("host service socket");
        service.set_nonblocking(true).expect("nonblocking");
        (dir, service)
    })
}

fn reg(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn set(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// The Linux driver's init sequence: features, queues, DRIVER_OK.
fn init(t: &mut MmioTransport) {
    set(t, 0x70, ACKNOWLEDGE);
    set(t, 0x70, ACKNOWLEDGE | DRIVER);
    set(t, 0x14, 0);
    let lo = reg(t, 0x10);
    set(t, 0x14, 1);
    let hi = reg(t, 0x10);
    set(t, 0x24, 0);
    set(t, 0x20, lo);
    set(t, 0x24, 1);
    set(t, 0x20, hi);
    set(t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    for q in 0..t.device().queue_max_sizes().len() {
        set(t, 0x30, q as u32);
        let size = u32::from(QUEUE_SIZE).min(reg(t, 0x34));
        set(t, 0x38, size);
        for (lo, addr) in [
            (0x80, desc_table(q)),
            (0x90, avail_ring(q)),
            (0xa0, used_ring(q)),
        ] {
            set(t, lo, addr as u32);
            set(t, lo + 4, (addr >> 32) as u32);
        }
        set(t, 0x44, 1);
    }
    set(t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (dir, service) = scratch();
    let (kind, flags) = (data[0] % 3, data[1]);
    let image_len = (usize::from(u16::from_le_bytes([data[2], data[3]])))
        .min(MEM_SIZE)
        .min(data.len() - 4);
    let (image, mut ops) = data[4..].split_at(image_len);
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    mem.write_slice(image, GuestAddress(0)).expect("image fits");

    // The far end of the tap: frames to deliver, a sink for transmitted ones.
    let (tap_end, wire) = UnixDatagram::pair().expect("socketpair");
    tap_end.set_nonblocking(true).expect("nonblocking");
    let device: Box<dyn VirtioDevice> = match kind {
        0 => Box::new(Block::new("fuzz", &dir.join("disk"), flags & 1 == 1).expect("block")),
        1 => {
            let tap = Tap::from_file(OwnedFd::from(tap_end).into(), "fuzz0");
            Box::new(Net::with_tap(tap, [2, 0, 0, 0, 0, 1]))
        }
        _ => Box::new(Vsock::new(3, &dir.join("vsock.sock")).expect("vsock")),
    };
    let irq = IrqTrigger::from_eventfd(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let Ok(mut t) = MmioTransport::with_irq(device, mem, irq) else {
        return;
    };

    // Frames come first: the tap is read when the device starts.
    let mut rest = Vec::new();
    while let Some((&tag, tail)) = ops.split_first() {
        match tag % 3 {
            OP_WRITE if tail.len() >= 6 => {
                let offset = u64::from(u16::from_le_bytes([tail[0], tail[1]]));
                rest.push((Some((offset, [tail[2], tail[3], tail[4], tail[5]])), false));
                ops = &tail[6..];
            }
            OP_FRAME if tail.len() >= 2 => {
                let len = usize::from(u16::from_le_bytes([tail[0], tail[1]])).min(tail.len() - 2);
                let _ = wire.send(&tail[2..2 + len]);
                ops = &tail[2 + len..];
            }
            OP_PROCESS => {
                rest.push((None, true));
                ops = tail;
            }
            _ => break,
        }
    }
    init(&mut t);
    for op in rest.into_iter().take(64) {
        match op {
            (Some((offset, value)), _) => t.write(offset, &value),
            (None, _) => {
                t.pause();
                let _ = t.resume();
            }
        }
    }
    t.pause();
    drop(t);
    // Connections the guest opened to the host service end with this input.
    while service.accept().is_ok() {}
});
