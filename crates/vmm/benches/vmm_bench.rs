//! Inside the lab (`cargo xtask lab -- <this bench binary>`): boot-to-marker of
//! drafter-vmm vs `qemu-system-x86_64 -M microvm -enable-kvm` on the same kernel
//! and initramfs, snapshot-restore-to-running time, and VMM RSS beyond guest RAM.
//! Prints medians and ratios; asserts nothing.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drafter_vmm::{BuildOptions, RestoreMemory, VmConfig, Vmm};
use support::{guest_dir, scratch, write_initramfs, Console, MARKER};
use vm_memory::GuestMemoryBackend;

const RUNS: usize = 3;
const ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ours(init: &std::path::Path) -> Duration {
    let mut c = VmConfig::new(guest_dir().join("vmlinuz"));
    c.initramfs = Some(init.to_path_buf());
    c.memory_mib = 256;
    c.boot_args = ARGS.into();
    let (mut console, out) = Console::new();
    let t = Instant::now();
    let mut vmm = match Vmm::boot(
        c,
        BuildOptions {
            console: Some(out),
            ..Default::default()
        },
    ) {
        Ok(v) => v,
        Err(e) => panic!("boot: {e}"),
    };
    console.wait_for(MARKER, Duration::from_secs(300));
    let d = t.elapsed();
    vmm.stop();
    d
}

fn qemu(init: &std::path::Path) -> Option<Duration> {
    let t = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm",
            "-enable-kvm",
            "-cpu",
            "host",
            "-m",
            "256",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(guest_dir().join("vmlinuz"))
        .arg("-initrd")
        .arg(init)
        .args(["-append", ARGS])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let out = child.stdout.take()?;
    let mut found = None;
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        if line.contains(MARKER) {
            found = Some(t.elapsed());
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    found
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Resident KiB of the mapping of this process that starts at `start`.
fn mapping_rss_kib(start: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut inside = false;
    for l in smaps.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if let Some((a, _)) = first.split_once('-') {
            if let Ok(a) = u64::from_str_radix(a, 16) {
                inside = a == start;
                continue;
            }
        }
        if inside && l.starts_with("Rss:") {
            return l
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    0
}

fn main() {
    let dir = scratch("bench");
    let init = write_initramfs(&dir, "sleep 1000");
    let ours_t: Vec<Duration> = (0..RUNS).map(|_| ours(&init)).collect();
    let qemu_t: Vec<Duration> = (0..RUNS).filter_map(|_| qemu(&init)).collect();
    let o = median(ours_t);
    println!("boot-to-marker drafter-vmm median: {o:?}");
    if qemu_t.is_empty() {
        println!("boot-to-marker qemu microvm: unavailable");
    } else {
        let q = median(qemu_t);
        println!("boot-to-marker qemu microvm median: {q:?}");
        println!(
            "ratio drafter-vmm / qemu: {:.2}",
            o.as_secs_f64() / q.as_secs_f64()
        );
    }

    // Snapshot a booted guest, then time restore-to-running (private mapping).
    let mut c = VmConfig::new(guest_dir().join("vmlinuz"));
    c.initramfs = Some(init.clone());
    c.memory_mib = 256;
    c.boot_args = ARGS.into();
    let (mut console, out) = Console::new();
    let before = rss_kib();
    let mut vmm = match Vmm::boot(
        c,
        BuildOptions {
            console: Some(out),
            ..Default::default()
        },
    ) {
        Ok(v) => v,
        Err(e) => panic!("boot: {e}"),
    };
    console.wait_for(MARKER, Duration::from_secs(300));
    let guest_resident: u64 = vmm
        .guest_memory()
        .iter()
        .map(|r| mapping_rss_kib(r.as_ptr() as u64))
        .sum();
    let after = rss_kib();
    println!(
        "VMM RSS beyond guest RAM (approx., guest-touched pages subtracted): {} KiB",
        after.saturating_sub(before).saturating_sub(guest_resident)
    );
    let (state, mem) = (dir.join("state"), dir.join("mem"));
    if vmm.pause().is_ok() && vmm.snapshot(&state, &mem).is_ok() {
        vmm.stop();
        let mut times = Vec::new();
        for _ in 0..RUNS {
            let t = Instant::now();
            let Ok(mut v) = Vmm::restore(&state, RestoreMemory::Private(mem.clone()), None) else {
                break;
            };
            let _ = v.resume();
            times.push(t.elapsed());
            v.stop();
        }
        if !times.is_empty() {
            println!("snapshot-restore-to-running median: {:?}", median(times));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
