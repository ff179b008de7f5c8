//! `Vmm::set_throttle` on the host's /dev/kvm: a throttled counting guest
//! counts clearly slower per unit of wall time, and pause, snapshot and
//! resume work while it is throttled.

use std::time::{Duration, Instant};

use drafter_vmm::{BuildOptions, VmConfig, Vmm};

mod counting_guest;
use counting_guest::{console, counter, wait_counter_past, COUNT};

fn boot() -> Vmm {
    let mut c = VmConfig::new("/nonexistent-flat-program");
    c.vcpus = 1;
    c.memory_mib = 32;
    let (out, _rx) = console();
    Vmm::boot(
        c,
        BuildOptions {
            console: Some(out),
            shared_memory_file: None,
            flat_program: Some(COUNT.to_vec()),
        },
    )
    .unwrap_or_else(|e| panic!("boot: {e}"))
}

/// Counter increments per second over a window of wall time.
fn rate(vmm: &Vmm, window: Duration) -> f64 {
    let (c0, t0) = (counter(vmm), Instant::now());
    std::thread::sleep(window);
    let (c1, t1) = (counter(vmm), Instant::now());
    c1.saturating_sub(c0) as f64 / (t1 - t0).as_secs_f64()
}

#[test]
fn throttle_slows_the_guest_and_pause_snapshot_resume_still_work() {
    let mut vmm = boot();
    wait_counter_past(&vmm, 0);
    let window = Duration::from_millis(600);
    let free1 = rate(&vmm, window);
    vmm.set_throttle(80).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(vmm.throttle(), 80);
    let throttled = rate(&vmm, window);
    vmm.set_throttle(0).unwrap_or_else(|e| panic!("{e}"));
    let free2 = rate(&vmm, window);
    let free = (free1 + free2) / 2.0;
    eprintln!("counter rate: free {free1:.0}/s and {free2:.0}/s, throttled 80 % {throttled:.0}/s");
    assert!(
        free > 0.0 && throttled > 0.0,
        "the guest must make progress"
    );
    assert!(
        throttled < 0.6 * free,
        "throttled rate {throttled:.0}/s not clearly below free {free:.0}/s"
    );

    // Pause, snapshot and resume while throttled.
    vmm.set_throttle(80).unwrap_or_else(|e| panic!("{e}"));
    vmm.pause().unwrap_or_else(|e| panic!("pause: {e}"));
    assert_eq!(vmm.throttle(), 0, "pausing ends the throttle");
    let frozen = counter(&vmm);
    let dir = std::env::temp_dir().join(format!("vmm-throttle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    vmm.snapshot(&dir.join("state"), &dir.join("memory"))
        .unwrap_or_else(|e| panic!("snapshot: {e}"));
    assert_eq!(counter(&vmm), frozen, "guest ran while paused");
    vmm.resume().unwrap_or_else(|e| panic!("resume: {e}"));
    wait_counter_past(&vmm, frozen);
    // Throttled again, then paused and resumed repeatedly: never stuck.
    vmm.set_throttle(95).unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..5 {
        let c = counter(&vmm);
        wait_counter_past(&vmm, c);
        vmm.pause().unwrap_or_else(|e| panic!("pause: {e}"));
        vmm.resume().unwrap_or_else(|e| panic!("resume: {e}"));
        vmm.set_throttle(95).unwrap_or_else(|e| panic!("{e}"));
    }
    vmm.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
