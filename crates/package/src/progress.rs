//! Progress reports: bytes done out of a total, per phase, so a caller can
//! draw a progress bar.

/// What is being done to the bytes counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Archive, first pass: hashing the device files for the manifest.
    Hashing,
    /// Archive, second pass: reading, compressing and writing the devices.
    Compressing,
    /// Extract: decompressing, verifying and writing the requested devices.
    Extracting,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Hashing => "hashing",
            Phase::Compressing => "compressing",
            Phase::Extracting => "extracting",
        })
    }
}

/// One progress report: `done` of `total` device bytes in `phase`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// The current phase.
    pub phase: Phase,
    /// Device bytes processed so far in this phase.
    pub done: u64,
    /// Device bytes this phase processes in all.
    pub total: u64,
}

/// A progress callback that ignores every report.
pub fn no_progress(_: Progress) {}
