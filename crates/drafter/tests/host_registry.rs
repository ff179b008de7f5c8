//! The registry and the terminator on the host's /dev/kvm with the tiny
//! counting guest: a package (state, memory, a drive, config, kernel) served
//! to two peers at once, a peer that drops mid-stream not disturbing
//! another, a terminator's outputs byte-identical to what it was sent, a VM
//! taken from a running source and resumed from the terminator's package,
//! the chain registry → peer → terminator carrying the package's files
//! along, a terminator that fails leaving the VM running on its source, and
//! a config whose CPU template is not the state's refused.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drafter::devices::{PeerPackage, RegistryDevices, TerminatorDevices};
use drafter::in_use::InUse;
use drafter::migration::{
    DestinationOptions, IncomingVm, Resume, SourceOptions, VmMigrationDestination,
    VmMigrationError, VmMigrationSource,
};
use drafter::package_config::{PackageConfig, PackageDrive, PACKAGE_FORMAT_VERSION};
use drafter::peer::{Origin, Peer, PeerOptions};
use drafter::registry::{Registry, RegistryOptions};
use drafter::terminator::{terminate, terminate_from, TerminatorError, TerminatorOptions};
use drafter_storage::{
    DestinationDevice, Initial, MemoryDevice, MigrationConfig, MigrationDestination, Secret,
};
use drafter_vmm::config::DriveConfig;
use drafter_vmm::{BuildOptions, ExitStatus, RestoreMemory, VmConfig, Vmm};
use serde_json::json;
use vm_memory::{Bytes, GuestAddress};

#[path = "../../vmm/tests/counting_guest/mod.rs"]
mod counting_guest;
use counting_guest::{
    counter, snapshot_counting_vm, wait_counter_past, ChanWriter, COUNT, COUNTER,
};

const SECRET: &str = "registry-secret";
const MEMORY_MIB: u64 = 32;

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("drafter-reg-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    ok(std::fs::create_dir_all(&d));
    d
}

fn migration() -> MigrationConfig {
    MigrationConfig {
        secret: Secret::new(SECRET),
        ..MigrationConfig::default()
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(seed) % 251) as u8)
        .collect()
}

/// A package of the counting guest, as the snapshotter lays one out.
struct Package {
    state: PathBuf,
    memory: PathBuf,
    disk: PathBuf,
    config: PathBuf,
    kernel: PathBuf,
    /// The guest's counter in the snapshot.
    counter: u64,
}

impl Package {
    fn make(dir: &Path) -> Package {
        let disk = dir.join("rootfs.ext4");
        ok(std::fs::write(&disk, pattern(700_000, 17)));
        let mut c = VmConfig::new("/nonexistent-flat-program");
        c.memory_mib = MEMORY_MIB;
        c.drives = vec![DriveConfig {
            name: "disk".into(),
            path: disk.clone(),
            read_only: false,
        }];
        let (state, memory) = snapshot_counting_vm(c, dir);
        let mut word = [0u8; 8];
        let f = ok(std::fs::File::open(&memory));
        ok(std::os::unix::fs::FileExt::read_exact_at(
            &f, &mut word, COUNTER,
        ));
        let config = dir.join("config.json");
        let pc = PackageConfig {
            format_version: PACKAGE_FORMAT_VERSION,
            agent_vsock_port: 26,
            liveness_vsock_port: 25,
            cpu_count: 1,
            memory_size: MEMORY_MIB,
            boot_args: String::new(),
            initramfs: false,
            drives: vec![PackageDrive {
                name: "disk".into(),
                read_only: false,
            }],
            vsock_cid: 3,
            network: None,
            cpu_template: "None".into(),
        };
        ok(std::fs::write(&config, pc.to_json()));
        let kernel = dir.join("vmlinux");
        ok(std::fs::write(&kernel, pattern(300_001, 31)));
        Package {
            state,
            memory,
            disk,
            config,
            kernel,
            counter: u64::from_le_bytes(word),
        }
    }

    fn registry(&self) -> Registry {
        ok(Registry::open(self.registry_options()))
    }

    fn registry_options(&self) -> RegistryOptions {
        let devices = json!([
            {"name": "state", "input": self.state},
            {"name": "memory", "input": self.memory, "blockSize": 4096},
            {"name": "kernel", "input": self.kernel},
            {"name": "disk", "input": self.disk},
            {"name": "config", "input": self.config},
        ]);
        RegistryOptions {
            devices: ok(RegistryDevices::parse(&devices.to_string())),
            migration: migration(),
            concurrency: 8,
            tls: None,
        }
    }
}

