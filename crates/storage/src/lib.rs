//! Block devices, dirty tracking, lazy devices, the migration wire protocol
//! and the migrator. Knows nothing of KVM: guest memory is one more device
//! whose dirty pages come from a [`DirtySource`].
//!
//! * [`BlockDevice`] with [`FileDevice`], [`MemoryDevice`], [`CowOverlay`] and
//!   [`LazyDevice`] backends.
//! * [`TrackedDevice`] marks written blocks dirty and orders blocks by
//!   volatility ([`VolatilityMonitor`]).
//! * [`protocol`] is the wire format; [`MigrationSource`] and
//!   [`MigrationDestination`] run pre-copy or pure post-copy migrations over
//!   any [`Link`] (TCP, Unix sockets).

pub mod auth;
pub mod device;
pub mod dirty;
pub mod error;
pub mod lazy;
pub mod migrator;
pub mod protocol;
pub mod report;
pub mod transport;
pub mod volatility;

pub use auth::Secret;
pub use device::{BlockDevice, CowOverlay, FileDevice, MemoryDevice, DEFAULT_BLOCK_SIZE};
pub use dirty::{DirtySource, TrackedDevice};
pub use error::StorageError;
pub use lazy::LazyDevice;
pub use migrator::{
    CancelHandle, Cause, DestinationDevice, DestinationSession, DeviceConfig, Initial,
    MigrationConfig, MigrationDestination, MigrationError, MigrationSource, Mode, Progress,
    SourceDevice,
};
pub use report::{MigrationReport, Phase};
pub use transport::Link;
pub use volatility::VolatilityMonitor;
