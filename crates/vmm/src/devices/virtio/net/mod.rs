//! virtio-net (in progress).

use serde::{Deserialize, Serialize};

/// Snapshot state of a virtio-net device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {}
