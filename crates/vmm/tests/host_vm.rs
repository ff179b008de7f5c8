//! VMs running tiny hand-assembled long-mode programs on the host's /dev/kvm:
//! pause/resume, dirty log, reset paths, snapshot and restore in every memory mode.

use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use drafter_vmm::memory::PageProvider;
use drafter_vmm::uffd::FilePageProvider;
use drafter_vmm::{BuildOptions, ExitStatus, RestoreMemory, VmConfig, Vmm};
use vm_memory::{Bytes, GuestAddress};

mod counting_guest;
use counting_guest::{console, counter, wait_counter_past, COUNT, COUNTER};

/// Writes one byte to each of 16 pages from 0x300000, prints 'D', halts forever.
/// Prints 'R', waits until the byte at 0x200000 is non-zero (the host sets
/// it), writes one byte to each of the 16 pages from 0x300000, prints 'D'
/// and halts.
const DIRTY16: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'R', // mov al, 'R'
    0xee, // out dx, al
    0x80, 0x3c, 0x25, 0x00, 0x00, 0x20, 0x00, 0x00, // cmp byte [0x200000], 0
    0x74, 0xf6, // je -10
    0x48, 0xc7, 0xc7, 0x00, 0x00, 0x30, 0x00, // mov rdi, 0x300000
    0xb9, 0x10, 0x00, 0x00, 0x00, // mov ecx, 16
    0xc6, 0x07, 0x01, // mov byte [rdi], 1
    0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 0x1000
    0xff, 0xc9, // dec ecx
    0x75, 0xf2, // jnz -14
    0xb0, b'D', // mov al, 'D'
    0xee, // out dx, al
    0xf4, // hlt
    0xeb, 0xfd, // jmp -3
];

/// Address of the byte that starts [`DIRTY16`]'s writes.
const DIRTY16_GO: u64 = 0x20_0000;

/// Pulses the reset line through the i8042 (`out 0x64, 0xfe`).
const I8042_RESET: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// `ud2` with an empty IDT: triple fault.
const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b];

fn config(vcpus: u8) -> VmConfig {
    let mut c = VmConfig::new("/nonexistent-flat-program");
    c.vcpus = vcpus;
    c.memory_mib = 32;
    c
}

fn boot(code: &[u8], vcpus: u8, shared: Option<PathBuf>) -> (Vmm, Receiver<u8>) {
    let (out, rx) = console();
    let vmm = Vmm::boot(
        config(vcpus),
        BuildOptions {
            console: Some(out),
            shared_memory_file: shared,
            flat_program: Some(code.to_vec()),
        },
    )
    .unwrap_or_else(|e| panic!("boot: {e}"));
    (vmm, rx)
}

fn expect_byte(rx: &Receiver<u8>, want: u8) {
    let got = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("no serial output: {e}"));
    assert_eq!(got, want);
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-host-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

#[test]
fn pause_freezes_the_guest_and_resume_continues_it() {
    let (mut vmm, rx) = boot(COUNT, 2, None);
    expect_byte(&rx, b'R');
    let c0 = wait_counter_past(&vmm, 0);
    for _ in 0..20 {
        vmm.pause().unwrap_or_else(|e| panic!("{e}"));
        let a = counter(&vmm);
        // The guest must not move while paused, however long we look.
        for _ in 0..1000 {
            std::thread::yield_now();
        }
        assert_eq!(counter(&vmm), a, "guest ran while paused");
        vmm.resume().unwrap_or_else(|e| panic!("{e}"));
        wait_counter_past(&vmm, a);
    }
    assert!(counter(&vmm) > c0);
    assert_eq!(vmm.stop(), ExitStatus::Stopped);
}

