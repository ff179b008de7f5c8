//! virtio-vsock (in progress).

use serde::{Deserialize, Serialize};

/// Snapshot state of a virtio-vsock device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {}
