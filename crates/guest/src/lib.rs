//! Guest agent and liveness: both sides of their vsock protocol.
