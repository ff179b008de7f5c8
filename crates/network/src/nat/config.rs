//! NAT configuration (the `drafter-nat` flags) and its validation into a per-namespace plan.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::cidr::Cidr;
use crate::error::{NetworkError, Result};

/// Upper bound on the namespaces created when no count is given.
pub const DEFAULT_MAX_NAMESPACES: usize = 64;

/// Longest Linux interface name.
pub const MAX_IFNAME: usize = 15;

/// A 48-bit Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = NetworkError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || NetworkError::InvalidConfig(format!("invalid MAC address {s:?}"));
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() || out[0] & 1 == 1 {
            return Err(bad());
        }
        Ok(Self(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// IPv6 part of the NAT: the same topology as IPv4 with ULA addresses and NAT66.
#[derive(Debug, Clone)]
pub struct Ipv6Config {
    /// Block split into /126 pairs for the namespace↔host veths.
    pub host_veth_cidr: Cidr,
    /// Block giving each namespace its own routable address (guest traffic is NATed to it).
    pub namespace_veth_cidr: Cidr,
    /// Block that namespaces may not reach and that may not reach them.
    pub blocked_subnet_cidr: Cidr,
    /// Gateway address on the tap (the guest's default router).
    pub gateway: Ipv6Addr,
    /// The guest's address.
    pub ip: Ipv6Addr,
    /// Prefix length of the tap network.
    pub prefix_len: u8,
}

impl Default for Ipv6Config {
    fn default() -> Self {
        Self {
            host_veth_cidr: cidr("fd64:d4af:8::/64"),
            namespace_veth_cidr: cidr("fd64:d4af:15::/64"),
            blocked_subnet_cidr: cidr("fd64:d4af:15::/64"),
            gateway: Ipv6Addr::new(0xfd64, 0xd4af, 0x100, 0, 0, 0, 0, 1),
            ip: Ipv6Addr::new(0xfd64, 0xd4af, 0x100, 0, 0, 0, 0, 2),
            prefix_len: 64,
        }
    }
}

/// What sits on the guest side of each namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestLink {
    /// A persistent tap device for a VM (the normal case).
    Tap,
    /// A veth whose peer (`eth0`) goes into the existing namespace `<prefix><N>` and is
    /// configured like a guest would configure itself (address, MAC, default routes).
    /// Lets processes stand in for a VM, e.g. in tests.
    VethIntoNamespace {
        /// Prefix of the guest namespaces (`<prefix>0`, `<prefix>1`, ...).
        prefix: String,
    },
}

/// Everything `drafter-nat` is configured with.
#[derive(Debug, Clone)]
pub struct NatConfig {
    /// Interface the guests' traffic leaves through (masqueraded); empty = default route's.
    pub host_interface: String,
    /// Block split into /30 pairs for the namespace↔host veths.
    pub host_veth_cidr: Cidr,
    /// Block giving each namespace its own routable address.
    pub namespace_veth_cidr: Cidr,
    /// Block that namespaces may not reach and that may not reach them.
    pub blocked_subnet_cidr: Cidr,
    /// Name of the guest-facing interface inside each namespace.
    pub namespace_interface: String,
    /// Gateway address on that interface.
    pub namespace_interface_gateway: Ipv4Addr,
    /// Prefix length of the tap network.
    pub namespace_interface_netmask: u8,
    /// The guest's address.
    pub namespace_interface_ip: Ipv4Addr,
    /// The guest's MAC address (the tap itself gets a neighbouring one).
    pub namespace_interface_mac: MacAddr,
    /// Namespaces are called `<prefix><N>`.
    pub namespace_prefix: String,
    /// Whether traffic to a namespace's host-veth-internal address is sent to the guest.
    pub allow_incoming_traffic: bool,
    /// IPv6 settings, `None` to disable IPv6.
    pub ipv6: Option<Ipv6Config>,
    /// How many namespaces; `None` = as many as the CIDRs allow, capped at
    /// [`DEFAULT_MAX_NAMESPACES`].
    pub namespace_count: Option<usize>,
    /// What the guest-facing interface is.
    pub guest_link: GuestLink,
}

impl Default for NatConfig {
    fn default() -> Self {
        Self {
            host_interface: String::new(),
            host_veth_cidr: cidr("10.0.8.0/22"),
            namespace_veth_cidr: cidr("10.0.15.0/24"),
            blocked_subnet_cidr: cidr("10.0.15.0/24"),
            namespace_interface: "tap0".into(),
            namespace_interface_gateway: Ipv4Addr::new(172, 100, 100, 1),
            namespace_interface_netmask: 30,
            namespace_interface_ip: Ipv4Addr::new(172, 100, 100, 2),
            namespace_interface_mac: MacAddr([0x02, 0x0e, 0xd9, 0xfd, 0x68, 0x3d]),
            namespace_prefix: "ark".into(),
            allow_incoming_traffic: true,
            ipv6: Some(Ipv6Config::default()),
            namespace_count: None,
            guest_link: GuestLink::Tap,
        }
    }
}

fn cidr(s: &str) -> Cidr {
    // Only used on the literal defaults above, which the unit tests parse.
    s.parse()
        .unwrap_or_else(|_| unreachable!("bad built-in CIDR {s}"))
}

/// IPv6 addresses of one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceIpv6 {
    /// The guest's address.
    pub guest_ip: Ipv6Addr,
    /// The guest's default router (on the tap).
    pub gateway: Ipv6Addr,
    /// Prefix length of the tap network.
    pub prefix_len: u8,
    /// Namespace end of the host veth pair (incoming traffic address).
    pub host_veth_internal_ip: Ipv6Addr,
    /// Host end of the host veth pair.
    pub host_veth_external_ip: Ipv6Addr,
    /// The namespace's own routable address (guest traffic is NATed to it).
    pub namespace_veth_ip: Ipv6Addr,
}

