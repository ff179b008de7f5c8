//! The migration wire protocol: framing, messages, validation and handshake.
//!
//! Every frame is `type: u8`, `len: u32 LE`, then `len` payload bytes. Each
//! type has a fixed or bounded payload length that is checked *before* the
//! payload is read, so a peer can never make us allocate more than one block
//! plus a small header. Every device id, block index and run is validated
//! against the device table by [`DeviceTable`]; anything malformed ends the
//! connection with a [`ProtocolError`], never a panic.
//!
//! ```text
//!  Source (has authority)                         Destination
//!  ──────────────────────                         ───────────
//!  Hello{magic,version,nonce} ─────────────────▶   ◀── Hello{magic,version,nonce}
//!  AuthProof{HMAC(secret, "src"‖n_s‖n_d)} ────▶   ◀── AuthProof{HMAC(secret, "dst"‖n_d‖n_s)}
//!       (each side checks the other's proof; on failure: Error, close — no data moves)
//!  DeviceInfo{id,name,size,block_size} × N ───▶
//!  DevicesListed{N} ──────────────────────────▶
//!                                            ◀── DeviceAck{id, has_base} × N
//!                                            ◀── BaseHashes{id,start,[blake3]}… (if has_base)
//!  [post-copy: suspend and HandoverOffered here, then the full pass is the tail]
//!  full pass, least volatile first:
//!    BlockData{id,idx,zstd?,bytes} | ZeroBlocks{id,start,count}
//!    | AlreadyHave{id,start,count} ──────────▶  (bulk queue, ≤ 1 block per frame)
//!                                            ◀── NeedBlock{id,idx}   (any time after DevicesListed)
//!  BlockData (reply) ─────────────────────────▶  (priority queue: overtakes bulk)
//!  dirty cycles: Dirty{id,[idx]} then BlockData… ▶  (Dirty invalidates, data refills)
//!  ── all devices ready: suspend hook (caller pauses the VM) ──
//!  Dirty{id,[final idx]} ─────────────────────▶
//!  Event(HandoverOffered) ────────────────────▶  source paused; destination may
//!  tail: BlockData for the final dirty blocks ▶  fetch and prepare, not write
//!  [VerifyHashes{id,start,[blake3]}…] ────────▶
//!  Event(AllSent) ────────────────────────────▶
//!                                            ◀── Event(ReadyToRun)  (whenever it has what it needs)
//!  Event(Commit) ─────────────────────────────▶  authority moves when this is *received*
//!                                            ◀── Event(Running)     (after the VM resumed there)
//!                                            ◀── [VerifyResult{id,mismatched,sample}…]
//!                                            ◀── Event(Completed)   (every block present)
//!  Error{message} may be sent by either side at any point before closing;
//!  a destination never sends one after it received Commit (except to
//!  decline a Commit it did not act on: see the migrator module).
//!  Keepalive{} is sent by either side, at any point after its handshake,
//!  whenever it has had nothing else to send for a while (version 2).
//! ```
//!
//! The handover (`HandoverOffered`, `ReadyToRun`, `Commit`, `Running`) is a
//! two-phase commit; its rules, and who holds authority after a fault at each
//! step, are described in [`crate::migrator`].
//!
//! # Liveness
//!
//! Each side's writer sends a Keepalive when it has been idle for a third of
//! the link timeout, and each reader gives up ([`ProtocolError::TimedOut`])
//! when nothing at all arrived for the link timeout. This catches a peer
//! whose process is frozen (its kernel keeps the TCP connection open and
//! ACKs data, so TCP keepalive never fires) as well as a silently dropped
//! link. Keepalive frames carry no payload and are ignored by readers.
//!
//! # Versions
//!
//! The Hello carries [`VERSION`]; peers speaking another version are refused
//! during the handshake, before any device frame. Version 2 added the
//! Keepalive frame (a version 1 peer would reject it as an unknown type).
//! Version 3 replaced the one-way `AuthorityTransferred`/`AuthorityAccepted`
//! events (authority moved when the source *sent* it) with the acknowledged
//! handover `HandoverOffered`, `ReadyToRun`, `Commit`, `Running`.

use std::io::{self, Read};
use std::ops::Deref;

use crate::device::{block_count, block_len, validate_block_size, MAX_BLOCK_SIZE};

/// Protocol magic, the first bytes of the Hello payload.
pub const MAGIC: [u8; 4] = *b"DRFT";
/// Protocol version spoken by this implementation (2: Keepalive frames;
/// 3: the acknowledged handover).
pub const VERSION: u16 = 3;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 5;
/// Most devices per migration.
pub const MAX_DEVICES: u32 = 1024;
/// Most blocks per device (bounds every per-device allocation).
pub const MAX_BLOCKS_PER_DEVICE: u64 = 1 << 26;
/// Most indices in one Dirty frame.
pub const MAX_LIST: usize = 8192;
/// Most hashes in one BaseHashes/VerifyHashes frame.
pub const MAX_HASHES: usize = 4096;
/// Most sample indices in a VerifyResult.
pub const MAX_SAMPLE: usize = 64;
/// Longest device name.
pub const MAX_NAME: usize = 255;
/// Longest error message.
pub const MAX_ERROR: usize = 1024;
/// Fixed part of a BlockData payload (device, index, flags).
pub const BLOCK_DATA_HEADER: usize = 13;

