//! NAT namespace pool and port forwarder (netlink + nftables), crash-safe.
//!
//! * [`nat::NatPool`] creates network namespaces `<prefix><N>`, each with a tap device for a
//!   VM and a veth pair to the host, NATs the guests' IPv4/IPv6 traffic out of a host
//!   interface and (optionally) lets traffic to a namespace's address reach the guest.
//! * [`forwarder::Forwarder`] forwards host ports to guests in those namespaces.
//!
//! Links, addresses, routes and namespaces go through netlink ([`netlink`], [`netns`]);
//! packet rules live in drafter-owned nftables tables replaced atomically ([`nft`]).

pub mod cidr;
pub mod error;
pub mod forwarder;
pub mod nat;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod service;
pub mod tap;

pub use cidr::Cidr;
pub use error::{NetworkError, Result};
pub use forwarder::{ForwardId, Forwarder, ForwarderConfig, PortForward, Protocol};
pub use nat::{ClaimedNamespace, NamespaceInfo, NatConfig, NatPool};
