//! TLS 1.3 for migration links, with mutual certificate authentication.
//!
//! Both ends hold a certificate and key issued by a CA they both trust
//! (`cert.pem`, `key.pem`, `ca.pem`): the side that dials checks the
//! listener's certificate against the CA and the name it dialled, the side
//! that listens requires a certificate from the dialler and checks it
//! against the CA. Only TLS 1.3 is offered (rustls with the `ring`
//! provider), without session resumption or early data, so every connection
//! runs a full handshake with fresh ephemeral keys: a recorded handshake
//! replayed to a listener fails to decrypt.
//!
//! [`TlsConfig::connect`] and [`TlsConfig::accept`] turn any [`Link`] (a
//! `TcpStream`, a `UnixStream`, …) into a [`TlsLink`], itself a [`Link`]
//! that the migrator uses unchanged. No I/O happens there: the TLS
//! handshake runs on the first read or write, so it is bounded by the
//! migration's handshake timeout and a failure is an ordinary handshake
//! failure of the migration (a source keeps its VM). The migrator's
//! shared-secret handshake then runs inside TLS, bound to the TLS session
//! ([`Link::channel_binding`]), so a peer holding a certificate of the CA
//! but not the secret cannot relay it between two TLS sessions.
//!
//! # Sharing one connection between a reader and a writer
//!
//! A rustls connection is one state machine, not cloneable, while the
//! migrator reads on one thread and writes on others. A [`TlsLink`] and its
//! clones share the state machine behind a mutex that is held only while
//! records are decrypted into it or encrypted out of it, never while the
//! socket blocks. The socket itself is reached through three handles of
//! the same connection: a read handle (with its ciphertext buffer, under a
//! read lock held across the blocking read), a write handle (under a write
//! lock held across the blocking write, so records reach the wire in the
//! order they were sealed) and a control handle for socket options and
//! shutdown. A reader never takes the write lock and a writer never the
//! read lock, so a reader blocked on a silent peer never stops a writer,
//! and a writer blocked on a full socket never stops a reader: both
//! directions can be busy at once. Only the TLS handshake takes both (read,
//! then write), once, under a handshake lock that the other threads wait on
//! until it completes; before that no thread holds either side. Shutting
//! the control handle down wakes a blocked reader and writer.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};

use crate::transport::Link;

/// Label of the TLS exporter that binds the shared-secret handshake to the
/// TLS session (RFC 8446 section 7.5).
const EXPORTER_LABEL: &[u8] = b"EXPORTER-drafter-migration-v1";

/// Plaintext sealed per write call (four full records).
const WRITE_CHUNK: usize = 64 * 1024;

/// Ciphertext read from the socket at once.
const READ_BUFFER: usize = 64 * 1024;

/// Why TLS settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("TLS {what} {}: {source}", path.display())]
    Read {
        /// Which file (certificate, key, CA).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file holds no usable PEM item of the kind needed.
    #[error("TLS {what} {}: {reason}", path.display())]
    Pem {
        /// Which file (certificate, key, CA).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the combination (e.g. a key that does not match the
    /// certificate, or a CA file with no usable certificate).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The name to check the listener's certificate against is not a DNS
    /// name or IP address.
    #[error("TLS server name {0:?} is not a DNS name or IP address")]
    ServerName(String),
}

/// Where a peer's TLS files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This peer's certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// This peer's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificate(s) peers' certificates must chain to (PEM).
    pub ca: PathBuf,
}

impl TlsFiles {
    /// `cert.pem`, `key.pem` and `ca.pem` in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca: dir.join("ca.pem"),
        }
    }
}

/// TLS settings of a peer: its identity and the CA it trusts, for both
/// dialling ([`Self::connect`]) and listening ([`Self::accept`]).
#[derive(Clone)]
pub struct TlsConfig {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    server_name: Option<String>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn certs(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE in the file".into()));
    }
    Ok(certs)
}

