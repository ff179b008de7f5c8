//! Linux-guest tests (issue 3 "Done when" 1–3, 5–8): the Debian cloud kernel and a
//! busybox initramfs built here, on real KVM inside the lab.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use drafter_vmm::config::DriveConfig;
use drafter_vmm::memory::PageProvider;
use drafter_vmm::uffd::FilePageProvider;
use drafter_vmm::{BuildOptions, CpuTemplate, ExitStatus, RestoreMemory, VmConfig, Vmm};
use sha2::Digest;
use support::{guest_dir, scratch, vmm_binary, write_initramfs, Console, MARKER};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const BOOT: Duration = Duration::from_secs(300);

fn config(initramfs: &Path, vcpus: u8) -> VmConfig {
    let mut c = VmConfig::new(guest_dir().join("vmlinuz"));
    c.initramfs = Some(initramfs.to_path_buf());
    c.vcpus = vcpus;
    c.memory_mib = 256;
    c.boot_args = "console=ttyS0 reboot=k panic=1 pci=off quiet".into();
    c
}

fn boot(c: VmConfig) -> (Vmm, Console) {
    let (console, out) = Console::new();
    let vmm = Vmm::boot(
        c,
        BuildOptions {
            console: Some(out),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("boot: {e}"));
    (vmm, console)
}

fn counter_body() -> &'static str {
    "i=0; while true; do i=$((i+1)); \
     echo 1 > /proc/sys/vm/drop_caches; d=$(head -c 8 /dev/vda); \
     echo COUNT $i $(cut -d' ' -f1 /proc/uptime) $d; sleep 0.3; done"
}

/// Parses `COUNT <n> <uptime> <disk>`.
fn parse_count(line: &str) -> (u64, f64, String) {
    let mut w = line
        .split_whitespace()
        .skip_while(|w| *w != "COUNT")
        .skip(1);
    let n = w.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    let up = w.next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
    (n, up, w.next().unwrap_or_default().to_string())
}

