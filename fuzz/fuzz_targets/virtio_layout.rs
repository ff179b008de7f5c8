//! Input layout of the `virtio_queues` target, shared with the seed writer.
//!
//! `[device][flags][image length: u16 LE][guest memory image][ops…]`
//!
//! * device: 0 virtio-blk, 1 virtio-net, 2 virtio-vsock (modulo 3);
//! * flags: bit 0 makes the block device read-only;
//! * the image is copied to guest address 0: it holds every queue's
//!   descriptor table, available ring and the buffers the chains point to;
//! * ops, each a tag byte and its arguments: [`OP_WRITE`] `offset: u16,
//!   value: u32` (a guest MMIO register write), [`OP_FRAME`] `len: u16,
//!   bytes` (a frame the tap delivers, virtio-net only), [`OP_PROCESS`]
//!   (the device processes its queues again).
//!
//! The driver sets every queue up with [`QUEUE_SIZE`] entries at the
//! addresses below and sets DRIVER_OK, which makes the device process
//! whatever the image made available.
#![allow(dead_code)]

/// Guest memory size.
pub const MEM_SIZE: usize = 64 << 10;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 16;
/// First byte of the data area (queues live below it).
pub const DATA: u64 = 0x1000;
/// Op tag: MMIO register write.
pub const OP_WRITE: u8 = 0;
/// Op tag: frame from the tap.
pub const OP_FRAME: u8 = 1;
/// Op tag: process the queues again.
pub const OP_PROCESS: u8 = 2;

/// Descriptor table of queue `q`.
pub fn desc_table(q: usize) -> u64 {
    q as u64 * 0x400
}
/// Available ring of queue `q`.
pub fn avail_ring(q: usize) -> u64 {
    desc_table(q) + 0x100
}
/// Used ring of queue `q`.
pub fn used_ring(q: usize) -> u64 {
    desc_table(q) + 0x140
}
