//! How often each block was written recently, to send cold blocks first.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counts the writes of each block within a sliding window (`expiry`) and keeps
/// the blocks ordered by that count.
///
/// Recording a write costs O(log n) (one ordered-set update plus amortised
/// expiry of old writes); no operation scans all blocks except producing the
/// full send order, which is linear in its output.
pub struct VolatilityMonitor {
    expiry: Duration,
    inner: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    events: VecDeque<(Instant, u64)>,
    counts: HashMap<u64, u32>,
    ordered: BTreeSet<(u32, u64)>,
}

impl Window {
    fn bump(&mut self, block: u64, up: bool) {
        let old = self.counts.get(&block).copied().unwrap_or(0);
        let new = if up { old + 1 } else { old.saturating_sub(1) };
        if old > 0 {
            self.ordered.remove(&(old, block));
        }
        if new > 0 {
            self.ordered.insert((new, block));
            self.counts.insert(block, new);
        } else {
            self.counts.remove(&block);
        }
    }

    fn expire(&mut self, now: Instant, expiry: Duration) {
        while let Some(&(t, block)) = self.events.front() {
            if now.saturating_duration_since(t) < expiry {
                break;
            }
            self.events.pop_front();
            self.bump(block, false);
        }
    }
}

impl VolatilityMonitor {
    /// A monitor forgetting writes older than `expiry`.
    pub fn new(expiry: Duration) -> Self {
        VolatilityMonitor {
            expiry,
            inner: Mutex::new(Window::default()),
        }
    }

    /// Records one write of `block` now.
    pub fn record(&self, block: u64) {
        self.record_at(block, Instant::now());
    }

    /// Records one write of `block` at `now`.
    pub fn record_at(&self, block: u64, now: Instant) {
        if let Ok(mut w) = self.inner.lock() {
            w.expire(now, self.expiry);
            w.events.push_back((now, block));
            w.bump(block, true);
        }
    }

    /// Writes of `block` within the window ending at `now`.
    pub fn volatility_at(&self, block: u64, now: Instant) -> u32 {
        self.inner.lock().map_or(0, |mut w| {
            w.expire(now, self.expiry);
            w.counts.get(&block).copied().unwrap_or(0)
        })
    }

    /// Every block of a `blocks`-block device, least volatile first: blocks
    /// not written within the window in index order, then the written ones by
    /// ascending count (ties by index).
    pub fn send_order(&self, blocks: u64) -> Vec<u64> {
        self.send_order_at(blocks, Instant::now())
    }

    /// [`Self::send_order`] evaluated at `now`.
    pub fn send_order_at(&self, blocks: u64, now: Instant) -> Vec<u64> {
        let Ok(mut w) = self.inner.lock() else {
            return (0..blocks).collect();
        };
        w.expire(now, self.expiry);
        let mut order: Vec<u64> = (0..blocks).filter(|b| !w.counts.contains_key(b)).collect();
        order.extend(w.ordered.iter().map(|&(_, b)| b).filter(|&b| b < blocks));
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hottest_blocks_go_last_and_old_writes_expire() {
        let m = VolatilityMonitor::new(Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..5 {
            m.record_at(2, t0);
        }
        for _ in 0..2 {
            m.record_at(0, t0);
        }
        m.record_at(4, t0 + Duration::from_secs(5));
        assert_eq!(
            m.send_order_at(6, t0 + Duration::from_secs(5)),
            vec![1, 3, 5, 4, 0, 2]
        );
        // After 10 s the writes at t0 have expired; block 4's write remains.
        let later = t0 + Duration::from_secs(11);
        assert_eq!(m.volatility_at(2, later), 0);
        assert_eq!(m.volatility_at(4, later), 1);
        assert_eq!(m.send_order_at(6, later), vec![0, 1, 2, 3, 5, 4]);
    }
}