/// A protocol failure; any of these ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Transport error.
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection between frames.
    #[error("peer closed the connection")]
    Closed,
    /// The connection ended inside a frame.
    #[error("truncated frame")]
    Truncated,
    /// Nothing arrived within the read timeout set on the link.
    #[error("timed out: nothing received from the peer within the read timeout")]
    TimedOut,
    /// A frame type this version does not know.
    #[error("unknown frame type {0}{hint}", hint = tls_hint(*.0))]
    UnknownType(u8),
    /// A frame longer than its type allows.
    #[error("oversized {kind} frame: {len} bytes, at most {max} allowed")]
    Oversized {
        /// Frame kind.
        kind: &'static str,
        /// Announced length.
        len: u32,
        /// Largest allowed length.
        max: u32,
    },
    /// A payload that does not parse.
    #[error("malformed {kind} frame: {what}")]
    Malformed {
        /// Frame kind.
        kind: &'static str,
        /// What is wrong.
        what: &'static str,
    },
    /// The peer does not speak this protocol.
    #[error("bad protocol magic")]
    BadMagic,
    /// The peer speaks another version.
    #[error("protocol version mismatch: we speak {ours}, peer speaks {theirs}")]
    Version {
        /// Our version.
        ours: u16,
        /// Theirs.
        theirs: u16,
    },
    /// The peer failed the shared-secret challenge.
    #[error("authentication failed: peer does not know the shared secret")]
    AuthFailed,
    /// The peer reported an error.
    #[error("peer error: {0}")]
    Peer(String),
    /// A valid frame at the wrong time.
    #[error("unexpected {got} frame {state}")]
    Unexpected {
        /// Frame kind received.
        got: &'static str,
        /// When it arrived.
        state: &'static str,
    },
    /// A device id, block index or run outside the device table.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// Block data that does not match its device (length or decompression).
    #[error("bad block data for device {device} block {index}: {what}")]
    BadBlock {
        /// Device id.
        device: u32,
        /// Block index.
        index: u64,
        /// What is wrong.
        what: String,
    },
}

/// Events (no payload beyond their code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Source: every block has been sent; nothing follows but verification.
    AllSent,
    /// Destination: every block is present and the VM runs here; the
    /// migration is complete.
    Completed,
    /// Source: the VM is paused and the final dirty lists were sent; the
    /// destination may fetch blocks and prepare the VM, but not run it.
    HandoverOffered,
    /// Destination: it has everything it needs to run the VM (restored and
    /// paused) and asks for authority.
    ReadyToRun,
    /// Source: authority is the destination's; the source never resumes the
    /// VM after sending this (unless the destination declines it).
    Commit,
    /// Destination: the VM runs here (resumed after Commit was received).
    Running,
}

impl Event {
    fn code(self) -> u8 {
        match self {
            Event::AllSent => 1,
            // 2 and 3 were version 2's AuthorityTransferred / AuthorityAccepted.
            Event::Completed => 4,
            Event::HandoverOffered => 5,
            Event::ReadyToRun => 6,
            Event::Commit => 7,
            Event::Running => 8,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Event::AllSent,
            4 => Event::Completed,
            5 => Event::HandoverOffered,
            6 => Event::ReadyToRun,
            7 => Event::Commit,
            8 => Event::Running,
            _ => return None,
        })
    }
}

/// Description of one device, sent before any of its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device id used by later frames (its position in the list).
    pub id: u32,
    /// Name (e.g. "disk", "memory").
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Block size in bytes.
    pub block_size: u32,
}

impl DeviceInfo {
    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        block_count(self.size, self.block_size)
    }
}

/// Bytes of a received block, borrowed from the frame buffer without a copy.
#[derive(Clone, Eq)]
pub struct Payload {
    buf: Vec<u8>,
    start: usize,
}

impl Payload {
    /// Wraps owned bytes.
    pub fn new(data: Vec<u8>) -> Self {
        Payload {
            buf: data,
            start: 0,
        }
    }
}

impl Payload {
    /// The frame buffer, for reuse by [`read_frame_in`].
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({} bytes)", self.len())
    }
}

