use std::fs;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::mmio::status;
use crate::devices::virtio::testing::{
    clear_dirty, page_dirty, temp_path, Buf, TestDriver, DATA_START,
};
use crate::devices::virtio::MmioTransport;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

const HDR: u64 = DATA_START;
const STATUS: u64 = DATA_START + 0x100;
const DATA: u64 = DATA_START + 0x1000;
const DISK_SECTORS: u64 = 2048; // 1 MiB

fn disk_file(name: &str) -> std::path::PathBuf {
    let path = temp_path(name);
    let content: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE)
        .map(|i| (i / SECTOR_SIZE) as u8 ^ (i % 251) as u8)
        .collect();
    fs::write(&path, content).unwrap();
    path
}

fn driver(path: &std::path::Path, read_only: bool) -> TestDriver {
    TestDriver::new(Box::new(Block::new("rootfs", path, read_only).unwrap()), 16)
}

/// Submits `type`/`sector` with `data` buffers; returns (status, used len).
fn request(d: &mut TestDriver, kind: u32, sector: u64, data: &[Buf]) -> (u8, u32) {
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    d.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mut chain = vec![Buf::r(HDR, 16)];
    chain.extend_from_slice(data);
    chain.push(Buf::w(STATUS, 1));
    let head = d.add_chain(0, &chain);
    d.kick(0);
    let (id, len) = d.wait_used(0);
    assert_eq!(id, u32::from(head));
    (d.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
}

fn read_guest(d: &TestDriver, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    d.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

#[test]
fn config_space_reports_capacity_and_features() {
    let path = disk_file("cfg");
    let mut d = driver(&path, false);
    let lo = d.reg(0x100);
    let hi = d.reg(0x104);
    assert_eq!(u64::from(lo) | (u64::from(hi) << 32), DISK_SECTORS);
    assert_eq!(d.reg(0x008), TYPE_BLOCK);
    d.set_reg(0x14, 0);
    let f = d.reg(0x10);
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    fs::remove_file(path).unwrap();
}

#[test]
fn reads_and_writes_reach_the_file_and_mark_pages_dirty() {
    let path = disk_file("rw");
    let expected = fs::read(&path).unwrap();
    let mut d = driver(&path, false);
    clear_dirty(&d.mem);

    // Read sectors 3..6 into two buffers on different pages.
    let (st, len) = request(
        &mut d,
        VIRTIO_BLK_T_IN,
        3,
        &[Buf::w(DATA, 512), Buf::w(DATA + 0x3000, 1024)],
    );
    assert_eq!((st, len), (0, 1536 + 1));
    assert_eq!(read_guest(&d, DATA, 512), &expected[3 * 512..4 * 512]);
    assert_eq!(
        read_guest(&d, DATA + 0x3000, 1024),
        &expected[4 * 512..6 * 512]
    );
    assert!(page_dirty(&d.mem, DATA));
    assert!(page_dirty(&d.mem, DATA + 0x3000));
    assert!(
        !page_dirty(&d.mem, DATA + 0x1000),
        "untouched page reported dirty"
    );

    // Write a pattern to sectors 100..108.
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 1) as u8).collect();
    d.mem
        .write_slice(&pattern, GuestAddress(DATA + 0x8000))
        .unwrap();
    let (st, len) = request(
        &mut d,
        VIRTIO_BLK_T_OUT,
        100,
        &[Buf::r(DATA + 0x8000, 4096)],
    );
    assert_eq!((st, len), (0, 1));
    let (st, _) = request(&mut d, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(st, 0);
    let on_disk = fs::read(&path).unwrap();
    assert_eq!(&on_disk[100 * 512..108 * 512], &pattern[..]);
    assert_eq!(&on_disk[..100 * 512], &expected[..100 * 512]);
    assert_eq!(&on_disk[108 * 512..], &expected[108 * 512..]);
    fs::remove_file(path).unwrap();
}

#[test]
fn out_of_range_and_malformed_requests_get_ioerr() {
    let path = disk_file("range");
    let before = fs::read(&path).unwrap();
    let mut d = driver(&path, false);
    // Last sector is fine, one past it is not.
    assert_eq!(
        request(
            &mut d,
            VIRTIO_BLK_T_IN,
            DISK_SECTORS - 1,
            &[Buf::w(DATA, 512)]
        )
        .0,
        0
    );
    assert_eq!(
        request(
            &mut d,
            VIRTIO_BLK_T_IN,
            DISK_SECTORS - 1,
            &[Buf::w(DATA, 1024)]
        ),
        (1, 1)
    );
    assert_eq!(
        request(&mut d, VIRTIO_BLK_T_OUT, DISK_SECTORS, &[Buf::r(DATA, 512)]),
        (1, 1)
    );
    // Sector arithmetic that would overflow.
    assert_eq!(
        request(&mut d, VIRTIO_BLK_T_IN, u64::MAX, &[Buf::w(DATA, 512)]).0,
        1
    );
    // Partial sector.
    assert_eq!(
        request(&mut d, VIRTIO_BLK_T_IN, 0, &[Buf::w(DATA, 100)]).0,
        1
    );
    // Data buffer outside guest memory.
    assert_eq!(
        request(&mut d, VIRTIO_BLK_T_IN, 0, &[Buf::w(1 << 40, 512)]).0,
        1
    );
    // Read into a device-readable buffer.
    assert_eq!(
        request(&mut d, VIRTIO_BLK_T_IN, 0, &[Buf::r(DATA, 512)]).0,
        1
    );
    // Unknown request type.
    assert_eq!(request(&mut d, 77, 0, &[]), (2, 1));
    // Nothing was written.
    assert_eq!(fs::read(&path).unwrap(), before);
    fs::remove_file(path).unwrap();
}

#[test]
fn bad_descriptor_chains_do_not_stop_the_device() {
    let path = disk_file("chains");
    let mut d = driver(&path, false);
    // Header outside guest memory: status still written as IOERR.
    d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let head = d.add_chain(0, &[Buf::r(1 << 40, 16), Buf::w(STATUS, 1)]);
    d.kick(0);
    assert_eq!(d.wait_used(0), (u32::from(head), 1));
    assert_eq!(d.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 1);
    // No writable status byte: completed with length 0.
    let head = d.add_chain(0, &[Buf::r(HDR, 16)]);
    d.kick(0);
    assert_eq!(d.wait_used(0), (u32::from(head), 0));
    // A descriptor looping to itself.
    d.write_desc(0, 9, HDR, 16, 1, 9);
    d.make_available(0, 9);
    d.kick(0);
    assert_eq!(d.wait_used(0), (9, 0));
    // A head index beyond the queue size.
    d.make_available(0, 200);
    // The device keeps serving valid requests afterwards.
    let (st, _) = request(&mut d, VIRTIO_BLK_T_IN, 1, &[Buf::w(DATA, 512)]);
    assert_eq!(st, 0);
    assert_eq!(d.reg(0x70) & status::DEVICE_NEEDS_RESET, 0);
    fs::remove_file(path).unwrap();
}

#[test]
fn read_only_drive_rejects_writes_but_reads() {
    let path = disk_file("ro");
    let before = fs::read(&path).unwrap();
    let mut d = driver(&path, true);
    d.set_reg(0x14, 0);
    assert_ne!(d.reg(0x10) & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        request(&mut d, VIRTIO_BLK_T_OUT, 0, &[Buf::r(DATA, 512)]),
        (1, 1)
    );
    assert_eq!(
        request(&mut d, VIRTIO_BLK_T_IN, 0, &[Buf::w(DATA, 512)]),
        (0, 513)
    );
    assert_eq!(read_guest(&d, DATA, 512), &before[..512]);
    assert_eq!(request(&mut d, VIRTIO_BLK_T_FLUSH, 0, &[]).0, 0);
    assert_eq!(fs::read(&path).unwrap(), before);
    fs::remove_file(path).unwrap();
}

#[test]
fn get_id_returns_the_drive_name() {
    let path = disk_file("id");
    let mut d = driver(&path, false);
    let (st, len) = request(&mut d, VIRTIO_BLK_T_GET_ID, 0, &[Buf::w(DATA, 20)]);
    assert_eq!((st, len), (0, 21));
    let id = read_guest(&d, DATA, 20);
    assert_eq!(&id[..6], b"rootfs");
    assert!(id[6..].iter().all(|&b| b == 0));
    fs::remove_file(path).unwrap();
}

#[test]
fn snapshot_restore_continues_at_the_saved_queue_position() {
    let path = disk_file("snap");
    let expected = fs::read(&path).unwrap();
    let mut d = driver(&path, false);
    for s in 0..3 {
        assert_eq!(
            request(&mut d, VIRTIO_BLK_T_IN, s, &[Buf::w(DATA, 512)]).0,
            0
        );
    }
    let state = d.transport.save();
    assert_eq!(state.queues[0].next_avail, 3);
    assert_eq!(state.queues[0].next_used, 3);
    // A request made available while paused is not processed...
    d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mut hdr = [0u8; 16];
    hdr[8..].copy_from_slice(&7u64.to_le_bytes());
    d.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    d.add_chain(0, &[Buf::r(HDR, 16), Buf::w(DATA, 512), Buf::w(STATUS, 1)]);
    d.kick(0);
    assert!(d.try_used(0).is_none());
    // ...and the old transport goes away; the restored one (same memory) picks it up.
    let mem = d.mem.clone();
    let queues = d.take_queues();
    drop(d);
    let dev = Block::new("rootfs", &path, false).unwrap();
    let mut r = TestDriver::restored(Box::new(dev), mem, &state, queues);
    assert_eq!(r.wait_used(0).1, 513);
    assert_eq!(read_guest(&r, DATA, 512), &expected[7 * 512..8 * 512]);
    assert_eq!(
        request(&mut r, VIRTIO_BLK_T_IN, 9, &[Buf::w(DATA, 512)]).0,
        0
    );
    assert_eq!(read_guest(&r, DATA, 512), &expected[9 * 512..10 * 512]);

    // A disk of another size is refused.
    fs::write(&path, [0u8; 512]).unwrap();
    let small = Block::new("rootfs", &path, false).unwrap();
    let err = MmioTransport::restore(
        Box::new(small),
        r.mem.clone(),
        IrqTrigger::new().unwrap(),
        &state,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("sectors"), "{err}");
    fs::remove_file(path).unwrap();
}

#[test]
fn guest_writes_mark_exactly_their_blocks_dirty_until_taken() {
    let path = disk_file("dirty");
    let block = Block::new("rootfs", &path, false).unwrap();
    let log = block.dirty_log();
    assert_eq!(
        log.block_count(),
        DISK_SECTORS * SECTOR_SIZE / DIRTY_BLOCK_SIZE
    );
    let mut d = TestDriver::new(Box::new(block), 16);
    let data = vec![0x5au8; 4096];
    d.mem
        .write_slice(&data, GuestAddress(DATA + 0x8000))
        .unwrap();

    // Reads, flushes and GET_ID write nothing to the disk.
    let (st, _) = request(&mut d, VIRTIO_BLK_T_IN, 0, &[Buf::w(DATA, 4096)]);
    assert_eq!(st, 0);
    let (st, _) = request(&mut d, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(st, 0);
    assert!(log.take().is_empty(), "a read marked blocks dirty");

    // One block-aligned write: block 1 only. One unaligned 4 KiB write at
    // sector 100 (byte 51200): blocks 12 and 13. One sector at the very
    // end of the disk: the last block.
    let (st, _) = request(&mut d, VIRTIO_BLK_T_OUT, 8, &[Buf::r(DATA + 0x8000, 4096)]);
    assert_eq!(st, 0);
    let (st, _) = request(
        &mut d,
        VIRTIO_BLK_T_OUT,
        100,
        &[Buf::r(DATA + 0x8000, 1024), Buf::r(DATA + 0x9000, 3072)],
    );
    assert_eq!(st, 0);
    let (st, _) = request(
        &mut d,
        VIRTIO_BLK_T_OUT,
        DISK_SECTORS - 1,
        &[Buf::r(DATA + 0x8000, 512)],
    );
    assert_eq!(st, 0);
    let last = log.block_count() - 1;
    assert_eq!(log.take(), vec![1, 12, 13, last]);
    // Taken means reset: nothing until the guest writes again.
    assert!(log.take().is_empty());
    let (st, _) = request(&mut d, VIRTIO_BLK_T_OUT, 8, &[Buf::r(DATA + 0x8000, 512)]);
    assert_eq!(st, 0);
    assert_eq!(log.take(), vec![1]);

    // A write refused (beyond the end) marks nothing.
    let (st, _) = request(
        &mut d,
        VIRTIO_BLK_T_OUT,
        DISK_SECTORS,
        &[Buf::r(DATA + 0x8000, 512)],
    );
    assert_ne!(st, 0);
    assert!(log.take().is_empty());
    fs::remove_file(path).unwrap();
}

#[test]
fn a_read_only_drive_never_marks_blocks_dirty() {
    let path = disk_file("dirty-ro");
    let block = Block::new("rootfs", &path, true).unwrap();
    let log = block.dirty_log();
    let mut d = TestDriver::new(Box::new(block), 16);
    let (st, _) = request(&mut d, VIRTIO_BLK_T_OUT, 8, &[Buf::r(DATA + 0x8000, 512)]);
    assert_ne!(st, 0);
    assert!(log.take().is_empty());
    fs::remove_file(path).unwrap();
}

#[test]
fn once_paused_no_write_is_in_flight_and_every_completed_one_is_logged() {
    // Writes queued at once, the device paused right after the kick: the
    // pause joins the I/O thread, so whatever completed is logged, nothing
    // completes while paused, and the rest runs on resume.
    const N: u64 = 4;
    let path = disk_file("dirty-pause");
    let block = Block::new("rootfs", &path, false).unwrap();
    let log = block.dirty_log();
    let mut d = TestDriver::new(Box::new(block), 16);
    let mut heads = Vec::new();
    for k in 0..N {
        let (hdr, status) = (HDR + 0x20 * k, STATUS + k);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        // Request k writes block 2k + 1 (sectors 8(2k+1)..).
        h[8..].copy_from_slice(&(8 * (2 * k + 1)).to_le_bytes());
        d.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let head = d.add_chain(
            0,
            &[
                Buf::r(hdr, 16),
                Buf::r(DATA + 0x8000, 4096),
                Buf::w(status, 1),
            ],
        );
        heads.push(u32::from(head));
    }
    d.kick(0);
    d.transport.pause();
    let block_of = |head: u32| heads.iter().position(|h| *h == head).unwrap() as u64 * 2 + 1;
    let mut done = Vec::new();
    while let Some((id, _)) = d.try_used(0) {
        done.push(block_of(id));
    }
    assert_eq!(
        log.take(),
        done,
        "completed writes and logged blocks differ"
    );
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(d.try_used(0).is_none(), "a request completed while paused");
    assert!(log.take().is_empty(), "a write landed while paused");
    d.transport.resume().unwrap();
    let mut rest = Vec::new();
    while (done.len() + rest.len()) < N as usize {
        let (id, _) = d.wait_used(0);
        rest.push(block_of(id));
    }
    assert_eq!(log.take(), rest);
    fs::remove_file(path).unwrap();
}
