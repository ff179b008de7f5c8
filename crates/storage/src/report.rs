//! What a migration did, for CLIs to print as JSON.

use serde::{Deserialize, Serialize};

/// Phases of a migration, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Versioned handshake and authentication.
    Handshake,
    /// Exchanging device descriptions (and base hashes).
    DeviceInfo,
    /// First pass over every block.
    FullPass,
    /// Repeated {take dirty → send} cycles.
    DirtyCycles,
    /// The caller's suspend hook (the VM is paused in it).
    Suspend,
    /// Taking and sending the final dirty lists once the VM is paused
    /// (pre-copy only).
    FinalDirty,
    /// Authority has been handed over (destination may resume).
    AuthorityTransferred,
    /// The destination confirmed it holds authority.
    AuthorityAccepted,
    /// Pushing blocks the destination still lacks after authority moved.
    Tail,
    /// Comparing per-block hashes.
    Verify,
    /// Done.
    Complete,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Phase::Handshake => "handshake",
            Phase::DeviceInfo => "device info",
            Phase::FullPass => "full pass",
            Phase::DirtyCycles => "dirty cycles",
            Phase::Suspend => "suspend",
            Phase::FinalDirty => "final dirty set",
            Phase::AuthorityTransferred => "authority transfer",
            Phase::AuthorityAccepted => "authority accepted",
            Phase::Tail => "post-copy tail",
            Phase::Verify => "verification",
            Phase::Complete => "completion",
        };
        f.write_str(s)
    }
}

/// Time spent in one phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseTiming {
    /// The phase.
    pub phase: Phase,
    /// Milliseconds spent in it.
    pub millis: f64,
}

/// Per-device outcome.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceReport {
    /// Device name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Dirty cycles run (source).
    pub cycles: u32,
    /// Dirty blocks found in each cycle (source).
    pub dirty_per_cycle: Vec<u64>,
    /// Blocks in the final dirty set taken after suspend (source).
    pub final_dirty: u64,
    /// Why the device was considered ready (source).
    pub ready_reason: String,
    /// Blocks whose verification hash differed, if verification ran.
    pub mismatched_blocks: Option<u64>,
    /// Up to 64 of the mismatched block indices.
    pub mismatch_sample: Vec<u64>,
}

/// Report of one migration, from either side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MigrationReport {
    /// "source" or "destination".
    pub role: String,
    /// "pre-copy" or "post-copy".
    pub mode: String,
    /// Bytes written to the connection.
    pub bytes_sent: u64,
    /// Bytes read from the connection.
    pub bytes_received: u64,
    /// Block data frames sent or received.
    pub data_blocks: u64,
    /// Zero blocks sent or received without payload.
    pub zero_blocks: u64,
    /// Bytes of ZeroBlocks frames on the wire.
    pub zero_wire_bytes: u64,
    /// Blocks skipped because the destination's base already had them.
    pub already_have_blocks: u64,
    /// Priority block requests served (source) or issued (destination).
    pub need_block_requests: u64,
    /// Bytes saved by compression.
    pub compression_saved_bytes: u64,
    /// Time in each phase.
    pub phases: Vec<PhaseTiming>,
    /// From the start of the suspend hook until authority was handed over
    /// (source) — the window in which the VM runs nowhere.
    pub downtime_millis: f64,
    /// Whole migration, milliseconds.
    pub total_millis: f64,
    /// The link's bandwidth measured over the recent busy sends (source),
    /// bytes/s.
    pub bandwidth_bytes_per_sec: f64,
    /// The guest's dirty rate over the last cycles, all devices (source),
    /// bytes/s.
    pub dirty_rate_bytes_per_sec: f64,
    /// The downtime predicted when the dirty cycles ended (source), ms.
    pub predicted_downtime_millis: Option<f64>,
    /// The downtime budget (source), ms.
    pub max_downtime_millis: f64,
    /// The highest vCPU throttle applied to converge (source), percent.
    pub throttle_percent: u8,
    /// Which rule ended the dirty cycles (source).
    pub ready_reason: String,
    /// Devices.
    pub devices: Vec<DeviceReport>,
}

impl MigrationReport {
    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}