#[test]
#[ignore = "lab"]
fn lab_boots_with_1_and_2_vcpus_poweroff_and_reboot() {
    let dir = scratch("boot");
    // Each guest also runs with a CPU template, whose flags its
    // /proc/cpuinfo shows. The lab's guests never show AVX, template or
    // not: their kernel turns XSAVE off ("XSAVE consistency problem: size
    // 2696 != kernel_size 576" with no template too: CPUID 0xD EBX is not
    // updated after XSETBV in KVM nested under QEMU's TCG, cause not
    // confirmed), so the flags checked are ones that need no XSAVE. The
    // lab's TCG `-cpu max` has all of them, and AES, ADX, SMAP, PKU, SVM.
    let cases = [
        (1u8, "poweroff", ExitStatus::Poweroff, CpuTemplate::X86_64V2),
        (2u8, "reboot", ExitStatus::Reboot, CpuTemplate::X86_64V3),
    ];
    // One guest at a time: the lab has 2 vCPUs, and three nested vCPUs on them
    // starve each other into RCU stalls under TCG.
    for (n, how, want, template) in cases {
        let dir = dir.join(format!("v{n}"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let body = format!(
            "echo FLAGS,$(grep -m1 ^flags /proc/cpuinfo | cut -d: -f2 | tr -s ' ' ,),; \
             echo CPUS=$(grep -c ^processor /proc/cpuinfo); sleep 1; {how} -f"
        );
        let init = write_initramfs(&dir, &body);
        let mut c = config(&init, n);
        c.cpu_template = template;
        let (mut vmm, mut console) = boot(c);
        console.wait_for(MARKER, BOOT);
        let flags = console.wait_for("FLAGS,", BOOT);
        let (has, lacks): (&[&str], &[&str]) = match template {
            CpuTemplate::X86_64V2 => (
                &[
                    "pni", "ssse3", "sse4_2", "popcnt", "cx16", "lahf_lm", "smep",
                ],
                &[
                    "movbe", "f16c", "bmi1", "bmi2", "abm", "aes", "adx", "smap", "pku",
                ],
            ),
            _ => (
                &["sse4_2", "popcnt", "movbe", "f16c", "bmi1", "bmi2", "abm"],
                &["aes", "adx", "smap", "erms", "pku", "ospke", "svm", "sse4a"],
            ),
        };
        for f in has {
            assert!(
                flags.contains(&format!(",{f},")),
                "{template}: no {f}: {flags}"
            );
        }
        for f in lacks {
            assert!(
                !flags.contains(&format!(",{f},")),
                "{template}: {f}: {flags}"
            );
        }
        let line = console.wait_for("CPUS=", BOOT);
        assert_eq!(line.trim(), format!("CPUS={n}"));
        assert_eq!(vmm.wait_timeout(BOOT), Some(want));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "lab"]
fn lab_virtio_blk_reads_writes_and_honours_read_only() {
    let dir = scratch("blk");
    let vda: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let vda_sum = format!("{:x}", sha2::Sha256::digest(&vda));
    std::fs::write(dir.join("vda"), &vda).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join("vdb"), vec![0u8; 1 << 20]).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join("vdc"), vec![7u8; 1 << 20]).unwrap_or_else(|e| panic!("{e}"));
    let body = "echo VDA $(sha256sum /dev/vda); \
        yes DRAFTER | head -c 1048576 > /dev/vdb; sync; echo VDB-WRITTEN; \
        if echo x | dd of=/dev/vdc conv=fsync 2>/dev/null; then echo RO-ACCEPTED; else echo RO-REFUSED; fi";
    let init = write_initramfs(&dir, body);
    let mut c = config(&init, 1);
    for (name, ro) in [("vda", false), ("vdb", false), ("vdc", true)] {
        c.drives.push(DriveConfig {
            name: name.into(),
            path: dir.join(name),
            read_only: ro,
        });
    }
    let (mut vmm, mut console) = boot(c);
    let line = console.wait_for("VDA ", BOOT);
    assert!(
        line.contains(&vda_sum),
        "guest read {line}, host has {vda_sum}"
    );
    console.wait_for("VDB-WRITTEN", BOOT);
    let ro = console.wait_for("RO-", BOOT);
    assert!(ro.contains("RO-REFUSED"), "{ro}");
    assert_eq!(vmm.wait_timeout(BOOT), Some(ExitStatus::Poweroff));
    drop(vmm);
    let vdb = std::fs::read(dir.join("vdb")).unwrap_or_default();
    let want: Vec<u8> = b"DRAFTER\n".iter().copied().cycle().take(1 << 20).collect();
    assert!(vdb == want, "vdb does not hold the guest's pattern");
    assert!(std::fs::read(dir.join("vdc"))
        .unwrap_or_default()
        .iter()
        .all(|b| *b == 7));
    assert_eq!(std::fs::read(dir.join("vda")).unwrap_or_default(), vda);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "lab"]
fn lab_virtio_net_pings_the_tap() {
    let dir = scratch("net");
    let ns = format!("drafter-vmm-{}", std::process::id());
    let sh = |cmd: &str| {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .status()
            .map(|s| s.success());
        assert_eq!(ok.ok(), Some(true), "{cmd}");
    };
    sh(&format!("ip netns add {ns}"));
    sh(&format!(
        "ip -n {ns} tuntap add dev tap0 mode tap && ip -n {ns} addr add 10.213.0.1/30 dev tap0 && ip -n {ns} link set tap0 up"
    ));
    let body = "ip addr add 10.213.0.2/30 dev eth0; ip link set eth0 up; \
        if ping -c 3 -W 5 10.213.0.1; then echo PING-OK; else echo PING-FAILED; fi";
    let init = write_initramfs(&dir, body);
    let mut c = config(&init, 1);
    c.net = Some(drafter_vmm::config::NetConfig {
        tap: "tap0".into(),
        mac: Some("02:00:0a:d5:00:02".into()),
        netns: Some(ns.clone()),
    });
    let (mut vmm, mut console) = boot(c);
    let line = console.wait_for("PING-", BOOT);
    let _ = vmm.wait_timeout(BOOT);
    drop(vmm);
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    assert!(line.contains("PING-OK"), "{line}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `drafter-vmm` process and its stdout lines.
struct VmmProcess {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl VmmProcess {
    fn spawn(args: &[&std::ffi::OsStr]) -> VmmProcess {
        let mut child = Command::new(vmm_binary())
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn drafter-vmm: {e}"));
        let out = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                eprintln!("vmm| {line}");
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        VmmProcess { child, lines: rx }
    }

    fn restore(state: &Path, mem: &Path, mode: &str) -> VmmProcess {
        Self::spawn(&[
            "--restore-state".as_ref(),
            state.as_os_str(),
            "--restore-memory".as_ref(),
            mem.as_os_str(),
            "--memory-mode".as_ref(),
            mode.as_ref(),
        ])
    }

    fn wait_for(&self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(BOOT) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(e) => panic!("drafter-vmm printed no {needle:?}: {e}"),
            }
        }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for counter lines past `after`, checking uptime and disk keep going.
fn expect_continues(p: &VmmProcess, after: (u64, f64)) -> (u64, f64) {
    let mut last = after;
    for _ in 0..3 {
        let (n, up, disk) = parse_count(&p.wait_for("COUNT "));
        assert!(n > last.0, "counter went from {} to {n}: rebooted?", last.0);
        assert!(up >= last.1, "uptime went back from {} to {up}", last.1);
        assert_eq!(disk, "DISKDATA", "disk unreadable after restore");
        last = (n, up);
    }
    last
}

fn disk_with_marker(dir: &Path) -> DriveConfig {
    let mut d = b"DISKDATA".to_vec();
    d.resize(1 << 20, 0);
    std::fs::write(dir.join("disk"), d).unwrap_or_else(|e| panic!("{e}"));
    DriveConfig {
        name: "data".into(),
        path: dir.join("disk"),
        read_only: false,
    }
}

/// Boots the counter guest in-process, snapshots it mid-run; returns the files
/// and the last counter/uptime seen.
fn snapshot_counter(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, (u64, f64)) {
    let init = write_initramfs(dir, counter_body());
    let mut c = config(&init, 2);
    c.drives.push(disk_with_marker(dir));
    let (mut vmm, mut console) = boot(c);
    let mut last = (0, 0.0);
    while last.0 < 5 {
        let (n, up, _) = parse_count(&console.wait_for("COUNT ", BOOT));
        last = (n, up);
    }
    vmm.pause().unwrap_or_else(|e| panic!("{e}"));
    let (state, mem) = (dir.join("state"), dir.join("mem"));
    vmm.snapshot(&state, &mem).unwrap_or_else(|e| panic!("{e}"));
    vmm.stop();
    (state, mem, last)
}

#[test]
#[ignore = "lab"]
fn lab_snapshot_restores_in_a_new_process_twice() {
    let dir = scratch("snap");
    let (state, mem, last) = snapshot_counter(&dir);
    for _ in 0..2 {
        let p = VmmProcess::restore(&state, &mem, "private");
        expect_continues(&p, last);
        p.kill();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "lab"]
fn lab_shared_memory_suspend_in_place_survives_kill() {
    let dir = scratch("shared");
    let init = write_initramfs(&dir, counter_body());
    let mut c = config(&init, 1);
    c.drives.push(disk_with_marker(&dir));
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, serde_json::to_vec(&c).unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}"));
    let (mem, state, sock) = (dir.join("mem"), dir.join("state"), dir.join("ctl"));
    let p = VmmProcess::spawn(&[
        "--config".as_ref(),
        cfg.as_os_str(),
        "--memory-file".as_ref(),
        mem.as_os_str(),
        "--control-socket".as_ref(),
        sock.as_os_str(),
    ]);
    let mut last = (0, 0.0);
    while last.0 < 5 {
        let (n, up, _) = parse_count(&p.wait_for("COUNT "));
        last = (n, up);
    }
    let ctl = UnixStream::connect(&sock).unwrap_or_else(|e| panic!("control socket: {e}"));
    let mut w = ctl.try_clone().unwrap_or_else(|e| panic!("{e}"));
    let mut r = BufReader::new(ctl);
    for cmd in [
        "pause".to_string(),
        format!("snapshot {} {}", state.display(), mem.display()),
    ] {
        writeln!(w, "{cmd}").unwrap_or_else(|e| panic!("{e}"));
        let mut reply = String::new();
        r.read_line(&mut reply).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reply.trim(), "ok", "{cmd}");
    }
    // Whatever the guest printed before the pause is the last thing it did.
    while let Ok(l) = p.lines.recv_timeout(Duration::from_millis(500)) {
        if l.contains("COUNT ") {
            let (n, up, _) = parse_count(&l);
            last = (n, up);
        }
    }
    p.kill();
    let p = VmmProcess::restore(&state, &mem, "shared");
    expect_continues(&p, last);
    p.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

struct CountingPages(FilePageProvider, Arc<AtomicU64>);
impl PageProvider for CountingPages {
    fn fill(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.fill(offset, buf)
    }
}

#[test]
#[ignore = "lab"]
fn lab_userfaultfd_restore_serves_every_page_from_the_handler() {
    let dir = scratch("uffd");
    let (state, mem, last) = snapshot_counter(&dir);
    let faults = Arc::new(AtomicU64::new(0));
    let file = std::fs::File::open(&mem).unwrap_or_else(|e| panic!("{e}"));
    let provider = CountingPages(FilePageProvider::new(file), faults.clone());
    let (console, out) = Console::new();
    let mut vmm = Vmm::restore(
        &state,
        RestoreMemory::Userfault(Box::new(provider)),
        Some(out),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    vmm.resume().unwrap_or_else(|e| panic!("{e}"));
    let mut console = console;
    let mut prev = last;
    for _ in 0..3 {
        let (n, up, disk) = parse_count(&console.wait_for("COUNT ", BOOT));
        assert!(n > prev.0 && up >= prev.1 && disk == "DISKDATA");
        prev = (n, up);
    }
    vmm.stop();
    assert!(
        faults.load(Ordering::SeqCst) > 10,
        "handler saw {} faults",
        faults.load(Ordering::SeqCst)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "lab"]
fn lab_dirty_pages_cover_guest_writes_and_quiet_down() {
    let dir = scratch("dirty");
    let body = "echo READY; read go; \
        i=0; while [ $i -lt 64 ]; do yes DRAFTERPAGE-$i | head -c 4096 >> /tmp/pages; i=$((i+1)); done; \
        echo WROTE; sleep 1000";
    let init = write_initramfs(&dir, body);
    let mut c = config(&init, 1);
    c.serial.stdin = false;
    let (mut vmm, mut console) = boot(c);
    console.wait_for("READY", BOOT);
    vmm.set_dirty_logging(true)
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = vmm.dirty_pages().unwrap_or_else(|e| panic!("{e}"));
    vmm.serial_input(b"go\n");
    console.wait_for("WROTE", BOOT);
    let dirty = vmm.dirty_pages().unwrap_or_else(|e| panic!("{e}"));
    let quiet = vmm.dirty_pages().unwrap_or_else(|e| panic!("{e}"));
    // Find the pages holding the guest's pattern and check every one is reported.
    let mut found = 0;
    let mut page = vec![0u8; 4096];
    for r in vmm.guest_memory().iter() {
        let base = r.start_addr().0;
        for off in (0..r.len()).step_by(4096) {
            let _ = vmm
                .guest_memory()
                .read_slice(&mut page, GuestAddress(base + off));
            if page.starts_with(b"DRAFTERPAGE-") {
                found += 1;
                assert!(
                    dirty.is_dirty(base + off),
                    "pattern page at {:#x} not reported",
                    base + off
                );
            }
        }
    }
    assert!(found >= 64, "only {found} pattern pages in guest memory");
    assert!(dirty.count() >= 64);
    assert!(
        quiet.count() < 64,
        "idle guest dirtied {} pages",
        quiet.count()
    );
    drop(vmm);
    let _ = std::fs::remove_dir_all(&dir);
}
