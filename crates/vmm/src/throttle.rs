//! vCPU throttling (auto-converge for live migration): a throttle thread
//! kicks every vCPU out of `KVM_RUN` once per [`PERIOD`], and each kicked
//! vCPU thread then stays out of the guest for the throttle's share of the
//! period, still answering commands (pause, save, exit) while it waits.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Length of one throttle window.
pub const PERIOD: Duration = Duration::from_millis(50);

/// The highest throttle, percent (the guest keeps a sliver of each window).
pub const MAX_PERCENT: u8 = 99;

/// One vCPU thread's slot.
#[derive(Default)]
struct Slot {
    /// A window started since the vCPU last paused for the throttle.
    tick: AtomicBool,
    /// The vCPU thread, while it runs its loop (cleared before it returns).
    thread: Mutex<Option<libc::pthread_t>>,
}

/// Throttle state shared by the VMM, its throttle thread and its vCPU threads.
pub struct VcpuThrottle {
    percent: AtomicU8,
    slots: Vec<Slot>,
}

impl VcpuThrottle {
    /// State for `vcpus` vCPU threads, unthrottled.
    pub fn new(vcpus: usize) -> Arc<Self> {
        Arc::new(VcpuThrottle {
            percent: AtomicU8::new(0),
            slots: (0..vcpus).map(|_| Slot::default()).collect(),
        })
    }

    /// The current throttle, percent.
    pub fn percent(&self) -> u8 {
        self.percent.load(Ordering::SeqCst)
    }

    /// Registers the calling thread as vCPU `index`'s thread until the
    /// returned guard is dropped (which the thread does before it ends).
    pub fn register(self: &Arc<Self>, index: usize) -> Registration {
        if let Some(s) = self.slots.get(index) {
            // SAFETY: pthread_self has no preconditions.
            let me = unsafe { libc::pthread_self() };
            *s.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(me);
        }
        Registration {
            throttle: self.clone(),
            index,
        }
    }

    /// How long vCPU `index` should stay out of the guest now: the throttle
    /// share of a window, once per window.
    pub fn take_pause(&self, index: usize) -> Option<Duration> {
        let p = self.percent();
        let ticked = self
            .slots
            .get(index)
            .is_some_and(|s| s.tick.swap(false, Ordering::SeqCst));
        (ticked && p > 0).then(|| PERIOD * u32::from(p) / 100)
    }

    /// Starts a window: marks every vCPU and kicks it out of the guest.
    fn kick_all(&self, signal: libc::c_int) {
        for s in &self.slots {
            s.tick.store(true, Ordering::SeqCst);
            let t = s.thread.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = *t {
                // SAFETY: `t` names a live thread: a vCPU thread clears its
                // slot under this lock before it returns, so the thread
                // cannot have ended while the lock is held. The signal's
                // handler only sets the thread's immediate-exit flag.
                unsafe { libc::pthread_kill(t, signal) };
            }
        }
    }
}

/// Keeps a vCPU thread registered for throttle kicks.
pub struct Registration {
    throttle: Arc<VcpuThrottle>,
    index: usize,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(s) = self.throttle.slots.get(self.index) {
            *s.thread.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}

/// The running throttle thread; stopped (and joined) by [`Throttler::stop`]
/// or on drop.
pub struct Throttler {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Throttler {
    /// Starts kicking the vCPUs of `throttle` once per [`PERIOD`] with `signal`.
    pub fn start(throttle: Arc<VcpuThrottle>, signal: libc::c_int) -> std::io::Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    let (g, _) = cv
                        .wait_timeout(stopped, PERIOD)
                        .unwrap_or_else(|p| p.into_inner());
                    stopped = g;
                    if *stopped {
                        return;
                    }
                    throttle.kick_all(signal);
                }
            })?;
        Ok(Throttler {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Throttler {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VcpuThrottle {
    /// Sets the throttle (clamped to [`MAX_PERCENT`]).
    pub(crate) fn set(&self, percent: u8) {
        self.percent
            .store(percent.min(MAX_PERCENT), Ordering::SeqCst);
    }
}
