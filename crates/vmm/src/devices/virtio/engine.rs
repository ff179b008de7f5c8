//! The I/O thread every virtio device runs once activated, with the stop/restart
//! dance needed for reset and snapshots.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use virtio_queue::Queue;

use super::state::duplicate_queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The part of a device that runs on its I/O thread: queues, guest memory, backend.
pub(crate) trait Engine: Send + 'static {
    /// Processes I/O until `stop` becomes readable (or the engine hits an
    /// unrecoverable error). Must first process anything already pending.
    fn run(&mut self, stop: &EventFd);
    /// The live queues.
    fn queues(&self) -> &[Queue];
}

/// Set by [`run_engines_inline`].
static INLINE: AtomicBool = AtomicBool::new(false);

/// For fuzzing only: when `on`, starting or resuming a device's engine runs
/// it on the caller's thread until it has processed everything pending
/// (its stop event is already signalled) and leaves it paused, instead of
/// spawning its I/O thread. A process that sets this runs no VM.
#[doc(hidden)]
pub fn run_engines_inline(on: bool) {
    INLINE.store(on, Ordering::Relaxed);
}

enum Slot<E> {
    Inactive,
    Paused(Box<E>),
    Running {
        stop: EventFd,
        handle: JoinHandle<Box<E>>,
    },
}

/// Holds a device's [`Engine`], either idle, paused or running on its thread.
pub(crate) struct EngineSlot<E> {
    name: String,
    slot: Slot<E>,
}

impl<E: Engine> EngineSlot<E> {
    /// An empty slot; `name` names the I/O thread.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            slot: Slot::Inactive,
        }
    }

    /// Whether an engine is present (running or paused).
    pub fn is_active(&self) -> bool {
        !matches!(self.slot, Slot::Inactive)
    }

    /// Starts `engine` on a new thread.
    pub fn start(&mut self, engine: E) -> io::Result<()> {
        self.stop_thread();
        self.slot = Slot::Paused(Box::new(engine));
        self.resume()
    }

    /// Restarts a paused engine.
    pub fn resume(&mut self) -> io::Result<()> {
        let Slot::Paused(engine) = std::mem::replace(&mut self.slot, Slot::Inactive) else {
            return Ok(());
        };
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let mut engine = engine;
        if INLINE.load(Ordering::Relaxed) {
            stop.write(1)?;
            engine.run(&stop);
            self.slot = Slot::Paused(engine);
            return Ok(());
        }
        let thread_stop = stop.try_clone()?;
        // Through the spawner: a vCPU thread activating the device is
        // filtered, and its filter must not pass to the I/O thread.
        let handle = crate::seccomp::spawn(
            self.name.clone(),
            crate::seccomp::ThreadKind::DeviceIo,
            move || {
                engine.run(&thread_stop);
                engine
            },
        )?;
        self.slot = Slot::Running { stop, handle };
        Ok(())
    }

    /// Stops the thread (if running) and keeps the engine; returns its live queues.
    pub fn pause(&mut self) -> Option<Vec<Queue>> {
        self.stop_thread();
        match &self.slot {
            Slot::Paused(e) => Some(e.queues().iter().map(duplicate_queue).collect()),
            _ => None,
        }
    }

    /// The paused engine.
    pub fn paused(&self) -> Option<&E> {
        match &self.slot {
            Slot::Paused(e) => Some(e),
            _ => None,
        }
    }

    /// Stops everything and hands back the engine (to recover its backend).
    pub fn take(&mut self) -> Option<E> {
        self.stop_thread();
        match std::mem::replace(&mut self.slot, Slot::Inactive) {
            Slot::Paused(e) => Some(*e),
            _ => None,
        }
    }

    fn stop_thread(&mut self) {
        if let Slot::Running { .. } = self.slot {
            let Slot::Running { stop, handle } = std::mem::replace(&mut self.slot, Slot::Inactive)
            else {
                return;
            };
            if let Err(e) = stop.write(1) {
                tracing::error!(thread = %self.name, "cannot signal device thread to stop: {e}");
            }
            match handle.join() {
                Ok(engine) => self.slot = Slot::Paused(engine),
                Err(_) => tracing::error!(thread = %self.name, "device thread panicked"),
            }
        }
    }
}

impl<E> Drop for EngineSlot<E> {
    fn drop(&mut self) {
        if let Slot::Running { stop, handle } = std::mem::replace(&mut self.slot, Slot::Inactive) {
            // Join so the backend (files, sockets) is closed when the device is dropped.
            if stop.write(1).is_ok() {
                let _ = handle.join();
            }
        }
    }
}
