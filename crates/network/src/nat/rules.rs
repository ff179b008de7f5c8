//! nftables rules of the NAT: one host table per prefix, one table per namespace.

use std::net::IpAddr;

use super::config::{NamespaceInfo, NatConfig};
use crate::cidr::Cidr;
use crate::nft::{Action, Chain, Family, Hook, Match, Rule};

/// Name of the host table owned by the pool with this prefix.
pub fn host_table_name(prefix: &str) -> String {
    format!("drafter_nat_{prefix}")
}

/// Name of the table inside every namespace.
pub const NAMESPACE_TABLE: &str = "drafter";

fn host(addr: IpAddr) -> Cidr {
    let len = if addr.is_ipv6() { 128 } else { 32 };
    Cidr::new(addr, len).unwrap_or_else(|_| unreachable!("full-length prefix is valid"))
}

/// Host table: masquerade the namespaces' traffic out of the host interface and keep the
/// blocked subnet away from (and out of) the namespaces.
pub fn host_table(
    config: &NatConfig,
    host_interface: &str,
    namespaces: &[NamespaceInfo],
) -> Vec<Chain> {
    let mut families = vec![(
        Family::V4,
        [config.namespace_veth_cidr, config.host_veth_cidr],
        config.blocked_subnet_cidr,
    )];
    if let Some(v6) = &config.ipv6 {
        families.push((
            Family::V6,
            [v6.namespace_veth_cidr, v6.host_veth_cidr],
            v6.blocked_subnet_cidr,
        ));
    }
    let mut post = Vec::new();
    let mut fwd = Vec::new();
    for (family, sources, blocked) in families {
        for source in sources {
            post.push(Rule::new(
                family,
                vec![Match::Oif(host_interface.into()), Match::Saddr(source)],
                Action::Masquerade,
            ));
        }
        for ns in namespaces {
            let veth = &ns.host_veth_name;
            fwd.push(Rule::new(
                family,
                vec![Match::Iif(veth.clone()), Match::Daddr(blocked)],
                Action::Drop,
            ));
            fwd.push(Rule::new(
                family,
                vec![Match::Oif(veth.clone()), Match::Saddr(blocked)],
                Action::Drop,
            ));
        }
    }
    vec![
        Chain::new(Hook::Postrouting, post),
        Chain::new(Hook::Forward, fwd),
    ]
}

/// Namespace table: the guest's traffic leaves as the namespace's own address, traffic to
/// that address (and, if allowed, to the host-veth-internal address) reaches the guest.
pub fn namespace_table(info: &NamespaceInfo, allow_incoming: bool) -> Vec<Chain> {
    let mut addrs = vec![(
        Family::V4,
        IpAddr::from(info.guest_ip),
        IpAddr::from(info.namespace_veth_ip),
        IpAddr::from(info.host_veth_internal_ip),
    )];
    if let Some(v6) = &info.ipv6 {
        addrs.push((
            Family::V6,
            v6.guest_ip.into(),
            v6.namespace_veth_ip.into(),
            v6.host_veth_internal_ip.into(),
        ));
    }
    let veth = &info.namespace_veth_name;
    let mut pre = Vec::new();
    let mut post = Vec::new();
    for (family, guest, own, internal) in addrs {
        pre.push(Rule::new(
            family,
            vec![Match::Iif(veth.clone()), Match::Daddr(host(own))],
            Action::Dnat(guest, None),
        ));
        post.push(Rule::new(
            family,
            vec![Match::Oif(veth.clone()), Match::Saddr(host(guest))],
            Action::Snat(own),
        ));
        if allow_incoming {
            pre.push(Rule::new(
                family,
                vec![Match::Iif(veth.clone()), Match::Daddr(host(internal))],
                Action::Dnat(guest, None),
            ));
            post.push(Rule::new(
                family,
                vec![Match::Oif(info.tap_name.clone()), Match::Daddr(host(guest))],
                Action::Masquerade,
            ));
        }
    }
    vec![
        Chain::new(Hook::Prerouting, pre),
        Chain::new(Hook::Postrouting, post),
    ]
}
