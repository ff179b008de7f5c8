//! The migration handshake (version Hello, HMAC proofs) against a peer whose
//! every byte is the input, from both roles, with and without a secret.
#![no_main]

use std::io::{self, Read, Write};

use drafter_storage::auth::{handshake, Role};
use drafter_storage::Secret;
use libfuzzer_sys::fuzz_target;

/// A link whose reads are the fuzzer's bytes and whose writes are dropped.
struct Peer<'a> {
    incoming: &'a [u8],
}

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.incoming.read(buf)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, incoming)) = data.split_first() else {
        return;
    };
    let role = if mode & 1 == 0 {
        Role::Source
    } else {
        Role::Destination
    };
    let secret = if mode & 2 == 0 {
        Secret::default()
    } else {
        Secret::new(b"fuzz secret".to_vec())
    };
    // The peer cannot know our random nonce, so a proof from it never verifies.
    let r = handshake(&mut Peer { incoming }, role, &secret);
    assert!(r.is_err(), "a handshake with a scripted peer succeeded");
});