impl Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.get(self.start..).unwrap_or(&[])
    }
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First frame from each side.
    Hello {
        /// Protocol version.
        version: u16,
        /// Random challenge for the peer.
        nonce: [u8; 32],
    },
    /// HMAC over both nonces proving knowledge of the shared secret.
    AuthProof {
        /// The HMAC-SHA256 value.
        mac: [u8; 32],
    },
    /// Fatal error; the sender closes after it.
    Error {
        /// Human-readable reason.
        message: String,
    },
    /// A device.
    DeviceInfo(DeviceInfo),
    /// All device infos have been sent.
    DevicesListed {
        /// Number of devices.
        count: u32,
    },
    /// Destination: device accepted; whether it has a base to compare.
    DeviceAck {
        /// Device id.
        device: u32,
        /// True if BaseHashes follow for this device.
        has_base: bool,
    },
    /// Destination: blake3 hashes of its base blocks `start..`.
    BaseHashes {
        /// Device id.
        device: u32,
        /// First block.
        start: u64,
        /// One hash per block.
        hashes: Vec<[u8; 32]>,
    },
    /// The contents of one block.
    BlockData {
        /// Device id.
        device: u32,
        /// Block index.
        index: u64,
        /// True if `data` is zstd-compressed.
        compressed: bool,
        /// Block bytes.
        data: Payload,
    },
    /// Blocks `start..start+count` are all zero.
    ZeroBlocks {
        /// Device id.
        device: u32,
        /// First block.
        start: u64,
        /// Number of blocks.
        count: u64,
    },
    /// Blocks `start..start+count` equal the destination's base.
    AlreadyHave {
        /// Device id.
        device: u32,
        /// First block.
        start: u64,
        /// Number of blocks.
        count: u64,
    },
    /// Destination: send this block now (priority).
    NeedBlock {
        /// Device id.
        device: u32,
        /// Block index.
        index: u64,
    },
    /// Source: these blocks changed; their earlier data is stale.
    Dirty {
        /// Device id.
        device: u32,
        /// Block indices.
        blocks: Vec<u64>,
    },
    /// A protocol event.
    Event(Event),
    /// Source: blake3 hashes of its final blocks `start..` for verification.
    VerifyHashes {
        /// Device id.
        device: u32,
        /// First block.
        start: u64,
        /// One hash per block.
        hashes: Vec<[u8; 32]>,
    },
    /// Destination: outcome of verification for one device.
    VerifyResult {
        /// Device id.
        device: u32,
        /// Number of blocks whose hashes differ.
        mismatched: u64,
        /// Up to [`MAX_SAMPLE`] of their indices.
        sample: Vec<u64>,
    },
    /// Either side: "still here" while it has nothing else to send (no
    /// payload; readers ignore it). Since version 2.
    Keepalive,
}

const T_HELLO: u8 = 1;
const T_AUTH: u8 = 2;
const T_ERROR: u8 = 3;
const T_DEVICE_INFO: u8 = 4;
const T_DEVICES_LISTED: u8 = 5;
const T_DEVICE_ACK: u8 = 6;
const T_BASE_HASHES: u8 = 7;
/// Frame type byte of BlockData frames.
pub const T_BLOCK_DATA: u8 = 8;
/// Frame type byte of ZeroBlocks frames.
pub const T_ZERO_BLOCKS: u8 = 9;
const T_ALREADY_HAVE: u8 = 10;
const T_NEED_BLOCK: u8 = 11;
const T_DIRTY: u8 = 12;
/// Frame type byte of Event frames.
pub const T_EVENT: u8 = 13;
const T_VERIFY_HASHES: u8 = 14;
const T_VERIFY_RESULT: u8 = 15;
/// Frame type byte of Keepalive frames.
pub const T_KEEPALIVE: u8 = 16;
/// Number of frame type codes (for per-type counters).
pub const FRAME_TYPES: usize = 17;
/// A complete Keepalive frame (type, zero length).
pub const KEEPALIVE_FRAME: [u8; HEADER_LEN] = [T_KEEPALIVE, 0, 0, 0, 0];

/// Name of a frame type byte.
pub fn kind_name(ty: u8) -> &'static str {
    match ty {
        T_HELLO => "Hello",
        T_AUTH => "AuthProof",
        T_ERROR => "Error",
        T_DEVICE_INFO => "DeviceInfo",
        T_DEVICES_LISTED => "DevicesListed",
        T_DEVICE_ACK => "DeviceAck",
        T_BASE_HASHES => "BaseHashes",
        T_BLOCK_DATA => "BlockData",
        T_ZERO_BLOCKS => "ZeroBlocks",
        T_ALREADY_HAVE => "AlreadyHave",
        T_NEED_BLOCK => "NeedBlock",
        T_DIRTY => "Dirty",
        T_EVENT => "Event",
        T_VERIFY_HASHES => "VerifyHashes",
        T_VERIFY_RESULT => "VerifyResult",
        T_KEEPALIVE => "Keepalive",
        _ => "unknown",
    }
}

/// Largest payload a frame of type `ty` may announce, or None for unknown types.
fn max_payload(ty: u8) -> Option<usize> {
    Some(match ty {
        T_HELLO => 38,
        T_AUTH => 32,
        T_ERROR => MAX_ERROR,
        T_DEVICE_INFO => 17 + MAX_NAME,
        T_DEVICES_LISTED => 4,
        T_DEVICE_ACK => 5,
        T_BASE_HASHES | T_VERIFY_HASHES => 12 + 32 * MAX_HASHES,
        T_BLOCK_DATA => BLOCK_DATA_HEADER + MAX_BLOCK_SIZE as usize,
        T_ZERO_BLOCKS | T_ALREADY_HAVE => 20,
        T_NEED_BLOCK => 12,
        T_DIRTY => 4 + 8 * MAX_LIST,
        T_EVENT => 1,
        T_VERIFY_RESULT => 12 + 8 * MAX_SAMPLE,
        T_KEEPALIVE => 0,
        _ => return None,
    })
}

