//! The migrator: [`MigrationSource`] pushes devices, [`MigrationDestination`]
//! receives them into [`LazyDevice`](crate::LazyDevice)s.
//!
//! # The migration protocol
//!
//! The frames and their encoding are in [`crate::protocol`]; this section is
//! about order, authority and faults. "Authority" is the right to run the
//! VM (for a storage-only migration: to write the devices). The guarantee:
//! **after any single fault at any moment, at most one side runs the VM,
//! the source resumes it whenever the destination provably does not, and no
//! write the guest saw complete is lost** — with one window, Commit sent but
//! not acknowledged, that neither side can resolve alone
//! ([`Authority::Unknown`], below).
//!
//! ## Sequence
//!
//! ```text
//!  Source                                        Destination
//!  (authority: SOURCE)                           HandoverState::Receiving
//!  ────────────────────────────────────────────────────────────────────────
//!  Hello/AuthProof ◀──────────────────────────▶ Hello/AuthProof
//!  DeviceInfo × N, DevicesListed ─────────────▶
//!                                            ◀── DeviceAck × N [BaseHashes]
//!  full pass: BlockData|ZeroBlocks|AlreadyHave ▶
//!  dirty cycles: Dirty{list}, BlockData… ─────▶  (Dirty invalidates)
//!                                            ◀── NeedBlock (any time; answered first)
//!  ── suspend hook: the VM is PAUSED (not stopped) ──
//!  Dirty{final lists} ────────────────────────▶
//!  [final data, if final_data_before_authority]
//!  Event(HandoverOffered) ────────────────────▶  Offered: may read/fetch, no writes;
//!  tail: BlockData for the final dirty blocks ▶   restores the VM, PAUSED
//!  [VerifyHashes…]                              (pre-copy destination: waits
//!  Event(AllSent) ────────────────────────────▶   for AllSent and every block)
//!                                            ◀── Event(ReadyToRun)   Ready
//!  Event(Commit) ─────────────────────────────▶  (sent at once by the reader)
//!  (authority: UNKNOWN until the ack)             Committed: authority is HERE,
//!                                                 devices writable, VM resumed
//!                                            ◀── Event(Running)      Running
//!  (authority: DESTINATION; VM stopped            (tail/NeedBlock continue
//!   once migrate() returns)                        in post-copy)
//!                                            ◀── [VerifyResult…] Event(Completed)
//!  close                                          Complete
//! ```
//!
//! In post-copy ([`Mode::PostCopy`]) the source suspends and offers right
//! after the device list, the destination answers ReadyToRun as soon as it
//! can restore from the state (missing pages fetched with NeedBlock), and
//! the full pass is the tail. ReadyToRun may arrive before or after AllSent;
//! Completed always follows Running.
//!
//! ## The receiver's state machine ([`HandoverState`])
//!
//! ```text
//!            HandoverOffered            ready_to_run()          Commit
//!  Receiving ───────────────▶ Offered ───────────────▶ Ready ─────────▶ Committed
//!      │                         │      (ReadyToRun)     │                 │ running()
//!      │ any fault               │ any fault /           │ fault, or no    │ (Running)
//!      ▼                         │ decline()             │ Commit within   ▼
//!   Failed ◀─────────────────────┴───────────────────────┘ link timeout  Running
//!   (authority: source; Error frame sent if the link works;                │ AllSent seen,
//!    devices refuse writes; the VM never ran here)                          │ all present
//!                                                                           ▼
//!   Committed ── decline() (could not resume) ──▶ Failed, authority source  Complete
//!   Committed/Running ── fault ──▶ Failed, authority DESTINATION (no Error
//!   frame is sent: the VM runs here; missing blocks become unavailable)
//! ```
//!
//! Dirty lists are accepted only in `Receiving`, Commit only in `Ready`,
//! AllSent and VerifyHashes only from `Offered` on; anything else ends the
//! session with a protocol error. The caller drives the transitions
//! [`DestinationSession::ready_to_run`], [`DestinationSession::running`] and
//! [`DestinationSession::decline`]; [`DestinationSession::wait_authority`]
//! and [`DestinationSession::wait_complete`] compose them for callers with
//! no VM to restore.
//!
//! ## Rules
//!
//! Source:
//! 1. It pauses the VM in the suspend hook and never stops it before the
//!    destination's Running.
//! 2. It sends Commit only in answer to ReadyToRun, only once, and only if
//!    the migration has not already failed or been cancelled (decided under
//!    one lock with the failure path, so a failure and a Commit cannot both
//!    happen).
//! 3. Outcome of a failure ([`MigrationError::authority`]):
//!    * Commit not yet written → [`Authority::Source`]: resume the VM.
//!    * an Error frame from the destination before Running (it declined, or
//!      failed before it acted on Commit) → [`Authority::Source`]: resume.
//!    * Running received → [`Authority::Destination`]: stop the VM; in
//!      post-copy a later fault leaves the destination without its missing
//!      pages (it must stop rather than run on them; see `drafter-vmm`).
//!    * Commit written, neither Running nor Error came (link cut, peer
//!      dead, or Running not within the link timeout) →
//!      [`Authority::Unknown`]: keep the VM paused, do not destroy it.
//! 4. After AllSent, ReadyToRun must come within the link timeout (the VM is
//!    paused meanwhile); Running within the link timeout of Commit.
//!
//! Destination:
//! 1. It restores the VM paused, sends ReadyToRun, and resumes the VM only
//!    after Commit arrived; it waits at most the link timeout for Commit,
//!    then gives up (Error frame, devices refuse writes, the VM is dropped).
//! 2. After Commit it resumes the VM and sends Running; from then on it
//!    never sends an Error frame (which would tell the source to resume).
//!    If it could not resume the VM it calls `decline` (Error frame): the
//!    source resumes its own.
//! 3. A fault after Commit leaves authority here, whatever the source knows.
//!
//! ## Faults in each phase
//!
//! | fault during                         | source            | destination          | runs the VM |
//! |--------------------------------------|-------------------|----------------------|-------------|
//! | handshake … dirty cycles             | Source: resumes (was running) | fails, discards | source |
//! | suspend, final lists, offer, tail    | Source: resumes   | fails, discards      | source      |
//! | after ReadyToRun, before Commit sent | Source: resumes   | no Commit: discards  | source      |
//! | Commit lost in flight                | **Unknown**: paused | no Commit: discards | nobody (operator resumes the source) |
//! | Commit received, Running lost        | **Unknown**: paused | runs               | destination |
//! | destination declines after Commit    | Source: resumes   | never ran            | source      |
//! | after Running (post-copy page serving) | Destination: stops | runs; missing pages unavailable | destination (stops at a missing page) |
//! | after Completed                      | Destination       | runs                 | destination |
//!
//! The two **Unknown** rows are the remaining window: the source cannot
//! tell a destination that runs the VM from one that never got Commit (or
//! died). It never resumes on its own then; [`Authority::Unknown`] asks an
//! operator (or a higher-level retry that can reach the destination) to
//! decide. `drafter`'s VM source keeps the VM paused and saves it as a
//! snapshot so it can be restored if the destination does not run it.
//!
//! The window is short: Commit is sent the moment ReadyToRun arrives, and
//! the destination answers Running as soon as `resume` returns, so the
//! bytes at risk are two small frames one round trip apart.

mod config;
mod converge;
mod destination;
mod source;

pub use config::{DeviceConfig, MigrationConfig, Mode, OnNoConvergence};
pub use converge::ThrottleHook;
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
    /// The guest dirties faster than the link drains and the configured
    /// remedy is to give up ([`OnNoConvergence::GiveUp`]): the source was
    /// never suspended and keeps authority.
    #[error("gave up: {0}")]
    NoConvergence(String),
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
