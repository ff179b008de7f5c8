//! Errors of the networking crate.

use std::io;

/// Everything that can go wrong while building or tearing down drafter networking.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A CIDR string could not be parsed.
    #[error("invalid CIDR {0}")]
    InvalidCidr(String),
    /// The configuration is inconsistent (overlapping or too small ranges, bad names, ...).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A port-forward entry is malformed or refers to something that does not exist.
    #[error("invalid port forward: {0}")]
    InvalidForward(String),
    /// A netlink request was refused by the kernel.
    #[error("netlink {op}: {source}")]
    Netlink {
        /// What was being done.
        op: String,
        /// The kernel's answer.
        source: io::Error,
    },
    /// A netlink answer could not be decoded.
    #[error("netlink {op}: undecodable answer: {detail}")]
    NetlinkDecode {
        /// What was being done.
        op: String,
        /// Decoder message.
        detail: String,
    },
    /// A named network namespace does not exist.
    #[error("network namespace {0:?} not found (no /run/netns/{0})")]
    NamespaceNotFound(String),
    /// A network interface does not exist.
    #[error("network interface {0:?} not found")]
    InterfaceNotFound(String),
    /// An nftables transaction failed.
    #[error("nftables: {0}")]
    Nftables(String),
    /// Every namespace of the pool is claimed.
    #[error("all {0} namespaces of the pool are claimed")]
    PoolExhausted(usize),
    /// Another live process already owns this namespace prefix.
    #[error("namespace prefix {prefix:?} is in use by another running drafter-nat (lock {path})")]
    PrefixInUse {
        /// The prefix.
        prefix: String,
        /// The lock file held by the other process.
        path: String,
    },
    /// An operating-system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// The OS error.
        source: io::Error,
    },
}

impl NetworkError {
    /// Wraps an I/O error with what was being done.
    pub fn io(op: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Self::Io {
            op: op.into(),
            source: source.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, NetworkError>;
