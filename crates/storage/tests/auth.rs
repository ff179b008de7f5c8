//! Peers without the shared secret are refused before any device data moves.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use drafter_storage::protocol::{read_frame, Message, ProtocolError, VERSION};
use drafter_storage::{Cause, MigrationConfig, MigrationDestination, Secret};

fn secret(s: &str) -> MigrationConfig {
    MigrationConfig {
        secret: Secret::new(s),
        handshake_timeout: Duration::from_millis(500),
        ..MigrationConfig::default()
    }
}

/// Every frame the peer sent, until it closed.
fn frames_until_close(sock: &mut impl Read) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    while let Ok(m) = read_frame(sock) {
        kinds.push(m.kind());
    }
    kinds
}

#[test]
fn wrong_secret_is_refused_on_both_sides_and_no_device_is_created() {
    let dev = seeded_device(64, 4096, 1);
    let src = source_of(&[dev], secret("right"));
    let (a, b) = UnixStream::pair().unwrap();
    let created = Arc::new(AtomicBool::new(false));
    let c2 = created.clone();
    let dest = std::thread::spawn(move || {
        MigrationDestination::accept(b, &secret("wrong"), |info| {
            c2.store(true, Ordering::SeqCst);
            memory_factory(info)
        })
        .map(|_| ())
    });
    let err = src.migrate(a, || Ok(())).expect_err("refused");
    assert!(err.source_keeps_authority());
    assert!(err.to_string().contains("authentication failed"), "{err}");
    let derr = dest.join().unwrap().expect_err("refused");
    assert!(derr.to_string().contains("authentication failed"), "{derr}");
    assert!(
        !created.load(Ordering::SeqCst),
        "no device created for an unauthenticated peer"
    );
}

#[test]
fn peer_with_a_forged_proof_receives_no_device_data() {
    let dev = seeded_device(64, 4096, 2);
    let src = source_of(&[dev], secret("s3cret"));
    let (a, mut b) = UnixStream::pair().unwrap();
    let peer = std::thread::spawn(move || {
        b.write_all(
            &Message::Hello {
                version: VERSION,
                nonce: [7; 32],
            }
            .to_frame(),
        )
        .unwrap();
        b.write_all(&Message::AuthProof { mac: [0; 32] }.to_frame())
            .unwrap();
        frames_until_close(&mut b)
    });
    let err = src.migrate(a, || Ok(())).expect_err("refused");
    assert!(
        matches!(err.cause, Cause::Protocol(ProtocolError::AuthFailed)),
        "{err}"
    );
    let seen = peer.join().unwrap();
    assert!(
        seen.iter()
            .all(|k| matches!(*k, "Hello" | "AuthProof" | "Error")),
        "only handshake frames reach an unauthenticated peer: {seen:?}"
    );
    assert!(seen.contains(&"Error"));
}

#[test]
fn silent_or_garbage_peers_are_refused() {
    let dev = seeded_device(64, 4096, 3);
    let src = source_of(&[dev], secret("k"));
    // Silent: times out in the handshake.
    let (a, b) = UnixStream::pair().unwrap();
    let err = src.migrate(a, || Ok(())).expect_err("silent peer");
    assert_eq!(err.phase, drafter_storage::Phase::Handshake);
    drop(b);
    // Garbage: not even a Hello.
    let (a, mut b) = UnixStream::pair().unwrap();
    b.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let err = src.migrate(a, || Ok(())).expect_err("garbage peer");
    assert_eq!(err.phase, drafter_storage::Phase::Handshake);
    let mut rest = Vec::new();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = b.read_to_end(&mut rest);
    let kinds = frames_until_close(&mut &rest[..]);
    assert!(
        kinds.iter().all(|k| matches!(*k, "Hello" | "Error")),
        "{kinds:?}"
    );
}

#[test]
fn matching_secrets_migrate() {
    let dev = seeded_device(64, 4096, 4);
    let src = source_of(std::slice::from_ref(&dev), secret("same"));
    let (r, d) = run_pair(&src, secret("same"), || Ok(()));
    r.unwrap();
    let d = d.unwrap();
    let lazy = d.devices()[0].1.clone();
    d.wait_complete().unwrap();
    assert!(read_all(&*lazy) == read_all(&*dev));
}
