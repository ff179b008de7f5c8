//! Post-copy restore when the page provider fails: a page that cannot be fetched
//! ends the VM with an error naming its offset and is never replaced by zeros; a
//! page that fails for a while is retried and served with its real content.
//! Flat-program VMs on the host's /dev/kvm, restored with `RestoreMemory::Userfault`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Duration;

use drafter_vmm::memory::PageProvider;
use drafter_vmm::uffd::{FilePageProvider, RetryPolicy};
use drafter_vmm::{BuildOptions, ExitStatus, RestoreMemory, VmConfig, Vmm};

mod counting_guest;
use counting_guest::console;

/// The page the guest polls until it is non-zero.
const FLAG: u64 = 0x60_0000;
/// The page whose first byte the guest prints once the flag is set.
const MARKER: u64 = 0x70_0000;
/// What the marker page holds in the snapshot.
const MARKER_BYTE: u8 = 0x5a;

/// `out 0x3f8, 'R'`; spins until the byte at `FLAG` is non-zero; prints the
/// byte at `MARKER`; halts forever.
const PRINT_MARKER: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'R', // mov al, 'R'
    0xee, // out dx, al
    0x48, 0xc7, 0xc7, 0x00, 0x00, 0x60, 0x00, // mov rdi, FLAG
    0x80, 0x3f, 0x00, // cmp byte [rdi], 0
    0x74, 0xfb, // jz -5
    0x48, 0xc7, 0xc6, 0x00, 0x00, 0x70, 0x00, // mov rsi, MARKER
    0x8a, 0x06, // mov al, [rsi]
    0xee, // out dx, al
    0xf4, // hlt
    0xeb, 0xfd, // jmp -3
];

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-uffd-fail-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

/// Snapshots the guest while it spins on the flag, then sets the flag and the
/// marker in the memory file: a restored guest goes straight for the marker page.
fn snapshot(dir: &Path) -> (PathBuf, PathBuf) {
    let (out, rx) = console();
    let mut config = VmConfig::new("/nonexistent-flat-program");
    config.vcpus = 1;
    config.memory_mib = 32;
    let mut vmm = Vmm::boot(
        config,
        BuildOptions {
            console: Some(out),
            shared_memory_file: None,
            flat_program: Some(PRINT_MARKER.to_vec()),
        },
    )
    .unwrap_or_else(|e| panic!("boot: {e}"));
    let r = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("guest never started: {e}"));
    assert_eq!(r, b'R');
    vmm.pause().unwrap_or_else(|e| panic!("{e}"));
    let (state, mem) = (dir.join("state"), dir.join("mem"));
    vmm.snapshot(&state, &mem)
        .unwrap_or_else(|e| panic!("snapshot: {e}"));
    vmm.stop();
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&mem)
        .unwrap_or_else(|e| panic!("{e}"));
    // Below 3 GiB the memory file offset is the guest-physical address.
    f.write_all_at(&[1], FLAG).unwrap_or_else(|e| panic!("{e}"));
    f.write_all_at(&[MARKER_BYTE], MARKER)
        .unwrap_or_else(|e| panic!("{e}"));
    (state, mem)
}

/// Serves pages from the memory file, but fails the marker page `failures`
/// times (`None`: always), scribbling over the buffer each time.
struct FailingMarker {
    file: FilePageProvider,
    failures: Option<u32>,
    attempts: Arc<AtomicU64>,
    deadline: Duration,
}

impl PageProvider for FailingMarker {
    fn fill(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if offset == MARKER {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            let fail = match &mut self.failures {
                None => true,
                Some(0) => false,
                Some(n) => {
                    *n -= 1;
                    true
                }
            };
            if fail {
                buf.fill(0);
                return Err(std::io::Error::other("source peer unreachable"));
            }
        }
        self.file.fill(offset, buf)
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            deadline: self.deadline,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(50),
        }
    }
}

