//! Virtio seeds: well-formed requests of each device laid out as
//! `virtio_queues` reads them (see `virtio_layout.rs`).

#[path = "../fuzz_targets/virtio_layout.rs"]
mod layout;

use drafter_vmm::devices::virtio::vsock::packet;
use layout::*;

use crate::Corpus;

/// A guest memory image under construction.
struct Image {
    mem: Vec<u8>,
    /// Next free descriptor and available-ring slot per queue.
    next: [u16; 3],
}

impl Image {
    fn new() -> Self {
        Self {
            mem: vec![0u8; DATA as usize + 0x3000],
            next: [0; 3],
        }
    }

    fn put(&mut self, addr: u64, bytes: &[u8]) {
        let a = addr as usize;
        self.mem[a..a + bytes.len()].copy_from_slice(bytes);
    }

    /// Adds a chain of `(addr, len, device-writable)` to queue `q` and makes it available.
    fn chain(&mut self, q: usize, bufs: &[(u64, u32, bool)]) {
        let head = self.next[q];
        assert!(usize::from(head) + bufs.len() <= usize::from(QUEUE_SIZE));
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = head + i as u16;
            let mut flags = if write { 2u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= 1;
            }
            let at = desc_table(q) + 16 * u64::from(idx);
            self.put(at, &addr.to_le_bytes());
            self.put(at + 8, &len.to_le_bytes());
            self.put(at + 12, &flags.to_le_bytes());
            self.put(at + 14, &(idx + 1).to_le_bytes());
        }
        self.next[q] = head + bufs.len() as u16;
        let slot = self.avail_count(q);
        self.put(avail_ring(q) + 4 + 2 * u64::from(slot), &head.to_le_bytes());
        self.put(avail_ring(q) + 2, &(slot + 1).to_le_bytes());
    }

    fn avail_count(&self, q: usize) -> u16 {
        let a = avail_ring(q) as usize + 2;
        u16::from_le_bytes([self.mem[a], self.mem[a + 1]])
    }

    fn input(&self, device: u8, flags: u8, ops: &[u8]) -> Vec<u8> {
        let mut v = vec![device, flags];
        v.extend_from_slice(&(self.mem.len() as u16).to_le_bytes());
        v.extend_from_slice(&self.mem);
        v.extend_from_slice(ops);
        v
    }
}

fn blk_header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn blk(c: &Corpus) {
    // IN (read) 2 sectors, OUT (write) 1 sector, FLUSH, GET_ID.
    let mut m = Image::new();
    let (hdr, data, status) = (DATA, DATA + 0x200, DATA + 0x100);
    m.put(hdr, &blk_header(0, 3));
    m.chain(
        0,
        &[(hdr, 16, false), (data, 1024, true), (status, 1, true)],
    );
    m.put(hdr + 16, &blk_header(1, 5));
    m.put(DATA + 0x1000, &[0xc3; 512]);
    m.chain(
        0,
        &[
            (hdr + 16, 16, false),
            (DATA + 0x1000, 512, false),
            (status + 1, 1, true),
        ],
    );
    m.put(hdr + 32, &blk_header(4, 0));
    m.chain(0, &[(hdr + 32, 16, false), (status + 2, 1, true)]);
    m.put(hdr + 48, &blk_header(8, 0));
    m.chain(
        0,
        &[
            (hdr + 48, 16, false),
            (DATA + 0x2000, 20, true),
            (status + 3, 1, true),
        ],
    );
    // Then the guest kicks and the device processes again.
    let ops = [OP_WRITE, 0x50, 0, 0, 0, 0, 0, OP_PROCESS];
    c.put("virtio_queues", "blk-requests", &m.input(0, 0, &ops));
    c.put("virtio_queues", "blk-read-only", &m.input(0, 1, &[]));
}

fn net(c: &Corpus) {
    let mut m = Image::new();
    // Two RX buffers (queue 0), one TX frame (queue 1): header + Ethernet.
    m.chain(0, &[(DATA, 2048, true)]);
    m.chain(0, &[(DATA + 0x800, 2048, true)]);
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    frame.extend_from_slice(&[0u8; 28]);
    m.put(DATA + 0x1000, &frame);
    m.chain(
        1,
        &[
            (DATA + 0x1000, 12, false),
            (DATA + 0x100c, frame.len() as u32 - 12, false),
        ],
    );
    let mut ops = vec![OP_FRAME];
    ops.extend_from_slice(&(frame.len() as u16).to_le_bytes());
    ops.extend_from_slice(&frame);
    ops.extend_from_slice(&[OP_PROCESS]);
    c.put("virtio_queues", "net-rx-tx", &m.input(1, 0, &ops));
}

fn vsock_header(src_port: u32, dst_port: u32, op: u16, len: u32) -> [u8; packet::HDR_LEN] {
    packet::Header {
        src_cid: 3,
        dst_cid: packet::HOST_CID,
        src_port,
        dst_port,
        len,
        type_: packet::TYPE_STREAM,
        op,
        flags: if op == packet::OP_SHUTDOWN {
            packet::SHUTDOWN_RCV | packet::SHUTDOWN_SEND
        } else {
            0
        },
        buf_alloc: 256 << 10,
        fwd_cnt: 0,
    }
    .to_bytes()
}

fn vsock(c: &Corpus) {
    let mut m = Image::new();
    // RX buffers for the device's replies, a connection request, data, a
    // credit update and a shutdown on TX (queue 1).
    for i in 0..4 {
        m.chain(
            0,
            &[
                (DATA + i * 0x100, 44, true),
                (DATA + 0x800 + i * 0x100, 0x100, true),
            ],
        );
    }
    let pkts = [
        vsock_header(1024, 26, packet::OP_REQUEST, 0),
        vsock_header(1024, 26, packet::OP_RW, 5),
        vsock_header(1024, 26, packet::OP_CREDIT_UPDATE, 0),
        vsock_header(1024, 26, packet::OP_SHUTDOWN, 0),
    ];
    let mut at = DATA + 0x1800;
    for (i, p) in pkts.iter().enumerate() {
        m.put(at, p);
        if i == 1 {
            m.put(at + 44, b"hello");
            m.chain(1, &[(at, 44, false), (at + 44, 5, false)]);
        } else {
            m.chain(1, &[(at, 44, false)]);
        }
        at += 0x80;
    }
    c.put(
        "virtio_queues",
        "vsock-session",
        &m.input(2, 0, &[OP_PROCESS]),
    );
}

/// Writes the `virtio_queues` seeds.
pub fn write(c: &Corpus) {
    blk(c);
    net(c);
    vsock(c);
}
