//! The "state" device: the VM's snapshot state (vCPUs, interrupt controllers,
//! devices) framed so the destination can tell a complete state from an
//! empty, truncated or foreign one.
//!
//! Layout (little endian): 8-byte magic `DRFTVMST`, `u64` wall-clock time of
//! the source's pause in nanoseconds since the Unix epoch, `u64` payload
//! length, then the payload (a `drafter-vmm` state file, which carries its own
//! checksum). The rest of the device is zero.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drafter_storage::BlockDevice;

/// Magic bytes opening a state frame.
pub const STATE_MAGIC: [u8; 8] = *b"DRFTVMST";
/// Bytes before the payload.
pub const STATE_HEADER_LEN: usize = 24;
/// Default capacity of the state device (a 1-vCPU state is tens of KiB).
pub const DEFAULT_STATE_CAPACITY: u64 = 4 << 20;

/// Why a state device's content is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateFrameError {
    /// The device holds only zeros: the source never wrote a state.
    #[error("the state device is empty: the source never wrote the VM state")]
    Empty,
    /// The device does not start with the state magic.
    #[error("the state device holds no VM state (bad magic)")]
    BadMagic,
    /// The announced payload does not fit the device.
    #[error("the VM state is truncated: {len} bytes announced, the device holds at most {room}")]
    Truncated {
        /// Announced payload length.
        len: u64,
        /// Room for the payload.
        room: u64,
    },
    /// The state is larger than the device.
    #[error("the VM state ({len} bytes) does not fit the state device ({capacity} bytes)")]
    TooLarge {
        /// Bytes needed (header included).
        len: u64,
        /// Device capacity.
        capacity: u64,
    },
    /// The device could not be read or written.
    #[error("state device: {0}")]
    Device(String),
}

/// A VM state and when the source paused the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateFrame {
    /// Wall-clock time at which the source paused the VM.
    pub paused_at: SystemTime,
    /// The `drafter-vmm` state file bytes.
    pub state: Vec<u8>,
}

impl StateFrame {
    /// A frame for a VM state read from a package (what a registry serves):
    /// no VM was paused for it, which the frame says with a pause time of
    /// the Unix epoch.
    pub fn from_package(state: Vec<u8>) -> Self {
        StateFrame {
            paused_at: UNIX_EPOCH,
            state,
        }
    }

