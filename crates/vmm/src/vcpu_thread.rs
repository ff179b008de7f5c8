//! vCPU threads: each owns one [`Vcpu`], runs it, and obeys commands (pause,
//! resume, save state, exit) delivered over a channel plus a kick signal.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::signal::Killable;

use crate::bus::Bus;
use crate::throttle::VcpuThrottle;
use crate::vstate::vcpu::{kick_signal, RunOutcome};
use crate::vstate::{Vcpu, VcpuError, VcpuState};

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    /// The guest powered off.
    Poweroff,
    /// The guest rebooted (reset request or triple fault); the VMM stops.
    Reboot,
    /// The VMM stopped the VM on request.
    Stopped,
    /// The VM failed.
    Error(String),
}

enum Command {
    Pause,
    Resume,
    Save(Arc<Vec<u32>>),
    Exit,
}

enum Response {
    Paused,
    Resumed,
    State(Box<Result<VcpuState, VcpuError>>),
}

/// A vCPU thread could not be controlled.
#[derive(Debug, thiserror::Error)]
pub enum VcpuThreadError {
    /// The thread is gone (it panicked or exited).
    #[error("vCPU {0} thread is gone")]
    Gone(u8),
    /// Saving state failed.
    #[error("vCPU {index}: {err}")]
    Save {
        /// Which vCPU.
        index: u8,
        /// Why.
        err: VcpuError,
    },
    /// The thread could not be started.
    #[error("cannot start vCPU thread: {0}")]
    Spawn(String),
}

/// The controlling end of a vCPU thread.
pub struct VcpuHandle {
    index: u8,
    cmd: Sender<Command>,
    resp: Receiver<Response>,
    thread: Option<JoinHandle<()>>,
    signal: libc::c_int,
}

impl VcpuHandle {
    /// Starts a thread running `vcpu` (paused if `paused`), dispatching I/O to
    /// `pio`/`mmio`, reporting the guest's end on `exits`, and staying out of
    /// the guest for `throttle`'s share of each throttle window.
    pub fn spawn(
        vcpu: Vcpu,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exits: Sender<ExitStatus>,
        paused: bool,
        throttle: Arc<VcpuThrottle>,
    ) -> Result<Self, VcpuThreadError> {
        let signal = kick_signal().map_err(|e| VcpuThreadError::Spawn(e.to_string()))?;
        // Filtered vCPU threads start device threads through the spawner.
        crate::seccomp::prepare().map_err(|e| VcpuThreadError::Spawn(e.to_string()))?;
        let index = vcpu.index();
        let (cmd_tx, cmd_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let _registered = throttle.register(usize::from(index));
                let ends = Ends {
                    cmds: &cmd_rx,
                    resp: &resp_tx,
                    exits: &exits,
                };
                vcpu_loop(vcpu, &pio, &mmio, &ends, &throttle, paused)
            })
            .map_err(|e| VcpuThreadError::Spawn(e.to_string()))?;
        Ok(VcpuHandle {
            index,
            cmd: cmd_tx,
            resp: resp_rx,
            thread: Some(thread),
            signal,
        })
    }

    fn send(&self, c: Command) -> Result<(), VcpuThreadError> {
        self.cmd
            .send(c)
            .map_err(|_| VcpuThreadError::Gone(self.index))?;
        if let Some(t) = &self.thread {
            // A vCPU in KVM_RUN returns at once; one waiting for commands ignores it.
            let _ = t.kill(self.signal);
        }
        Ok(())
    }

    fn recv(&self) -> Result<Response, VcpuThreadError> {
        self.resp
            .recv()
            .map_err(|_| VcpuThreadError::Gone(self.index))
    }

    /// Asks the vCPU to pause (use [`VcpuHandle::wait_paused`] to wait for it).
    pub fn request_pause(&self) -> Result<(), VcpuThreadError> {
        self.send(Command::Pause)
    }

    /// Waits until the vCPU acknowledged a pause.
    pub fn wait_paused(&self) -> Result<(), VcpuThreadError> {
        loop {
            if let Response::Paused = self.recv()? {
                return Ok(());
            }
        }
    }

    /// Resumes a paused vCPU.
    pub fn resume(&self) -> Result<(), VcpuThreadError> {
        self.send(Command::Resume)?;
        loop {
            if let Response::Resumed = self.recv()? {
                return Ok(());
            }
        }
    }

    /// Saves the (paused) vCPU's state, with the MSRs in `msrs`.
    pub fn save(&self, msrs: Arc<Vec<u32>>) -> Result<VcpuState, VcpuThreadError> {
        self.send(Command::Save(msrs))?;
        loop {
            if let Response::State(s) = self.recv()? {
                return (*s).map_err(|err| VcpuThreadError::Save {
                    index: self.index,
                    err,
                });
            }
        }
    }

    /// Stops the thread and waits for it.
    pub fn exit(&mut self) {
        let _ = self.send(Command::Exit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.exit();
    }
}

