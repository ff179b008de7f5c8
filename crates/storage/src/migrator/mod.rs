//! The migrator: [`MigrationSource`] pushes devices, [`MigrationDestination`]
//! receives them into [`LazyDevice`](crate::LazyDevice)s.

mod config;
mod destination;
mod source;

pub use config::{DeviceConfig, MigrationConfig, Mode};
pub use destination::{DestinationDevice, DestinationSession, Initial, MigrationDestination};
pub use source::{MigrationSource, SourceDevice};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::StorageError;
use crate::protocol::ProtocolError;
use crate::report::Phase;
use crate::transport::Link;

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
}

/// A failed migration: where it failed and who holds authority now.
#[derive(Debug, thiserror::Error)]
#[error("migration failed during {phase}: {cause}{}", if *.source_keeps_authority { "" } else { " (authority was handed over: do not resume the source)" })]
pub struct MigrationError {
    /// Phase in which it failed.
    pub phase: Phase,
    /// True if authority was never handed over: the caller may resume the
    /// source VM and retry later. False once the authority frame may have
    /// reached the destination.
    pub source_keeps_authority: bool,
    /// What went wrong.
    #[source]
    pub cause: Cause,
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

/// Cancels a running migration from another thread.
#[derive(Clone, Default)]
pub struct CancelHandle(Arc<CancelInner>);

#[derive(Default)]
struct CancelInner {
    cancelled: AtomicBool,
    link: Mutex<Option<Box<dyn Link>>>,
}

impl CancelHandle {
    /// Cancels: the migration stops with [`Cause::Cancelled`] and the
    /// connection is shut down.
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        if let Some(l) = &*self.0.link.lock().unwrap_or_else(|p| p.into_inner()) {
            l.shutdown_link();
        }
    }

    /// True once [`Self::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    pub(crate) fn attach(&self, link: Box<dyn Link>) {
        let mut g = self.0.link.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_cancelled() {
            link.shutdown_link();
        }
        *g = Some(link);
    }
}