/// Restores the snapshot with the failing provider and resumes it.
fn restore(
    dir: &Path,
    failures: Option<u32>,
    deadline: Duration,
) -> (Vmm, Receiver<u8>, Arc<AtomicU64>) {
    let (state, mem) = snapshot(dir);
    let attempts = Arc::new(AtomicU64::new(0));
    let provider = FailingMarker {
        file: FilePageProvider::new(std::fs::File::open(&mem).unwrap_or_else(|e| panic!("{e}"))),
        failures,
        attempts: attempts.clone(),
        deadline,
    };
    let (out, rx) = console();
    let mut vmm = Vmm::restore(
        &state,
        RestoreMemory::Userfault(Box::new(provider)),
        Some(out),
    )
    .unwrap_or_else(|e| panic!("restore: {e}"));
    vmm.resume().unwrap_or_else(|e| panic!("{e}"));
    (vmm, rx, attempts)
}

/// Runs `f` on its own thread; fails the test if it does not finish in time
/// (a teardown deadlock would otherwise hang the test binary).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|e| panic!("did not finish within {secs} s: {e}"))
}

#[test]
fn a_page_the_provider_never_delivers_ends_the_vm_naming_its_offset() {
    let dir = tmpdir("always");
    let d = dir.clone();
    let (status, serial, attempts) = within(60, move || {
        let (mut vmm, rx, attempts) = restore(&d, None, Duration::from_millis(500));
        // The VM ends on its own once the deadline passes; `wait` also stops the
        // vCPU that is blocked on the missing page.
        let status = vmm.wait_timeout(Duration::from_secs(20));
        drop(vmm);
        // Every console byte the guest ever wrote (the console is gone now).
        let serial: Vec<u8> = rx.iter().collect();
        (status, serial, attempts.load(Ordering::SeqCst))
    });
    let Some(ExitStatus::Error(msg)) = status else {
        panic!("VM did not end with an error: {status:?}")
    };
    assert!(
        msg.starts_with(
            "guest page at offset 0x700000 could not be fetched: source peer unreachable"
        ),
        "{msg}"
    );
    assert!(attempts >= 3, "the provider was asked {attempts} times");
    // The guest never ran past the missing page: nothing printed, in
    // particular not the zero a zero-filled page would have given.
    assert!(serial.is_empty(), "guest printed {serial:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_page_the_provider_delivers_on_retry_has_its_real_content() {
    let dir = tmpdir("transient");
    let d = dir.clone();
    let (byte, running, attempts, stopped) = within(60, move || {
        let (mut vmm, rx, attempts) = restore(&d, Some(2), Duration::from_millis(500));
        let byte = rx.recv_timeout(Duration::from_secs(20));
        let running = vmm.wait_timeout(Duration::from_millis(200)).is_none();
        let stopped = vmm.stop();
        (byte, running, attempts.load(Ordering::SeqCst), stopped)
    });
    assert_eq!(byte, Ok(MARKER_BYTE));
    assert!(running, "the VM ended after a transient failure");
    assert_eq!(attempts, 3);
    assert_eq!(stopped, ExitStatus::Stopped);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stopping_a_vm_blocked_on_a_page_being_retried_is_prompt() {
    let dir = tmpdir("stop");
    let d = dir.clone();
    let (status, serial, attempts) = within(60, move || {
        // The provider would be retried for ten minutes.
        let (mut vmm, rx, attempts) = restore(&d, None, Duration::from_secs(600));
        while attempts.load(Ordering::SeqCst) < 2 {
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = vmm.stop();
        drop(vmm);
        let serial: Vec<u8> = rx.iter().collect();
        (status, serial, attempts.load(Ordering::SeqCst))
    });
    assert_eq!(status, ExitStatus::Stopped);
    assert!(serial.is_empty(), "guest printed {serial:?}");
    assert!(attempts >= 2);
    let _ = std::fs::remove_dir_all(&dir);
}
