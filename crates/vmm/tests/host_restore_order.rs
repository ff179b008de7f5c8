//! Restore is a pure step: devices rebuilt from a snapshot start no I/O and
//! signal no interrupt until the restored VM is resumed, once KVM's
//! interrupt-controller and vCPU state is in place; then live devices start and
//! interrupts pending at snapshot time reach the guest's irqchip. Real
//! snapshots of a flat-program VM with a virtio-blk drive on the host's
//! /dev/kvm, with device state edited on disk as a guest driver would have
//! left it (the flat program drives no device itself).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drafter_vmm::config::DriveConfig;
use drafter_vmm::devices::virtio::{DeviceState, MmioState, QueueSnapshot, VIRTIO_F_VERSION_1};
use drafter_vmm::persist::{read_state_file, write_state_file};
use drafter_vmm::{RestoreMemory, Snapshot, VmConfig, Vmm};
use vm_memory::{Bytes, GuestAddress};

mod counting_guest;
use counting_guest::{console, counter, snapshot_counting_vm, wait_counter_past};

const DRIVE: &str = "ordr";
/// The split virtqueue the edited snapshot's driver set up (16 entries).
const DESC: u64 = 0x40_0000;
const AVAIL: u64 = 0x40_1000;
const USED: u64 = 0x40_2000;
/// A GET_ID request: header, 20-byte answer, status byte.
const HDR: u64 = 0x40_3000;
const ID: u64 = 0x40_3100;
const STATUS: u64 = 0x40_3200;

const COM1_IRQ: u32 = 4;
const VIRTIO_IRQ: u32 = 5;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-restore-order-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

/// Snapshots a counting VM with one (idle) drive into `dir`; returns (state, memory).
fn snapshot(dir: &Path) -> (PathBuf, PathBuf) {
    let disk = dir.join("disk");
    std::fs::write(&disk, vec![0u8; 64 * 1024]).unwrap_or_else(|e| panic!("{e}"));
    let mut config = VmConfig::new("/nonexistent-flat-program");
    config.vcpus = 1;
    config.memory_mib = 32;
    config.drives.push(DriveConfig {
        name: DRIVE.into(),
        path: disk,
        read_only: false,
    });
    snapshot_counting_vm(config, dir)
}

/// Makes the drive live in `snap`, as a driver that negotiated VERSION_1 and
/// set up one 16-entry queue at [`DESC`]/[`AVAIL`]/[`USED`] leaves it.
fn make_drive_live(snap: &mut Snapshot, interrupt_status: u32) {
    let v: &mut MmioState = &mut snap.devices.virtio[0];
    v.status = 1 | 2 | 8 | 4; // ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    v.driver_features = VIRTIO_F_VERSION_1;
    v.interrupt_status = interrupt_status;
    v.queues[0] = QueueSnapshot {
        max_size: v.queues[0].max_size,
        size: 16,
        ready: true,
        desc_table: DESC,
        avail_ring: AVAIL,
        used_ring: USED,
        next_avail: 0,
        next_used: 0,
        event_idx: false,
    };
    let DeviceState::Block(b) = &mut v.device else {
        panic!("drive 0 is not a block device");
    };
    b.acked_features = VIRTIO_F_VERSION_1;
}

/// Writes `value` at guest address `addr` of the memory file (one region from 0).
fn poke(mem: &Path, addr: u64, value: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(mem)
        .unwrap_or_else(|e| panic!("{e}"));
    f.write_all_at(value, addr)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Puts a GET_ID request in the queue's available ring (in the memory file).
fn queue_get_id(mem: &Path) {
    let mut hdr = [0u8; 16];
    hdr[0] = 8; // VIRTIO_BLK_T_GET_ID
    poke(mem, HDR, &hdr);
    poke(mem, STATUS, &[0xff]);
    let desc = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = Vec::new();
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        d
    };
    let mut table = desc(HDR, 16, 1, 1); // NEXT
    table.extend(desc(ID, 20, 1 | 2, 2)); // NEXT | WRITE
    table.extend(desc(STATUS, 1, 2, 0)); // WRITE
    poke(mem, DESC, &table);
    // flags 0, idx 1, ring[0] = head 0.
    poke(mem, AVAIL, &[0, 0, 1, 0, 0, 0]);
}

