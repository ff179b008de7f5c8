//! Host side: listens on the VMM's hybrid-vsock sockets for the liveness
//! signal and the agent, and calls the agent's hooks.
//!
//! With Firecracker-style hybrid vsock, a guest connection to vsock port `P`
//! arrives as a Unix-socket connection to `<uds_path>_<P>`.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::hook::HookReport;
use crate::line::{Line, LineReader};
use crate::protocol::{
    to_line, Call, ErrorKind, Hello, Reply, Request, MAX_LINE, PROTOCOL_VERSION,
};

/// Errors of the host side.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Binding the listening socket failed.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Something other than a stale socket occupies the socket path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Nothing happened in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The agent could not serve the call.
    #[error("agent rejected {call}: {kind:?}: {message}")]
    Remote {
        /// The call.
        call: Call,
        /// Error category reported by the agent.
        kind: ErrorKind,
        /// Detail reported by the agent.
        message: String,
    },
    /// The hook ran and failed.
    #[error("{call} hook failed (exit code {:?}, signal {:?}): {}", report.exit_code, report.signal, report.stderr.trim())]
    HookFailed {
        /// The call.
        call: Call,
        /// What the agent reported.
        report: Box<HookReport>,
    },
    /// The hook ran past its timeout and was killed.
    #[error("{call} hook timed out and was killed")]
    HookTimedOut {
        /// The call.
        call: Call,
        /// What the agent reported.
        report: Box<HookReport>,
    },
    /// The agent connection kept dropping during the call.
    #[error("agent connection lost during {0}")]
    Disconnected(Call),
    /// Other socket errors.
    #[error("agent socket error: {0}")]
    Io(#[from] io::Error),
}

/// `<uds_path>_<port>`: where the VMM forwards guest connections to `port`.
pub fn port_socket_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = uds_path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// A bound Unix listener whose socket file is removed on drop.
#[derive(Debug)]
struct PortListener {
    listener: UnixListener,
    path: PathBuf,
}

