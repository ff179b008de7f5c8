//! The peer's guest-agent hooks (issue 10 item 5) on the host's /dev/kvm
//! with the tiny counting guest. That guest has no agent of its own, so the
//! test plays the agent: it connects to the host socket where a guest
//! agent's vsock connection would arrive (`<work dir>/vsock.sock_<port>`)
//! and serves the hooks with `drafter_guest::Agent`, whose commands append
//! to a log. Checked: a registry → peer A → peer B chain calls AfterResume
//! on A and B once the VM runs there and BeforeSuspend on A before the
//! final stop, with the hooks' output in the reports; hooks that fail (no
//! agent answers) are reported while the VM keeps running and still
//! migrates; a VM without a vsock device has no hooks at all.

use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drafter::devices::RegistryDevices;
use drafter::migration::{Resume, SourceOptions, VmMigrationReport};
use drafter::package_config::{PackageConfig, PACKAGE_FORMAT_VERSION};
use drafter::peer::{Origin, Peer, PeerOptions};
use drafter::registry::{Registry, RegistryOptions};
use drafter_guest::{Agent, AgentConfig};
use drafter_storage::{MigrationConfig, Secret};
use drafter_vmm::config::VsockConfig;
use drafter_vmm::VmConfig;
use serde_json::json;

#[path = "../../vmm/tests/counting_guest/mod.rs"]
mod counting_guest;
use counting_guest::snapshot_counting_vm;

const SECRET: &str = "agent-secret";
const AGENT_PORT: u32 = 26;

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("drafter-agent-{}-{name}", std::process::id()));
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

/// A registry serving a counting-guest package (state, memory, config with
/// the agent's port); the VM has a vsock device if `vsock`.
fn registry(dir: &Path, vsock: bool) -> Registry {
    let mut c = VmConfig::new("/nonexistent-flat-program");
    c.memory_mib = 32;
    if vsock {
        c.vsock = Some(VsockConfig {
            cid: 3,
            uds_path: dir.join("vsock.sock"),
        });
    }
    let (state, memory) = snapshot_counting_vm(c, dir);
    let config = dir.join("config.json");
    let pc = PackageConfig {
        format_version: PACKAGE_FORMAT_VERSION,
        agent_vsock_port: AGENT_PORT,
        liveness_vsock_port: 25,
        cpu_count: 1,
        memory_size: 32,
        boot_args: String::new(),
        initramfs: false,
        drives: Vec::new(),
        vsock_cid: 3,
        network: None,
        cpu_template: "None".into(),
    };
    ok(std::fs::write(&config, pc.to_json()));
    let devices = json!([
        {"name": "state", "input": state},
        {"name": "memory", "input": memory, "blockSize": 4096},
        {"name": "config", "input": config},
    ]);
    ok(Registry::open(RegistryOptions {
        devices: ok(RegistryDevices::parse(&devices.to_string())),
        migration: migration(),
        concurrency: 2,
        tls: None,
    }))
}

/// Plays the guest agent of the VM whose peer works in `work_dir`: connects
/// (once the peer listens) and serves hooks that append `<hook>-<name>` to
/// `log` and print `<bs|ar>-<name>`.
fn fake_agent(work_dir: &Path, name: &'static str, log: &Path) {
    let socket = work_dir.join(format!("vsock.sock_{AGENT_PORT}"));
    let log = log.display().to_string();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let stream = loop {
            match UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "{}: never listened: {e}",
                        socket.display()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        let agent = Agent::new(AgentConfig {
            shell: "sh".into(),
            before_suspend: format!("echo before-suspend-{name} >> {log}; echo bs-{name}"),
            after_resume: format!("echo after-resume-{name} >> {log}; echo ar-{name}"),
        });
        // Serves until the peer closes the connection (its VM is gone).
        let _ = agent.serve(stream);
    });
}

fn options(work_dir: PathBuf, resume_timeout: Duration) -> PeerOptions {
    PeerOptions {
        source: SourceOptions {
            migration: migration(),
            ..SourceOptions::default()
        },
        resume: Resume::AfterComplete,
        console: Some(Box::new(std::io::sink())),
        resume_timeout,
        rescue_timeout: resume_timeout,
        ..PeerOptions::new(work_dir)
    }
}

/// Starts a peer that pulls the VM from the registry (one connection served).
fn pull_from_registry(registry: &Registry, options: PeerOptions) -> Peer {
    let listener = ok(TcpListener::bind("127.0.0.1:0"));
    let raddr = ok(listener.local_addr()).to_string();
    std::thread::scope(|s| {
        let served = s.spawn(|| {
            let (link, _) = ok(listener.accept());
            registry.serve_connection(link)
        });
        let peer = ok(Peer::start(Origin::Migrate { raddr }, options));
        ok(served
            .join()
            .unwrap_or_else(|_| panic!("registry panicked")));
        peer
    })
}