fn used_idx(vmm: &Vmm) -> u16 {
    vmm.guest_memory()
        .read_obj(GuestAddress(USED + 2))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// IRR of the master 8259 in a saved VM state: edge-triggered lines raised
/// while the guest runs with interrupts disabled stay pending there.
fn pic_irr(snap: &Snapshot) -> u8 {
    // SAFETY: KVM_GET_IRQCHIP for KVM_IRQCHIP_PIC_MASTER fills the `pic` member.
    unsafe { snap.vm.pic_master.chip.pic }.irr
}

fn restore(state: &Path, mem: &Path) -> Vmm {
    let (out, _rx) = console();
    Vmm::restore(state, RestoreMemory::Private(mem.to_path_buf()), Some(out))
        .unwrap_or_else(|e| panic!("restore: {e}"))
}

fn saved_state(vmm: &mut Vmm, path: &Path) -> Snapshot {
    vmm.snapshot_state(path).unwrap_or_else(|e| panic!("{e}"));
    read_state_file(path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_restored_live_device_serves_nothing_before_resume() {
    let dir = tmpdir("io");
    let (state, mem) = snapshot(&dir);
    let mut snap: Snapshot = read_state_file(&state).unwrap_or_else(|e| panic!("{e}"));
    make_drive_live(&mut snap, 0);
    write_state_file(&state, &snap).unwrap_or_else(|e| panic!("{e}"));
    queue_get_id(&mem);

    let mut vmm = restore(&state, &mem);
    let saved = counter(&vmm);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(used_idx(&vmm), 0, "request served before resume");
    let dirty = vmm.dirty_pages().unwrap_or_else(|e| panic!("{e}"));
    assert!(!dirty.is_dirty(USED), "used ring written before resume");
    // A snapshot of the restored, never resumed VM holds the restored device.
    let again = saved_state(&mut vmm, &dir.join("again"));
    assert_eq!(again.devices.virtio, snap.devices.virtio);

    vmm.resume().unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while used_idx(&vmm) == 0 {
        assert!(Instant::now() < deadline, "request not served after resume");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut id = [0u8; 4];
    vmm.guest_memory()
        .read_slice(&mut id, GuestAddress(ID))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&id, DRIVE.as_bytes());
    wait_counter_past(&vmm, saved);
    // The completion interrupt reached the irqchip (the guest runs with IF=0).
    vmm.pause().unwrap_or_else(|e| panic!("{e}"));
    let after = saved_state(&mut vmm, &dir.join("after"));
    assert_ne!(pic_irr(&after) & (1 << VIRTIO_IRQ), 0);
    assert_eq!(after.devices.virtio[0].queues[0].next_used, 1);
    vmm.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn interrupts_pending_at_snapshot_reach_the_irqchip_after_resume() {
    let dir = tmpdir("irq");
    let (state, mem) = snapshot(&dir);
    let mut snap: Snapshot = read_state_file(&state).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pic_irr(&snap) & (1 << COM1_IRQ | 1 << VIRTIO_IRQ), 0);
    // The drive had used buffers the guest had not acknowledged yet...
    make_drive_live(&mut snap, 1);
    // ...and the UART a THR-empty interrupt enabled and pending.
    snap.devices.serial.interrupt_enable = 0x02;
    snap.devices.serial.interrupt_identification = 0x02;
    write_state_file(&state, &snap).unwrap_or_else(|e| panic!("{e}"));

    let mut vmm = restore(&state, &mem);
    let saved = counter(&vmm);
    let before = saved_state(&mut vmm, &dir.join("before"));
    assert_eq!(before.devices.virtio, snap.devices.virtio);
    assert_eq!(before.devices.serial, snap.devices.serial);

    vmm.resume().unwrap_or_else(|e| panic!("{e}"));
    wait_counter_past(&vmm, saved);
    vmm.pause().unwrap_or_else(|e| panic!("{e}"));
    let after = saved_state(&mut vmm, &dir.join("after"));
    let irr = pic_irr(&after);
    assert_ne!(
        irr & (1 << COM1_IRQ),
        0,
        "UART interrupt lost: IRR {irr:#04x}"
    );
    assert_ne!(
        irr & (1 << VIRTIO_IRQ),
        0,
        "virtio interrupt lost: IRR {irr:#04x}"
    );
    assert_eq!(after.devices.virtio[0].interrupt_status, 1);
    vmm.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