impl TlsConfig {
    /// Loads a peer's certificate, key and CA from PEM files.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let cert = read_file("certificate", &files.cert)?;
        let key = read_file("key", &files.key)?;
        let ca = read_file("CA", &files.ca)?;
        Self::from_pem_named(&cert, &key, &ca, files)
    }

    /// Builds the settings from PEM text (certificate chain, private key,
    /// CA certificates).
    pub fn from_pem(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<Self, TlsError> {
        let names = TlsFiles {
            cert: "<certificate>".into(),
            key: "<key>".into(),
            ca: "<CA>".into(),
        };
        Self::from_pem_named(cert, key, ca, &names)
    }

    fn from_pem_named(
        cert: &[u8],
        key: &[u8],
        ca: &[u8],
        names: &TlsFiles,
    ) -> Result<Self, TlsError> {
        let chain = certs("certificate", &names.cert, cert)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Pem {
            what: "key",
            path: names.key.clone(),
            reason: format!("no usable private key: {e}"),
        })?;
        let mut roots = RootCertStore::empty();
        for c in certs("CA", &names.ca, ca)? {
            roots.add(c).map_err(|e| TlsError::Pem {
                what: "CA",
                path: names.ca.clone(),
                reason: format!("unusable CA certificate: {e}"),
            })?;
        }
        let roots = Arc::new(roots);
        // AES-128-GCM first: the fastest suite with AES instructions and
        // as strong as needed here; the others stay acceptable.
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ];
        let provider = Arc::new(provider);
        let config = |e: rustls::Error| TlsError::Config(e.to_string());

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config)?;
        // Every connection is a full handshake: no tickets, no resumption,
        // no early data (which could be replayed).
        server.send_tls13_tickets = 0;
        server.max_early_data_size = 0;

        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(config)?;
        client.resumption = Resumption::disabled();
        client.enable_early_data = false;
        Ok(TlsConfig {
            client: Arc::new(client),
            server: Arc::new(server),
            server_name: None,
        })
    }

    /// Checks the listener's certificate against `name` instead of the host
    /// the caller dialled (see [`Self::connect`]).
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// The dialling side: wraps `link`, a connection to `host`, in TLS.
    /// The listener's certificate must chain to the CA and name `host` (a
    /// DNS name or an IP address; see [`host_of`] for an address's host),
    /// unless [`Self::with_server_name`] set another name. The handshake
    /// runs on the first read or write.
    pub fn connect<L: Link>(&self, link: L, host: &str) -> Result<TlsLink, TlsError> {
        let name = self.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|_| TlsError::ServerName(name.to_string()))?;
        let conn = ClientConnection::new(self.client.clone(), server_name)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        TlsLink::new(Connection::Client(conn), Box::new(link))
            .map_err(|e| TlsError::Config(format!("cannot share the connection: {e}")))
    }

    /// The listening side: wraps an accepted `link` in TLS, requiring a
    /// client certificate that chains to the CA. The handshake runs on the
    /// first read or write.
    pub fn accept<L: Link>(&self, link: L) -> Result<TlsLink, TlsError> {
        let conn = rustls::ServerConnection::new(self.server.clone())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        TlsLink::new(Connection::Server(conn), Box::new(link))
            .map_err(|e| TlsError::Config(format!("cannot share the connection: {e}")))
    }

    /// [`Self::connect`] or, without settings, the plain link; the form a
    /// dialling command uses for its optional `--tls-*` flags.
    pub fn maybe_connect<L: Link>(
        tls: Option<&TlsConfig>,
        link: L,
        host: &str,
    ) -> Result<Box<dyn Link>, TlsError> {
        Ok(match tls {
            Some(t) => Box::new(t.connect(link, host)?),
            None => Box::new(link),
        })
    }

    /// [`Self::accept`] or, without settings, the plain link; the form a
    /// listening command uses for its optional `--tls-*` flags.
    pub fn maybe_accept<L: Link>(
        tls: Option<&TlsConfig>,
        link: L,
    ) -> Result<Box<dyn Link>, TlsError> {
        Ok(match tls {
            Some(t) => Box::new(t.accept(link)?),
            None => Box::new(link),
        })
    }
}

/// The host part of a `host:port` address (`[v6]:port` too), to check the
/// listener's certificate against.
pub fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        if let Some((host, _)) = rest.split_once(']') {
            return host;
        }
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => addr,
    }
}

/// A one-line description of a TLS failure.
fn describe(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => format!("peer certificate refused: {c:?}"),
        E::NoCertificatesPresented => "the peer presented no certificate".into(),
        E::AlertReceived(a) => format!("the peer refused the TLS session (alert {a:?})"),
        E::InvalidMessage(m) => {
            format!("the peer does not speak TLS or sent a corrupt record ({m:?})")
        }
        E::DecryptError => "a record failed to decrypt (a replayed or tampered TLS stream)".into(),
        E::PeerIncompatible(p) => format!("the peer's TLS is incompatible ({p:?})"),
        other => other.to_string(),
    }
}