#[test]
fn dirty_pages_report_guest_writes_then_go_quiet() {
    let (mut vmm, rx) = boot(DIRTY16, 1, None);
    expect_byte(&rx, b'R');
    vmm.set_dirty_logging(true)
        .unwrap_or_else(|e| panic!("{e}"));
    start_dirty16(&vmm);
    expect_byte(&rx, b'D');
    let d = vmm.dirty_pages().unwrap_or_else(|e| panic!("{e}"));
    for i in 0..16 {
        assert!(d.is_dirty(0x30_0000 + i * 0x1000), "page {i} not reported");
    }
    assert!(
        !d.is_dirty(0x31_0000),
        "page after the written ones reported"
    );
    let again = vmm.dirty_pages().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        again.count() <= 2,
        "idle guest dirtied {} pages",
        again.count()
    );
}

#[test]
fn guest_writes_are_not_logged_while_dirty_logging_is_off() {
    let (mut vmm, rx) = boot(DIRTY16, 1, None);
    expect_byte(&rx, b'R');
    start_dirty16(&vmm);
    expect_byte(&rx, b'D');
    let d = vmm.dirty_pages().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !d.is_dirty(0x30_0000),
        "guest write logged with logging off"
    );
    assert!(
        d.is_dirty(DIRTY16_GO),
        "the VMM's own write is always logged"
    );
    // Turned on and off again, the log is quiet.
    vmm.set_dirty_logging(true)
        .unwrap_or_else(|e| panic!("{e}"));
    vmm.set_dirty_logging(false)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(vmm.dirty_pages().map(|d| d.count()).ok(), Some(0));
}

