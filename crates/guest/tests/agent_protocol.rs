//! Agent ↔ host protocol over real Unix sockets, exactly as the VMM's hybrid
//! vsock presents guest connections on the host (`<uds_path>_<port>`).

use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use drafter_guest::host::port_socket_path;
use drafter_guest::protocol::{ErrorKind, Reply};
use drafter_guest::{liveness, Agent, AgentConfig, AgentServer, HostError, LivenessServer};

const PORT: u32 = 26;
const LONG: Duration = Duration::from_secs(20);

fn config(before: &str, after: &str) -> AgentConfig {
    AgentConfig {
        shell: "sh".to_owned(),
        before_suspend: before.to_owned(),
        after_resume: after.to_owned(),
    }
}

/// Runs an agent in a thread, connecting to the host's `<uds>_<port>`.
/// Returns clones of every stream it connected, so a test can cut them.
fn spawn_agent(uds: &Path, config: AgentConfig) -> Arc<Mutex<Vec<UnixStream>>> {
    let target = port_socket_path(uds, PORT);
    let streams = Arc::new(Mutex::new(Vec::new()));
    let seen = streams.clone();
    thread::spawn(move || {
        Agent::new(config).run(
            || {
                let s = UnixStream::connect(&target)?;
                seen.lock().unwrap().push(s.try_clone()?);
                Ok(s)
            },
            LONG,
        )
    });
    streams
}

fn uds(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("vsock.sock")
}

#[test]
fn both_hooks_run_their_commands_and_report_output() {
    let dir = tempfile::tempdir().unwrap();
    let before = dir.path().join("before");
    let after = dir.path().join("after");
    let mut host = AgentServer::listen(&uds(&dir), PORT).unwrap();
    spawn_agent(
        &uds(&dir),
        config(
            &format!("echo suspending; touch {}", before.display()),
            &format!("echo resumed >&2; touch {}", after.display()),
        ),
    );
    host.wait_connected(LONG).unwrap();

    let r = host.before_suspend(LONG).unwrap();
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.stdout, "suspending\n");
    assert!(before.exists() && !after.exists());

    let r = host.after_resume(LONG).unwrap();
    assert_eq!(r.stderr, "resumed\n");
    assert!(after.exists());
}

#[test]
fn a_hook_past_its_timeout_is_killed_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = AgentServer::listen(&uds(&dir), PORT).unwrap();
    spawn_agent(&uds(&dir), config("echo started; exec sleep 60", ""));
    host.wait_connected(LONG).unwrap();

    let start = Instant::now();
    let err = host.before_suspend(Duration::from_secs(1)).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(10));
    match err {
        HostError::HookTimedOut { report, .. } => {
            assert!(report.timed_out);
            assert_eq!(report.stdout, "started\n");
        }
        other => panic!("expected HookTimedOut, got {other:?}"),
    }
    // The agent is still serving afterwards.
    host.after_resume(LONG).unwrap();
}

#[test]
fn a_failing_hook_returns_its_status_and_output() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = AgentServer::listen(&uds(&dir), PORT).unwrap();
    spawn_agent(&uds(&dir), config("", "echo boom >&2; exit 7"));
    match host.after_resume(LONG).unwrap_err() {
        HostError::HookFailed { report, .. } => {
            assert_eq!(report.exit_code, Some(7));
            assert_eq!(report.stderr, "boom\n");
        }
        other => panic!("expected HookFailed, got {other:?}"),
    }
    // An empty command is a successful no-op.
    assert!(host.before_suspend(LONG).unwrap().succeeded());
}

#[test]
fn agent_reconnects_after_its_connection_drops() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("count");
    let mut host = AgentServer::listen(&uds(&dir), PORT).unwrap();
    let streams = spawn_agent(
        &uds(&dir),
        config("", &format!("echo x >> {}", count.display())),
    );
    host.wait_connected(LONG).unwrap();
    host.after_resume(LONG).unwrap();

    // Cut the agent's connection (as a snapshot restore does).
    streams.lock().unwrap()[0].shutdown(Shutdown::Both).unwrap();
    host.after_resume(LONG).unwrap();
    assert!(
        streams.lock().unwrap().len() >= 2,
        "agent did not reconnect"
    );
    let runs = std::fs::read_to_string(&count).unwrap();
    assert!(runs.lines().count() >= 2);
}

#[test]
fn agent_reconnects_to_a_new_host_listener_at_the_same_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = AgentServer::listen(&uds(&dir), PORT).unwrap();
    let streams = spawn_agent(&uds(&dir), config("true", "true"));
    host.before_suspend(LONG).unwrap();
    // The old VMM goes away and a restored one listens again.
    drop(host);
    let mut host = AgentServer::listen(&uds(&dir), PORT).unwrap();
    host.after_resume(LONG).unwrap();
    assert!(streams.lock().unwrap().len() >= 2);
}