impl Message {
    /// The frame type byte.
    pub fn type_byte(&self) -> u8 {
        match self {
            Message::Hello { .. } => T_HELLO,
            Message::AuthProof { .. } => T_AUTH,
            Message::Error { .. } => T_ERROR,
            Message::DeviceInfo(_) => T_DEVICE_INFO,
            Message::DevicesListed { .. } => T_DEVICES_LISTED,
            Message::DeviceAck { .. } => T_DEVICE_ACK,
            Message::BaseHashes { .. } => T_BASE_HASHES,
            Message::BlockData { .. } => T_BLOCK_DATA,
            Message::ZeroBlocks { .. } => T_ZERO_BLOCKS,
            Message::AlreadyHave { .. } => T_ALREADY_HAVE,
            Message::NeedBlock { .. } => T_NEED_BLOCK,
            Message::Dirty { .. } => T_DIRTY,
            Message::Event(_) => T_EVENT,
            Message::VerifyHashes { .. } => T_VERIFY_HASHES,
            Message::VerifyResult { .. } => T_VERIFY_RESULT,
            Message::Keepalive => T_KEEPALIVE,
        }
    }

    /// Name of the message kind.
    pub fn kind(&self) -> &'static str {
        kind_name(self.type_byte())
    }

    /// Encodes the message as one frame appended to `out`.
    ///
    /// Strings and lists longer than the protocol allows are truncated to the
    /// limit (callers split lists with [`MAX_LIST`]/[`MAX_HASHES`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.push(self.type_byte());
        out.extend_from_slice(&[0; 4]);
        match self {
            Message::Hello { version, nonce } => {
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(nonce);
            }
            Message::AuthProof { mac } => out.extend_from_slice(mac),
            Message::Error { message } => {
                out.extend_from_slice(truncate_utf8(message, MAX_ERROR).as_bytes())
            }
            Message::DeviceInfo(d) => {
                out.extend_from_slice(&d.id.to_le_bytes());
                out.extend_from_slice(&d.size.to_le_bytes());
                out.extend_from_slice(&d.block_size.to_le_bytes());
                let name = truncate_utf8(&d.name, MAX_NAME);
                out.push(name.len() as u8);
                out.extend_from_slice(name.as_bytes());
            }
            Message::DevicesListed { count } => out.extend_from_slice(&count.to_le_bytes()),
            Message::DeviceAck { device, has_base } => {
                out.extend_from_slice(&device.to_le_bytes());
                out.push(u8::from(*has_base));
            }
            Message::BaseHashes {
                device,
                start,
                hashes,
            }
            | Message::VerifyHashes {
                device,
                start,
                hashes,
            } => {
                out.extend_from_slice(&device.to_le_bytes());
                out.extend_from_slice(&start.to_le_bytes());
                for h in hashes.iter().take(MAX_HASHES) {
                    out.extend_from_slice(h);
                }
            }
            Message::BlockData {
                device,
                index,
                compressed,
                data,
            } => {
                out.extend_from_slice(&device.to_le_bytes());
                out.extend_from_slice(&index.to_le_bytes());
                out.push(u8::from(*compressed));
                out.extend_from_slice(data);
            }
            Message::ZeroBlocks {
                device,
                start,
                count,
            }
            | Message::AlreadyHave {
                device,
                start,
                count,
            } => {
                out.extend_from_slice(&device.to_le_bytes());
                out.extend_from_slice(&start.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
            Message::NeedBlock { device, index } => {
                out.extend_from_slice(&device.to_le_bytes());
                out.extend_from_slice(&index.to_le_bytes());
            }
            Message::Dirty { device, blocks } => {
                out.extend_from_slice(&device.to_le_bytes());
                for b in blocks.iter().take(MAX_LIST) {
                    out.extend_from_slice(&b.to_le_bytes());
                }
            }
            Message::Event(e) => out.push(e.code()),
            Message::VerifyResult {
                device,
                mismatched,
                sample,
            } => {
                out.extend_from_slice(&device.to_le_bytes());
                out.extend_from_slice(&mismatched.to_le_bytes());
                for b in sample.iter().take(MAX_SAMPLE) {
                    out.extend_from_slice(&b.to_le_bytes());
                }
            }
            Message::Keepalive => {}
        }
        let len = (out.len() - start - HEADER_LEN) as u32;
        out[start + 1..start + HEADER_LEN].copy_from_slice(&len.to_le_bytes());
    }

    /// Encodes into a fresh buffer.
    pub fn to_frame(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Decodes one payload of frame type `ty`.
    pub fn decode(ty: u8, payload: Vec<u8>) -> Result<Message, ProtocolError> {
        let kind = kind_name(ty);
        let max = max_payload(ty).ok_or(ProtocolError::UnknownType(ty))?;
        if payload.len() > max {
            return Err(ProtocolError::Oversized {
                kind,
                len: payload.len() as u32,
                max: max as u32,
            });
        }
        let mut d = Dec {
            b: &payload,
            pos: 0,
            kind,
        };
        let msg = match ty {
            T_HELLO => {
                if d.take(4)? != MAGIC {
                    return Err(ProtocolError::BadMagic);
                }
                let version = d.u16()?;
                let nonce = d.array32()?;
                Message::Hello { version, nonce }
            }
            T_AUTH => Message::AuthProof { mac: d.array32()? },
            T_ERROR => {
                let s = String::from_utf8_lossy(d.rest()).into_owned();
                Message::Error { message: s }
            }
            T_DEVICE_INFO => {
                let id = d.u32()?;
                let size = d.u64()?;
                let block_size = d.u32()?;
                let n = d.u8()? as usize;
                let name = std::str::from_utf8(d.take(n)?)
                    .map_err(|_| d.bad("name is not UTF-8"))?
                    .to_owned();
                if validate_block_size(block_size).is_err() {
                    return Err(d.bad("invalid block size"));
                }
                if block_count(size, block_size) > MAX_BLOCKS_PER_DEVICE {
                    return Err(d.bad("device has too many blocks"));
                }
                if id >= MAX_DEVICES {
                    return Err(d.bad("device id too large"));
                }
                Message::DeviceInfo(DeviceInfo {
                    id,
                    name,
                    size,
                    block_size,
                })
            }
            T_DEVICES_LISTED => Message::DevicesListed { count: d.u32()? },
            T_DEVICE_ACK => {
                let device = d.u32()?;
                let has_base = match d.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(d.bad("has_base is not 0 or 1")),
                };
                Message::DeviceAck { device, has_base }
            }
            T_BASE_HASHES | T_VERIFY_HASHES => {
                let device = d.u32()?;
                let start = d.u64()?;
                let rest = d.rest();
                if rest.is_empty() || !rest.len().is_multiple_of(32) {
                    return Err(d.bad("hash list length is not a positive multiple of 32"));
                }
                let hashes = rest
                    .chunks_exact(32)
                    .map(|c| {
                        let mut h = [0u8; 32];
                        h.copy_from_slice(c);
                        h
                    })
                    .collect();
                if ty == T_BASE_HASHES {
                    Message::BaseHashes {
                        device,
                        start,
                        hashes,
                    }
                } else {
                    Message::VerifyHashes {
                        device,
                        start,
                        hashes,
                    }
                }
            }
            T_BLOCK_DATA => {
                let device = d.u32()?;
                let index = d.u64()?;
                let compressed = match d.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(d.bad("unknown flags")),
                };
                if d.rest().is_empty() {
                    return Err(d.bad("empty block"));
                }
                return Ok(Message::BlockData {
                    device,
                    index,
                    compressed,
                    data: Payload {
                        buf: payload,
                        start: BLOCK_DATA_HEADER,
                    },
                });
            }
            T_ZERO_BLOCKS | T_ALREADY_HAVE => {
                let device = d.u32()?;
                let start = d.u64()?;
                let count = d.u64()?;
                if count == 0 {
                    return Err(d.bad("empty run"));
                }
                if ty == T_ZERO_BLOCKS {
                    Message::ZeroBlocks {
                        device,
                        start,
                        count,
                    }
                } else {
                    Message::AlreadyHave {
                        device,
                        start,
                        count,
                    }
                }
            }
            T_NEED_BLOCK => Message::NeedBlock {
                device: d.u32()?,
                index: d.u64()?,
            },
            T_DIRTY => {
                let device = d.u32()?;
                let rest = d.rest();
                if rest.is_empty() || !rest.len().is_multiple_of(8) {
                    return Err(d.bad("list length is not a positive multiple of 8"));
                }
                Message::Dirty {
                    device,
                    blocks: u64_list(rest),
                }
            }
            T_EVENT => {
                let c = d.u8()?;
                Message::Event(Event::from_code(c).ok_or(d.bad("unknown event"))?)
            }
            T_VERIFY_RESULT => {
                let device = d.u32()?;
                let mismatched = d.u64()?;
                let rest = d.rest();
                if !rest.len().is_multiple_of(8) {
                    return Err(d.bad("sample length is not a multiple of 8"));
                }
                Message::VerifyResult {
                    device,
                    mismatched,
                    sample: u64_list(rest),
                }
            }
            T_KEEPALIVE => Message::Keepalive,
            _ => return Err(ProtocolError::UnknownType(ty)),
        };
        if d.pos != payload.len() {
            return Err(d.bad("trailing bytes"));
        }
        Ok(msg)
    }
}