/// Lets [`DIRTY16`] go on from its wait.
fn start_dirty16(vmm: &Vmm) {
    vmm.guest_memory()
        .write_obj(1u8, GuestAddress(DIRTY16_GO))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn vmm_writes_show_up_in_dirty_pages() {
    let (vmm, rx) = boot(DIRTY16, 1, None);
    expect_byte(&rx, b'R');
    start_dirty16(&vmm);
    expect_byte(&rx, b'D');
    let _ = vmm.dirty_pages();
    vmm.guest_memory()
        .write_obj(0xdead_beef_u32, GuestAddress(0x50_0000))
        .unwrap_or_else(|e| panic!("{e}"));
    let d = vmm.dirty_pages().unwrap_or_else(|e| panic!("{e}"));
    assert!(d.is_dirty(0x50_0000));
    assert_eq!(
        d.ranges()
            .iter()
            .filter(|r| r.guest_addr == 0x50_0000)
            .count(),
        1
    );
}

#[test]
fn i8042_reset_and_triple_fault_end_as_reboot() {
    for prog in [I8042_RESET, TRIPLE_FAULT] {
        let (mut vmm, _rx) = boot(prog, 1, None);
        let st = vmm.wait_timeout(Duration::from_secs(20));
        assert_eq!(st, Some(ExitStatus::Reboot));
    }
}

fn snapshot_counter(dir: &std::path::Path, shared: Option<PathBuf>) -> (PathBuf, PathBuf, u64) {
    let (mut vmm, rx) = boot(COUNT, 2, shared.clone());
    expect_byte(&rx, b'R');
    wait_counter_past(&vmm, 1000);
    vmm.pause().unwrap_or_else(|e| panic!("{e}"));
    let saved = counter(&vmm);
    let state = dir.join("state");
    let mem = shared.unwrap_or_else(|| dir.join("mem"));
    vmm.snapshot(&state, &mem).unwrap_or_else(|e| panic!("{e}"));
    vmm.stop();
    (state, mem, saved)
}

fn resume_and_check(state: &std::path::Path, memory: RestoreMemory, saved: u64) -> Vmm {
    let (out, _rx) = console();
    let mut vmm = Vmm::restore(state, memory, Some(out)).unwrap_or_else(|e| panic!("restore: {e}"));
    assert!(vmm.is_paused());
    assert_eq!(counter(&vmm), saved, "memory differs from the snapshot");
    vmm.resume().unwrap_or_else(|e| panic!("{e}"));
    wait_counter_past(&vmm, saved);
    vmm
}

#[test]
fn snapshot_restores_twice_in_private_mode() {
    let dir = tmpdir("private");
    let (state, mem, saved) = snapshot_counter(&dir, None);
    for _ in 0..2 {
        let mut vmm = resume_and_check(&state, RestoreMemory::Private(mem.clone()), saved);
        vmm.stop();
    }
    // Private mode never wrote the file back.
    let bytes = std::fs::read(&mem).unwrap_or_default();
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[COUNTER as usize..COUNTER as usize + 8]);
    assert_eq!(u64::from_le_bytes(word), saved);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shared_memory_suspends_in_place() {
    let dir = tmpdir("shared");
    let memfile = dir.join("mem");
    let (state, mem, saved) = snapshot_counter(&dir, Some(memfile.clone()));
    assert_eq!(mem, memfile);
    let mut vmm = resume_and_check(&state, RestoreMemory::Shared(mem.clone()), saved);
    // Suspend again in place and check the file holds the newer counter.
    vmm.pause().unwrap_or_else(|e| panic!("{e}"));
    let now = counter(&vmm);
    vmm.snapshot(&state, &mem).unwrap_or_else(|e| panic!("{e}"));
    vmm.stop();
    drop(vmm);
    let (out, _rx) = console();
    let vmm = Vmm::restore(&state, RestoreMemory::Shared(mem), Some(out))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(counter(&vmm), now);
    assert!(now > saved);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn state_only_snapshot_restores_with_the_live_shared_memory_file() {
    let dir = tmpdir("state-only");
    let mem = dir.join("mem");
    let state = dir.join("state");
    let (mut vmm, rx) = boot(COUNT, 1, Some(mem.clone()));
    expect_byte(&rx, b'R');
    wait_counter_past(&vmm, 0);
    assert!(matches!(
        vmm.snapshot_state(&state),
        Err(drafter_vmm::Error::NotPaused)
    ));
    vmm.pause().unwrap_or_else(|e| panic!("{e}"));
    let saved = counter(&vmm);
    vmm.snapshot_state(&state).unwrap_or_else(|e| panic!("{e}"));
    // The VM still holds its mapping: the file is the live page cache.
    let mut restored = resume_and_check(&state, RestoreMemory::Shared(mem.clone()), saved);
    restored.stop();
    vmm.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

struct Counting(
    FilePageProvider,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
);
impl PageProvider for Counting {
    fn fill(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.fill(offset, buf)
    }
}

#[test]
fn userfaultfd_restore_serves_pages_from_the_provider() {
    let dir = tmpdir("uffd");
    let (state, mem, saved) = snapshot_counter(&dir, None);
    let faults = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let file = std::fs::File::open(&mem).unwrap_or_else(|e| panic!("{e}"));
    let provider = Counting(FilePageProvider::new(file), faults.clone());
    let mut vmm = resume_and_check(&state, RestoreMemory::Userfault(Box::new(provider)), saved);
    vmm.stop();
    assert!(faults.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn damaged_state_files_are_refused_with_a_clear_error() {
    let dir = tmpdir("damaged");
    let (state, mem, _) = snapshot_counter(&dir, None);
    let good = std::fs::read(&state).unwrap_or_default();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..good.len() / 2].to_vec(), "truncated"),
        (
            {
                let mut b = good.clone();
                let n = b.len() - 100;
                b[n] ^= 0x40;
                b
            },
            "corrupted",
        ),
        (
            {
                let mut b = good.clone();
                b[8] = 99;
                b
            },
            "format version 99",
        ),
        (b"hello".to_vec(), "not a drafter VM state file"),
    ];
    for (bytes, want) in cases {
        let bad = dir.join("bad");
        std::fs::write(&bad, &bytes).unwrap_or_else(|e| panic!("{e}"));
        let err = Vmm::restore(&bad, RestoreMemory::Private(mem.clone()), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(want), "{want}: got {err:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
