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
//!   any [`Link`] (TCP, Unix sockets, or either wrapped in TLS 1.3 with
//!   mutual certificate authentication by [`tls`]).
//!
//! # Live migration in a few lines
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use drafter_storage::*;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Source: every write goes through a TrackedDevice (guest memory would add
//! // a DirtySource for pages written behind its back).
//! let disk = Arc::new(TrackedDevice::new(
//!     Arc::new(MemoryDevice::new(64 * 4096, 4096)?),
//!     Duration::from_secs(1),
//! ));
//! disk.write_at(b"hello", 4096)?;
//! let source = MigrationSource::new(
//!     vec![SourceDevice::tracked("disk", disk.clone(), DeviceConfig::default())],
//!     MigrationConfig { secret: Secret::new("s3cret"), ..MigrationConfig::default() },
//! );
//!
//! let (a, b) = std::os::unix::net::UnixStream::pair()?;
//! let dest = std::thread::spawn(move || -> Result<Vec<u8>, MigrationError> {
//!     let config = MigrationConfig { secret: Secret::new("s3cret"), ..MigrationConfig::default() };
//!     let session = MigrationDestination::accept(b, &config, |info| {
//!         Ok(DestinationDevice {
//!             backing: Arc::new(MemoryDevice::new(info.size, info.block_size).map_err(|e| e.to_string())?),
//!             initial: Initial::Zeroed,
//!         })
//!     })?;
//!     session.wait_authority()?; // the VM may resume here now
//!     let disk = session.device("disk").expect("announced");
//!     let mut buf = vec![0u8; 5];
//!     disk.read_at(&mut buf, 4096).expect("fetched on demand if still missing");
//!     session.wait_complete()?;
//!     Ok(buf)
//! });
//! // `suspend` runs once every device is ready: pause the VM there.
//! let report = source.migrate(a, || Ok(()))?;
//! assert_eq!(dest.join().expect("destination thread")?, b"hello");
//! println!("{}", report.to_json());
//! # Ok(())
//! # }
//! ```

pub mod auth;
pub mod device;
pub mod dirty;
pub mod error;
pub mod lazy;
pub mod migrator;
pub mod protocol;
pub mod report;
pub mod tls;
pub mod transport;
pub mod volatility;

pub use auth::Secret;
pub use device::{BlockDevice, CowOverlay, FileDevice, MemoryDevice, DEFAULT_BLOCK_SIZE};
pub use dirty::{DirtySource, TrackedDevice};
pub use error::StorageError;
pub use lazy::LazyDevice;
pub use migrator::{
    CancelHandle, Cause, DestinationDevice, DestinationSession, DeviceConfig, Initial,
    MigrationConfig, MigrationDestination, MigrationError, MigrationSource, Mode, OnNoConvergence,
    Progress, SourceDevice, ThrottleHook,
};
pub use report::{MigrationReport, Phase};
pub use tls::{TlsConfig, TlsError, TlsFiles, TlsLink};
pub use transport::Link;
pub use volatility::VolatilityMonitor;