/// A relay between a client and the registry whose registry → client
/// direction stops after `hold_after` bytes until released: the client is
/// then held mid-stream.
struct Gate {
    client: UnixStream,
    registry: UnixStream,
    held: Receiver<()>,
    release: Sender<()>,
}

fn pump(mut from: UnixStream, mut to: UnixStream, hold: Option<(usize, Sender<()>, Receiver<()>)>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut moved = 0usize;
    let mut hold = hold;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            let _ = from.shutdown(Shutdown::Both);
            break;
        }
        moved += n;
        if hold.as_ref().is_some_and(|(at, _, _)| moved >= *at) {
            if let Some((_, held, release)) = hold.take() {
                let _ = held.send(());
                let _ = release.recv();
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn gate(hold_after: usize) -> Gate {
    let (client, c_relay) = ok(UnixStream::pair());
    let (registry, r_relay) = ok(UnixStream::pair());
    let (held_tx, held) = channel();
    let (release, release_rx) = channel();
    let (c2, r2) = (ok(c_relay.try_clone()), ok(r_relay.try_clone()));
    std::thread::spawn(move || pump(c_relay, r_relay, None));
    std::thread::spawn(move || pump(r2, c2, Some((hold_after, held_tx, release_rx))));
    Gate {
        client,
        registry,
        held,
        release,
    }
}

type Served = std::thread::JoinHandle<
    Result<drafter_storage::MigrationReport, drafter_storage::MigrationError>,
>;

fn serve(registry: &Arc<Registry>, link: UnixStream) -> Served {
    let r = registry.clone();
    std::thread::spawn(move || r.serve_connection(link))
}

type Receiving = std::thread::JoinHandle<Result<IncomingVm, VmMigrationError>>;

fn pull(link: UnixStream, dir: PathBuf, resume: Resume) -> Receiving {
    std::thread::spawn(move || {
        VmMigrationDestination::accept(
            link,
            DestinationOptions {
                resume,
                migration: migration(),
                console: Some(Box::new(std::io::sink())),
                ..DestinationOptions::new(dir)
            },
        )
    })
}

/// The pulled VM counts on from the package's snapshot, its drive and the
/// package's files arrived intact, and no downtime is claimed for it.
fn check_pulled(p: &Package, mut vm: IncomingVm, dir: &Path) {
    let first = counter(vm.vmm());
    assert!(
        first >= p.counter && p.counter > 1000,
        "pulled VM starts at {first}, the package at {}",
        p.counter
    );
    wait_counter_past(vm.vmm(), first + 1000);
    let report = ok(vm.finish_transfer());
    assert_eq!(report.vm_downtime_millis, None, "{}", report.to_json_line());
    assert!(std::fs::read(dir.join("drive-disk")).ok() == std::fs::read(&p.disk).ok());
    let files: Vec<(String, PathBuf)> = vm.files().to_vec();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["kernel", "config"]);
    for (name, path) in &files {
        let want = if name == "kernel" {
            &p.kernel
        } else {
            &p.config
        };
        assert!(
            std::fs::read(path).ok() == std::fs::read(want).ok(),
            "{name} differs"
        );
    }
}

#[test]
fn two_peers_pull_one_package_at_once_and_both_vms_count_on() {
    let dir = scratch("two");
    let p = Package::make(&dir);
    let registry = Arc::new(p.registry());
    let names: Vec<&str> = registry
        .devices()
        .iter()
        .map(|d| d.wire_name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "state",
            "drive/disk",
            "memory",
            "file/kernel",
            "file/config"
        ]
    );
    // A is held mid-stream while B is served from start to end.
    let a = gate(64 << 10);
    let served_a = serve(&registry, a.registry);
    let pulled_a = pull(a.client, dir.join("a"), Resume::AfterComplete);
    ok(a.held.recv_timeout(Duration::from_secs(20)));
    let (b_link, b_registry) = ok(UnixStream::pair());
    let served_b = serve(&registry, b_registry);
    let b = ok(pulled(pull(b_link, dir.join("b"), Resume::AtAuthority)));
    check_pulled(&p, b, &dir.join("b"));
    let report_b = ok(ok_join(served_b));
    assert!(!served_a.is_finished(), "A finished while it was held");
    ok(a.release.send(()));
    let vm_a = ok(pulled(pulled_a));
    check_pulled(&p, vm_a, &dir.join("a"));
    let report_a = ok(ok_join(served_a));
    for r in [&report_a, &report_b] {
        assert_eq!(r.mode, "post-copy");
        assert!(r.bytes_sent > 700_000, "{}", r.bytes_sent);
    }
    // B resumed at authority, so it may have asked for any blocks; A
    // (after complete) restores from the state at the offer, so it may have
    // asked for the state's blocks first, and for nothing else.
    let state_blocks = drafter::migration::DEFAULT_STATE_CAPACITY.div_ceil(4096);
    assert!(
        report_a.need_block_requests <= state_blocks,
        "A asked for {} blocks",
        report_a.need_block_requests
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn ok_join<T>(h: std::thread::JoinHandle<T>) -> T {
    h.join().unwrap_or_else(|_| panic!("thread panicked"))
}

fn pulled(h: Receiving) -> Result<IncomingVm, VmMigrationError> {
    ok_join(h)
}

#[test]
fn a_peer_dropping_mid_stream_does_not_disturb_another() {
    let dir = scratch("drop");
    let p = Package::make(&dir);
    let registry = Arc::new(p.registry());
    let a = gate(64 << 10);
    let served_a = serve(&registry, a.registry);
    let pulled_a = pull(a.client, dir.join("a"), Resume::AfterComplete);
    ok(a.held.recv_timeout(Duration::from_secs(20)));

    // B takes part of the stream, then goes away.
    let b = gate(32 << 10);
    let served_b = serve(&registry, b.registry);
    let session = ok(MigrationDestination::accept(
        b.client,
        &migration(),
        |info| {
            Ok(DestinationDevice {
                backing: Arc::new(
                    MemoryDevice::new(info.size, info.block_size).map_err(|e| e.to_string())?,
                ),
                initial: Initial::Zeroed,
            })
        },
    ));
    ok(b.held.recv_timeout(Duration::from_secs(20)));
    let missing: u64 = session
        .devices()
        .iter()
        .map(|(_, d)| d.missing_blocks())
        .sum();
    assert!(missing > 0, "B had everything before it dropped");
    session.abort();
    drop(session);
    ok(b.release.send(()));
    let err = ok_join(served_b).err();
    assert!(err.is_some(), "the dropped peer's pull did not fail");

    ok(a.release.send(()));
    let vm_a = ok(pulled(pulled_a));
    check_pulled(&p, vm_a, &dir.join("a"));
    ok(ok_join(served_a));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Terminator devices writing every device under `out`.
fn terminator_devices(out: &Path, names: &[&str]) -> TerminatorDevices {
    let list: Vec<serde_json::Value> = names
        .iter()
        .map(|n| json!({"name": n, "output": out.join(n)}))
        .collect();
    ok(TerminatorDevices::parse(
        &serde_json::Value::Array(list).to_string(),
    ))
}

fn terminator_options(devices: TerminatorDevices) -> TerminatorOptions {
    TerminatorOptions {
        devices,
        migration: migration(),
        progress: None,
        tls: None,
    }
}

/// The file names under `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_terminator_pulling_from_a_registry_writes_the_package_byte_for_byte() {
    let dir = scratch("reg-term");
    let p = Package::make(&dir);
    let registry = Arc::new(p.registry());
    let (link, theirs) = ok(UnixStream::pair());
    let served = serve(&registry, theirs);
    let out = dir.join("out/package");
    // A run of an old package there was killed: its mark goes with the
    // new package.
    ok(std::fs::create_dir_all(&out));
    ok(std::fs::write(
        drafter::in_use::mark_path(&out.join("state")),
        "pid 4242 since unix time 1",
    ));
    // kernel is not asked for: it is dropped, not written.
    let report = ok(terminate(
        link,
        terminator_options(terminator_devices(
            &out,
            &["state", "memory", "disk", "config"],
        )),
    ));
    ok(ok_join(served));
    for (name, want) in [
        ("state", &p.state),
        ("memory", &p.memory),
        ("disk", &p.disk),
        ("config", &p.config),
    ] {
        assert!(
            std::fs::read(out.join(name)).ok() == std::fs::read(want).ok(),
            "{name} is not byte-identical"
        );
    }
    assert_eq!(names_in(&out), ["config", "disk", "memory", "state"]);
    ok(InUse::check(&out.join("state")));
    assert_eq!(report.dropped, ["kernel"]);
    assert!(report.devices.iter().all(|d| d.source == "received"));
    assert!(report.bytes_received > 700_000);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Boots the counting guest with a writable drive and waits until it runs.
fn boot_with_disk(disk: &Path) -> Arc<Mutex<Vmm>> {
    let mut c = VmConfig::new("/nonexistent-flat-program");
    c.memory_mib = MEMORY_MIB;
    c.drives = vec![DriveConfig {
        name: "disk".into(),
        path: disk.to_path_buf(),
        read_only: false,
    }];
    let (tx, rx) = channel();
    let vmm = ok(Vmm::boot(
        c,
        BuildOptions {
            console: Some(Box::new(ChanWriter(tx))),
            shared_memory_file: None,
            flat_program: Some(COUNT.to_vec()),
        },
    ));
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)).ok(), Some(b'R'));
    wait_counter_past(&vmm, 1000);
    Arc::new(Mutex::new(vmm))
}

