//! Convergence of the dirty cycles: the link's bandwidth and the guest's
//! dirty rate, the stop rule by predicted downtime, and the remedy when the
//! guest dirties faster than the link drains ([`OnNoConvergence`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{MigrationConfig, OnNoConvergence};

/// Slows the guest down: called with the share of time (0–100 %) its vCPUs
/// should spend out of the guest; 0 removes the throttle.
pub type ThrottleHook = Arc<dyn Fn(u8) + Send + Sync>;

/// First throttle step, in percent.
const FIRST_STEP: u8 = 20;
/// Each further step, in percent.
const STEP: u8 = 10;
/// The highest throttle applied.
const MAX_THROTTLE: u8 = 95;
/// Sends smaller than this do not update the bandwidth estimate: the link
/// was not busy long enough to show its rate.
const MIN_SAMPLE_BYTES: u64 = 256 * 1024;
/// Weight of the newest bandwidth sample.
const ALPHA: f64 = 0.5;

/// What the dirty cycles should do after a round.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Keep cycling.
    Continue,
    /// The predicted downtime fits the budget: stop now, for this reason.
    Fits(String),
    /// The guest outruns the link and the remedy is to give up.
    GiveUp(String),
}

/// Rates and the convergence decision of one migration's dirty cycles.
pub(crate) struct Convergence {
    max_downtime: Duration,
    allowance: Duration,
    remedy: OnNoConvergence,
    hook: Option<ThrottleHook>,
    /// Bytes/s, EWMA over busy sends; 0 while unknown.
    bandwidth: f64,
    /// Per device: dirty bytes found by its last cycle.
    dirty_bytes: Vec<u64>,
    /// Per device: dirty bytes/s over its last cycle.
    dirty_rate: Vec<f64>,
    /// Per device: when its dirty set was last taken.
    last_take: Vec<Instant>,
    /// Total dirty bytes after each round.
    totals: Vec<u64>,
    /// Throttle level applied, percent.
    pub(crate) throttle: u8,
    /// The last predicted downtime.
    pub(crate) predicted: Option<Duration>,
}

