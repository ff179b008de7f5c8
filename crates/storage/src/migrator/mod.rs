//! The migrator: [`MigrationSource`] pushes devices, [`MigrationDestination`]
//! receives them into [`LazyDevice`](crate::LazyDevice)s.

mod config;
mod destination;
mod source;

pub use config::{DeviceConfig, MigrationConfig, Mode};
pub use destination::{
    DestinationDevice, DestinationSession, HandoverState, Initial, MigrationDestination,
};
pub use source::{MigrationSource, SourceDevice};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::StorageError;
use crate::protocol::ProtocolError;
use crate::report::Phase;
use crate::transport::{Link, LinkTimeout, Silence, WriterStopped};

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// The peer or the connection misbehaved.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A local device failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The caller cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The connection failed (reported by the receiving thread).
    #[error("connection failed: {0}")]
    Connection(String),
    /// The caller's suspend hook or device factory failed.
    #[error("{0}")]
    Caller(String),
    /// The peer showed no sign of life for the link timeout
    /// ([`MigrationConfig::link_timeout`]).
    #[error(transparent)]
    LinkTimeout(#[from] LinkTimeout),
    /// The peer is alive but a handover step it owes did not come within
    /// the link timeout (a destination that got no Commit after ReadyToRun,
    /// a source that got no Running after Commit).
    #[error("handover: no {awaited} within {:.1} s", .waited.as_secs_f64())]
    HandoverTimeout {
        /// The event that did not come.
        awaited: &'static str,
        /// How long it was awaited.
        waited: std::time::Duration,
    },
    /// The destination declined the handover: it does not run the VM.
    #[error("the destination declined the handover: {0}")]
    Declined(String),
}

impl Cause {
    /// True if this failure means the peer cannot hear us any more, so
    /// telling it why (an Error frame) is pointless.
    pub(crate) fn link_is_gone(&self) -> bool {
        matches!(
            self,
            Cause::Protocol(
                ProtocolError::Peer(_)
                    | ProtocolError::Io(_)
                    | ProtocolError::Closed
                    | ProtocolError::TimedOut
            ) | Cause::LinkTimeout(_)
                | Cause::HandoverTimeout { .. }
                | Cause::Declined(_)
        )
    }

    /// The cause of a receive loop's failure on a link whose read timeout
    /// is `link_timeout`: a read timeout becomes [`Cause::LinkTimeout`], and
    /// so does any read error after the writer timed out (it shuts the link
    /// down, so the reader then sees the connection closed).
    pub(crate) fn of_receive(
        self,
        link_timeout: Option<std::time::Duration>,
        writer: Option<WriterStopped>,
    ) -> Cause {
        match (self, link_timeout, writer) {
            (Cause::Protocol(ProtocolError::TimedOut), Some(waited), _) => {
                Cause::LinkTimeout(LinkTimeout {
                    silence: Silence::Receiving,
                    waited,
                })
            }
            (Cause::Protocol(_) | Cause::Connection(_), _, Some(WriterStopped::TimedOut(t))) => {
                Cause::LinkTimeout(t)
            }
            (c, _, _) => c,
        }
    }
}

impl From<WriterStopped> for Cause {
    fn from(e: WriterStopped) -> Self {
        match e {
            WriterStopped::TimedOut(t) => Cause::LinkTimeout(t),
            WriterStopped::Failed(why) => Cause::Connection(why),
        }
    }
}

/// Who holds authority (who may run the VM) after a failed migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Authority {
    /// The source: the destination provably does not run the VM (it never
    /// received Commit, or it declined it). The caller resumes the VM and
    /// may retry.
    Source,
    /// The destination: it acknowledged that it runs the VM (Running). The
    /// source must never resume it.
    Destination,
    /// Commit was sent but neither Running nor a refusal came back before
    /// the link failed: the destination runs the VM if it received Commit,
    /// and does not if it did not. The source must keep its VM paused (not
    /// resumed, not destroyed) until an operator has checked the
    /// destination.
    Unknown,
}

impl std::fmt::Display for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Authority::Source => "source",
            Authority::Destination => "destination",
            Authority::Unknown => "unknown",
        })
    }
}

fn authority_note(a: Authority) -> &'static str {
    match a {
        Authority::Source => "",
        Authority::Destination => " (authority was handed over: do not resume the source)",
        Authority::Unknown => {
            " (authority unknown: Commit was sent but not acknowledged; keep the source \
             paused until the destination is known not to run the VM)"
        }
    }
}

/// A failed migration: where it failed and who holds authority now.
#[derive(Debug, thiserror::Error)]
#[error("migration failed during {phase}: {cause}{}", authority_note(*.authority))]
pub struct MigrationError {
    /// Phase in which it failed.
    pub phase: Phase,
    /// Who holds authority now. On a destination this is
    /// [`Authority::Destination`] once it received Commit, and
    /// [`Authority::Source`] otherwise (it never runs the VM then).
    pub authority: Authority,
    /// What went wrong.
    #[source]
    pub cause: Cause,
}

impl MigrationError {
    /// True if the source holds authority: the caller may (and should)
    /// resume the source VM, and may retry later.
    pub fn source_keeps_authority(&self) -> bool {
        self.authority == Authority::Source
    }
}

/// Progress notifications for observers (progress bars, fault injection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A phase started.
    Phase(Phase),
    /// Blocks handled so far in the current pass.
    Blocks {
        /// Blocks done.
        done: u64,
        /// Blocks in the pass.
        total: u64,
    },
    /// A dirty cycle of one device finished.
    Cycle {
        /// Device index.
        device: usize,
        /// Cycle number (1-based).
        cycle: u32,
        /// Dirty blocks found.
        dirty: u64,
    },
}

/// Observer callback.
pub type Observer = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Cancels migrations from another thread: every migration running on the
/// [`MigrationSource`] it came from (one source may serve many readers).
#[derive(Clone, Default)]
pub struct CancelHandle(Arc<CancelInner>);

#[derive(Default)]
struct CancelInner {
    cancelled: AtomicBool,
    next_id: std::sync::atomic::AtomicU64,
    links: Mutex<Vec<(u64, Box<dyn Link>)>>,
}

/// Keeps a running migration's link registered for cancellation.
pub(crate) struct Attached {
    handle: CancelHandle,
    id: u64,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut links = self
            .handle
            .0
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        links.retain(|(id, _)| *id != self.id);
    }
}

impl CancelHandle {
    /// Cancels: running migrations stop with [`Cause::Cancelled`], their
    /// connections are shut down, and later ones fail at once.
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        for (_, l) in self
            .0
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            l.shutdown_link();
        }
    }

    /// True once [`Self::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    pub(crate) fn attach(&self, link: Box<dyn Link>) -> Attached {
        let id = self.0.next_id.fetch_add(1, Ordering::SeqCst);
        let mut links = self.0.links.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_cancelled() {
            link.shutdown_link();
        }
        links.push((id, link));
        Attached {
            handle: self.clone(),
            id,
        }
    }
}