/// Everything about one namespace of the pool: what the runner needs to start a VM in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Position in the pool.
    pub index: usize,
    /// Namespace name (`<prefix><index>`), usable as `--netns`.
    pub name: String,
    /// Guest-facing interface inside the namespace (the tap the VMM attaches to).
    pub tap_name: String,
    /// MAC address the guest must use.
    pub guest_mac: MacAddr,
    /// MAC address of the tap (the guest's gateway).
    pub tap_mac: MacAddr,
    /// The guest's address.
    pub guest_ip: Ipv4Addr,
    /// The guest's default gateway (address of the tap).
    pub gateway: Ipv4Addr,
    /// Prefix length of the tap network.
    pub netmask: u8,
    /// Namespace end of the host veth pair; with incoming traffic allowed it reaches the guest.
    pub host_veth_internal_ip: Ipv4Addr,
    /// Host end of the host veth pair.
    pub host_veth_external_ip: Ipv4Addr,
    /// The namespace's own routable address (guest traffic is NATed to it).
    pub namespace_veth_ip: Ipv4Addr,
    /// Host end of the veth pair (`<name>-veth1`).
    pub host_veth_name: String,
    /// Namespace end of the veth pair (`<name>-veth0`).
    pub namespace_veth_name: String,
    /// IPv6 addresses, if enabled.
    pub ipv6: Option<NamespaceIpv6>,
}

/// A validated configuration: the resolved addresses of every namespace.
#[derive(Debug, Clone)]
pub struct NatPlan {
    /// The configuration the plan was made from.
    pub config: NatConfig,
    /// One entry per namespace.
    pub namespaces: Vec<NamespaceInfo>,
}

fn v4(a: IpAddr) -> Ipv4Addr {
    match a {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    }
}

fn v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V6(a) => a,
        IpAddr::V4(_) => Ipv6Addr::UNSPECIFIED,
    }
}

fn invalid(msg: String) -> NetworkError {
    NetworkError::InvalidConfig(msg)
}