/// A raw "host" talking to a real agent: garbage never ends the session.
#[test]
fn agent_answers_garbage_with_errors_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = port_socket_path(&uds(&dir), PORT);
    let listener = UnixListener::bind(&path).unwrap();
    spawn_agent(&uds(&dir), config("echo ok", ""));
    let (stream, _) = listener.accept().unwrap();
    stream.set_read_timeout(Some(LONG)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut lines = BufReader::new(stream);
    let mut next = || {
        let mut l = String::new();
        lines.read_line(&mut l).unwrap();
        serde_json::from_str::<serde_json::Value>(&l).unwrap()
    };
    assert_eq!(next()["hello"]["role"], "agent");

    let mut send = |bytes: &[u8]| writer.write_all(bytes).unwrap();
    send(b"\xff\xfe not json\n");
    send(b"{\"v\":1}\n");
    send(b"{\"v\":7,\"id\":3,\"call\":\"before_suspend\",\"timeout_ms\":10}\n");
    send(b"{\"v\":1,\"id\":4,\"call\":\"format_disk\",\"timeout_ms\":10}\n");
    let mut huge = vec![b'a'; 2 * 1024 * 1024];
    huge.push(b'\n');
    send(&huge);
    send(b"{\"v\":1,\"id\":5,\"call\":\"before_suspend\",\"timeout_ms\":10000}\n");

    let kinds: Vec<(serde_json::Value, serde_json::Value)> = (0..5)
        .map(|_| next())
        .map(|r| (r["id"].clone(), r["error"]["kind"].clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (serde_json::Value::Null, "malformed".into()),
            (serde_json::Value::Null, "malformed".into()),
            (3.into(), "unsupported_version".into()),
            (4.into(), "malformed".into()),
            (serde_json::Value::Null, "too_long".into()),
        ]
    );
    let ok: Reply = serde_json::from_value(next()).unwrap();
    assert_eq!(ok.id, Some(5));
    assert_eq!(ok.ok.unwrap().stdout, "ok\n");
}

/// A raw "agent" talking to the real host side: bad greetings and bad or
/// stale replies are skipped, never fatal.
#[test]
fn host_skips_bad_greetings_and_garbage_replies() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = AgentServer::listen(&uds(&dir), PORT).unwrap();
    let path = host.path().to_owned();
    let fake = thread::spawn(move || {
        // Not an agent greeting: the host must drop this one.
        let mut bad = UnixStream::connect(&path).unwrap();
        bad.write_all(b"hello there\n").unwrap();
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"{\"v\":1,\"hello\":{\"role\":\"agent\",\"version\":\"x\"}}\n")
            .unwrap();
        let mut lines = BufReader::new(s.try_clone().unwrap());
        let mut req = String::new();
        lines.read_line(&mut req).unwrap();
        let req: serde_json::Value = serde_json::from_str(&req).unwrap();
        let id = req["id"].as_u64().unwrap();
        s.write_all(b"}}garbage{{\n").unwrap();
        s.write_all(
            format!(
                "{{\"v\":1,\"id\":{},\"ok\":{{\"exit_code\":1}}}}\n",
                id + 100
            )
            .as_bytes(),
        )
        .unwrap();
        let report =
            r#"{"exit_code":0,"signal":null,"timed_out":false,"stdout":"fine","stderr":""}"#;
        s.write_all(format!("{{\"v\":1,\"id\":{id},\"ok\":{report}}}\n").as_bytes())
            .unwrap();
        // Then answer the next request with an agent-side error.
        let mut req = String::new();
        lines.read_line(&mut req).unwrap();
        let id: serde_json::Value =
            serde_json::from_str::<serde_json::Value>(&req).unwrap()["id"].clone();
        s.write_all(format!("{{\"v\":1,\"id\":{id},\"error\":{{\"kind\":\"spawn_failed\",\"message\":\"no shell\"}}}}\n").as_bytes())
            .unwrap();
        drop(bad);
        s
    });
    assert_eq!(host.before_suspend(LONG).unwrap().stdout, "fine");
    match host.after_resume(LONG).unwrap_err() {
        HostError::Remote { kind, message, .. } => {
            assert_eq!(kind, ErrorKind::SpawnFailed);
            assert_eq!(message, "no shell");
        }
        other => panic!("expected Remote, got {other:?}"),
    }
    let _keep = fake.join().unwrap();
}

#[test]
fn waiting_for_a_missing_agent_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = AgentServer::listen(&uds(&dir), PORT).unwrap();
    let start = Instant::now();
    let err = host.before_suspend(Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, HostError::Timeout { .. }), "{err:?}");
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[test]
fn liveness_arrives_once_the_guest_connects() {
    let dir = tempfile::tempdir().unwrap();
    let server = LivenessServer::listen(&uds(&dir), 25).unwrap();
    assert!(matches!(
        server.wait(Duration::from_millis(100)),
        Err(HostError::Timeout { .. })
    ));
    let path = server.path().to_owned();
    let guest = thread::spawn(move || liveness::signal(|| UnixStream::connect(&path), LONG));
    server.wait(LONG).unwrap();
    guest.join().unwrap().unwrap();
}

#[test]
fn liveness_retries_until_the_host_listens() {
    let dir = tempfile::tempdir().unwrap();
    let path = port_socket_path(&uds(&dir), 25);
    let target = path.clone();
    let guest = thread::spawn(move || liveness::signal(|| UnixStream::connect(&target), LONG));
    let server = LivenessServer::listen(&uds(&dir), 25).unwrap();
    server.wait(LONG).unwrap();
    guest.join().unwrap().unwrap();
    assert!(path.exists());
}

#[test]
fn stale_sockets_are_replaced_but_other_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = port_socket_path(&uds(&dir), PORT);
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = AgentServer::listen(&uds(&dir), PORT).unwrap();
    drop(server);
    assert!(!path.exists(), "socket file not cleaned up on drop");

    std::fs::write(&path, b"precious").unwrap();
    assert!(matches!(
        AgentServer::listen(&uds(&dir), PORT),
        Err(HostError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}