impl PortListener {
    fn bind(path: PathBuf) -> Result<Self, HostError> {
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_socket() => {
                std::fs::remove_file(&path).map_err(|source| HostError::Listen {
                    path: path.clone(),
                    source,
                })?;
            }
            Ok(_) => return Err(HostError::NotASocket(path)),
            Err(_) => {}
        }
        let listener = UnixListener::bind(&path).map_err(|source| HostError::Listen {
            path: path.clone(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| HostError::Listen {
                path: path.clone(),
                source,
            })?;
        Ok(Self { listener, path })
    }

    /// Accepts a connection if one is queued.
    fn try_accept(&self) -> io::Result<Option<UnixStream>> {
        match self.listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                Ok(Some(stream))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Accepts a connection, waiting until `deadline` at most.
    fn accept_until(&self, deadline: Instant) -> io::Result<Option<UnixStream>> {
        loop {
            if let Some(s) = self.try_accept()? {
                return Ok(Some(s));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
            // SAFETY: `pfd` is a valid pollfd for the duration of the call and
            // the count passed is 1, matching the single struct.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

impl Drop for PortListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Waits for the guest's liveness connection.
#[derive(Debug)]
pub struct LivenessServer {
    port: PortListener,
}

impl LivenessServer {
    /// Listens on `<uds_path>_<port>`.
    pub fn listen(uds_path: &Path, port: u32) -> Result<Self, HostError> {
        Ok(Self {
            port: PortListener::bind(port_socket_path(uds_path, port))?,
        })
    }

    /// The socket path listened on.
    pub fn path(&self) -> &Path {
        &self.port.path
    }

    /// Returns once the guest has connected, or fails after `timeout`.
    pub fn wait(&self, timeout: Duration) -> Result<(), HostError> {
        match self.port.accept_until(Instant::now() + timeout)? {
            Some(_) => {
                info!("guest liveness signal received");
                Ok(())
            }
            None => Err(HostError::Timeout {
                what: "the guest's liveness signal".to_owned(),
                timeout,
            }),
        }
    }
}

/// Talks to the guest agent: accepts its (re)connections and calls hooks.
#[derive(Debug)]
pub struct AgentServer {
    port: PortListener,
    conn: Option<LineReader<UnixStream>>,
    next_id: u64,
}

impl AgentServer {
    /// Listens on `<uds_path>_<port>`.
    pub fn listen(uds_path: &Path, port: u32) -> Result<Self, HostError> {
        Ok(Self {
            port: PortListener::bind(port_socket_path(uds_path, port))?,
            conn: None,
            next_id: 1,
        })
    }

    /// The socket path listened on.
    pub fn path(&self) -> &Path {
        &self.port.path
    }

    /// Waits until an agent has connected and greeted.
    pub fn wait_connected(&mut self, timeout: Duration) -> Result<(), HostError> {
        let deadline = Instant::now() + timeout;
        self.adopt_newest(deadline)?;
        if self.conn.is_none() {
            self.conn = Some(self.accept_agent(deadline, timeout)?);
        }
        Ok(())
    }

    /// Runs the agent's `BeforeSuspend` hook; the whole call, including
    /// waiting for the agent to (re)connect, is bounded by `timeout`.
    pub fn before_suspend(&mut self, timeout: Duration) -> Result<HookReport, HostError> {
        self.call(Call::BeforeSuspend, timeout)
    }

    /// Runs the agent's `AfterResume` hook; see [`Self::before_suspend`].
    pub fn after_resume(&mut self, timeout: Duration) -> Result<HookReport, HostError> {
        self.call(Call::AfterResume, timeout)
    }

    /// Accepts every queued connection; the newest one that greets properly
    /// replaces the current connection (an agent reconnects after a restore,
    /// leaving the old connection dead).
    fn adopt_newest(&mut self, deadline: Instant) -> Result<(), HostError> {
        while let Some(stream) = self.port.try_accept()? {
            if let Some(conn) = greet(stream, deadline) {
                debug!("adopting newer agent connection");
                self.conn = Some(conn);
            }
        }
        Ok(())
    }

    fn accept_agent(
        &self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<LineReader<UnixStream>, HostError> {
        loop {
            match self.port.accept_until(deadline)? {
                Some(stream) => {
                    if let Some(conn) = greet(stream, deadline) {
                        info!("agent connected");
                        return Ok(conn);
                    }
                }
                None => {
                    return Err(HostError::Timeout {
                        what: "the guest agent to connect".to_owned(),
                        timeout,
                    })
                }
            }
        }
    }

    fn call(&mut self, call: Call, timeout: Duration) -> Result<HookReport, HostError> {
        let deadline = Instant::now() + timeout;
        let timed_out = || HostError::Timeout {
            what: format!("the agent's {call} reply"),
            timeout,
        };
        // A dead connection is usually only noticed on use; retry on a fresh
        // one a few times (the hook may then run again, as after a restore).
        for _ in 0..3 {
            self.adopt_newest(deadline)?;
            let mut conn = match self.conn.take() {
                Some(c) => c,
                None => self.accept_agent(deadline, timeout)?,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            // Leave the agent a margin to report back after killing the hook.
            let margin = (left / 10).min(Duration::from_millis(500));
            let id = self.next_id;
            self.next_id += 1;
            let request = Request {
                v: PROTOCOL_VERSION,
                id,
                call,
                timeout_ms: u64::try_from((left - margin).as_millis()).unwrap_or(u64::MAX),
            };
            if let Err(e) = conn.get_mut().write_all(&to_line(&request)) {
                debug!(error = %e, "agent connection dead on write");
                continue;
            }
            match read_reply(&mut conn, id, deadline) {
                ReplyOutcome::Reply(reply) => {
                    self.conn = Some(conn);
                    return interpret(call, reply);
                }
                ReplyOutcome::TimedOut => {
                    // Keep the connection: a late reply is skipped by id.
                    self.conn = Some(conn);
                    return Err(timed_out());
                }
                ReplyOutcome::Dropped => debug!("agent connection dropped during call"),
            }
        }
        Err(HostError::Disconnected(call))
    }
}

enum ReplyOutcome {
    Reply(Reply),
    TimedOut,
    Dropped,
}

fn read_reply(conn: &mut LineReader<UnixStream>, id: u64, deadline: Instant) -> ReplyOutcome {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return ReplyOutcome::TimedOut;
        }
        if conn.get_ref().set_read_timeout(Some(left)).is_err() {
            return ReplyOutcome::Dropped;
        }
        let line = match conn.next_line() {
            Ok(Line::Message(line)) => line,
            Ok(Line::TooLong) => {
                warn!("agent sent an over-long line; ignored");
                continue;
            }
            Ok(Line::Eof) => return ReplyOutcome::Dropped,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return ReplyOutcome::TimedOut
            }
            Err(_) => return ReplyOutcome::Dropped,
        };
        let reply: Reply = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "agent sent a malformed reply; ignored");
                continue;
            }
        };
        // Replies to earlier (timed-out) calls are stale; an id-less error
        // means the agent could not read our request at all.
        if reply.id == Some(id) || (reply.id.is_none() && reply.error.is_some()) {
            return ReplyOutcome::Reply(reply);
        }
        debug!(got = ?reply.id, want = id, "skipping stale reply");
    }
}

/// What the host makes of the agent's `reply` to `call`: the hook's report,
/// or the error it names. Public for the fuzz targets only.
#[doc(hidden)]
pub fn interpret(call: Call, reply: Reply) -> Result<HookReport, HostError> {
    if let Some(err) = reply.error {
        return Err(HostError::Remote {
            call,
            kind: err.kind,
            message: err.message,
        });
    }
    let Some(report) = reply.ok else {
        return Err(HostError::Remote {
            call,
            kind: ErrorKind::Malformed,
            message: "reply carries neither `ok` nor `error`".to_owned(),
        });
    };
    if report.timed_out {
        Err(HostError::HookTimedOut {
            call,
            report: Box::new(report),
        })
    } else if !report.succeeded() {
        Err(HostError::HookFailed {
            call,
            report: Box::new(report),
        })
    } else {
        Ok(report)
    }
}

/// Reads the agent's greeting; `None` (connection dropped) if it is not one.
fn greet(stream: UnixStream, deadline: Instant) -> Option<LineReader<UnixStream>> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left)).ok()?;
    let mut conn = LineReader::new(stream, MAX_LINE);
    match conn.next_line() {
        Ok(Line::Message(line)) => match serde_json::from_slice::<Hello>(&line) {
            Ok(h) if h.v == PROTOCOL_VERSION && h.hello.role == "agent" => {
                info!(version = %h.hello.version, "agent greeted");
                Some(conn)
            }
            Ok(h) => {
                warn!(v = h.v, role = %h.hello.role, "unsupported agent greeting; dropping");
                None
            }
            Err(e) => {
                warn!(error = %e, "malformed agent greeting; dropping");
                None
            }
        },
        other => {
            warn!(?other, "no agent greeting; dropping");
            None
        }
    }
}