fn mb(bytes_per_sec: f64) -> f64 {
    bytes_per_sec / 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Convergence {
    /// Starts measuring `devices` devices whose dirty sets were all taken at
    /// `taken` (before the full pass).
    pub(crate) fn new(
        cfg: &MigrationConfig,
        hook: Option<ThrottleHook>,
        devices: usize,
        taken: Instant,
    ) -> Self {
        Convergence {
            max_downtime: cfg.max_downtime,
            allowance: cfg.stop_allowance,
            remedy: cfg.on_no_convergence,
            hook,
            bandwidth: 0.0,
            dirty_bytes: vec![0; devices],
            dirty_rate: vec![0.0; devices],
            last_take: vec![taken; devices],
            totals: Vec::new(),
            throttle: 0,
            predicted: None,
        }
    }

    /// Records `bytes` written to the link in `busy` (time spent sending,
    /// no throttle pauses).
    pub(crate) fn record_send(&mut self, bytes: u64, busy: Duration) {
        if bytes < MIN_SAMPLE_BYTES || busy.is_zero() {
            return;
        }
        let sample = bytes as f64 / busy.as_secs_f64();
        self.bandwidth = if self.bandwidth == 0.0 {
            sample
        } else {
            ALPHA * sample + (1.0 - ALPHA) * self.bandwidth
        };
    }

    /// Records that device `dev`'s dirty set, taken at `taken`, held
    /// `bytes` dirty bytes.
    pub(crate) fn record_dirty(&mut self, dev: usize, bytes: u64, taken: Instant) {
        let (Some(b), Some(r), Some(t)) = (
            self.dirty_bytes.get_mut(dev),
            self.dirty_rate.get_mut(dev),
            self.last_take.get_mut(dev),
        ) else {
            return;
        };
        let interval = taken.saturating_duration_since(*t).as_secs_f64();
        *b = bytes;
        *r = if interval > 0.0 {
            bytes as f64 / interval
        } else {
            0.0
        };
        *t = taken;
    }

    /// The bandwidth estimate, bytes/s (0 while unknown).
    pub(crate) fn bandwidth(&self) -> f64 {
        self.bandwidth
    }

    /// The guest's dirty rate over all devices, bytes/s.
    pub(crate) fn dirty_rate(&self) -> f64 {
        self.dirty_rate.iter().sum()
    }

    /// Predicted downtime if the VM stopped now: every device's dirty bytes
    /// over the bandwidth, plus the fixed allowance. Nothing dirty needs no
    /// bandwidth: a quiet guest fits even when no send was big enough to
    /// measure the link (a small or mostly-zero full pass).
    fn predict(&self) -> Option<Duration> {
        let bytes: u64 = self.dirty_bytes.iter().sum();
        if bytes == 0 {
            return Some(self.allowance);
        }
        if self.bandwidth <= 0.0 {
            return None;
        }
        Duration::try_from_secs_f64(bytes as f64 / self.bandwidth)
            .ok()
            .map(|d| d + self.allowance)
    }

    /// Decides after a round of cycles. `min_cycles_done`: every device ran
    /// its `minCycles` (before that the time rule does not end the cycles).
    pub(crate) fn evaluate(&mut self, min_cycles_done: bool) -> Verdict {
        self.totals.push(self.dirty_bytes.iter().sum());
        self.predicted = self.predict();
        let Some(predicted) = self.predicted else {
            return Verdict::Continue;
        };
        if predicted <= self.max_downtime {
            if !min_cycles_done {
                return Verdict::Continue;
            }
            let fits = format!(
                "predicted downtime {:.0} ms fits the {:.0} ms budget",
                ms(predicted),
                ms(self.max_downtime)
            );
            return Verdict::Fits(if self.throttle > 0 {
                format!("throttled to {} %, then {fits}", self.throttle)
            } else {
                fits
            });
        }
        if !self.outrun() {
            return Verdict::Continue;
        }
        match self.remedy {
            OnNoConvergence::Stop => Verdict::Continue,
            OnNoConvergence::GiveUp => Verdict::GiveUp(format!(
                "dirty rate {:.1} MB/s exceeds what the link drains ({:.1} MB/s): \
                 predicted downtime {:.0} ms, budget {:.0} ms",
                mb(self.dirty_rate()),
                mb(self.bandwidth),
                ms(predicted),
                ms(self.max_downtime)
            )),
            OnNoConvergence::Throttle => {
                self.step_throttle();
                Verdict::Continue
            }
        }
    }

    /// True when the guest dirties faster than the link drains: the dirty
    /// rate exceeds the bandwidth, or the dirty set did not shrink over the
    /// last two rounds. Never when only the fixed allowance is over budget
    /// (no remedy helps then).
    fn outrun(&self) -> bool {
        if self.allowance >= self.max_downtime || self.totals.len() < 2 {
            return false;
        }
        let n = self.totals.len();
        let stalled = n >= 3 && self.totals[n - 1] > 0 && self.totals[n - 1] >= self.totals[n - 3];
        stalled || self.dirty_rate() > self.bandwidth
    }

    /// The throttle (percent) at which the guest would dirty at most half
    /// of what the link drains: the measured dirty rate was seen under the
    /// current throttle, so the unthrottled rate is `rate / (1 - current)`.
    /// Jumping there at once matters when a cycle resends a large working
    /// set: stepping 10 % per cycle would take minutes.
    fn throttle_needed(&self) -> u8 {
        let rate = self.dirty_rate();
        if rate <= 0.0 || self.bandwidth <= 0.0 {
            return 0;
        }
        let running = 1.0 - f64::from(self.throttle) / 100.0;
        let share = (self.bandwidth * running / (2.0 * rate)).clamp(0.0, 1.0);
        ((1.0 - share) * 100.0)
            .ceil()
            .clamp(0.0, f64::from(MAX_THROTTLE)) as u8
    }

    fn step_throttle(&mut self) {
        let Some(hook) = &self.hook else { return };
        let step = match self.throttle {
            0 => FIRST_STEP,
            t => t.saturating_add(STEP).min(MAX_THROTTLE),
        };
        let next = step.max(self.throttle_needed());
        if next != self.throttle {
            self.throttle = next;
            tracing::info!(
                percent = next,
                "migration: throttling the guest to converge"
            );
            hook(next);
        }
    }

    /// Removes the throttle if one was applied.
    pub(crate) fn release(&mut self) {
        if self.throttle > 0 {
            if let Some(hook) = &self.hook {
                hook(0);
            }
        }
    }

    /// `reason` for a stop by a per-device bound, noting the throttle.
    pub(crate) fn bound_reason(&self, reason: &str) -> String {
        if self.throttle > 0 {
            format!("{reason} (throttled to {} %)", self.throttle)
        } else {
            reason.to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn conv(remedy: OnNoConvergence, hook: Option<ThrottleHook>) -> (Convergence, Instant) {
        let cfg = MigrationConfig {
            on_no_convergence: remedy,
            ..MigrationConfig::default()
        };
        let t = Instant::now();
        (Convergence::new(&cfg, hook, 1, t), t)
    }

    #[test]
    fn fits_when_dirty_bytes_drain_within_budget() {
        let (mut c, t) = conv(OnNoConvergence::Stop, None);
        c.record_send(10 << 20, Duration::from_secs(1));
        c.record_dirty(0, 100 << 10, t + Duration::from_secs(1));
        assert_eq!(c.evaluate(false), Verdict::Continue);
        assert!(matches!(c.evaluate(true), Verdict::Fits(r) if r.contains("fits the 100 ms")));
    }

    #[test]
    fn nothing_dirty_fits_without_a_bandwidth_sample() {
        let (mut c, t) = conv(OnNoConvergence::Stop, None);
        c.record_send(4 << 10, Duration::from_millis(1));
        assert_eq!(c.bandwidth(), 0.0, "too small to sample");
        c.record_dirty(0, 4 << 10, t + Duration::from_secs(1));
        assert_eq!(c.evaluate(true), Verdict::Continue, "dirty, link unknown");
        c.record_dirty(0, 0, t + Duration::from_secs(2));
        assert!(
            matches!(c.evaluate(true), Verdict::Fits(r) if r.contains("predicted downtime 20 ms"))
        );
    }

    #[test]
    fn throttle_steps_up_to_95_then_gives_way() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let c2 = calls.clone();
        let hook: ThrottleHook = Arc::new(move |p| c2.lock().unwrap().push(p));
        let (mut c, t) = conv(OnNoConvergence::Throttle, Some(hook));
        c.record_send(1 << 20, Duration::from_secs(1));
        for i in 1..=12 {
            c.record_dirty(0, 4 << 20, t + Duration::from_secs(i));
            assert_eq!(c.evaluate(true), Verdict::Continue);
        }
        c.release();
        // 4 MB/s dirtied over a 1 MB/s link: 88 % leaves 0.5 MB/s, half the
        // link; the measured rate stays at 4 MB/s (a fake guest), so it
        // steps on to the cap.
        assert_eq!(*calls.lock().unwrap(), vec![88, 95, 0]);
    }

    #[test]
    fn throttle_steps_by_ten_when_the_rates_ask_for_less() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let c2 = calls.clone();
        let hook: ThrottleHook = Arc::new(move |p| c2.lock().unwrap().push(p));
        let (mut c, t) = conv(OnNoConvergence::Throttle, Some(hook));
        c.record_send(4 << 20, Duration::from_secs(1));
        // Dirtying 4.4 MB/s over a 4.2 MB/s link: the rates ask for 53 %
        // first, then 10 % steps while the measured rate (seen under that
        // throttle) asks for less.
        c.record_dirty(0, (4 << 20) + (200 << 10), t + Duration::from_secs(1));
        assert_eq!(c.evaluate(true), Verdict::Continue);
        c.record_dirty(0, (4 << 20) + (200 << 10), t + Duration::from_secs(2));
        assert_eq!(c.evaluate(true), Verdict::Continue);
        // The same dirty set over 3 s (1.5 MB/s): not shrinking, so another
        // step, and the rates now ask for only 33 %.
        c.record_dirty(0, (4 << 20) + (200 << 10), t + Duration::from_secs(5));
        assert_eq!(c.evaluate(true), Verdict::Continue);
        assert_eq!(*calls.lock().unwrap(), vec![53, 63]);
    }

    #[test]
    fn give_up_names_both_rates() {
        let (mut c, t) = conv(OnNoConvergence::GiveUp, None);
        c.record_send(1 << 20, Duration::from_secs(1));
        c.record_dirty(0, 4 << 20, t + Duration::from_secs(1));
        assert_eq!(c.evaluate(true), Verdict::Continue);
        c.record_dirty(0, 4 << 20, t + Duration::from_secs(2));
        match c.evaluate(true) {
            Verdict::GiveUp(m) => assert!(m.contains("4.2 MB/s") && m.contains("1.0 MB/s"), "{m}"),
            v => panic!("{v:?}"),
        }
    }
}
