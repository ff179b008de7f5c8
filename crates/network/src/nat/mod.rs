//! NAT namespace pool: each VM gets its own network namespace with a tap device, NATed to
//! the outside through a host interface (IPv4 and IPv6).

mod config;
mod pool;
mod rules;

pub use config::{
    GuestLink, Ipv6Config, MacAddr, NamespaceInfo, NamespaceIpv6, NatConfig, NatPlan,
    DEFAULT_MAX_NAMESPACES, MAX_IFNAME,
};
pub use pool::{sweep, ClaimedNamespace, NatPool, GUEST_VETH_NAME, LOCK_DIR};
pub use rules::{host_table_name, NAMESPACE_TABLE};