fn u64_list(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect()
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

struct Dec<'a> {
    b: &'a [u8],
    pos: usize,
    kind: &'static str,
}

impl<'a> Dec<'a> {
    fn bad(&self, what: &'static str) -> ProtocolError {
        ProtocolError::Malformed {
            kind: self.kind,
            what,
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or(ProtocolError::Malformed {
            kind: self.kind,
            what: "payload too short",
        })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.pos..];
        self.pos = self.b.len();
        s
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        let mut w = [0u8; 2];
        w.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(w))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let mut w = [0u8; 4];
        w.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(w))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        let mut w = [0u8; 8];
        w.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(w))
    }
    fn array32(&mut self) -> Result<[u8; 32], ProtocolError> {
        let mut w = [0u8; 32];
        w.copy_from_slice(self.take(32)?);
        Ok(w)
    }
}

/// A TLS record where a frame should be (content types 21, alert, and 22,
/// handshake): the peer uses TLS and this side does not.
fn tls_hint(ty: u8) -> &'static str {
    match ty {
        21 | 22 => " (the peer speaks TLS: use the same --tls-* settings on both sides)",
        _ => "",
    }
}

/// True if `e` is a read or write timeout set on a socket (SO_RCVTIMEO and
/// SO_SNDTIMEO report EAGAIN, which std maps to `WouldBlock`).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A read error as a protocol error: timeouts become [`ProtocolError::TimedOut`].
fn read_error(e: io::Error) -> ProtocolError {
    if is_timeout(&e) {
        ProtocolError::TimedOut
    } else {
        ProtocolError::Io(e)
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` if the stream ended before the
/// first byte, [`ProtocolError::Truncated`] if it ended later.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<bool, ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_error(e)),
        }
    }
    Ok(true)
}

/// Reads and decodes one frame. The announced length is checked against the
/// type's limit before anything is allocated.
pub fn read_frame(r: &mut impl Read) -> Result<Message, ProtocolError> {
    read_frame_in(r, Vec::new())
}

/// [`read_frame`] reusing `buf`'s allocation for the payload (see
/// [`Payload::into_buffer`]).
pub fn read_frame_in(r: &mut impl Read, mut payload: Vec<u8>) -> Result<Message, ProtocolError> {
    let (ty, len) = read_header(r)?;
    payload.clear();
    read_rest(r, ty, len, payload)
}

/// What [`read_frame_or_block`] found.
pub enum Incoming {
    /// A fully read and decoded message.
    Message(Message),
    /// The header of an uncompressed BlockData frame; its `len` data bytes are
    /// still unread on the stream, so the caller can read them straight into
    /// the device. The caller must consume exactly `len` bytes.
    Block {
        /// Device id.
        device: u32,
        /// Block index.
        index: u64,
        /// Data bytes that follow.
        len: usize,
    },
}

/// Like [`read_frame_in`], but stops after the fixed part of an
/// uncompressed BlockData frame (zero-copy receive).
pub fn read_frame_or_block(
    r: &mut impl Read,
    mut payload: Vec<u8>,
) -> Result<Incoming, ProtocolError> {
    let (ty, len) = read_header(r)?;
    if ty == T_BLOCK_DATA && len as usize > BLOCK_DATA_HEADER {
        let mut sub = [0u8; BLOCK_DATA_HEADER];
        if !read_full(r, &mut sub)? {
            return Err(ProtocolError::Truncated);
        }
        if sub[12] == 0 {
            let mut d = Dec {
                b: &sub,
                pos: 0,
                kind: "BlockData",
            };
            return Ok(Incoming::Block {
                device: d.u32()?,
                index: d.u64()?,
                len: len as usize - BLOCK_DATA_HEADER,
            });
        }
        payload.clear();
        payload.extend_from_slice(&sub);
        return read_rest(r, ty, len - BLOCK_DATA_HEADER as u32, payload).map(Incoming::Message);
    }
    payload.clear();
    read_rest(r, ty, len, payload).map(Incoming::Message)
}

/// Reads and checks a frame header: known type, length within its limit.
fn read_header(r: &mut impl Read) -> Result<(u8, u32), ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    if !read_full(r, &mut header)? {
        return Err(ProtocolError::Closed);
    }
    let ty = header[0];
    let mut lenb = [0u8; 4];
    lenb.copy_from_slice(&header[1..]);
    let len = u32::from_le_bytes(lenb);
    let max = max_payload(ty).ok_or(ProtocolError::UnknownType(ty))?;
    if len as usize > max {
        return Err(ProtocolError::Oversized {
            kind: kind_name(ty),
            len,
            max: max as u32,
        });
    }
    Ok((ty, len))
}

/// Appends `len` more payload bytes to `payload` and decodes the frame.
fn read_rest(
    r: &mut impl Read,
    ty: u8,
    len: u32,
    mut payload: Vec<u8>,
) -> Result<Message, ProtocolError> {
    // Bounded by the type's limit (checked by read_header); read_to_end into
    // reserved capacity avoids zero-filling a buffer about to be overwritten.
    payload.reserve(len as usize);
    let got = r
        .take(u64::from(len))
        .read_to_end(&mut payload)
        .map_err(read_error)?;
    if got != len as usize {
        return Err(ProtocolError::Truncated);
    }
    Message::decode(ty, payload)
}

/// Builds a BlockData frame in place: the returned buffer holds the header and
/// `len` zero bytes of data at `[BLOCK_FRAME_DATA..]` for the caller to fill.
pub fn block_frame(device: u32, index: u64, len: usize) -> Vec<u8> {
    block_frame_in(Vec::new(), device, index, len)
}

/// [`block_frame`] reusing `buf`'s allocation (its old bytes are not cleared:
/// the caller overwrites the data area).
pub fn block_frame_in(mut f: Vec<u8>, device: u32, index: u64, len: usize) -> Vec<u8> {
    f.resize(BLOCK_FRAME_DATA + len, 0);
    f[0] = T_BLOCK_DATA;
    f[17] = 0;
    f[1..5].copy_from_slice(&((BLOCK_DATA_HEADER + len) as u32).to_le_bytes());
    f[5..9].copy_from_slice(&device.to_le_bytes());
    f[9..17].copy_from_slice(&index.to_le_bytes());
    f
}

/// Offset of the data inside a frame from [`block_frame`].
pub const BLOCK_FRAME_DATA: usize = HEADER_LEN + BLOCK_DATA_HEADER;

/// Replaces the data of a [`block_frame`] with its zstd compression if that
/// is smaller.
pub fn compress_block_frame(frame: Vec<u8>, level: i32) -> Vec<u8> {
    let Some(data) = frame.get(BLOCK_FRAME_DATA..) else {
        return frame;
    };
    match zstd::bulk::compress(data, level) {
        Ok(c) if c.len() + 16 < data.len() => {
            let mut f = Vec::with_capacity(BLOCK_FRAME_DATA + c.len());
            f.extend_from_slice(&frame[..BLOCK_FRAME_DATA]);
            f[1..5].copy_from_slice(&((BLOCK_DATA_HEADER + c.len()) as u32).to_le_bytes());
            f[17] = 1;
            f.extend_from_slice(&c);
            f
        }
        _ => frame,
    }
}

/// The devices of one migration, for validating ids, indices and runs.
#[derive(Debug, Clone, Default)]
pub struct DeviceTable {
    devices: Vec<DeviceInfo>,
}

impl DeviceTable {
    /// A table over `devices` (ids must equal positions).
    pub fn new(devices: Vec<DeviceInfo>) -> Self {
        DeviceTable { devices }
    }

    /// Adds the next device; its id must be the next position.
    pub fn push(&mut self, info: DeviceInfo) -> Result<(), ProtocolError> {
        if info.id as usize != self.devices.len() {
            return Err(ProtocolError::OutOfRange(format!(
                "device id {} announced out of order (expected {})",
                info.id,
                self.devices.len()
            )));
        }
        self.devices.push(info);
        Ok(())
    }

    /// The devices.
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    /// The device with `id`.
    pub fn device(&self, id: u32) -> Result<&DeviceInfo, ProtocolError> {
        self.devices
            .get(id as usize)
            .ok_or_else(|| ProtocolError::OutOfRange(format!("unknown device id {id}")))
    }

    /// Checks that block `index` exists on device `id`.
    pub fn check_block(&self, id: u32, index: u64) -> Result<&DeviceInfo, ProtocolError> {
        let d = self.device(id)?;
        if index >= d.blocks() {
            return Err(ProtocolError::OutOfRange(format!(
                "block {index} of device {id} ({} blocks)",
                d.blocks()
            )));
        }
        Ok(d)
    }

    /// Checks that blocks `start..start+count` exist on device `id`.
    pub fn check_run(&self, id: u32, start: u64, count: u64) -> Result<&DeviceInfo, ProtocolError> {
        let d = self.device(id)?;
        match start.checked_add(count) {
            Some(end) if end <= d.blocks() => Ok(d),
            _ => Err(ProtocolError::OutOfRange(format!(
                "blocks {start}+{count} of device {id} ({} blocks)",
                d.blocks()
            ))),
        }
    }

    /// Length block `index` of device `id` must have.
    pub fn block_len(&self, id: u32, index: u64) -> Result<usize, ProtocolError> {
        let d = self.check_block(id, index)?;
        Ok(block_len(d.size, d.block_size, index))
    }
}

/// Decodes the data of a BlockData message into `out` (exactly the block's
/// length), decompressing with a bound so a compression bomb cannot grow it.
pub fn block_bytes(
    device: u32,
    index: u64,
    compressed: bool,
    data: &[u8],
    expected_len: usize,
    scratch: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    let bad = |what: String| ProtocolError::BadBlock {
        device,
        index,
        what,
    };
    if compressed {
        scratch.clear();
        scratch.resize(expected_len, 0);
        let n = zstd::bulk::decompress_to_buffer(data, scratch.as_mut_slice())
            .map_err(|e| bad(format!("zstd: {e}")))?;
        if n != expected_len {
            return Err(bad(format!(
                "decompressed to {n} bytes, expected {expected_len}"
            )));
        }
    } else if data.len() != expected_len {
        return Err(bad(format!(
            "{} bytes, expected {expected_len}",
            data.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: Message) {
        let f = m.to_frame();
        let back = read_frame(&mut &f[..]).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(Message::Hello {
            version: 7,
            nonce: [3; 32],
        });
        round_trip(Message::AuthProof { mac: [9; 32] });
        round_trip(Message::Error {
            message: "boom".into(),
        });
        round_trip(Message::DeviceInfo(DeviceInfo {
            id: 2,
            name: "disk".into(),
            size: 1 << 30,
            block_size: 65536,
        }));
        round_trip(Message::DevicesListed { count: 3 });
        round_trip(Message::DeviceAck {
            device: 1,
            has_base: true,
        });
        round_trip(Message::BaseHashes {
            device: 1,
            start: 5,
            hashes: vec![[1; 32], [2; 32]],
        });
        round_trip(Message::BlockData {
            device: 0,
            index: 9,
            compressed: false,
            data: Payload::new(vec![5; 4096]),
        });
        round_trip(Message::ZeroBlocks {
            device: 0,
            start: 1,
            count: 100,
        });
        round_trip(Message::AlreadyHave {
            device: 0,
            start: 1,
            count: 2,
        });
        round_trip(Message::NeedBlock {
            device: 3,
            index: 77,
        });
        round_trip(Message::Dirty {
            device: 0,
            blocks: vec![1, 5, 9],
        });
        for e in [
            Event::AllSent,
            Event::Completed,
            Event::HandoverOffered,
            Event::ReadyToRun,
            Event::Commit,
            Event::Running,
        ] {
            round_trip(Message::Event(e));
        }
        // Version 2's authority events are gone.
        for code in [2u8, 3] {
            let frame = [T_EVENT, 1, 0, 0, 0, code];
            assert!(read_frame(&mut &frame[..]).is_err());
        }
        round_trip(Message::VerifyHashes {
            device: 0,
            start: 0,
            hashes: vec![[0; 32]],
        });
        round_trip(Message::VerifyResult {
            device: 0,
            mismatched: 2,
            sample: vec![4, 8],
        });
        round_trip(Message::Keepalive);
        assert_eq!(Message::Keepalive.to_frame(), KEEPALIVE_FRAME);
        let mut with_payload = KEEPALIVE_FRAME.to_vec();
        with_payload[1] = 1;
        with_payload.push(0);
        assert!(matches!(
            read_frame(&mut &with_payload[..]),
            Err(ProtocolError::Oversized { .. })
        ));
    }

    #[test]
    fn read_timeouts_are_reported_as_timeouts() {
        struct Stalled;
        impl Read for Stalled {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
        assert!(matches!(
            read_frame(&mut Stalled),
            Err(ProtocolError::TimedOut)
        ));
        // A timeout inside a payload, too.
        let f = Message::NeedBlock {
            device: 0,
            index: 1,
        }
        .to_frame();
        let mut r = (&f[..7]).chain(Stalled);
        assert!(matches!(read_frame(&mut r), Err(ProtocolError::TimedOut)));
    }

    #[test]
    fn block_frame_builder_matches_encoder_and_compresses() {
        let mut f = block_frame(2, 11, 4096);
        f[BLOCK_FRAME_DATA..].fill(0xab);
        let m = read_frame(&mut &f[..]).unwrap();
        assert_eq!(
            m,
            Message::BlockData {
                device: 2,
                index: 11,
                compressed: false,
                data: Payload::new(vec![0xab; 4096])
            }
        );
        let c = compress_block_frame(f, 1);
        assert!(c.len() < 200);
        let Message::BlockData {
            compressed: true,
            data,
            ..
        } = read_frame(&mut &c[..]).unwrap()
        else {
            panic!("not compressed block data");
        };
        let mut out = Vec::new();
        block_bytes(2, 11, true, &data, 4096, &mut out).unwrap();
        assert_eq!(out, vec![0xab; 4096]);
        // A bomb: decompresses past the block size.
        let bomb = zstd::bulk::compress(&vec![0u8; 8192], 1).unwrap();
        assert!(block_bytes(2, 11, true, &bomb, 4096, &mut out).is_err());
    }

    #[test]
    fn oversized_unknown_and_truncated_frames_are_rejected_before_allocation() {
        let mut f = vec![T_BLOCK_DATA];
        f.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_frame(&mut &f[..]),
            Err(ProtocolError::Oversized { .. })
        ));
        assert!(matches!(
            read_frame(&mut &[200u8, 0, 0, 0, 0][..]),
            Err(ProtocolError::UnknownType(200))
        ));
        let full = Message::NeedBlock {
            device: 0,
            index: 1,
        }
        .to_frame();
        assert!(matches!(
            read_frame(&mut &full[..7]),
            Err(ProtocolError::Truncated)
        ));
        assert!(matches!(
            read_frame(&mut &full[..3]),
            Err(ProtocolError::Truncated)
        ));
        assert!(matches!(
            read_frame(&mut &[][..]),
            Err(ProtocolError::Closed)
        ));
        let mut hello = Message::Hello {
            version: 1,
            nonce: [0; 32],
        }
        .to_frame();
        hello[5] = b'X';
        assert!(matches!(
            read_frame(&mut &hello[..]),
            Err(ProtocolError::BadMagic)
        ));
    }

    #[test]
    fn table_checks_ranges() {
        let t = DeviceTable::new(vec![DeviceInfo {
            id: 0,
            name: "a".into(),
            size: 10_000,
            block_size: 4096,
        }]);
        assert!(t.check_block(0, 2).is_ok());
        assert!(t.check_block(0, 3).is_err());
        assert!(t.check_block(1, 0).is_err());
        assert!(t.check_run(0, 1, 2).is_ok());
        assert!(t.check_run(0, 1, u64::MAX).is_err());
        assert_eq!(t.block_len(0, 2).unwrap(), 10_000 - 8192);
    }

    /// Found by the `storage_frames` fuzz target (its round-trip check, not
    /// a parser panic): an Error frame of `MAX_ERROR` bytes that are not
    /// UTF-8 decodes (lossily, so its text grows past `MAX_ERROR` bytes) and
    /// re-encodes truncated to the limit, into a frame that decodes again.
    #[test]
    fn invalid_utf8_error_text_at_the_limit_reencodes_within_it() {
        let mut payload = vec![0xffu8; MAX_ERROR - 1];
        payload.insert(0, b'd');
        let mut frame = vec![T_ERROR];
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&payload);
        let msg = read_frame(&mut &frame[..]).unwrap_or_else(|e| panic!("{e}"));
        let Message::Error { message } = &msg else {
            panic!("decoded as {msg:?}");
        };
        assert!(
            message.len() > MAX_ERROR,
            "lossy text is {} bytes",
            message.len()
        );
        let again = msg.to_frame();
        assert!(again.len() <= HEADER_LEN + MAX_ERROR);
        let back = read_frame(&mut &again[..]).unwrap_or_else(|e| panic!("{e}"));
        let Message::Error { message: back } = back else {
            panic!("re-read as {back:?}");
        };
        assert!(message.starts_with(&back) && !back.is_empty());
    }
}