fn tls_error(e: &rustls::Error) -> io::Error {
    let kind = match e {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::AlertReceived(_) => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, format!("TLS: {}", describe(e)))
}

struct ReadSide {
    sock: Box<dyn Link>,
    buf: Box<[u8]>,
    /// Ciphertext read but not yet given to rustls: `buf[start..end]`.
    start: usize,
    end: usize,
    eof: bool,
}

struct WriteSide {
    sock: Box<dyn Link>,
    buf: Vec<u8>,
}

struct Inner {
    /// The rustls state; never held while a socket blocks.
    conn: Mutex<Connection>,
    /// The read handle; held across blocking reads.
    rd: Mutex<ReadSide>,
    /// The write handle; held across blocking writes.
    wr: Mutex<WriteSide>,
    /// Socket options and shutdown.
    ctl: Mutex<Box<dyn Link>>,
    /// Held by the one thread running the TLS handshake; the others wait on
    /// it, not on the read side, which a reader holds while it blocks.
    handshake: Mutex<()>,
    /// The TLS handshake is complete.
    ready: AtomicBool,
    /// A fatal TLS failure every later call reports.
    failed: Mutex<Option<(io::ErrorKind, String)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A TLS connection over another [`Link`]; clones share it (see the module
/// documentation for how a reader and writers share one rustls state).
pub struct TlsLink {
    inner: Arc<Inner>,
}

impl TlsLink {
    fn new(conn: Connection, link: Box<dyn Link>) -> io::Result<Self> {
        let rd = link.try_clone_link()?;
        let wr = link.try_clone_link()?;
        Ok(TlsLink {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                rd: Mutex::new(ReadSide {
                    sock: rd,
                    buf: vec![0u8; READ_BUFFER].into_boxed_slice(),
                    start: 0,
                    end: 0,
                    eof: false,
                }),
                wr: Mutex::new(WriteSide {
                    sock: wr,
                    buf: Vec::with_capacity(WRITE_CHUNK + 1024),
                }),
                ctl: Mutex::new(link),
                handshake: Mutex::new(()),
                ready: AtomicBool::new(false),
                failed: Mutex::new(None),
            }),
        })
    }

    /// Whether the TLS handshake has completed.
    pub fn is_established(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// Fails with the recorded fatal error, if any.
    fn check_failed(&self) -> io::Result<()> {
        match &*lock(&self.inner.failed) {
            Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
            None => Ok(()),
        }
    }

    /// Records a fatal failure (the first one wins) and returns it.
    fn fail(&self, e: io::Error) -> io::Error {
        let mut f = lock(&self.inner.failed);
        match &*f {
            Some((kind, msg)) => io::Error::new(*kind, msg.clone()),
            None => {
                *f = Some((e.kind(), e.to_string()));
                e
            }
        }
    }

    /// Seals everything rustls has to send into `wr.buf`, then writes it.
    /// The caller holds the write lock, so records leave in order.
    fn flush_tls(&self, wr: &mut WriteSide) -> io::Result<()> {
        {
            let mut c = lock(&self.inner.conn);
            while c.wants_write() {
                c.write_tls(&mut wr.buf)?;
            }
        }
        if wr.buf.is_empty() {
            return Ok(());
        }
        let r = wr.sock.write_all(&wr.buf).and_then(|()| wr.sock.flush());
        wr.buf.clear();
        if let Err(e) = r {
            // Part of a record may be on the wire: the stream is broken.
            // The caller sees the error as is (a timeout stays a timeout).
            let _ = self.fail(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("TLS stream broken by a failed write: {e}"),
            ));
            return Err(e);
        }
        Ok(())
    }

    /// Hands buffered ciphertext to rustls and processes it. Returns whether
    /// there was any.
    fn feed(&self, rd: &mut ReadSide, c: &mut Connection) -> io::Result<bool> {
        if rd.start >= rd.end {
            return Ok(false);
        }
        let mut slice = &rd.buf[rd.start..rd.end];
        let n = c.read_tls(&mut slice)?;
        rd.start = if n == 0 { rd.end } else { rd.start + n };
        if let Err(e) = c.process_new_packets() {
            return Err(self.fail(tls_error(&e)));
        }
        Ok(true)
    }

