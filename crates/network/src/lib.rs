//! NAT namespace pool and port forwarder (netlink + nftables), crash-safe.
//!
//! * [`nat::NatPool`] creates network namespaces `<prefix><N>`, each with a tap device for a
//!   VM and a veth pair to the host, NATs the guests' IPv4/IPv6 traffic out of a host
//!   interface and (optionally) lets traffic to a namespace's address reach the guest.
//! * [`forwarder::Forwarder`] forwards host ports to guests in those namespaces.
//!
//! Links, addresses, routes and namespaces go through netlink ([`netlink`], [`netns`]);
//! packet rules live in drafter-owned nftables tables, each replaced in one atomic
//! nfnetlink batch ([`nft`]).
//!
//! Topology of namespace `<prefix>N` (same for IPv6, with /126 pairs and NAT66):
//!
//! ```text
//! guest 172.100.100.2 ── tap0 172.100.100.1 │ <prefix>N-veth0 10.0.8.1 ══ <prefix>N-veth1 10.0.8.2 (host)
//!   SNAT guest → namespace address 10.0.15.1 │ host: 10.0.15.1/32 via 10.0.8.1; masquerade out
//!   DNAT 10.0.15.1 (and 10.0.8.1 if incoming  │ of the host interface; blocked subnet dropped
//!   traffic is allowed) → guest               │ to/from the namespaces
//! ```
//!
//! Host-wide side effects that are deliberately not undone on exit (other pools or
//! forwarders may rely on them): `net.ipv4.ip_forward=1`, `net.ipv6.conf.all.forwarding=1`
//! (with IPv6), and `route_localnet=1` on `all`/`lo` once a loopback forward was added.
//! Lock files `/run/drafter/nat-<prefix>.lock` stay (empty; they only carry `flock`s).
//! Nothing shells out: rules are encoded as nf_tables netlink batches ([`nft`]); the `nft`
//! tool is only used by the tests, to inspect.

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
