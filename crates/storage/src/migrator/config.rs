//! Migration settings, with the Go Drafter's per-device JSON fields.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::Secret;
use crate::device::DEFAULT_BLOCK_SIZE;

/// Per-device settings, deserialisable from the Go Drafter's `--devices`
/// JSON fields (`blockSize`, `expiry` and `cycleThrottle` in nanoseconds,
/// `maxDirtyBlocks`, `minCycles`, `maxCycles`). Unknown fields are ignored so
/// the whole device object can be passed in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeviceConfig {
    /// Block size in bytes.
    pub block_size: u32,
    /// Window of the volatility monitor.
    #[serde(with = "nanos")]
    pub expiry: Duration,
    /// A cycle with fewer dirty blocks than this counts as quiet.
    pub max_dirty_blocks: u64,
    /// Quiet cycles needed (strictly more than this many in a row).
    pub min_cycles: u32,
    /// Cycles after which the device is ready regardless.
    pub max_cycles: u32,
    /// Pause between cycles.
    #[serde(with = "nanos")]
    pub cycle_throttle: Duration,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            block_size: DEFAULT_BLOCK_SIZE,
            expiry: Duration::from_secs(1),
            max_dirty_blocks: 200,
            min_cycles: 5,
            max_cycles: 20,
            cycle_throttle: Duration::from_millis(500),
        }
    }
}

mod nanos {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_nanos(u64::deserialize(d)?))
    }
}

/// How authority moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Full pass and dirty cycles first, authority at the end (live migration).
    #[default]
    PreCopy,
    /// Authority immediately, every block in the tail (a registry).
    PostCopy,
}

/// The remedy when the dirty rate exceeds what the link drains (the dirty
/// set does not shrink over two cycles, or the dirty rate exceeds the
/// measured bandwidth) and the downtime budget cannot be met.
///
/// Switching to post-copy mid-migration is not offered: a pre-copy
/// destination waits for every block before it asks for authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnNoConvergence {
    /// Auto-converge: slow the guest down through the source's throttle
    /// hook ([`MigrationSource::with_throttle`](super::MigrationSource::with_throttle)),
    /// 20 % first, 10 % more after each cycle that still does not
    /// converge, up to 95 %; `maxCycles` still ends the cycles.
    #[default]
    Throttle,
    /// Fail before suspending: the source keeps authority (and the VM runs
    /// on); the error names the dirty rate and the bandwidth.
    GiveUp,
    /// Keep cycling; stop anyway at `maxCycles` (the reference's behaviour).
    Stop,
}

/// Settings for one migration.
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    /// Pre-copy or pure post-copy.
    pub mode: Mode,
    /// The downtime budget, summed across devices: the dirty cycles end
    /// once the predicted stop time (the dirty bytes of every device over
    /// the measured bandwidth, plus [`Self::stop_allowance`]) fits in it.
    pub max_downtime: Duration,
    /// Fixed part of the predicted downtime that does not depend on the
    /// dirty set (capturing and restoring the VM state, a round trip).
    pub stop_allowance: Duration,
    /// What to do when the guest dirties faster than the link drains.
    pub on_no_convergence: OnNoConvergence,
    /// zstd-compress block data (level 1) when it helps.
    pub compression: bool,
    /// Compare per-block blake3 hashes at the end.
    pub verify: bool,
    /// Shared secret for authentication.
    pub secret: Secret,
    /// Limit for the handshake (and, on the destination, the device list).
    pub handshake_timeout: Duration,
    /// Liveness bound for everything after the handshake: each side sends a
    /// keepalive frame when it has had nothing to send for a third of this,
    /// and a migration fails with [`Cause::LinkTimeout`](super::Cause::LinkTimeout)
    /// when nothing at all arrived from the peer, or the peer accepted none
    /// of our data, for this long (a frozen peer process, a host gone, a
    /// silently dropped link). On TCP links, kernel keepalive probes and
    /// TCP_USER_TIMEOUT are set to the same bound. [`Duration::ZERO`]
    /// disables all of this (waits are then unbounded).
    pub link_timeout: Duration,
    /// Bulk bytes queued ahead of the socket before the sender waits.
    pub bulk_queue_bytes: usize,
    /// Send the final dirty blocks' data before handing authority over
    /// (stop-and-copy tail: longer downtime, the destination never waits for
    /// a block). By default only their list is sent and the data follows in
    /// the post-copy tail.
    pub final_data_before_authority: bool,
    /// Bound on data queued in the kernel ahead of a need-block reply: on
    /// TCP the unsent-queue low-water mark (TCP_NOTSENT_LOWAT, receive buffer
    /// 4x), on Unix sockets SO_SNDBUF. `None` leaves kernel autotuning alone.
    pub socket_buffer_bytes: Option<usize>,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            mode: Mode::PreCopy,
            max_downtime: Duration::from_millis(100),
            stop_allowance: Duration::from_millis(20),
            on_no_convergence: OnNoConvergence::Throttle,
            compression: false,
            verify: false,
            secret: Secret::default(),
            handshake_timeout: Duration::from_secs(10),
            link_timeout: Duration::from_secs(10),
            bulk_queue_bytes: 512 * 1024,
            socket_buffer_bytes: Some(64 * 1024),
            final_data_before_authority: false,
        }
    }
}

impl MigrationConfig {
    /// [`Self::link_timeout`], or `None` if disabled.
    pub(crate) fn link_timeout_bound(&self) -> Option<Duration> {
        Some(self.link_timeout).filter(|t| !t.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_drafter_device_json() {
        let j = r#"{"name":"memory","base":"out/package/memory.bin","blockSize":65536,"expiry":1000000000,
                    "maxDirtyBlocks":200,"minCycles":5,"maxCycles":20,"cycleThrottle":500000000}"#;
        let c: DeviceConfig = serde_json::from_str(j).unwrap();
        assert_eq!(c, DeviceConfig::default());
        let c: DeviceConfig =
            serde_json::from_str(r#"{"blockSize":4096,"cycleThrottle":0}"#).unwrap();
        assert_eq!(c.block_size, 4096);
        assert_eq!(c.cycle_throttle, Duration::ZERO);
        assert_eq!(c.max_cycles, 20);
        assert!(serde_json::from_str::<DeviceConfig>(r#"{"expiry":-1}"#).is_err());
    }
}