/// What a command asks of the loop.
enum Next {
    Run,
    Wait,
    Exit,
}

fn handle(cmd: Command, vcpu: &Vcpu, resp: &Sender<Response>) -> Option<Next> {
    match cmd {
        Command::Pause => {
            let _ = resp.send(Response::Paused);
            Some(Next::Wait)
        }
        Command::Resume => {
            let _ = resp.send(Response::Resumed);
            Some(Next::Run)
        }
        Command::Save(msrs) => {
            let s = vcpu.save_state(&msrs);
            let _ = resp.send(Response::State(Box::new(s)));
            None
        }
        Command::Exit => Some(Next::Exit),
    }
}

/// A vCPU thread's channels.
struct Ends<'a> {
    cmds: &'a Receiver<Command>,
    resp: &'a Sender<Response>,
    exits: &'a Sender<ExitStatus>,
}

fn vcpu_loop(
    mut vcpu: Vcpu,
    pio: &Bus,
    mmio: &Bus,
    ends: &Ends<'_>,
    throttle: &VcpuThrottle,
    paused: bool,
) {
    let Ends { cmds, resp, exits } = *ends;
    let index = usize::from(vcpu.index());
    vcpu.bind_to_current_thread();
    // Before the guest runs; a vCPU that cannot be confined does not run.
    if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
        let _ = exits.send(ExitStatus::Error(format!("vCPU {index}: {e}")));
        return;
    }
    let mut next = if paused { Next::Wait } else { Next::Run };
    // A kick sent before the binding above found no vCPU to interrupt; its
    // command is already queued, so look once before the first run.
    let mut kicked = true;
    loop {
        match next {
            Next::Exit => return,
            Next::Wait => {
                let Ok(cmd) = cmds.recv() else { return };
                if let Some(n) = handle(cmd, &vcpu, resp) {
                    next = n;
                }
                continue;
            }
            Next::Run => {}
        }
        if kicked {
            kicked = false;
            while let Ok(cmd) = cmds.try_recv() {
                if let Some(n) = handle(cmd, &vcpu, resp) {
                    next = n;
                }
            }
            if let (Next::Run, Some(pause)) = (&next, throttle.take_pause(index)) {
                // Out of the guest for the throttle's share of the window,
                // still answering commands (a pause ends the wait at once).
                match cmds.recv_timeout(pause) {
                    Ok(cmd) => {
                        if let Some(n) = handle(cmd, &vcpu, resp) {
                            next = n;
                        }
                        // More commands may be queued behind this one.
                        kicked = true;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            continue;
        }
        match vcpu.run(pio, mmio) {
            RunOutcome::Continue => {}
            RunOutcome::Kicked => kicked = true,
            RunOutcome::Poweroff => {
                let _ = exits.send(ExitStatus::Poweroff);
                next = Next::Wait;
            }
            RunOutcome::Reset => {
                let _ = exits.send(ExitStatus::Reboot);
                next = Next::Wait;
            }
            RunOutcome::Failed(why) => {
                let _ = exits.send(ExitStatus::Error(format!("vCPU {}: {why}", vcpu.index())));
                next = Next::Wait;
            }
        }
    }
}
