//! nftables rule text for the NAT: one host table per prefix, one table per namespace.

use std::fmt::Write;

use super::config::{NamespaceInfo, NatConfig};
use crate::nft::quote;

/// Name of the host table owned by the pool with this prefix.
pub fn host_table_name(prefix: &str) -> String {
    format!("drafter_nat_{prefix}")
}

/// Name of the table inside every namespace.
pub const NAMESPACE_TABLE: &str = "drafter";

/// Host table body: masquerade the namespaces' traffic out of the host interface and keep
/// the blocked subnet away from (and out of) the namespaces.
pub fn host_table(
    config: &NatConfig,
    host_interface: &str,
    namespaces: &[NamespaceInfo],
) -> String {
    let veths = namespaces
        .iter()
        .map(|n| quote(&n.host_veth_name))
        .collect::<Vec<_>>()
        .join(", ");
    let oif = quote(host_interface);
    let mut post = format!(
        "  oifname {oif} ip saddr {{ {}, {} }} masquerade\n",
        config.namespace_veth_cidr, config.host_veth_cidr
    );
    let mut fwd = format!(
        "  iifname {{ {veths} }} ip daddr {b} drop\n  oifname {{ {veths} }} ip saddr {b} drop\n",
        b = config.blocked_subnet_cidr
    );
    if let Some(v6) = &config.ipv6 {
        let _ = writeln!(
            post,
            "  oifname {oif} ip6 saddr {{ {}, {} }} masquerade",
            v6.namespace_veth_cidr, v6.host_veth_cidr
        );
        let _ = write!(
            fwd,
            "  iifname {{ {veths} }} ip6 daddr {b} drop\n  oifname {{ {veths} }} ip6 saddr {b} drop\n",
            b = v6.blocked_subnet_cidr
        );
    }
    format!(
        " chain postrouting {{\n  type nat hook postrouting priority srcnat; policy accept;\n{post} }}\n chain forward {{\n  type filter hook forward priority filter; policy accept;\n{fwd} }}\n"
    )
}

/// Namespace table body: the guest's traffic leaves as the namespace's own address,
/// traffic to that address (and, if allowed, to the host-veth-internal address) reaches it.
pub fn namespace_table(info: &NamespaceInfo, allow_incoming: bool) -> String {
    let veth = quote(&info.namespace_veth_name);
    let tap = quote(&info.tap_name);
    let mut pre = format!(
        "  iifname {veth} ip daddr {} dnat ip to {}\n",
        info.namespace_veth_ip, info.guest_ip
    );
    let mut post = format!(
        "  oifname {veth} ip saddr {} snat ip to {}\n",
        info.guest_ip, info.namespace_veth_ip
    );
    if allow_incoming {
        let _ = writeln!(
            pre,
            "  iifname {veth} ip daddr {} dnat ip to {}",
            info.host_veth_internal_ip, info.guest_ip
        );
        let _ = writeln!(
            post,
            "  oifname {tap} ip daddr {} masquerade",
            info.guest_ip
        );
    }
    if let Some(v6) = &info.ipv6 {
        let _ = writeln!(
            pre,
            "  iifname {veth} ip6 daddr {} dnat ip6 to {}",
            v6.namespace_veth_ip, v6.guest_ip
        );
        let _ = writeln!(
            post,
            "  oifname {veth} ip6 saddr {} snat ip6 to {}",
            v6.guest_ip, v6.namespace_veth_ip
        );
        if allow_incoming {
            let _ = writeln!(
                pre,
                "  iifname {veth} ip6 daddr {} dnat ip6 to {}",
                v6.host_veth_internal_ip, v6.guest_ip
            );
            let _ = writeln!(post, "  oifname {tap} ip6 daddr {} masquerade", v6.guest_ip);
        }
    }
    format!(
        " chain prerouting {{\n  type nat hook prerouting priority dstnat; policy accept;\n{pre} }}\n chain postrouting {{\n  type nat hook postrouting priority srcnat; policy accept;\n{post} }}\n"
    )
}
