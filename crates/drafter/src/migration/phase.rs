//! Where a VM migration is, for observers (progress displays, fault
//! injection): the storage engine's phases and the VM's own steps on the
//! destination.

use std::sync::Arc;

use drafter_storage::migrator::{Observer, Progress};
use drafter_storage::Phase;

/// A step of a VM migration, reported as it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmPhase {
    /// A phase of the storage engine (see [`drafter_storage::migrator`]):
    /// on the source every phase it enters, on the destination the ones
    /// [`drafter_storage::MigrationDestination::accept_observed`] reports.
    Engine(Phase),
    /// Destination: what the VM needs has arrived (every block, or for
    /// [`Resume::AtAuthority`](super::Resume::AtAuthority) the handover
    /// offer; its drives are fetched whole now); the VM is restored, paused.
    Restore,
    /// Destination: the VM is restored and paused; authority is asked for
    /// (ReadyToRun) and Commit awaited.
    ReadyToRun,
    /// Destination ([`Resume::AtAuthority`](super::Resume::AtAuthority)):
    /// the VM runs here; the memory still missing arrives in the background
    /// or is fetched as the guest touches it.
    PostCopyFetch,
}

impl VmPhase {
    /// The phase's name in events (kebab-case): `handshake`, `device-info`,
    /// `full-pass`, `dirty-cycles`, `suspend`, `final-dirty`, `tail`,
    /// `verify`, `authority` (Commit sent by the source / received by the
    /// destination), `authority-accepted` (Running received / sent),
    /// `complete`, `restore`, `ready-to-run`, `post-copy-fetch`.
    pub fn name(self) -> &'static str {
        match self {
            VmPhase::Engine(p) => match p {
                Phase::Handshake => "handshake",
                Phase::DeviceInfo => "device-info",
                Phase::FullPass => "full-pass",
                Phase::DirtyCycles => "dirty-cycles",
                Phase::Suspend => "suspend",
                Phase::FinalDirty => "final-dirty",
                Phase::AuthorityTransferred => "authority",
                Phase::AuthorityAccepted => "authority-accepted",
                Phase::Tail => "tail",
                Phase::Verify => "verify",
                Phase::Complete => "complete",
            },
            VmPhase::Restore => "restore",
            VmPhase::ReadyToRun => "ready-to-run",
            VmPhase::PostCopyFetch => "post-copy-fetch",
        }
    }
}

impl std::fmt::Display for VmPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Told of each [`VmPhase`] as it starts, from the thread that reaches it.
pub type VmObserver = Arc<dyn Fn(VmPhase) + Send + Sync>;

/// The storage engine's observer that passes its phases on to `observer`.
pub fn engine_observer(observer: VmObserver) -> Observer {
    Arc::new(move |p: &Progress| {
        if let Progress::Phase(phase) = p {
            observer(VmPhase::Engine(*phase));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_kebab_case() {
        let all = [
            VmPhase::Engine(Phase::Handshake),
            VmPhase::Engine(Phase::DeviceInfo),
            VmPhase::Engine(Phase::FullPass),
            VmPhase::Engine(Phase::DirtyCycles),
            VmPhase::Engine(Phase::Suspend),
            VmPhase::Engine(Phase::FinalDirty),
            VmPhase::Engine(Phase::AuthorityTransferred),
            VmPhase::Engine(Phase::AuthorityAccepted),
            VmPhase::Engine(Phase::Tail),
            VmPhase::Engine(Phase::Verify),
            VmPhase::Engine(Phase::Complete),
            VmPhase::Restore,
            VmPhase::ReadyToRun,
            VmPhase::PostCopyFetch,
        ];
        let mut names: Vec<&str> = all.iter().map(|p| p.name()).collect();
        assert!(names
            .iter()
            .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '-')));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len());
    }
}