fn vm_source(vmm: &Arc<Mutex<Vmm>>, files: Vec<(String, PathBuf)>) -> VmMigrationSource {
    let mut o = SourceOptions {
        migration: migration(),
        files,
        ..SourceOptions::default()
    };
    o.memory.cycle_throttle = Duration::from_millis(50);
    ok(VmMigrationSource::new(vmm.clone(), o))
}

/// Resumes the terminator's package with the VMM directly (the counting
/// guest has no agent for `drafter-runner` to talk to) and checks that it
/// counts on from `at_stop`.
fn resume_package(out: &Path, at_stop: u64) {
    let mut vmm = ok(Vmm::restore(
        &out.join("state"),
        RestoreMemory::Shared(out.join("memory")),
        Some(Box::new(std::io::sink())),
    ));
    assert_eq!(
        counter(&vmm),
        at_stop,
        "the package does not hold the final memory"
    );
    ok(vmm.resume());
    wait_counter_past(&vmm, at_stop + 1000);
    vmm.stop();
}

#[test]
fn a_terminator_takes_a_running_vm_whose_package_then_resumes() {
    let dir = scratch("term");
    let disk = dir.join("disk.img");
    let data = pattern(1_000_000, 13);
    ok(std::fs::write(&disk, &data));
    let vmm = boot_with_disk(&disk);
    let source = vm_source(&vmm, Vec::new());
    let (link, theirs) = ok(UnixStream::pair());
    let out = dir.join("out");
    let taking = std::thread::spawn(move || source.migrate(theirs));
    let report = ok(terminate(
        link,
        terminator_options(terminator_devices(
            &out,
            &["state", "memory", "disk", "config"],
        )),
    ));
    ok(ok_join(taking));
    let at_stop = {
        let mut v = vmm.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(v.wait_timeout(Duration::ZERO), Some(ExitStatus::Stopped));
        let mut ram = vec![0u8; (MEMORY_MIB << 20) as usize];
        ok(v.guest_memory().read_slice(&mut ram, GuestAddress(0)));
        assert!(
            std::fs::read(out.join("memory")).ok().as_deref() == Some(&ram[..]),
            "memory output differs from the stopped VM's memory"
        );
        counter(&v)
    };
    assert!(std::fs::read(out.join("disk")).ok() == Some(data));
    let config = ok(PackageConfig::read(&out.join("config")));
    assert_eq!((config.cpu_count, config.memory_size), (1, MEMORY_MIB));
    assert_eq!(config.drives.len(), 1);
    let sources: Vec<(&str, &str)> = report
        .devices
        .iter()
        .map(|d| (d.name.as_str(), d.source.as_str()))
        .collect();
    assert_eq!(
        sources,
        [
            ("state", "received"),
            ("memory", "received"),
            ("disk", "received"),
            ("config", "from-state")
        ]
    );
    assert_eq!(names_in(&out), ["config", "disk", "memory", "state"]);
    resume_package(&out, at_stop);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn registry_to_peer_to_terminator_carries_the_package_files_along() {
    let dir = scratch("chain");
    let p = Package::make(&dir);
    let registry = p.registry();
    let listener = ok(TcpListener::bind("127.0.0.1:0"));
    let raddr = ok(listener.local_addr()).to_string();
    let peer = std::thread::scope(|s| {
        let served = s.spawn(|| {
            let (link, _) = ok(listener.accept());
            registry.serve_connection(link)
        });
        let peer = ok(Peer::start(
            Origin::Migrate { raddr },
            PeerOptions {
                source: SourceOptions {
                    migration: migration(),
                    ..SourceOptions::default()
                },
                resume: Resume::AfterComplete,
                console: Some(Box::new(std::io::sink())),
                ..PeerOptions::new(dir.join("peer"))
            },
        ));
        ok(ok_join_scoped(served));
        peer
    });
    let names: Vec<&str> = peer.files().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["kernel", "config"]);
    let listener = ok(TcpListener::bind("127.0.0.1:0"));
    let laddr = ok(listener.local_addr()).to_string();
    let out = dir.join("out");
    let report = std::thread::scope(|s| {
        let serving = s.spawn(|| {
            let mut o = SourceOptions {
                migration: migration(),
                ..SourceOptions::default()
            };
            o.memory.cycle_throttle = Duration::from_millis(50);
            peer.serve(&listener, o, None, |e| panic!("migration failed: {e}"))
        });
        let report = ok(terminate_from(
            &laddr,
            terminator_options(terminator_devices(
                &out,
                &["state", "memory", "kernel", "disk", "config"],
            )),
        ));
        ok(ok_join_scoped(serving));
        report
    });
    assert_eq!(peer.wait(), ExitStatus::Stopped);
    assert!(report.dropped.is_empty());
    for (name, want) in [
        ("kernel", &p.kernel),
        ("config", &p.config),
        ("disk", &p.disk),
    ] {
        assert!(
            std::fs::read(out.join(name)).ok() == std::fs::read(want).ok(),
            "{name} did not travel intact"
        );
    }
    let mut word = [0u8; 8];
    let f = ok(std::fs::File::open(out.join("memory")));
    ok(std::os::unix::fs::FileExt::read_exact_at(
        &f, &mut word, COUNTER,
    ));
    let at_stop = u64::from_le_bytes(word);
    assert!(at_stop > p.counter, "the VM did not run on the peer");
    resume_package(&out, at_stop);
    let _ = std::fs::remove_dir_all(&dir);
}

