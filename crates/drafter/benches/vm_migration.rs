//! VM migration bench on the host's /dev/kvm: prints figures, asserts
//! nothing.
//!
//! A tiny guest counts in memory while `--fill` MiB of its RAM hold random
//! data. Each run boots it, migrates it over loopback TCP to a destination in
//! this process and records the source's downtime (suspend hook to authority
//! hand-over), the VM's downtime (pause on the source to resume on the
//! destination), the total time and bytes sent. Side by side, the baseline:
//! stop-and-copy on one host (pause, dump state and memory, restore from the
//! dump, resume), the least any non-live move costs.
//!
//! Run: `cargo bench -p drafter --bench vm_migration -- --runs 5 --memory 256 --fill 64`.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drafter::migration::{
    DestinationOptions, Resume, SourceOptions, VmMigrationDestination, VmMigrationSource,
};
use drafter_storage::{MigrationConfig, Secret};
use drafter_vmm::{BuildOptions, RestoreMemory, VmConfig, Vmm};
use vm_memory::{Bytes, GuestAddress};

/// `loop { inc qword [0x200000] }`.
const COUNT: &[u8] = &[
    0x48, 0xc7, 0xc7, 0x00, 0x00, 0x20, 0x00, // mov rdi, 0x200000
    0x48, 0xff, 0x07, // inc qword [rdi]
    0xeb, 0xfb, // jmp -5
];

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn boot(dir: &Path, memory_mib: u64, fill_mib: u64) -> (Vmm, PathBuf) {
    let mut c = VmConfig::new("/nonexistent-flat-program");
    c.memory_mib = memory_mib;
    c.serial.stdout = false;
    let mem = dir.join("mem");
    let _ = std::fs::remove_file(&mem);
    let vmm = Vmm::boot(
        c,
        BuildOptions {
            console: Some(Box::new(std::io::sink())),
            shared_memory_file: Some(mem.clone()),
            flat_program: Some(COUNT.to_vec()),
        },
    )
    .unwrap_or_else(|e| panic!("boot: {e}"));
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for mib in 0..fill_mib {
        for w in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        // From 16 MiB up, clear of the program and its counter.
        let addr = GuestAddress((16 + mib) << 20);
        vmm.guest_memory()
            .write_slice(&chunk, addr)
            .unwrap_or_else(|e| panic!("fill: {e}"));
    }
    (vmm, mem)
}

struct Sample {
    source_downtime: f64,
    vm_downtime: f64,
    total: f64,
    bytes: f64,
}

fn migrate_once(dir: &Path, memory: u64, fill: u64, resume: Resume, block: u32) -> Sample {
    let (vmm, _) = boot(dir, memory, fill);
    let vmm = Arc::new(Mutex::new(vmm));
    let mut opts = SourceOptions {
        migration: MigrationConfig {
            secret: Secret::new("bench"),
            ..MigrationConfig::default()
        },
        ..SourceOptions::default()
    };
    opts.memory.block_size = block;
    opts.memory.cycle_throttle = Duration::from_millis(100);
    let source = VmMigrationSource::new(vmm.clone(), opts).unwrap_or_else(|e| panic!("{e}"));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let dst = dir.join("dst");
    let dest = std::thread::spawn(move || {
        let link = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{e}"));
        let mut options = DestinationOptions::new(dst);
        options.resume = resume;
        options.migration.secret = Secret::new("bench");
        options.console = Some(Box::new(std::io::sink()));
        let mut incoming =
            VmMigrationDestination::accept(link, options).unwrap_or_else(|e| panic!("{e}"));
        let report = incoming.finish_transfer().unwrap_or_else(|e| panic!("{e}"));
        incoming.vmm().stop();
        report
    });
    let (link, _) = listener.accept().unwrap_or_else(|e| panic!("{e}"));
    let report = source.migrate(link).unwrap_or_else(|e| panic!("{e}"));
    let incoming = dest.join().unwrap_or_else(|_| panic!("destination"));
    Sample {
        source_downtime: report.storage.downtime_millis,
        vm_downtime: incoming.vm_downtime_millis.unwrap_or(f64::NAN),
        total: report.storage.total_millis,
        bytes: report.storage.bytes_sent as f64,
    }
}

/// Stop-and-copy on one host: pause, dump, restore, resume.
fn stop_and_copy_once(dir: &Path, memory: u64, fill: u64) -> f64 {
    let (mut vmm, _) = boot(dir, memory, fill);
    let (state, dump) = (dir.join("cold-state"), dir.join("cold-mem"));
    let start = Instant::now();
    vmm.pause().unwrap_or_else(|e| panic!("{e}"));
    vmm.snapshot(&state, &dump)
        .unwrap_or_else(|e| panic!("{e}"));
    vmm.stop();
    let mut restored = Vmm::restore(
        &state,
        RestoreMemory::Private(dump.clone()),
        Some(Box::new(std::io::sink())),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    restored.resume().unwrap_or_else(|e| panic!("{e}"));
    let ms = start.elapsed().as_secs_f64() * 1e3;
    restored.stop();
    ms
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let runs = arg("--runs", 5);
    let memory = arg("--memory", 256);
    let fill = arg("--fill", 64).min(memory.saturating_sub(32));
    let dir = std::env::temp_dir().join(format!("drafter-vm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    println!("VM migration bench: {memory} MiB guest, {fill} MiB random, {runs} runs, medians");
    let cold = median(
        (0..runs)
            .map(|_| stop_and_copy_once(&dir, memory, fill))
            .collect(),
    );
    println!("  stop-and-copy on one host (baseline)   downtime {cold:8.1} ms");
    for (label, resume, block) in [
        ("pre-copy, 64 KiB blocks", Resume::AfterComplete, 64 * 1024),
        ("pre-copy, 4 KiB blocks", Resume::AfterComplete, 4096),
        (
            "resume at authority, 64 KiB",
            Resume::AtAuthority,
            64 * 1024,
        ),
    ] {
        let samples: Vec<Sample> = (0..runs)
            .map(|_| migrate_once(&dir, memory, fill, resume, block))
            .collect();
        let m = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        let vm = m(|s| s.vm_downtime);
        println!(
            "  {label:<38} downtime {vm:8.1} ms (source {:6.1} ms), total {:7.1} ms, {:6.1} MiB sent, {:5.1}x less downtime than the baseline",
            m(|s| s.source_downtime),
            m(|s| s.total),
            m(|s| s.bytes) / (1u64 << 20) as f64,
            cold / vm
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