    /// Runs the TLS handshake if it has not completed yet.
    fn ensure_handshake(&self) -> io::Result<()> {
        if self.is_established() {
            return self.check_failed();
        }
        // Lock order: handshake, read side, write side (the only place
        // taking both sides). Outside this function the read side is only
        // held once the handshake has completed, so no thread that is
        // blocked reading holds what a thread waiting here needs.
        let _hs = lock(&self.inner.handshake);
        self.check_failed()?;
        if self.is_established() {
            return Ok(());
        }
        let mut rd = lock(&self.inner.rd);
        let mut wr = lock(&self.inner.wr);
        loop {
            self.flush_tls(&mut wr).map_err(|e| handshake_io(&e))?;
            let mut c = lock(&self.inner.conn);
            if !c.is_handshaking() {
                break;
            }
            match self.feed(&mut rd, &mut c) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    drop(c);
                    // Best effort: tell the peer why (an alert rustls queued).
                    let _ = self.flush_tls(&mut wr);
                    return Err(e);
                }
            }
            drop(c);
            if rd.eof {
                return Err(self.fail(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "TLS: the peer closed the connection during the handshake",
                )));
            }
            let ReadSide {
                sock, buf, start, ..
            } = &mut *rd;
            let n = sock.read(buf).map_err(|e| handshake_io(&e))?;
            *start = 0;
            rd.end = n;
            rd.eof = n == 0;
        }
        self.inner.ready.store(true, Ordering::Release);
        Ok(())
    }
}

/// A socket error during the TLS handshake, kind kept (a timeout stays a
/// timeout), message saying where it happened.
fn handshake_io(e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("TLS handshake: {e}"))
}

impl Read for TlsLink {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        self.ensure_handshake()?;
        let mut rd = lock(&self.inner.rd);
        loop {
            {
                let mut c = lock(&self.inner.conn);
                match c.reader().read(out) {
                    // Ok(0): the peer sent close_notify.
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // EOF without close_notify: an end like plain TCP's (the
                    // migration protocol has its own end of stream).
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if self.feed(&mut rd, &mut c)? {
                    continue;
                }
                if rd.eof {
                    return Ok(0);
                }
            }
            self.check_failed()?;
            // Block on the socket without holding the rustls state.
            let ReadSide {
                sock, buf, start, ..
            } = &mut *rd;
            let n = sock.read(buf)?;
            *start = 0;
            rd.end = n;
            rd.eof = n == 0;
        }
    }
}

impl Write for TlsLink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        self.ensure_handshake()?;
        let mut wr = lock(&self.inner.wr);
        self.check_failed()?;
        let n = {
            let mut c = lock(&self.inner.conn);
            let take = data.len().min(WRITE_CHUNK);
            c.writer().write(&data[..take])?
        };
        self.flush_tls(&mut wr)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.is_established() {
            return Ok(());
        }
        let mut wr = lock(&self.inner.wr);
        self.check_failed()?;
        self.flush_tls(&mut wr)
    }
}

impl Link for TlsLink {
    fn try_clone_link(&self) -> io::Result<Box<dyn Link>> {
        Ok(Box::new(TlsLink {
            inner: self.inner.clone(),
        }))
    }
    fn shutdown_link(&self) {
        lock(&self.inner.ctl).shutdown_link();
    }
    fn set_link_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        lock(&self.inner.ctl).set_link_read_timeout(t)
    }
    fn set_link_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        lock(&self.inner.ctl).set_link_write_timeout(t)
    }
    fn detect_dead_peer(&self, timeout: Duration) -> io::Result<()> {
        lock(&self.inner.ctl).detect_dead_peer(timeout)
    }
    fn limit_buffers(&self, bytes: usize) -> io::Result<()> {
        lock(&self.inner.ctl).limit_buffers(bytes)
    }
    fn channel_binding(&self) -> Option<[u8; 32]> {
        if !self.is_established() {
            return None;
        }
        let c = lock(&self.inner.conn);
        c.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_splits_addresses() {
        assert_eq!(host_of("10.0.0.2:1337"), "10.0.0.2");
        assert_eq!(host_of("peer.example:80"), "peer.example");
        assert_eq!(host_of("[::1]:1337"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
        assert_eq!(host_of("::1"), "::1");
    }

    #[test]
    fn unusable_pem_is_named() {
        let e = TlsConfig::from_pem(b"junk", b"junk", b"junk")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("certificate") && !e.contains('\n'), "{e}");
    }
}
