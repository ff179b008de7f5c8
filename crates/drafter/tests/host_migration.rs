//! VM migration on the host's /dev/kvm with a tiny hand-assembled guest that
//! counts in memory: pre-copy and at-authority (userfaultfd) resumes, a wrong
//! secret refused with the VM still running, writable drives carried over
//! two hops, read-only drives carried along.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drafter::migration::{
    DestinationOptions, IncomingVm, Resume, SourceOptions, VmMigrationDestination,
    VmMigrationError, VmMigrationSource,
};
use drafter_storage::{MigrationConfig, Secret};
use drafter_vmm::config::DriveConfig;
use drafter_vmm::{BuildOptions, ExitStatus, VmConfig, Vmm};

#[path = "../../vmm/tests/counting_guest/mod.rs"]
mod counting_guest;
use counting_guest::{counter, wait_counter_past, ChanWriter, COUNT};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("drafter-migr-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

/// Boots the counting guest (anonymous memory: the migration source reads
/// guest RAM through the VMM's mapping) and waits until it runs.
fn boot(drives: Vec<DriveConfig>) -> Arc<Mutex<Vmm>> {
    let mut c = VmConfig::new("/nonexistent-flat-program");
    c.memory_mib = 32;
    c.drives = drives;
    let (tx, rx): (Sender<u8>, Receiver<u8>) = channel();
    let vmm = Vmm::boot(
        c,
        BuildOptions {
            console: Some(Box::new(ChanWriter(tx))),
            shared_memory_file: None,
            flat_program: Some(COUNT.to_vec()),
        },
    )
    .unwrap_or_else(|e| panic!("boot: {e}"));
    let got = rx.recv_timeout(Duration::from_secs(20));
    assert_eq!(got.ok(), Some(b'R'), "guest did not start");
    wait_counter_past(&vmm, 0);
    Arc::new(Mutex::new(vmm))
}

fn migration_config(secret: &str) -> MigrationConfig {
    MigrationConfig {
        secret: Secret::new(secret),
        ..MigrationConfig::default()
    }
}

fn source_options(secret: &str) -> SourceOptions {
    let mut o = SourceOptions {
        migration: migration_config(secret),
        ..SourceOptions::default()
    };
    o.memory.cycle_throttle = Duration::from_millis(50);
    o
}

type Incoming = std::thread::JoinHandle<Result<IncomingVm, VmMigrationError>>;

fn receive(dir: PathBuf, secret: &str, resume: Resume) -> (UnixStream, Incoming) {
    let (a, b) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
    let migration = migration_config(secret);
    let dest = std::thread::spawn(move || {
        VmMigrationDestination::accept(
            b,
            DestinationOptions {
                resume,
                migration,
                console: Some(Box::new(std::io::sink())),
                ..DestinationOptions::new(dir)
            },
        )
    });
    (a, dest)
}

fn joined(dest: Incoming) -> IncomingVm {
    dest.join()
        .unwrap_or_else(|_| panic!("destination thread panicked"))
        .unwrap_or_else(|e| panic!("destination: {e}"))
}

/// Migrates the counting guest and checks it continues on the destination
/// from where it stopped, with the source's VM gone.
fn migrate_and_check(name: &str, resume: Resume) {
    let dir = scratch(name);
    let vmm = boot(Vec::new());
    let source = VmMigrationSource::new(vmm.clone(), source_options("s3cret"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (link, dest) = receive(dir.join("dst"), "s3cret", resume);
    let report = source.migrate(link).unwrap_or_else(|e| panic!("{e}"));
    let mut incoming = joined(dest);

    let at_stop = {
        let mut v = vmm.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(v.wait_timeout(Duration::ZERO), Some(ExitStatus::Stopped));
        counter(&v)
    };
    assert!(at_stop > 1000, "the guest barely ran: {at_stop}");
    // The destination starts from the source's final memory, not from zero.
    let first = counter(incoming.vmm());
    assert!(
        first >= at_stop,
        "destination counter {first} is behind the source's {at_stop}"
    );
    wait_counter_past(incoming.vmm(), first);
    let full = incoming.finish_transfer().unwrap_or_else(|e| panic!("{e}"));
    wait_counter_past(incoming.vmm(), first + 1000);
    // The source VM did not move after it was stopped.
    assert_eq!(
        counter(&vmm.lock().unwrap_or_else(|p| p.into_inner())),
        at_stop
    );

    assert!(report.storage.bytes_sent > 0 && report.state_bytes > 0);
    let (pause, state) = (
        report.pause_millis.unwrap_or(-1.0),
        report.state_millis.unwrap_or(-1.0),
    );
    assert!(
        pause >= 0.0 && state >= 0.0 && pause + state <= report.storage.downtime_millis,
        "pause {pause} ms + state {state} ms outside the downtime {} ms",
        report.storage.downtime_millis
    );
    assert!(report.storage.downtime_millis > 0.0);
    assert!(full.vm_downtime_millis.is_some_and(|d| d > 0.0));
    assert_eq!(full.storage.role, "destination");
    assert!(full.storage.bytes_received >= report.storage.bytes_sent / 2);
    assert_eq!(
        incoming.memory_file().is_some(),
        resume == Resume::AfterComplete
    );
    eprintln!(
        "{name}: source {}\ndestination {}",
        report.to_json_line(),
        full.to_json_line()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pre_copy_migration_keeps_the_guest_counting() {
    migrate_and_check("precopy", Resume::AfterComplete);
}

#[test]
fn at_authority_resume_fetches_pages_on_demand() {
    migrate_and_check("postcopy", Resume::AtAuthority);
}

#[test]
fn wrong_secret_is_refused_and_the_vm_keeps_running_then_a_retry_succeeds() {
    let dir = scratch("secret");
    let vmm = boot(Vec::new());
    let source = VmMigrationSource::new(vmm.clone(), source_options("right"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (link, dest) = receive(dir.join("dst-wrong"), "wrong", Resume::AfterComplete);
    let err = source.migrate(link).err();
    let dest_err = dest.join().unwrap_or_else(|_| panic!("thread")).err();
    assert!(
        err.as_ref().is_some_and(|e| e.source_keeps_authority()),
        "{err:?}"
    );
    assert!(dest_err.is_some(), "destination accepted a wrong secret");
    {
        let v = vmm.lock().unwrap_or_else(|p| p.into_inner());
        assert!(!v.is_paused());
        let c = counter(&v);
        wait_counter_past(&v, c);
    }
    let (link, dest) = receive(dir.join("dst"), "right", Resume::AfterComplete);
    source
        .migrate(link)
        .unwrap_or_else(|e| panic!("retry: {e}"));
    let mut incoming = joined(dest);
    let c = counter(incoming.vmm());
    wait_counter_past(incoming.vmm(), c);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn writable_drives_travel_with_the_vm_over_two_hops() {
    // The counting guest has no virtio driver, so the drive holds what the
    // host put there; the guest's writes are covered by drafter-vmm's
    // virtio-blk tests and the lab test `lab_writable_drive_moves_with_the_vm`.
    let dir = scratch("writable");
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 17 % 253) as u8).collect();
    std::fs::write(dir.join("disk"), &data).unwrap_or_else(|e| panic!("{e}"));
    let drive = DriveConfig {
        name: "disk".into(),
        path: dir.join("disk"),
        read_only: false,
    };
    let a = boot(vec![drive]);
    // A -> B in pre-copy, resumed once everything arrived.
    let source = VmMigrationSource::new(a.clone(), source_options("w"))
        .unwrap_or_else(|e| panic!("writable drive refused: {e}"));
    let (link, dest) = receive(dir.join("b"), "w", Resume::AfterComplete);
    source
        .migrate(link)
        .unwrap_or_else(|e| panic!("A -> B: {e}"));
    let mut b = joined(dest);
    let drives = b.vmm().config().drives.clone();
    assert_eq!(drives.len(), 1);
    assert_eq!(drives[0].path, dir.join("b").join("drive-disk"));
    assert!(!drives[0].read_only, "the drive became read-only on B");
    assert!(std::fs::read(&drives[0].path).unwrap_or_default() == data);
    let c0 = counter(b.vmm());
    wait_counter_past(b.vmm(), c0);
    // B -> C, resumed at authority: the drive is complete before it runs.
    let (b_vmm, _) = b.into_parts().unwrap_or_else(|e| panic!("{e}"));
    let b_vmm = Arc::new(Mutex::new(b_vmm));
    let source = VmMigrationSource::new(b_vmm.clone(), source_options("w"))
        .unwrap_or_else(|e| panic!("B's writable drive refused: {e}"));
    let (link, dest) = receive(dir.join("c"), "w", Resume::AtAuthority);
    source
        .migrate(link)
        .unwrap_or_else(|e| panic!("B -> C: {e}"));
    let mut c = joined(dest);
    let drives = c.vmm().config().drives.clone();
    assert_eq!(drives[0].path, dir.join("c").join("drive-disk"));
    assert!(!drives[0].read_only, "the drive became read-only on C");
    assert!(std::fs::read(&drives[0].path).unwrap_or_default() == data);
    let c1 = counter(c.vmm());
    wait_counter_past(c.vmm(), c1);
    c.finish_transfer().unwrap_or_else(|e| panic!("{e}"));
    assert!(std::fs::read(&drives[0].path).unwrap_or_default() == data);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn read_only_drives_travel_with_the_vm() {
    let dir = scratch("rodrive");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(dir.join("oci"), &data).unwrap_or_else(|e| panic!("{e}"));
    let drive = DriveConfig {
        name: "oci".into(),
        path: dir.join("oci"),
        read_only: true,
    };
    let vmm = boot(vec![drive]);
    let source = VmMigrationSource::new(vmm, source_options("s")).unwrap_or_else(|e| panic!("{e}"));
    let (link, dest) = receive(dir.join("dst"), "s", Resume::AtAuthority);
    source.migrate(link).unwrap_or_else(|e| panic!("{e}"));
    let mut incoming = joined(dest);
    let drives = incoming.vmm().config().drives.clone();
    assert_eq!(drives.len(), 1);
    assert_eq!(drives[0].path, dir.join("dst").join("drive-oci"));
    assert!(drives[0].read_only);
    assert!(std::fs::read(&drives[0].path).unwrap_or_default() == data);
    incoming.finish_transfer().unwrap_or_else(|e| panic!("{e}"));
    // The finished receive's files under their own names, no marker.
    assert_eq!(
        names_in(&dir.join("dst")),
        ["drive-oci", "memory.bin", "state.bin"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends `devices` (name, content, size) from a plain storage source (no VM)
/// to a VM destination; returns the destination's result.
fn receive_raw(name: &str, devices: &[(&str, &[u8], u64)]) -> Result<IncomingVm, VmMigrationError> {
    let dir = scratch(name);
    let result = receive_raw_into(dir.join("dst"), devices, Resume::AfterComplete, false);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// [`receive_raw`] into `dst`; with `cut`, the link is cut when the source
/// is about to suspend (every device fully sent once, no authority moved).
fn receive_raw_into(
    dst: PathBuf,
    devices: &[(&str, &[u8], u64)],
    resume: Resume,
    cut: bool,
) -> Result<IncomingVm, VmMigrationError> {
    receive_raw_with_source(dst, devices, resume, cut).0
}

/// [`receive_raw_into`], also returning the source's result.
fn receive_raw_with_source(
    dst: PathBuf,
    devices: &[(&str, &[u8], u64)],
    resume: Resume,
    cut: bool,
) -> (
    Result<IncomingVm, VmMigrationError>,
    Result<drafter_storage::MigrationReport, drafter_storage::MigrationError>,
) {
    use drafter_storage::{BlockDevice, MemoryDevice, MigrationSource, SourceDevice};
    let sources = devices
        .iter()
        .map(|(n, content, size)| {
            let d = MemoryDevice::new(*size, 65536).unwrap_or_else(|e| panic!("{e}"));
            d.write_at(content, 0).unwrap_or_else(|e| panic!("{e}"));
            SourceDevice::fixed(*n, Arc::new(d), Default::default())
        })
        .collect();
    let source = MigrationSource::new(sources, migration_config("s"));
    let (link, dest) = receive(dst, "s", resume);
    let cutter = link.try_clone().unwrap_or_else(|e| panic!("{e}"));
    let sender = std::thread::spawn(move || {
        source.migrate(link, move || {
            if cut {
                let _ = cutter.shutdown(std::net::Shutdown::Both);
                return Err("link cut by the test".into());
            }
            Ok(())
        })
    });
    let result = dest.join().unwrap_or_else(|_| panic!("destination thread"));
    let sent = sender
        .join()
        .unwrap_or_else(|_| panic!("source thread panicked"));
    (result, sent)
}

/// The names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A work directory holding a previous VM's files and an unrelated one.
fn lived_in_work_dir(dst: &Path) {
    std::fs::create_dir_all(dst).unwrap_or_else(|e| panic!("{e}"));
    for (name, content) in [
        ("memory.bin", &b"previous VM's memory"[..]),
        ("state.bin", b"previous VM's state"),
        ("notes.txt", b"not ours"),
    ] {
        std::fs::write(dst.join(name), content).unwrap_or_else(|e| panic!("{e}"));
    }
}

fn assert_lived_in_work_dir_untouched(dst: &Path, what: &str) {
    assert_eq!(
        names_in(dst),
        ["memory.bin", "notes.txt", "state.bin"],
        "{what}: files left in {}",
        dst.display()
    );
    for (name, content) in [
        ("memory.bin", &b"previous VM's memory"[..]),
        ("state.bin", b"previous VM's state"),
        ("notes.txt", b"not ours"),
    ] {
        assert_eq!(
            std::fs::read(dst.join(name)).unwrap_or_default(),
            content,
            "{what}: {name} changed"
        );
    }
}

#[test]
fn a_failed_receive_removes_its_files_and_keeps_those_it_found() {
    let dir = scratch("failed-receive");
    let dst = dir.join("dst");
    let mem = 32u64 << 20;
    let pattern: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 253) as u8 + 1).collect();
    let frame = drafter::migration::StateFrame {
        paused_at: std::time::SystemTime::now(),
        state: b"not a drafter state file".to_vec(),
    }
    .encode();
    let drive = vec![7u8; 200_000];

    // The link is cut after the full pass, before authority moved.
    lived_in_work_dir(&dst);
    let r = receive_raw_into(
        dst.clone(),
        &[
            ("memory", &pattern, mem),
            ("state", &frame, 1 << 20),
            ("drive/oci", &drive, drive.len() as u64),
        ],
        Resume::AfterComplete,
        true,
    );
    let e = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(!e.is_empty(), "the receive of a cut link succeeded");
    assert_lived_in_work_dir_untouched(&dst, &format!("cut link ({e})"));

    // Everything arrived but the state is garbage: no VM to keep.
    let r = receive_raw_into(
        dst.clone(),
        &[
            ("memory", &pattern, mem),
            ("state", b"\x7fELF garbage", 1 << 20),
            ("drive/oci", &drive, drive.len() as u64),
        ],
        Resume::AfterComplete,
        false,
    );
    let e = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("holds no VM state"), "{e}");
    assert_lived_in_work_dir_untouched(&dst, "garbage state");

    // At authority the VM is not all here when its restore fails.
    let r = receive_raw_into(
        dst.clone(),
        &[
            ("memory", &pattern, mem),
            ("state", &frame, 1 << 20),
            ("drive/oci", &drive, drive.len() as u64),
        ],
        Resume::AtAuthority,
        false,
    );
    match r {
        Err(e) => assert!(e.to_string().contains("not a drafter VM state file"), "{e}"),
        Ok(_) => panic!("restored a VM from a bogus state"),
    }
    assert_lived_in_work_dir_untouched(&dst, "restore failure at authority");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fully_received_vm_whose_restore_fails_declines_the_handover_and_removes_its_files() {
    // The VM is restored before the destination asks for authority: a
    // restore that fails declines the handover, so the source keeps running
    // the VM and this receive's files (RAM-sized) are not kept.
    let dir = scratch("restore-fails");
    let dst = dir.join("dst");
    lived_in_work_dir(&dst);
    let mem = 32u64 << 20;
    let frame = drafter::migration::StateFrame {
        paused_at: std::time::SystemTime::now(),
        state: b"not a drafter state file".to_vec(),
    }
    .encode();
    let drive = vec![7u8; 200_000];
    let (r, sent) = receive_raw_with_source(
        dst.clone(),
        &[
            ("memory", b"memory!", mem),
            ("state", &frame, 1 << 20),
            ("drive/oci", &drive, drive.len() as u64),
        ],
        Resume::AfterComplete,
        false,
    );
    // The source heard the refusal: it keeps (and would resume) the VM.
    let sent = sent.err().unwrap_or_else(|| panic!("the source completed"));
    assert!(sent.source_keeps_authority(), "{sent}");
    assert!(sent.to_string().contains("declined"), "{sent}");
    let e = match r {
        Err(e @ VmMigrationError::Restore(_)) => e,
        other => panic!("expected a restore error, got {:?}", other.err()),
    };
    let msg = e.to_string();
    assert!(
        msg.contains("not a drafter VM state file") && msg.contains("the source keeps the VM"),
        "{msg}"
    );
    assert_lived_in_work_dir_untouched(&dst, "restore failure after complete");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn leftovers_of_a_receive_that_died_are_removed_before_the_next_one() {
    let dir = scratch("crashed-receive");
    let dst = dir.join("dst");
    std::fs::create_dir_all(&dst).unwrap_or_else(|e| panic!("{e}"));
    // What a receive killed with SIGKILL leaves: its marker listing the
    // files it made, and those files (a RAM-sized memory file among them).
    let marker = dst.join(VmMigrationDestination::MARKER);
    std::fs::write(
        &marker,
        "memory.bin.partial\ndrive-old.partial\nstate.bin\nnotes.txt\n../outside\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let big =
        std::fs::File::create(dst.join("memory.bin.partial")).unwrap_or_else(|e| panic!("{e}"));
    big.set_len(1 << 30).unwrap_or_else(|e| panic!("{e}"));
    drop(big);
    for name in ["drive-old.partial", "state.bin", "notes.txt"] {
        std::fs::write(dst.join(name), b"stale").unwrap_or_else(|e| panic!("{e}"));
    }
    std::fs::write(dir.join("outside"), b"outside").unwrap_or_else(|e| panic!("{e}"));

    // While a receive holds the marker, no other receive uses the directory.
    let held = std::fs::File::open(&marker).unwrap_or_else(|e| panic!("{e}"));
    held.try_lock().unwrap_or_else(|e| panic!("{e}"));
    let (_link, dest) = receive(dst.clone(), "s", Resume::AfterComplete);
    let e = dest
        .join()
        .unwrap_or_else(|_| panic!("thread"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("another receive into"), "{e}");
    assert!(dst.join("memory.bin.partial").exists());
    let e = VmMigrationDestination::clean_unfinished(&dst)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("in progress"), "{e}");
    drop(held);

    let vmm = boot(Vec::new());
    let source = VmMigrationSource::new(vmm, source_options("s")).unwrap_or_else(|e| panic!("{e}"));
    let (link, dest) = receive(dst.clone(), "s", Resume::AfterComplete);
    source.migrate(link).unwrap_or_else(|e| panic!("{e}"));
    let mut incoming = joined(dest);
    let c = counter(incoming.vmm());
    wait_counter_past(incoming.vmm(), c);
    // Only what the marker listed and a receive makes was removed; the
    // received VM's files replaced the stale ones.
    assert_eq!(names_in(&dst), ["memory.bin", "notes.txt", "state.bin"]);
    assert_eq!(
        std::fs::metadata(dst.join("memory.bin"))
            .map(|m| m.len())
            .ok(),
        Some(32 << 20)
    );
    assert_ne!(
        std::fs::read(dst.join("state.bin")).unwrap_or_default(),
        b"stale"
    );
    assert_eq!(
        std::fs::read(dst.join("notes.txt")).unwrap_or_default(),
        b"stale"
    );
    assert!(dir.join("outside").exists());
    drop(incoming);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn garbage_or_missing_state_from_the_wire_is_refused_with_a_named_error() {
    let mem = 32u64 << 20;
    let r = receive_raw(
        "garbage-frame",
        &[("memory", b"", mem), ("state", b"\x7fELF garbage", 1 << 20)],
    );
    let e = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("holds no VM state (bad magic)"), "{e}");

    let never_written = receive_raw(
        "empty-state",
        &[("memory", b"", mem), ("state", b"", 1 << 20)],
    );
    let e = never_written
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("state device is empty"), "{e}");

    // A well-framed state whose payload is not a VM state file: the
    // destination names it and keeps what arrived.
    let frame = drafter::migration::StateFrame {
        paused_at: std::time::SystemTime::now(),
        state: b"not a drafter state file".to_vec(),
    }
    .encode();
    let r = receive_raw(
        "bad-payload",
        &[("memory", b"", mem), ("state", &frame, 1 << 20)],
    );
    match r {
        Err(VmMigrationError::Restore(source)) => assert!(
            source.to_string().contains("not a drafter VM state file"),
            "{source}"
        ),
        other => panic!("expected a restore error, got {:?}", other.err()),
    }

    let r = receive_raw("no-state", &[("memory", b"", mem)]);
    assert!(
        matches!(&r, Err(VmMigrationError::MissingDevice(n)) if n == "state"),
        "{:?}",
        r.err()
    );
    let r = receive_raw("foreign", &[("memory", b"", mem), ("kernel", b"", 4096)]);
    let e = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        e.contains("\"kernel\": not a device of a VM migration"),
        "{e}"
    );
}

#[test]
fn a_migrated_vm_migrates_on_from_its_received_memory_file() {
    let dir = scratch("chain");
    let vmm = boot(Vec::new());
    let source = VmMigrationSource::new(vmm, source_options("s")).unwrap_or_else(|e| panic!("{e}"));
    let (link, dest) = receive(dir.join("b"), "s", Resume::AfterComplete);
    source.migrate(link).unwrap_or_else(|e| panic!("{e}"));
    let (vmm_b, mem_b) = joined(dest).into_parts().unwrap_or_else(|e| panic!("{e}"));
    let mem_b = mem_b.unwrap_or_else(|| panic!("no memory file after a pre-copy resume"));
    assert_eq!(mem_b, dir.join("b").join("memory.bin"));
    let on_b = wait_counter_past(&vmm_b, 0);
    let vmm_b = Arc::new(Mutex::new(vmm_b));
    let source = VmMigrationSource::new(vmm_b.clone(), source_options("s"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (link, dest) = receive(dir.join("c"), "s", Resume::AfterComplete);
    source
        .migrate(link)
        .unwrap_or_else(|e| panic!("second hop: {e}"));
    let mut on_c = joined(dest);
    let left_b = counter(&vmm_b.lock().unwrap_or_else(|p| p.into_inner()));
    assert!(left_b > on_b);
    let first = counter(on_c.vmm());
    assert!(
        first >= left_b,
        "C starts at {first}, B stopped at {left_b}"
    );
    wait_counter_past(on_c.vmm(), first);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 9, defect 8: a VM that resumed at authority (guest RAM filled on
/// demand through userfaultfd, no memory file) is migrated on once its
/// pages have arrived, and keeps counting on the third host.
#[test]
fn a_vm_that_resumed_at_authority_migrates_on() {
    let dir = scratch("postcopy-chain");
    let vmm = boot(Vec::new());
    let source = VmMigrationSource::new(vmm, source_options("s")).unwrap_or_else(|e| panic!("{e}"));
    let (link, dest) = receive(dir.join("b"), "s", Resume::AtAuthority);
    source.migrate(link).unwrap_or_else(|e| panic!("{e}"));
    let (vmm_b, mem_b) = joined(dest).into_parts().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mem_b, None, "an at-authority resume has no memory file");
    let on_b = wait_counter_past(&vmm_b, 0);
    let vmm_b = Arc::new(Mutex::new(vmm_b));
    let source = VmMigrationSource::new(vmm_b.clone(), source_options("s"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (link, dest) = receive(dir.join("c"), "s", Resume::AfterComplete);
    source
        .migrate(link)
        .unwrap_or_else(|e| panic!("second hop: {e}"));
    let mut on_c = joined(dest);
    let left_b = counter(&vmm_b.lock().unwrap_or_else(|p| p.into_inner()));
    assert!(left_b > on_b, "B did not run: {on_b} -> {left_b}");
    let first = counter(on_c.vmm());
    assert!(
        first >= left_b,
        "C starts at {first}, B stopped at {left_b}"
    );
    wait_counter_past(on_c.vmm(), first);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue #9, defect 1: a link cut in the handover tail (the final dirty data
/// on its way to a destination that resumes only with every block) must
/// leave the VM running on exactly one side. Before the acknowledged
/// handover, authority counted as moved once it was sent: the source
/// stopped its VM and the destination, cut off before the last block, had
/// none to run.
#[test]
fn a_link_cut_in_the_handover_tail_leaves_the_vm_running_on_the_source() {
    use drafter_storage::{Phase, Progress};
    let dir = scratch("tail-cut");
    let vmm = boot(Vec::new());
    let (link, dest) = receive(dir.join("dst"), "s", Resume::AfterComplete);
    let cutter = link.try_clone().unwrap_or_else(|e| panic!("{e}"));
    let source = VmMigrationSource::new(vmm.clone(), source_options("s"))
        .unwrap_or_else(|e| panic!("{e}"))
        .with_observer(Arc::new(move |p: &Progress| {
            // The VM is paused and the handover offered; the tail starts.
            if *p == Progress::Phase(Phase::Tail) {
                let _ = cutter.shutdown(std::net::Shutdown::Both);
            }
        }));
    let err = source
        .migrate(link)
        .err()
        .unwrap_or_else(|| panic!("the migration survived a cut link"));
    assert!(err.source_keeps_authority(), "{err}");
    let dest_err = dest
        .join()
        .unwrap_or_else(|_| panic!("destination thread panicked"))
        .err()
        .map(|e| e.to_string());
    assert!(
        dest_err.is_some(),
        "the destination got a VM over a cut link"
    );
    // The destination has no VM and kept none of this receive's files.
    assert!(
        names_in(&dir.join("dst")).is_empty(),
        "files left: {:?} ({dest_err:?})",
        names_in(&dir.join("dst"))
    );
    // The source resumed its VM: the guest keeps counting there.
    {
        let v = vmm.lock().unwrap_or_else(|p| p.into_inner());
        assert!(!v.is_paused(), "the source VM was left paused");
        assert_eq!(
            v.exit_waiter().get(),
            None,
            "the source VM was stopped: {err}"
        );
        let c = counter(&v);
        wait_counter_past(&v, c);
    }
    // And a retry moves it.
    let (link, dest) = receive(dir.join("dst2"), "s", Resume::AfterComplete);
    let source =
        VmMigrationSource::new(vmm.clone(), source_options("s")).unwrap_or_else(|e| panic!("{e}"));
    source
        .migrate(link)
        .unwrap_or_else(|e| panic!("retry: {e}"));
    let left = counter(&vmm.lock().unwrap_or_else(|p| p.into_inner()));
    let mut incoming = joined(dest);
    let first = counter(incoming.vmm());
    assert!(
        first >= left,
        "destination {first} behind the source's {left}"
    );
    wait_counter_past(incoming.vmm(), first);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The one window the handover cannot close alone: Commit was sent and no
/// acknowledgement came (here: a destination that asked for authority and
/// then went silent). The source must neither resume the VM (the
/// destination may run it) nor destroy it (it may not): it keeps it paused,
/// saves it, and says so; an operator who checked the destination can then
/// resume it here.
#[test]
fn commit_without_acknowledgement_keeps_the_vm_paused_and_saved() {
    use drafter_storage::auth::{handshake, Role};
    use drafter_storage::protocol::{read_frame, Event, Message};
    use std::io::Write;
    let dir = scratch("unknown");
    let vmm = boot(Vec::new());
    let (link, mut fake) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
    let (release, released) = channel::<()>();
    let destination = std::thread::spawn(move || {
        handshake(&mut fake, Role::Destination, &Secret::new("s"))
            .unwrap_or_else(|e| panic!("{e}"));
        // Alive (keepalives, as a real destination's writer sends) until
        // it asked for authority, however long the full pass takes on a
        // busy machine.
        let (silence, silenced) = channel::<()>();
        let mut beat = fake.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let (acked, wait_acked) = channel::<()>();
        let beats = std::thread::spawn(move || {
            // Not before the acks are written: one writer at a time.
            let _ = wait_acked.recv();
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                silenced.recv_timeout(Duration::from_millis(200))
            {
                if beat
                    .write_all(&drafter_storage::protocol::KEEPALIVE_FRAME)
                    .is_err()
                {
                    return;
                }
            }
        });
        loop {
            match read_frame(&mut fake) {
                Ok(Message::DevicesListed { count }) => {
                    for device in 0..count {
                        let ack = Message::DeviceAck {
                            device,
                            has_base: false,
                        };
                        fake.write_all(&ack.to_frame())
                            .unwrap_or_else(|e| panic!("{e}"));
                    }
                    let _ = acked.send(());
                }
                Ok(Message::Event(Event::HandoverOffered)) => break,
                Ok(_) => {}
                Err(e) => panic!("fake destination: {e}"),
            }
        }
        drop(acked);
        let _ = silence.send(());
        let _ = beats.join();
        fake.write_all(&Message::Event(Event::ReadyToRun).to_frame())
            .unwrap_or_else(|e| panic!("{e}"));
        // Frozen: the socket stays open, nothing more is read or written.
        let _ = released.recv_timeout(Duration::from_secs(60));
    });
    let mut options = source_options("s");
    options.migration.link_timeout = Duration::from_secs(1);
    options.unresolved_dir = Some(dir.join("unresolved"));
    // The fake destination sends no keepalives while it reads: keep the
    // dirty cycles shorter than the link timeout.
    for device in [&mut options.memory, &mut options.state] {
        device.min_cycles = 1;
        device.cycle_throttle = Duration::ZERO;
    }
    let source = VmMigrationSource::new(vmm.clone(), options).unwrap_or_else(|e| panic!("{e}"));
    let err = source
        .migrate(link)
        .err()
        .unwrap_or_else(|| panic!("migrated to a silent destination"));
    let _ = release.send(());
    let _ = destination.join();
    assert_eq!(
        err.authority(),
        drafter_storage::migrator::Authority::Unknown,
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("authority unknown") && msg.contains("kept paused"),
        "{msg}"
    );
    let (state, memory) = match &err {
        VmMigrationError::AuthorityUnknown {
            saved: Some(saved), ..
        } => (saved.0.clone(), saved.1.clone()),
        other => panic!("expected a saved unresolved VM, got {other}"),
    };
    assert!(state.exists() && memory.exists(), "{msg}");
    let frozen = {
        let v = vmm.lock().unwrap_or_else(|p| p.into_inner());
        assert!(v.is_paused(), "the VM must stay paused: {msg}");
        assert_eq!(v.exit_waiter().get(), None, "the VM must not be destroyed");
        counter(&v)
    };
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        counter(&vmm.lock().unwrap_or_else(|p| p.into_inner())),
        frozen,
        "a paused guest does not count"
    );
    // The operator checked: the destination does not run it.
    source.resume_here().unwrap_or_else(|e| panic!("{e}"));
    wait_counter_past(&vmm.lock().unwrap_or_else(|p| p.into_inner()), frozen);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A VM that resumed at authority writes its drives at once; if the rest of
/// its memory then never arrives (the source died or the link broke after
/// Running), the receive fails, but the drive and the state are the
/// running VM's: they stay in the work directory, off the receive marker
/// (so a later receive there does not remove them either); only the
/// partial memory file goes. Before, the failed transfer removed the drive
/// with everything the guest had written to it here (seen while writing
/// the lab fault test's post-copy-fetch cases).
#[test]
fn a_post_copy_transfer_failing_after_the_vm_ran_keeps_its_drive_and_state() {
    use drafter::migration::VmPhase;
    use drafter_storage::{Mode, Phase, Progress};
    let dir = scratch("postcopy-keep");
    let data: Vec<u8> = (0..500_000u32).map(|i| (i * 13 % 241) as u8).collect();
    std::fs::write(dir.join("disk"), &data).unwrap_or_else(|e| panic!("{e}"));
    let vmm = boot(vec![DriveConfig {
        name: "disk".into(),
        path: dir.join("disk"),
        read_only: false,
    }]);
    let (link, far_end) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
    let cutter = far_end.try_clone().unwrap_or_else(|e| panic!("{e}"));
    // The source holds its tail (every memory block) back until the
    // destination runs the VM; the destination then cuts the link.
    let (ran, tail_may_go) = channel::<()>();
    let tail_may_go = Mutex::new(tail_may_go);
    let work = dir.join("dst");
    let dest = {
        let work = work.clone();
        std::thread::spawn(move || {
            let ran = Mutex::new(ran);
            VmMigrationDestination::accept(
                far_end,
                DestinationOptions {
                    resume: Resume::AtAuthority,
                    migration: migration_config("p"),
                    console: Some(Box::new(std::io::sink())),
                    observer: Some(Arc::new(move |p| {
                        if p == VmPhase::PostCopyFetch {
                            let _ = cutter.shutdown(std::net::Shutdown::Both);
                            let _ = ran.lock().unwrap_or_else(|p| p.into_inner()).send(());
                        }
                    })),
                    ..DestinationOptions::new(work)
                },
            )
        })
    };
    let mut options = source_options("p");
    options.migration.mode = Mode::PostCopy;
    let source = VmMigrationSource::new(vmm.clone(), options)
        .unwrap_or_else(|e| panic!("{e}"))
        .with_observer(Arc::new(move |p: &Progress| {
            if *p == Progress::Phase(Phase::Tail) {
                let rx = tail_may_go.lock().unwrap_or_else(|p| p.into_inner());
                let _ = rx.recv_timeout(Duration::from_secs(30));
            }
        }));
    let err = source
        .migrate(link)
        .err()
        .unwrap_or_else(|| panic!("the migration survived a cut link"));
    assert!(!err.source_keeps_authority(), "{err}");
    let mut incoming = joined(dest);
    assert!(
        incoming.finish_transfer().is_err(),
        "the transfer finished over a cut link"
    );
    let names = names_in(&work);
    assert!(
        names.contains(&"drive-disk".to_string()) && names.contains(&"state.bin".to_string()),
        "the running VM's files were removed: {names:?}"
    );
    assert!(
        !names.iter().any(|n| n.starts_with("memory.bin")),
        "the partial memory file stayed: {names:?}"
    );
    assert!(std::fs::read(work.join("drive-disk")).unwrap_or_default() == data);
    drop(incoming);
    // A later receive into the directory cleans up what is listed, not them.
    VmMigrationDestination::clean_unfinished(&work).unwrap_or_else(|e| panic!("{e}"));
    assert!(std::fs::read(work.join("drive-disk")).unwrap_or_default() == data);
    assert!(work.join("state.bin").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 11 item 4: a pre-copy destination restores the VM (state read,
/// KVM VM, devices) while the final dirty blocks are still on their way,
/// not after the last one: the source holds its tail back until the
/// destination has started restoring, and the VM still arrives whole and
/// runs only after every block is here.
#[test]
fn a_pre_copy_destination_restores_while_the_tail_is_in_flight() {
    use drafter::migration::VmPhase;
    use drafter_storage::{Phase, Progress};
    let dir = scratch("restore-early");
    let vmm = boot(Vec::new());
    let (link, far_end) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
    let (restoring, tail_may_go) = channel::<()>();
    let tail_may_go = Mutex::new(tail_may_go);
    let work = dir.join("dst");
    let dest = {
        let work = work.clone();
        std::thread::spawn(move || {
            let restoring = Mutex::new(restoring);
            VmMigrationDestination::accept(
                far_end,
                DestinationOptions {
                    resume: Resume::AfterComplete,
                    migration: migration_config("r"),
                    console: Some(Box::new(std::io::sink())),
                    observer: Some(Arc::new(move |p| {
                        if p == VmPhase::Restore {
                            let tx = restoring.lock().unwrap_or_else(|p| p.into_inner());
                            let _ = tx.send(());
                        }
                    })),
                    ..DestinationOptions::new(work)
                },
            )
        })
    };
    let released_by_restore = Arc::new(Mutex::new(None));
    let released = released_by_restore.clone();
    let source = VmMigrationSource::new(vmm.clone(), source_options("r"))
        .unwrap_or_else(|e| panic!("{e}"))
        .with_observer(Arc::new(move |p: &Progress| {
            if *p == Progress::Phase(Phase::Tail) {
                let rx = tail_may_go.lock().unwrap_or_else(|p| p.into_inner());
                let ok = rx.recv_timeout(Duration::from_secs(20)).is_ok();
                *released.lock().unwrap_or_else(|p| p.into_inner()) = Some(ok);
            }
        }));
    source.migrate(link).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        *released_by_restore
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
        Some(true),
        "the destination did not start restoring before the final blocks came"
    );
    let mut incoming = joined(dest);
    incoming.finish_transfer().unwrap_or_else(|e| panic!("{e}"));
    let c = counter(incoming.vmm());
    wait_counter_past(incoming.vmm(), c);
    let _ = std::fs::remove_dir_all(&dir);
}