/// Migrates `from`'s VM to a new peer with `options`; returns the new peer
/// and `from`'s report.
fn migrate(from: &Peer, options: PeerOptions) -> (Peer, VmMigrationReport) {
    let listener = ok(TcpListener::bind("127.0.0.1:0"));
    let raddr = ok(listener.local_addr()).to_string();
    std::thread::scope(|s| {
        let serving = s.spawn(|| {
            let mut o = SourceOptions {
                migration: migration(),
                ..SourceOptions::default()
            };
            o.memory.cycle_throttle = Duration::from_millis(50);
            from.serve(&listener, o, None, |e| panic!("migration failed: {e}"))
        });
        let to = ok(Peer::start(Origin::Migrate { raddr }, options));
        let report = ok(serving.join().unwrap_or_else(|_| panic!("source panicked")));
        (to, report)
    })
}

fn still_runs(peer: &Peer) {
    assert_eq!(peer.exit_waiter().get(), None, "the VM ended");
}

#[test]
fn registry_to_peer_to_peer_calls_the_agent_hooks_around_each_hop() {
    let dir = scratch("chain");
    let registry = registry(&dir, true);
    let log = dir.join("hooks.log");
    let (work_a, work_b) = (dir.join("a"), dir.join("b"));
    let timeout = Duration::from_secs(30);

    fake_agent(&work_a, "a", &log);
    let a = pull_from_registry(&registry, options(work_a, timeout));
    assert!(a.has_agent());
    let hook = a
        .after_resume()
        .cloned()
        .unwrap_or_else(|| panic!("no AfterResume on A"));
    assert_eq!((hook.output.trim(), &hook.error), ("ar-a", &None));
    let report = a
        .incoming_report()
        .unwrap_or_else(|| panic!("no report on A"));
    assert_eq!(report.after_resume.as_ref(), Some(&hook));
    assert_eq!(ok(std::fs::read_to_string(&log)), "after-resume-a\n");

    fake_agent(&work_b, "b", &log);
    let (b, out) = migrate(&a, options(work_b, timeout));
    let before = out
        .before_suspend
        .clone()
        .unwrap_or_else(|| panic!("no BeforeSuspend on A: {out:?}"));
    assert_eq!((before.output.trim(), &before.error), ("bs-a", &None));
    let after = b
        .after_resume()
        .cloned()
        .unwrap_or_else(|| panic!("no AfterResume on B"));
    assert_eq!((after.output.trim(), &after.error), ("ar-b", &None));
    // BeforeSuspend ran on A before the VM left it, AfterResume on B once
    // it ran there; the JSON report carries both.
    assert_eq!(
        ok(std::fs::read_to_string(&log)),
        "after-resume-a\nbefore-suspend-a\nafter-resume-b\n"
    );
    let json = ok(serde_json::to_value(b.incoming_report()));
    assert_eq!(
        json["afterResume"]["output"].as_str().map(str::trim),
        Some("ar-b")
    );
    assert!(json["afterResume"]["millis"].as_f64().is_some(), "{json}");
    still_runs(&b);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn failing_hooks_are_reported_and_the_vm_runs_and_migrates_on() {
    let dir = scratch("silent");
    let registry = registry(&dir, true);
    let timeout = Duration::from_millis(300);
    // Nobody plays the agent: AfterResume times out, the VM runs here.
    let c = pull_from_registry(&registry, options(dir.join("c"), timeout));
    let hook = c
        .after_resume()
        .cloned()
        .unwrap_or_else(|| panic!("no AfterResume on C"));
    let e = hook.error.unwrap_or_default();
    assert!(e.contains("timed out") && !e.contains('\n'), "{e}");
    assert!(hook.millis >= 300.0, "{}", hook.millis);
    still_runs(&c);
    // BeforeSuspend fails the same way; the VM migrates all the same.
    let (d, out) = migrate(&c, options(dir.join("d"), timeout));
    let before = out
        .before_suspend
        .clone()
        .unwrap_or_else(|| panic!("no BeforeSuspend on C: {out:?}"));
    assert!(
        before
            .error
            .as_deref()
            .is_some_and(|e| e.contains("timed out")),
        "{before:?}"
    );
    assert_eq!(c.wait(), drafter_vmm::ExitStatus::Stopped);
    still_runs(&d);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_vm_without_vsock_has_no_hooks() {
    let dir = scratch("novsock");
    let registry = registry(&dir, false);
    let e = pull_from_registry(&registry, options(dir.join("e"), Duration::from_secs(60)));
    assert!(!e.has_agent());
    assert!(e.after_resume().is_none());
    assert!(e
        .incoming_report()
        .is_some_and(|r| r.after_resume.is_none()));
    still_runs(&e);
    let _ = std::fs::remove_dir_all(&dir);
}