fn check_family(name: &str, c: &Cidr, want_v6: bool) -> Result<()> {
    if c.is_ipv6() != want_v6 {
        let fam = if want_v6 { "IPv6" } else { "IPv4" };
        return Err(invalid(format!("{name} {c} must be an {fam} CIDR")));
    }
    Ok(())
}

fn check_ifname_chars(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if !ok {
        return Err(invalid(format!(
            "{what} {name:?} must be 1..{MAX_IFNAME} characters of [A-Za-z0-9_.-]"
        )));
    }
    Ok(())
}

/// Checks the tap network: gateway and guest distinct, in one subnet, not its edges.
fn check_tap_net(gateway: IpAddr, ip: IpAddr, prefix: u8, suffix: &str) -> Result<Cidr> {
    let net = Cidr::new(gateway, prefix).map_err(|_| {
        invalid(format!(
            "namespace-interface-netmask{suffix} /{prefix} is out of range"
        ))
    })?;
    if net.host_count() < 2 {
        return Err(invalid(format!(
            "namespace-interface-netmask{suffix} /{prefix} is too small for a gateway and a guest"
        )));
    }
    if gateway == ip {
        return Err(invalid(format!(
            "namespace-interface-gateway{suffix} and namespace-interface-ip{suffix} are both {ip}"
        )));
    }
    if !net.contains(ip) {
        return Err(invalid(format!(
            "namespace-interface-ip{suffix} {ip} is not in the gateway's network {net}"
        )));
    }
    let edges = [
        net.nth(0),
        (!net.is_ipv6()).then(|| net.nth(net.size() - 1)).flatten(),
    ];
    for a in [gateway, ip] {
        if net.size() > 2 && edges.contains(&Some(a)) {
            return Err(invalid(format!(
                "{a} is the network or broadcast address of {net}"
            )));
        }
    }
    Ok(net)
}

fn check_no_overlap(named: &[(&str, Cidr)]) -> Result<()> {
    for (i, (a_name, a)) in named.iter().enumerate() {
        for (b_name, b) in &named[i + 1..] {
            if a.overlaps(b) {
                return Err(invalid(format!("{a_name} {a} overlaps {b_name} {b}")));
            }
        }
    }
    Ok(())
}

