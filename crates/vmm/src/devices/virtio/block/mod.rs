//! virtio-block (in progress).

use serde::{Deserialize, Serialize};

/// Snapshot state of a virtio-block device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {}
