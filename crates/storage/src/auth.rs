//! Shared-secret authentication: mutual HMAC-SHA256 challenge–response.
//!
//! Each side sends a fresh 32-byte nonce, then proves knowledge of the secret
//! with `HMAC(secret, "drafter-migration-v1" ‖ role ‖ own nonce ‖ peer nonce)`.
//! The role byte stops a proof being reflected back; fresh nonces stop replay.
//! Over TLS ([`crate::tls`]) the proofs also cover the link's channel
//! binding (a TLS exporter, [`Link::channel_binding`]), so they are only
//! valid inside the TLS session they were made in: a man in the middle
//! holding a certificate of the CA cannot relay them between two sessions.
//! A peer that fails is sent an Error frame and the connection is closed before
//! any device frame is read or written.

use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::protocol::{read_frame, Message, ProtocolError, VERSION};
use crate::transport::Link;

/// A shared secret; the empty secret means "no authentication configured" and
/// still requires the peer to have the empty secret too.
#[derive(Clone, Default)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps secret bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Which end of a migration we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that has the data and authority.
    Source,
    /// The side receiving it.
    Destination,
}

impl Role {
    fn byte(self) -> u8 {
        match self {
            Role::Source => b's',
            Role::Destination => b'd',
        }
    }
    fn peer(self) -> Role {
        match self {
            Role::Source => Role::Destination,
            Role::Destination => Role::Source,
        }
    }
}

fn mac(
    secret: &Secret,
    role: Role,
    own: &[u8; 32],
    peer: &[u8; 32],
    binding: Option<&[u8; 32]>,
) -> Result<Hmac<Sha256>, ProtocolError> {
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(&secret.0).map_err(|_| ProtocolError::AuthFailed)?;
    m.update(b"drafter-migration-v1");
    m.update(&[role.byte()]);
    m.update(own);
    m.update(peer);
    if let Some(b) = binding {
        m.update(b"channel-binding");
        m.update(b);
    }
    Ok(m)
}

fn expect_frame(r: &mut impl Read, want: &'static str) -> Result<Message, ProtocolError> {
    match read_frame(r)? {
        Message::Error { message } => Err(ProtocolError::Peer(message)),
        m if m.kind() == want => Ok(m),
        m => Err(ProtocolError::Unexpected {
            got: m.kind(),
            state: "during the handshake",
        }),
    }
}

/// Runs the versioned handshake and mutual authentication on `link`.
/// On failure an Error frame is sent (best effort) before returning.
pub fn handshake<L: Read + Write>(
    link: &mut L,
    role: Role,
    secret: &Secret,
) -> Result<(), ProtocolError> {
    handshake_bound(link, role, secret, |_| None)
}

/// [`handshake`] on a [`Link`], with the proofs bound to the link's
/// channel binding if it has one (a TLS link does).
pub fn handshake_link<L: Link>(
    link: &mut L,
    role: Role,
    secret: &Secret,
) -> Result<(), ProtocolError> {
    handshake_bound(link, role, secret, |l| l.channel_binding())
}

fn handshake_bound<L: Read + Write>(
    link: &mut L,
    role: Role,
    secret: &Secret,
    binding: impl FnOnce(&L) -> Option<[u8; 32]>,
) -> Result<(), ProtocolError> {
    let result = handshake_inner(link, role, secret, binding);
    if let Err(e) = &result {
        if !matches!(
            e,
            ProtocolError::Peer(_)
                | ProtocolError::Io(_)
                | ProtocolError::Closed
                | ProtocolError::TimedOut
        ) {
            let _ = link.write_all(
                &Message::Error {
                    message: e.to_string(),
                }
                .to_frame(),
            );
            let _ = link.flush();
        }
    }
    result
}

fn handshake_inner<L: Read + Write>(
    link: &mut L,
    role: Role,
    secret: &Secret,
    binding: impl FnOnce(&L) -> Option<[u8; 32]>,
) -> Result<(), ProtocolError> {
    let mut nonce = [0u8; 32];
    getrandom::getrandom(&mut nonce)
        .map_err(|e| ProtocolError::Io(std::io::Error::other(e.to_string())))?;
    link.write_all(
        &Message::Hello {
            version: VERSION,
            nonce,
        }
        .to_frame(),
    )?;
    link.flush()?;
    let Message::Hello {
        version,
        nonce: peer,
    } = expect_frame(link, "Hello")?
    else {
        return Err(ProtocolError::Unexpected {
            got: "?",
            state: "during the handshake",
        });
    };
    if version != VERSION {
        return Err(ProtocolError::Version {
            ours: VERSION,
            theirs: version,
        });
    }
    if peer == nonce {
        // A reflected Hello: the peer is echoing us.
        return Err(ProtocolError::AuthFailed);
    }
    // Both ends finished any TLS handshake before the Hellos crossed.
    let binding = binding(link);
    let proof = mac(secret, role, &nonce, &peer, binding.as_ref())?
        .finalize()
        .into_bytes();
    let mut proof_bytes = [0u8; 32];
    proof_bytes.copy_from_slice(&proof);
    link.write_all(&Message::AuthProof { mac: proof_bytes }.to_frame())?;
    link.flush()?;
    let Message::AuthProof { mac: theirs } = expect_frame(link, "AuthProof")? else {
        return Err(ProtocolError::Unexpected {
            got: "?",
            state: "during the handshake",
        });
    };
    mac(secret, role.peer(), &peer, &nonce, binding.as_ref())?
        .verify_slice(&theirs)
        .map_err(|_| ProtocolError::AuthFailed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn run(
        a: &'static [u8],
        b: &'static [u8],
    ) -> (Result<(), ProtocolError>, Result<(), ProtocolError>) {
        let (mut x, mut y) = UnixStream::pair().unwrap();
        let h = std::thread::spawn(move || handshake(&mut y, Role::Destination, &Secret::new(b)));
        let r = handshake(&mut x, Role::Source, &Secret::new(a));
        (r, h.join().unwrap())
    }

    #[test]
    fn same_secret_passes_wrong_secret_fails_both_sides() {
        let (a, b) = run(b"k1", b"k1");
        assert!(a.is_ok() && b.is_ok());
        let (a, b) = run(b"k1", b"k2");
        assert!(a.is_err() && b.is_err());
        let (a, b) = run(b"", b"k2");
        assert!(a.is_err() && b.is_err());
    }

    #[test]
    fn wrong_version_is_refused() {
        let (mut x, mut y) = UnixStream::pair().unwrap();
        let h =
            std::thread::spawn(move || handshake(&mut y, Role::Destination, &Secret::default()));
        x.write_all(
            &Message::Hello {
                version: 99,
                nonce: [1; 32],
            }
            .to_frame(),
        )
        .unwrap();
        let err = h.join().unwrap().unwrap_err();
        assert!(
            matches!(err, ProtocolError::Version { theirs: 99, .. }),
            "{err}"
        );
    }
}