    /// When the source paused the VM; `None` for a state from a package
    /// ([`Self::from_package`]).
    pub fn paused(&self) -> Option<SystemTime> {
        (self.paused_at != UNIX_EPOCH).then_some(self.paused_at)
    }

    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let nanos = self
            .paused_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let mut out = Vec::with_capacity(STATE_HEADER_LEN + self.state.len());
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&nanos.to_le_bytes());
        out.extend_from_slice(&(self.state.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.state);
        out
    }

    /// Parses the header at the start of a device's content; returns the
    /// pause time and payload length, checked against `capacity`.
    pub fn decode_header(
        header: &[u8; STATE_HEADER_LEN],
        capacity: u64,
    ) -> Result<(SystemTime, u64), StateFrameError> {
        if header.iter().all(|&b| b == 0) {
            return Err(StateFrameError::Empty);
        }
        if header[..8] != STATE_MAGIC {
            return Err(StateFrameError::BadMagic);
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&header[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let (nanos, len) = (word(8), word(16));
        let room = capacity.saturating_sub(STATE_HEADER_LEN as u64);
        if len > room {
            return Err(StateFrameError::Truncated { len, room });
        }
        Ok((UNIX_EPOCH + Duration::from_nanos(nanos), len))
    }

    /// Parses a whole frame from `bytes` (the device's content or a prefix
    /// of it at least as long as the frame).
    pub fn decode(bytes: &[u8]) -> Result<StateFrame, StateFrameError> {
        let mut header = [0u8; STATE_HEADER_LEN];
        let n = bytes.len().min(STATE_HEADER_LEN);
        header[..n].copy_from_slice(&bytes[..n]);
        if n < STATE_HEADER_LEN && !header.iter().all(|&b| b == 0) {
            return Err(StateFrameError::Truncated {
                len: STATE_HEADER_LEN as u64,
                room: n as u64,
            });
        }
        let (paused_at, len) = Self::decode_header(&header, bytes.len() as u64)?;
        let end = STATE_HEADER_LEN + len as usize;
        Ok(StateFrame {
            paused_at,
            state: bytes[STATE_HEADER_LEN..end].to_vec(),
        })
    }

    /// Writes the frame at the start of `device`.
    pub fn write_to(&self, device: &dyn BlockDevice) -> Result<(), StateFrameError> {
        let bytes = self.encode();
        if bytes.len() as u64 > device.size() {
            return Err(StateFrameError::TooLarge {
                len: bytes.len() as u64,
                capacity: device.size(),
            });
        }
        device
            .write_at(&bytes, 0)
            .map_err(|e| StateFrameError::Device(e.to_string()))
    }

    /// Reads the frame from the start of `device`, touching only the blocks
    /// it occupies (on a lazy device, only those are fetched).
    pub fn read_from(device: &dyn BlockDevice) -> Result<StateFrame, StateFrameError> {
        let dev = |e: drafter_storage::StorageError| StateFrameError::Device(e.to_string());
        let size = device.size();
        if size < STATE_HEADER_LEN as u64 {
            return Err(StateFrameError::Truncated {
                len: STATE_HEADER_LEN as u64,
                room: size,
            });
        }
        let mut header = [0u8; STATE_HEADER_LEN];
        device.read_at(&mut header, 0).map_err(dev)?;
        let (paused_at, len) = Self::decode_header(&header, size)?;
        let mut state = vec![0u8; len as usize];
        device
            .read_at(&mut state, STATE_HEADER_LEN as u64)
            .map_err(dev)?;
        Ok(StateFrame { paused_at, state })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drafter_storage::MemoryDevice;

    fn frame() -> StateFrame {
        StateFrame {
            paused_at: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            state: (0..10_000u32).map(|i| (i * 7) as u8).collect(),
        }
    }

    #[test]
    fn round_trips_through_a_device_and_bytes() {
        let dev = MemoryDevice::new(64 * 1024, 4096).unwrap_or_else(|e| panic!("{e}"));
        let f = frame();
        f.write_to(&dev).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(StateFrame::read_from(&dev), Ok(f.clone()));
        assert_eq!(StateFrame::decode(&f.encode()), Ok(f.clone()));
        let mut padded = f.encode();
        padded.resize(64 * 1024, 0);
        assert_eq!(StateFrame::decode(&padded), Ok(f));
    }

    #[test]
    fn a_package_frame_has_no_pause_time_and_round_trips() {
        let f = StateFrame::from_package(vec![1, 2, 3]);
        assert_eq!(f.paused(), None);
        assert_eq!(StateFrame::decode(&f.encode()), Ok(f));
        assert!(frame().paused().is_some());
    }

    #[test]
    fn empty_device_is_named_empty() {
        let dev = MemoryDevice::new(64 * 1024, 4096).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(StateFrame::read_from(&dev), Err(StateFrameError::Empty));
        assert_eq!(StateFrame::decode(&[]), Err(StateFrameError::Empty));
    }

    #[test]
    fn garbage_is_refused() {
        let dev = MemoryDevice::new(64 * 1024, 4096).unwrap_or_else(|e| panic!("{e}"));
        dev.write_at(b"\x7fELF\x02\x01\x01\0garbage garbage garbage", 0)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(StateFrame::read_from(&dev), Err(StateFrameError::BadMagic));
        let mut flipped = frame().encode();
        flipped[0] ^= 0x20;
        assert_eq!(StateFrame::decode(&flipped), Err(StateFrameError::BadMagic));
    }

    #[test]
    fn truncated_frames_are_refused() {
        let bytes = frame().encode();
        let cut = &bytes[..bytes.len() - 1];
        assert_eq!(
            StateFrame::decode(cut),
            Err(StateFrameError::Truncated {
                len: 10_000,
                room: 9_999
            })
        );
        assert!(matches!(
            StateFrame::decode(&bytes[..12]),
            Err(StateFrameError::Truncated { .. })
        ));
        // A length field pointing past the device.
        let dev = MemoryDevice::new(8192, 4096).unwrap_or_else(|e| panic!("{e}"));
        let mut header = bytes[..STATE_HEADER_LEN].to_vec();
        header[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        dev.write_at(&header, 0).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            StateFrame::read_from(&dev),
            Err(StateFrameError::Truncated { len: u64::MAX, .. })
        ));
    }

    #[test]
    fn a_state_larger_than_the_device_is_refused_before_writing() {
        let dev = MemoryDevice::new(8192, 4096).unwrap_or_else(|e| panic!("{e}"));
        let e = frame().write_to(&dev);
        assert_eq!(
            e,
            Err(StateFrameError::TooLarge {
                len: 10_024,
                capacity: 8192
            })
        );
        assert_eq!(StateFrame::read_from(&dev), Err(StateFrameError::Empty));
    }
}
