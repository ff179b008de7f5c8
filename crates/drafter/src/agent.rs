//! The guest agent as the host sees it: one home for the glue the runner
//! and the peer share. [`GuestAgent`] listens where a VM's agent connects
//! (its vsock device's host socket and the agent's port) and calls the
//! agent's hooks with a deadline, timing each call ([`HookCall`]).
//!
//! After a resume the agent reconnects (its old vsock connection died with
//! the snapshot or the migration) and answers: that answer is the liveness
//! signal after a resume, so [`GuestAgent::after_resume`] covers both the
//! wait for the agent and the hook. [`GuestAgent::before_suspend`] is called
//! while the VM still runs, right before it is paused.

use std::path::Path;
use std::time::{Duration, Instant};

use drafter_guest::{AgentServer, HookReport, HostError};
use drafter_vmm::VmConfig;
use serde::{Deserialize, Serialize};

/// The agent of one VM: a listener on `<vsock uds>_<port>` and the
/// connection the agent made to it.
#[derive(Debug)]
pub struct GuestAgent {
    server: AgentServer,
}

/// One hook call: how long it took (including the wait for the agent to
/// connect) and what it gave.
#[derive(Debug)]
pub struct HookCall {
    /// From the call to the answer (or to the failure).
    pub elapsed: Duration,
    /// The hook's report, or why the call failed.
    pub result: Result<HookReport, HostError>,
}

/// A [`HookCall`] as reports carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookSummary {
    /// Milliseconds the call took.
    pub millis: f64,
    /// The hook's standard output (empty if the call failed).
    pub output: String,
    /// Why the call failed, if it did.
    pub error: Option<String>,
}

impl HookCall {
    /// Milliseconds the call took, rounded down.
    pub fn ms(&self) -> u64 {
        u64::try_from(self.elapsed.as_millis()).unwrap_or(u64::MAX)
    }

    /// The hook's standard output, empty if the call failed.
    pub fn output(&self) -> String {
        self.result
            .as_ref()
            .map(|r| r.stdout.clone())
            .unwrap_or_default()
    }

    /// Why the call failed, if it did.
    pub fn error(&self) -> Option<String> {
        self.result.as_ref().err().map(|e| e.to_string())
    }

    /// The call as reports carry it.
    pub fn summary(&self) -> HookSummary {
        HookSummary {
            millis: self.elapsed.as_secs_f64() * 1e3,
            output: self.output(),
            error: self.error(),
        }
    }
}

impl GuestAgent {
    /// Listens where a guest connection to vsock `port` arrives for a VM
    /// whose vsock device has the host socket `vsock_uds`
    /// (`<vsock_uds>_<port>`). A stale socket there is replaced.
    pub fn listen(vsock_uds: &Path, port: u32) -> Result<Self, HostError> {
        Ok(GuestAgent {
            server: AgentServer::listen(vsock_uds, port)?,
        })
    }

    /// The agent of the VM configured by `config`, if it can have one: the
    /// VM has a vsock device and the agent's port is known (`port`: a
    /// package's `agent_vsock_port`). `None` otherwise (a VM without an
    /// agent, such as a flat test guest): its hooks are skipped.
    pub fn for_vm(config: &VmConfig, port: Option<u32>) -> Result<Option<Self>, HostError> {
        match (&config.vsock, port) {
            (Some(vsock), Some(port)) => Self::listen(&vsock.uds_path, port).map(Some),
            _ => Ok(None),
        }
    }

    /// The socket the agent connects to.
    pub fn path(&self) -> &Path {
        self.server.path()
    }

    /// Waits for the agent to (re)connect and runs its `AfterResume` hook,
    /// all within `timeout`.
    pub fn after_resume(&mut self, timeout: Duration) -> HookCall {
        let start = Instant::now();
        let result = self.server.after_resume(timeout);
        HookCall {
            elapsed: start.elapsed(),
            result,
        }
    }

    /// Runs the agent's `BeforeSuspend` hook (waiting for the agent to
    /// connect if it has not), all within `timeout`.
    pub fn before_suspend(&mut self, timeout: Duration) -> HookCall {
        let start = Instant::now();
        let result = self.server.before_suspend(timeout);
        HookCall {
            elapsed: start.elapsed(),
            result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drafter_vmm::config::VsockConfig;

    #[test]
    fn a_vm_without_vsock_or_port_has_no_agent() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut config = VmConfig::new("/nonexistent");
        let none = |c: &VmConfig, p| GuestAgent::for_vm(c, p).map(|a| a.is_none());
        assert!(matches!(none(&config, Some(26)), Ok(true)));
        config.vsock = Some(VsockConfig {
            cid: 3,
            uds_path: dir.path().join("v.sock"),
        });
        assert!(matches!(none(&config, None), Ok(true)));
        let agent = GuestAgent::for_vm(&config, Some(26))
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no agent"));
        assert_eq!(agent.path(), dir.path().join("v.sock_26"));
    }

    #[test]
    fn a_call_without_an_agent_fails_within_its_timeout_and_is_timed() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut agent =
            GuestAgent::listen(&dir.path().join("v.sock"), 26).unwrap_or_else(|e| panic!("{e}"));
        let call = agent.after_resume(Duration::from_millis(200));
        assert!(call.elapsed >= Duration::from_millis(200));
        let s = call.summary();
        assert!(s.output.is_empty());
        let e = s.error.unwrap_or_default();
        assert!(e.contains("timed out") && e.contains("agent"), "{e}");
    }
}