impl NatConfig {
    /// Validates the configuration and computes every namespace's addresses.
    pub fn plan(&self) -> Result<NatPlan> {
        let prefix = &self.namespace_prefix;
        if prefix.is_empty()
            || !prefix.as_bytes()[0].is_ascii_alphabetic()
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(invalid(format!(
                "namespace-prefix {prefix:?} must start with a letter and contain only [A-Za-z0-9_-]"
            )));
        }
        check_ifname_chars("namespace-interface", &self.namespace_interface)?;
        if !self.host_interface.is_empty() {
            check_ifname_chars("host-interface", &self.host_interface)?;
        }
        for (n, c) in [
            ("host-veth-cidr", &self.host_veth_cidr),
            ("namespace-veth-cidr", &self.namespace_veth_cidr),
            ("blocked-subnet-cidr", &self.blocked_subnet_cidr),
        ] {
            check_family(n, c, false)?;
        }
        let tap_net = check_tap_net(
            self.namespace_interface_gateway.into(),
            self.namespace_interface_ip.into(),
            self.namespace_interface_netmask,
            "",
        )?;
        check_no_overlap(&[
            ("host-veth-cidr", self.host_veth_cidr),
            ("namespace-veth-cidr", self.namespace_veth_cidr),
            ("the namespace interface network", tap_net),
        ])?;
        let mut capacity = self.host_veth_cidr.subnet_count(30);
        if capacity == 0 {
            return Err(invalid(format!(
                "host-veth-cidr {} is too small: it must hold at least one /30",
                self.host_veth_cidr
            )));
        }
        let ns_hosts = self.namespace_veth_cidr.host_count();
        capacity = capacity.min(ns_hosts);
        if let Some(v6c) = &self.ipv6 {
            for (n, c) in [
                ("host-veth-cidr-ipv6", &v6c.host_veth_cidr),
                ("namespace-veth-cidr-ipv6", &v6c.namespace_veth_cidr),
                ("blocked-subnet-cidr-ipv6", &v6c.blocked_subnet_cidr),
            ] {
                check_family(n, c, true)?;
            }
            let tap6 = check_tap_net(v6c.gateway.into(), v6c.ip.into(), v6c.prefix_len, "-ipv6")?;
            check_no_overlap(&[
                ("host-veth-cidr-ipv6", v6c.host_veth_cidr),
                ("namespace-veth-cidr-ipv6", v6c.namespace_veth_cidr),
                ("the IPv6 namespace interface network", tap6),
            ])?;
            let pairs6 = v6c.host_veth_cidr.subnet_count(126);
            if pairs6 == 0 {
                return Err(invalid(format!(
                    "host-veth-cidr-ipv6 {} is too small: it must hold at least one /126",
                    v6c.host_veth_cidr
                )));
            }
            capacity = capacity
                .min(pairs6)
                .min(v6c.namespace_veth_cidr.host_count());
        }
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX);
        let count = match self.namespace_count {
            Some(0) => return Err(invalid("namespace count must be at least 1".into())),
            Some(n) if n > capacity => {
                return Err(invalid(format!(
                    "namespace count {n} exceeds the {capacity} namespaces the CIDRs allow"
                )))
            }
            Some(n) => n,
            None => capacity.min(DEFAULT_MAX_NAMESPACES),
        };
        let longest = format!("{prefix}{}-veth1", count - 1);
        if longest.len() > MAX_IFNAME {
            return Err(invalid(format!(
                "namespace-prefix {prefix:?} is too long: interface {longest:?} exceeds {MAX_IFNAME} characters"
            )));
        }
        if let GuestLink::VethIntoNamespace { prefix: gp } = &self.guest_link {
            if gp.is_empty() || gp.contains('/') {
                return Err(invalid(format!("invalid guest namespace prefix {gp:?}")));
            }
        }
        let mut tap_mac = self.namespace_interface_mac;
        tap_mac.0[5] ^= 0x01;
        let mut namespaces = Vec::with_capacity(count);
        for i in 0..count {
            let idx = i as u128;
            let name = format!("{prefix}{i}");
            let pair = self
                .host_veth_cidr
                .subnet(30, idx)
                .ok_or_else(|| invalid("host-veth-cidr exhausted".into()))?;
            let ns_ip = self
                .namespace_veth_cidr
                .host(idx)
                .ok_or_else(|| invalid("namespace-veth-cidr exhausted".into()))?;
            let ipv6 = match &self.ipv6 {
                None => None,
                Some(c) => {
                    let pair6 = c
                        .host_veth_cidr
                        .subnet(126, idx)
                        .ok_or_else(|| invalid("host-veth-cidr-ipv6 exhausted".into()))?;
                    let ns6 = c
                        .namespace_veth_cidr
                        .host(idx)
                        .ok_or_else(|| invalid("namespace-veth-cidr-ipv6 exhausted".into()))?;
                    Some(NamespaceIpv6 {
                        guest_ip: c.ip,
                        gateway: c.gateway,
                        prefix_len: c.prefix_len,
                        host_veth_internal_ip: v6(pair6.nth(1).unwrap_or(pair6.network())),
                        host_veth_external_ip: v6(pair6.nth(2).unwrap_or(pair6.network())),
                        namespace_veth_ip: v6(ns6),
                    })
                }
            };
            namespaces.push(NamespaceInfo {
                index: i,
                tap_name: self.namespace_interface.clone(),
                guest_mac: self.namespace_interface_mac,
                tap_mac,
                guest_ip: self.namespace_interface_ip,
                gateway: self.namespace_interface_gateway,
                netmask: self.namespace_interface_netmask,
                host_veth_internal_ip: v4(pair.nth(1).unwrap_or(pair.network())),
                host_veth_external_ip: v4(pair.nth(2).unwrap_or(pair.network())),
                namespace_veth_ip: v4(ns_ip),
                host_veth_name: format!("{name}-veth1"),
                namespace_veth_name: format!("{name}-veth0"),
                name,
                ipv6,
            });
        }
        Ok(NatPlan {
            config: self.clone(),
            namespaces,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_go_drafter() {
        let plan = NatConfig::default().plan().unwrap();
        assert_eq!(plan.namespaces.len(), DEFAULT_MAX_NAMESPACES);
        let first = &plan.namespaces[0];
        assert_eq!(first.name, "ark0");
        assert_eq!(first.host_veth_internal_ip, Ipv4Addr::new(10, 0, 8, 1));
        assert_eq!(first.host_veth_external_ip, Ipv4Addr::new(10, 0, 8, 2));
        assert_eq!(first.namespace_veth_ip, Ipv4Addr::new(10, 0, 15, 1));
        assert_eq!(
            plan.namespaces[1].host_veth_internal_ip,
            Ipv4Addr::new(10, 0, 8, 5)
        );
        assert_eq!(first.guest_mac.to_string(), "02:0e:d9:fd:68:3d");
        assert_ne!(first.tap_mac, first.guest_mac);
        let v6 = first.ipv6.unwrap();
        assert_eq!(v6.host_veth_internal_ip.to_string(), "fd64:d4af:8::1");
        assert_eq!(v6.namespace_veth_ip.to_string(), "fd64:d4af:15::1");
    }

    #[test]
    fn count_is_bounded_by_the_cidrs() {
        let cfg = NatConfig {
            host_veth_cidr: "10.200.0.0/28".parse().unwrap(),
            namespace_count: None,
            ..Default::default()
        };
        assert_eq!(cfg.plan().unwrap().namespaces.len(), 4);
        let too_many = NatConfig {
            namespace_count: Some(5),
            ..cfg.clone()
        };
        let err = too_many.plan().unwrap_err().to_string();
        assert!(err.contains("exceeds the 4"), "{err}");
    }

    #[test]
    fn rejects_bad_configurations() {
        let cases: Vec<(NatConfig, &str)> = vec![
            (
                NatConfig {
                    namespace_veth_cidr: "10.0.9.0/24".parse().unwrap(),
                    ..Default::default()
                },
                "overlaps",
            ),
            (
                NatConfig {
                    host_veth_cidr: "10.0.8.0/31".parse().unwrap(),
                    ..Default::default()
                },
                "too small",
            ),
            (
                NatConfig {
                    namespace_interface_ip: Ipv4Addr::new(172, 100, 101, 2),
                    ..Default::default()
                },
                "not in the gateway's network",
            ),
            (
                NatConfig {
                    namespace_interface_netmask: 32,
                    ..Default::default()
                },
                "too small",
            ),
            (
                NatConfig {
                    namespace_prefix: "averyveryverylongprefix".into(),
                    ..Default::default()
                },
                "too long",
            ),
            (
                NatConfig {
                    namespace_prefix: "a/b".into(),
                    ..Default::default()
                },
                "namespace-prefix",
            ),
            (
                NatConfig {
                    host_veth_cidr: "fd00::/64".parse().unwrap(),
                    ..Default::default()
                },
                "IPv4",
            ),
            (
                NatConfig {
                    ipv6: Some(Ipv6Config {
                        namespace_veth_cidr: "fd64:d4af:8::/80".parse().unwrap(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "overlaps",
            ),
        ];
        for (cfg, want) in cases {
            let err = cfg.plan().unwrap_err().to_string();
            assert!(err.contains(want), "{err} should mention {want}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn mac_parsing() {
        assert!("02:0e:d9:fd:68:3d".parse::<MacAddr>().is_ok());
        for bad in [
            "02:0e:d9:fd:68",
            "02:0e:d9:fd:68:3d:00",
            "zz:0e:d9:fd:68:3d",
            "01:00:5e:00:00:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }
}
