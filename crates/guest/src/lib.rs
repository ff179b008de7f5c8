//! Guest agent and liveness: both sides of their vsock protocol.
//!
//! Inside the VM, [`agent::Agent`] connects to the host (CID 2) and serves the
//! host's `BeforeSuspend` / `AfterResume` calls by running shell commands, and
//! [`liveness`] connects once to signal that the guest is up. On the host,
//! [`host::AgentServer`] and [`host::LivenessServer`] listen on the VMM's
//! hybrid-vsock Unix sockets (`<uds_path>_<port>`). The wire format is
//! described in [`protocol`].

pub mod agent;
pub mod hook;
pub mod host;
pub mod line;
pub mod liveness;
pub mod protocol;
pub mod vsock;

pub use agent::{Agent, AgentConfig};
pub use hook::HookReport;
pub use host::{AgentServer, HostError, LivenessServer};
pub use protocol::{Call, PROTOCOL_VERSION};

/// Default vsock port of the liveness signal.
pub const DEFAULT_LIVENESS_PORT: u32 = 25;
/// Default vsock port of the agent.
pub const DEFAULT_AGENT_PORT: u32 = 26;