fn ok_join_scoped<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|_| panic!("thread panicked"))
}

/// The VM runs (not paused) on the source and counts on.
fn still_running(vmm: &Arc<Mutex<Vmm>>) {
    let mut v = vmm.lock().unwrap_or_else(|p| p.into_inner());
    assert!(!v.is_paused(), "the source VM was left paused");
    assert_eq!(v.wait_timeout(Duration::ZERO), None, "the source VM ended");
    let c = counter(&v);
    wait_counter_past(&v, c);
}

#[test]
fn a_terminator_that_fails_leaves_the_vm_running_on_its_source_and_no_files() {
    let dir = scratch("term-fail");
    let disk = dir.join("disk.img");
    ok(std::fs::write(&disk, pattern(1_000_000, 7)));
    let vmm = boot_with_disk(&disk);
    let source = vm_source(&vmm, Vec::new());
    let out = dir.join("out");

    // No output for the VM's drive: refused as the devices are listed.
    let (link, theirs) = ok(UnixStream::pair());
    let e = std::thread::scope(|s| {
        let taking = s.spawn(|| source.migrate(theirs));
        let e = terminate(
            link,
            terminator_options(terminator_devices(&out, &["state", "memory"])),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        let src = ok_join_scoped(taking);
        assert!(
            src.as_ref().is_err_and(|e| e.source_keeps_authority()),
            "{:?}",
            src.err()
        );
        e
    });
    assert!(e.contains("drive \"disk\"") && !e.contains('\n'), "{e}");
    still_running(&vmm);
    assert!(!out.exists(), "{:?}", names_in(&out));

    // The link cut in the middle of the transfer: the terminator's files go,
    // the VM stays.
    let g = gate(128 << 10);
    let cut = ok(g.client.try_clone());
    let e: TerminatorError = std::thread::scope(|s| {
        let taking = s.spawn(|| source.migrate(g.registry));
        let terminating = s.spawn(|| {
            terminate(
                g.client,
                terminator_options(terminator_devices(&out, &["state", "memory", "disk"])),
            )
        });
        ok(g.held.recv_timeout(Duration::from_secs(20)));
        let partial = names_in(&out);
        assert!(
            partial.iter().any(|n| n.ends_with(".partial")),
            "{partial:?}"
        );
        ok(cut.shutdown(Shutdown::Both));
        ok(g.release.send(()));
        let src = ok_join_scoped(taking);
        assert!(
            src.as_ref().is_err_and(|e| e.source_keeps_authority()),
            "{:?}",
            src.err()
        );
        ok_join_scoped(terminating)
            .err()
            .unwrap_or_else(|| panic!("the terminator succeeded"))
    });
    assert!(e.peer_keeps_vm(), "{e}");
    still_running(&vmm);
    assert!(names_in(&out).is_empty(), "{:?}", names_in(&out));

    // And the next terminator gets it.
    let (link, theirs) = ok(UnixStream::pair());
    std::thread::scope(|s| {
        let taking = s.spawn(|| source.migrate(theirs));
        ok(terminate(
            link,
            terminator_options(terminator_devices(&out, &["state", "memory", "disk"])),
        ));
        ok(ok_join_scoped(taking));
    });
    let stopped = vmm
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .wait_timeout(Duration::ZERO);
    assert_eq!(stopped, Some(ExitStatus::Stopped));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wrong_secret_is_refused_and_the_registry_serves_the_next_peer() {
    let dir = scratch("secret");
    let p = Package::make(&dir);
    let registry = Arc::new(p.registry());
    let (link, theirs) = ok(UnixStream::pair());
    let served = serve(&registry, theirs);
    let wrong = MigrationConfig {
        secret: Secret::new("not-the-secret"),
        ..MigrationConfig::default()
    };
    let out = dir.join("out");
    let e = terminate(
        link,
        TerminatorOptions {
            devices: terminator_devices(&out, &["state", "memory", "disk"]),
            migration: wrong,
            progress: None,
            tls: None,
        },
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(e.contains("authentication failed"), "{e}");
    assert!(ok_join(served).is_err());
    assert!(!out.exists());
    let (link, theirs) = ok(UnixStream::pair());
    let served = serve(&registry, theirs);
    let seen = Arc::new(Mutex::new(0u64));
    let s2 = seen.clone();
    ok(terminate(
        link,
        TerminatorOptions {
            devices: terminator_devices(&out, &["state", "memory", "disk"]),
            migration: migration(),
            progress: Some(Arc::new(move |done, total| {
                assert!(done <= total);
                *s2.lock().unwrap_or_else(|p| p.into_inner()) = done;
            })),
            tls: None,
        },
    ));
    ok(ok_join(served));
    let blocks = (MEMORY_MIB << 20) / 4096;
    assert!(*seen.lock().unwrap_or_else(|p| p.into_inner()) > blocks);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_registry_refuses_a_config_whose_cpu_template_is_not_the_states() {
    let dir = scratch("template");
    let p = Package::make(&dir);
    let text = ok(std::fs::read_to_string(&p.config));
    let open = |text: String| {
        ok(std::fs::write(&p.config, text));
        let devices = json!([
            {"name": "state", "input": p.state},
            {"name": "memory", "input": p.memory},
            {"name": "disk", "input": p.disk},
            {"name": "config", "input": p.config},
        ]);
        Registry::open(RegistryOptions {
            devices: ok(RegistryDevices::parse(&devices.to_string())),
            migration: migration(),
            concurrency: 1,
            tls: None,
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    };
    let v3 = text.replace(
        "\"cpuTemplate\": \"None\"",
        "\"cpuTemplate\": \"x86_64_v3\"",
    );
    assert_ne!(v3, text);
    let e = open(v3);
    assert!(
        e.contains("config says CPU template x86_64_v3, the state has None"),
        "{e}"
    );
    let e = open(text.replace("\"cpuTemplate\": \"None\"", "\"cpuTemplate\": \"T2\""));
    assert!(
        e.contains("unknown CPU template \"T2\" (valid: None, X86_64_V2, X86_64_V3)"),
        "{e}"
    );
    // The recorded name round-trips: the unedited config opens.
    assert_eq!(open(text), "");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_peer_starts_from_the_package_base_files_and_never_writes_them() {
    let dir = scratch("peer-package");
    let p = Package::make(&dir);
    let bases = [&p.state, &p.memory, &p.disk, &p.config, &p.kernel];
    let before: Vec<Vec<u8>> = bases.iter().map(|b| ok(std::fs::read(b))).collect();
    let overlays = dir.join("overlay");
    ok(std::fs::create_dir_all(&overlays));
    // The reference peer's --devices: base, overlay, state and settings.
    let devices = json!([
        {"name": "state", "base": p.state, "overlay": overlays.join("state.bin"),
         "state": dir.join("bits/state"), "blockSize": 65536},
        {"name": "memory", "base": p.memory, "overlay": overlays.join("memory.bin"),
         "blockSize": 4096, "maxCycles": 20},
        {"name": "kernel", "base": p.kernel},
        {"name": "disk", "base": p.disk, "overlay": overlays.join("disk.img")},
        {"name": "config", "base": p.config},
    ])
    .to_string();
    let package = ok(PeerPackage::parse(&devices)).unwrap_or_else(|| panic!("no package"));
    let options = || PeerOptions {
        source: SourceOptions {
            migration: migration(),
            ..SourceOptions::default()
        },
        console: Some(Box::new(std::io::sink())),
        ..PeerOptions::new(dir.join("peer"))
    };
    let peer = ok(Peer::start(Origin::Package(package.clone()), options()));
    let names: Vec<&str> = peer.files().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["config", "kernel"]);
    assert_eq!(
        ok(std::fs::read(overlays.join("disk.img"))),
        before[2],
        "the VM's disk is not a copy of the base"
    );
    assert!(overlays.join("memory.bin").exists());
    // A second start on the same overlays would mix another run's writes
    // with the package's memory: refused, in one line.
    let e = Peer::start(Origin::Package(package), options())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("already exists") && e.contains("memory") && !e.contains('\n'),
        "{e}"
    );
    // The VM runs on from the package's state and migrates on as usual.
    let listener = ok(TcpListener::bind("127.0.0.1:0"));
    let laddr = ok(listener.local_addr()).to_string();
    let out = dir.join("out");
    std::thread::scope(|s| {
        let serving = s.spawn(|| {
            let mut o = SourceOptions {
                migration: migration(),
                ..SourceOptions::default()
            };
            o.memory.cycle_throttle = Duration::from_millis(50);
            peer.serve(&listener, o, None, |e| panic!("migration failed: {e}"))
        });
        ok(terminate_from(
            &laddr,
            terminator_options(terminator_devices(
                &out,
                &["state", "memory", "kernel", "disk", "config"],
            )),
        ));
        ok(ok_join_scoped(serving));
    });
    assert_eq!(peer.wait(), ExitStatus::Stopped);
    let mut word = [0u8; 8];
    let f = ok(std::fs::File::open(out.join("memory")));
    ok(std::os::unix::fs::FileExt::read_exact_at(
        &f, &mut word, COUNTER,
    ));
    let at_stop = u64::from_le_bytes(word);
    assert!(at_stop > p.counter, "the VM did not run from the package");
    for (base, was) in bases.iter().zip(&before) {
        assert!(
            ok(std::fs::read(base)) == *was,
            "{} was written",
            base.display()
        );
    }
    resume_package(&out, at_stop);

    // A runner running the package (its mark held), or killed in its run
    // (the mark left behind), leaves memory and disks out of step with the
    // state: the registry and a peer refuse the package.
    let refused = |e: Option<String>, want: &str| {
        let e = e.unwrap_or_default();
        assert!(e.contains(want) && !e.contains('\n'), "{e}");
    };
    let run = ok(InUse::acquire(&p.state));
    refused(
        Registry::open(p.registry_options())
            .err()
            .map(|e| e.to_string()),
        "in use by another run",
    );
    drop(run);
    refused(
        Registry::open(p.registry_options())
            .err()
            .map(|e| e.to_string()),
        "ended without a suspend",
    );
    let package = ok(PeerPackage::parse(&devices)).unwrap_or_else(|| panic!("no package"));
    refused(
        Peer::start(Origin::Package(package), options())
            .err()
            .map(|e| e.to_string()),
        "ended without a suspend",
    );
    let _ = std::fs::remove_dir_all(&dir);
}
