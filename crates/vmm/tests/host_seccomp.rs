//! Seccomp on the host: the vCPU filter kills a process whose filtered
//! thread calls `execve`, naming the call in its log (and the same child
//! without the filter runs the program, so the check can fail); the main
//! filter lets threads start but kills a `fork`; a counting
//! guest runs, pauses, snapshots and restores with its vCPU threads under
//! the filter (the default policy), and `--no-seccomp`'s policy leaves them
//! unfiltered.

use std::process::Command;
use std::time::Duration;

use drafter_vmm::seccomp::{self, SeccompPolicy, ThreadKind};
use drafter_vmm::{BuildOptions, RestoreMemory, VmConfig, Vmm};

mod counting_guest;
use counting_guest::{console, counter, wait_counter_past, COUNT};

const CHILD_ENV: &str = "DRAFTER_SECCOMP_TEST_CHILD";

/// In a child process (see the tests below): a thread named "vcpu0"
/// installs the vCPU filter unless `CHILD_ENV` is `unfiltered`, then
/// calls execve(/bin/true) directly; with `main-fork`, the main filter is
/// installed, a thread started, then fork called. Does nothing in a normal
/// test run.
#[test]
fn child_thread_calls_execve() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    if mode == "main-fork" {
        seccomp::install_always(ThreadKind::Main).unwrap_or_else(|e| panic!("install: {e}"));
        // Threads still start (clone3 fails with ENOSYS, clone with
        // CLONE_THREAD is allowed)...
        let t = std::thread::spawn(|| 7);
        assert_eq!(t.join().ok(), Some(7));
        eprintln!("thread started under the main filter");
        // ...processes do not.
        // SAFETY: fork in a test child; the filter stops it before it runs.
        let pid = unsafe { libc::fork() };
        panic!("fork returned {pid}");
    }
    let t = std::thread::Builder::new()
        .name("vcpu0".into())
        .spawn(move || {
            if mode != "unfiltered" {
                seccomp::install_always(ThreadKind::Vcpu)
                    .unwrap_or_else(|e| panic!("install: {e}"));
            }
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: NUL-terminated path and argument/environment arrays
            // that outlive the call; on success the process image is
            // replaced, as the test intends.
            unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            panic!("execve returned: {}", std::io::Error::last_os_error());
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = t.join();
    panic!("the child thread came back");
}

fn run_child(mode: &str) -> std::process::Output {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    Command::new(exe)
        .args(["--exact", "child_thread_calls_execve", "--nocapture"])
        .env(CHILD_ENV, mode)
        .output()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_vcpu_filter_kills_a_process_whose_thread_calls_execve_and_names_the_call() {
    let out = run_child("filtered");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(seccomp::BAD_SYSCALL_EXIT),
        "status {:?}, stderr: {stderr}",
        out.status
    );
    let line = stderr
        .lines()
        .find(|l| l.contains("seccomp"))
        .unwrap_or_else(|| panic!("no seccomp line in: {stderr}"));
    assert_eq!(
        line,
        "drafter: seccomp: thread vcpu0 (vcpu filter) made forbidden system call 59 (execve); \
         killing the process"
    );
    // Without the filter the same child becomes /bin/true and exits 0.
    let out = run_child("unfiltered");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_main_filter_lets_threads_start_but_kills_a_fork_naming_clone() {
    let out = run_child("main-fork");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(seccomp::BAD_SYSCALL_EXIT),
        "status {:?}, stderr: {stderr}",
        out.status
    );
    assert!(
        stderr.contains("thread started under the main filter"),
        "{stderr}"
    );
    assert!(
        stderr.contains("(main filter) made forbidden system call 56 (clone)"),
        "{stderr}"
    );
}

/// The `Seccomp:` mode of this process's threads named `name`.
fn seccomp_modes(name: &str) -> Vec<String> {
    let mut modes = Vec::new();
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        if let Some(l) = status.lines().find(|l| l.starts_with("Seccomp:")) {
            modes.push(l["Seccomp:".len()..].trim().to_string());
        }
    }
    modes
}

fn boot(dir: &std::path::Path) -> Vmm {
    let mut c = VmConfig::new("/nonexistent-flat-program");
    c.vcpus = 1;
    c.memory_mib = 32;
    let (out, rx) = console();
    let vmm = Vmm::boot(
        c,
        BuildOptions {
            console: Some(out),
            shared_memory_file: Some(dir.join("mem")),
            flat_program: Some(COUNT.to_vec()),
        },
    )
    .unwrap_or_else(|e| panic!("boot: {e}"));
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)).ok(), Some(b'R'));
    vmm
}

/// Both checks share the process-wide policy, so they run in one test.
#[test]
fn a_counting_guest_runs_snapshots_and_restores_under_the_vcpu_filter_and_not_without() {
    let dir = std::env::temp_dir().join(format!("vmm-seccomp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));

    seccomp::set_policy(SeccompPolicy::DEFAULT);
    let mut vmm = boot(&dir);
    let c = wait_counter_past(&vmm, 1000);
    assert_eq!(seccomp_modes("vcpu0"), vec!["2".to_string()]);
    vmm.pause().unwrap_or_else(|e| panic!("pause: {e}"));
    let state = dir.join("state");
    vmm.snapshot_state(&state)
        .unwrap_or_else(|e| panic!("snapshot: {e}"));
    vmm.resume().unwrap_or_else(|e| panic!("resume: {e}"));
    wait_counter_past(&vmm, c + 1000);
    vmm.pause().unwrap_or_else(|e| panic!("pause: {e}"));
    let saved = counter(&vmm);
    vmm.stop();
    drop(vmm);

    let (out, _rx) = console();
    let mut restored = Vmm::restore(&state, RestoreMemory::Shared(dir.join("mem")), Some(out))
        .unwrap_or_else(|e| panic!("restore: {e}"));
    restored.resume().unwrap_or_else(|e| panic!("resume: {e}"));
    wait_counter_past(&restored, saved);
    assert_eq!(seccomp_modes("vcpu0"), vec!["2".to_string()]);
    restored.stop();
    drop(restored);

    // --no-seccomp: the vCPU thread runs unfiltered.
    seccomp::set_policy(SeccompPolicy::OFF);
    let vmm = boot(&dir);
    wait_counter_past(&vmm, 0);
    assert_eq!(seccomp_modes("vcpu0"), vec!["0".to_string()]);
    drop(vmm);
    seccomp::set_policy(SeccompPolicy::DEFAULT);
    let _ = std::fs::remove_dir_all(&dir);
}
