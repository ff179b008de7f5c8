//! What a VM migration did.

use drafter_storage::MigrationReport;

use crate::agent::HookSummary;
use serde::{Deserialize, Serialize};

/// Report of one VM migration, from either side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmMigrationReport {
    /// The storage engine's report (bytes, blocks, phases, and on the source
    /// the window from the suspend hook to the authority hand-over).
    pub storage: MigrationReport,
    /// Size of the VM's snapshot state in bytes.
    pub state_bytes: u64,
    /// Source: milliseconds the VMM took to pause the vCPUs and devices
    /// (part of the downtime).
    pub pause_millis: Option<f64>,
    /// Source: milliseconds to capture and frame the VM state (part of the
    /// downtime).
    pub state_millis: Option<f64>,
    /// Destination: milliseconds spent restoring the VM from the received
    /// state and memory.
    pub restore_millis: Option<f64>,
    /// Destination: wall-clock milliseconds from the source pausing the VM
    /// to the destination resuming it — the VM's downtime (meaningful when
    /// both hosts' clocks agree, e.g. on one host).
    pub vm_downtime_millis: Option<f64>,
    /// Destination: "after-complete" or "at-authority".
    pub resumed: Option<String>,
    /// Source: the guest agent's `BeforeSuspend` hook, called while the VM
    /// still ran, right before the final pause (`None`: the VM has no
    /// agent). The VM migrates even if it failed (`error`).
    pub before_suspend: Option<HookSummary>,
    /// Destination: the wait for the guest agent and its `AfterResume`
    /// hook once the VM resumed here (`None`: the VM has no agent). The VM
    /// runs here even if it failed (`error`).
    pub after_resume: Option<HookSummary>,
}

impl VmMigrationReport {
    /// The report as one line of JSON.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}
