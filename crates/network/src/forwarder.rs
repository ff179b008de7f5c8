//! Port forwarder: host `externalAddr` → a NAT namespace's host-veth-internal address and
//! `internalPort` (which the namespace's own rules send on to the guest).
//!
//! Every [`Forwarder`] owns one nftables table, `drafter_fwd_<pid>_<n>`, replaced atomically
//! on each change and deleted when the forwarder is dropped. Tables left by processes that
//! no longer exist (after `kill -9`) are removed when the next forwarder starts.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;

use crate::cidr::Cidr;
use crate::error::{NetworkError, Result};
use crate::netns::{write_sysctl, NetNs};
use crate::nft::{self, Action, Chain, Family, Hook, Match, Rule, Table, L4};

/// Transport protocol of a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// One validated `--port-forwards` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForward {
    /// Network namespace of the VM.
    pub netns: String,
    /// Port inside the VM.
    pub internal_port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Host address and port to forward from.
    pub external: SocketAddr,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPortForward {
    netns: String,
    internal_port: String,
    protocol: String,
    external_addr: String,
}

impl PortForward {
    /// Parses the `--port-forwards` JSON array (format of the Go drafter).
    pub fn parse_list(json: &str) -> Result<Vec<PortForward>> {
        let raw: Vec<RawPortForward> = serde_json::from_str(json)
            .map_err(|e| NetworkError::InvalidForward(format!("malformed JSON: {e}")))?;
        raw.into_iter()
            .enumerate()
            .map(|(i, r)| {
                PortForward::from_raw(r)
                    .map_err(|e| NetworkError::InvalidForward(format!("entry {i}: {e}")))
            })
            .collect()
    }

    fn from_raw(r: RawPortForward) -> std::result::Result<Self, String> {
        if r.netns.is_empty() || r.netns.contains('/') {
            return Err(format!("invalid netns {:?}", r.netns));
        }
        let internal_port = match r.internal_port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("invalid internalPort {:?}", r.internal_port)),
        };
        let protocol = match r.protocol.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => return Err(format!("protocol {other:?} is not tcp or udp")),
        };
        // "localhost" is the one name accepted (the Go drafter resolved names).
        let addr_text = match r.external_addr.strip_prefix("localhost:") {
            Some(port) => format!("127.0.0.1:{port}"),
            None => r.external_addr.clone(),
        };
        let external: SocketAddr = addr_text.parse().map_err(|_| {
            format!(
                "externalAddr {:?} is not IP:PORT (IPv6 as [ADDR]:PORT)",
                r.external_addr
            )
        })?;
        if external.ip().is_unspecified() {
            return Err(format!(
                "externalAddr {}: wildcard IPs like 0.0.0.0 are not valid, be explicit",
                r.external_addr
            ));
        }
        if external.ip().is_multicast() {
            return Err(format!(
                "externalAddr {} is a multicast address",
                r.external_addr
            ));
        }
        if external.port() == 0 {
            return Err(format!("externalAddr {} has port 0", r.external_addr));
        }
        if external.is_ipv6() && external.ip().is_loopback() {
            return Err(format!(
                "externalAddr {}: Linux cannot route IPv6 loopback traffic to another host; use a non-loopback address",
                r.external_addr
            ));
        }
        Ok(Self {
            netns: r.netns,
            internal_port,
            protocol,
            external,
        })
    }
}

/// Where forwarded traffic goes: the address ranges the NAT gave the namespaces' veths.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// The NAT's `--host-veth-cidr`.
    pub host_veth_cidr: Cidr,
    /// The NAT's `--host-veth-cidr-ipv6`, if IPv6 forwards are wanted.
    pub host_veth_cidr_ipv6: Option<Cidr>,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        Self {
            host_veth_cidr: Cidr::new(IpAddr::from([10, 0, 8, 0]), 22)
                .unwrap_or_else(|_| unreachable!("valid literal")),
            host_veth_cidr_ipv6: Cidr::new(IpAddr::from([0xfd64, 0xd4af, 8, 0, 0, 0, 0, 0]), 64)
                .ok(),
        }
    }
}

/// Identifies a forward inside its [`Forwarder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ForwardId(u64);

/// A forward with its resolved target address.
#[derive(Debug, Clone)]
pub struct ActiveForward {
    /// The forward as requested.
    pub forward: PortForward,
    /// The namespace address traffic is sent to.
    pub target: IpAddr,
}

/// A set of port forwards, installed as one nftables table.
pub struct Forwarder {
    table: Table,
    config: ForwarderConfig,
    forwards: BTreeMap<ForwardId, ActiveForward>,
    next_id: u64,
    closed: bool,
}

const TABLE_PREFIX: &str = "drafter_fwd_";

impl Forwarder {
    /// Creates an empty forwarder (and removes tables of crashed forwarders).
    pub fn new(config: ForwarderConfig) -> Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        if config.host_veth_cidr.is_ipv6() {
            return Err(NetworkError::InvalidConfig(format!(
                "host-veth-cidr {} must be an IPv4 CIDR",
                config.host_veth_cidr
            )));
        }
        if config.host_veth_cidr_ipv6.is_some_and(|c| !c.is_ipv6()) {
            return Err(NetworkError::InvalidConfig(
                "host-veth-cidr-ipv6 must be an IPv6 CIDR".into(),
            ));
        }
        sweep_stale_tables()?;
        let seq = NEXT.fetch_add(1, Ordering::Relaxed);
        let table = Table::inet(format!("{TABLE_PREFIX}{}_{seq}", std::process::id()));
        let fwd = Self {
            table,
            config,
            forwards: BTreeMap::new(),
            next_id: 0,
            closed: false,
        };
        fwd.apply(&fwd.forwards)?;
        Ok(fwd)
    }

    /// Name of the nftables table this forwarder owns.
    pub fn table_name(&self) -> &str {
        &self.table.name
    }

    /// Adds forwards atomically: either all are installed or none.
    pub fn add_all(&mut self, forwards: Vec<PortForward>) -> Result<Vec<ForwardId>> {
        let mut next = self.forwards.clone();
        let mut ids = Vec::with_capacity(forwards.len());
        let mut localnet = false;
        for forward in forwards {
            let target = self.resolve_target(&forward)?;
            localnet |= forward.external.ip().is_loopback();
            let id = ForwardId(self.next_id);
            self.next_id += 1;
            next.insert(id, ActiveForward { forward, target });
            ids.push(id);
        }
        if localnet {
            write_sysctl("net/ipv4/conf/all/route_localnet", "1")?;
            write_sysctl("net/ipv4/conf/lo/route_localnet", "1")?;
        }
        self.apply(&next)?;
        for id in &ids {
            if let Some(a) = next.get(id) {
                tracing::info!(
                    netns = %a.forward.netns,
                    protocol = %a.forward.protocol,
                    external = %a.forward.external,
                    target = %SocketAddr::new(a.target, a.forward.internal_port),
                    "forwarding"
                );
            }
        }
        self.forwards = next;
        Ok(ids)
    }

    /// Adds one forward.
    pub fn add(&mut self, forward: PortForward) -> Result<ForwardId> {
        let ids = self.add_all(vec![forward])?;
        ids.into_iter()
            .next()
            .ok_or_else(|| NetworkError::InvalidForward("no forward added".into()))
    }

    /// Removes a forward; unknown ids are ignored.
    pub fn remove(&mut self, id: ForwardId) -> Result<()> {
        let mut next = self.forwards.clone();
        if next.remove(&id).is_some() {
            self.apply(&next)?;
            self.forwards = next;
        }
        Ok(())
    }

    /// The installed forwards.
    pub fn forwards(&self) -> impl Iterator<Item = (ForwardId, &ActiveForward)> {
        self.forwards.iter().map(|(id, a)| (*id, a))
    }

    /// Removes the forwarder's table.
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        self.table.delete()
    }

    fn resolve_target(&self, forward: &PortForward) -> Result<IpAddr> {
        let cidr = if forward.external.is_ipv6() {
            self.config.host_veth_cidr_ipv6.ok_or_else(|| {
                NetworkError::InvalidForward(format!(
                    "{}: IPv6 forwards need --host-veth-cidr-ipv6",
                    forward.external
                ))
            })?
        } else {
            self.config.host_veth_cidr
        };
        let ns = NetNs::open(&forward.netns)?;
        let addrs = ns.route_socket()?.addresses()?;
        addrs
            .iter()
            .map(|a| a.addr)
            .find(|a| !a.is_loopback() && cidr.contains(*a))
            .ok_or_else(|| {
                NetworkError::InvalidForward(format!(
                    "namespace {} has no address in {cidr} (is it a drafter-nat namespace?)",
                    forward.netns
                ))
            })
    }

    fn apply(&self, forwards: &BTreeMap<ForwardId, ActiveForward>) -> Result<()> {
        let mut dnat = Vec::new();
        let mut masq: Vec<Rule> = Vec::new();
        for a in forwards.values() {
            let f = &a.forward;
            let family = Family::of(a.target);
            let l4 = match f.protocol {
                Protocol::Tcp => L4::Tcp,
                Protocol::Udp => L4::Udp,
            };
            let full = |ip: IpAddr| {
                Cidr::new(ip, if ip.is_ipv6() { 128 } else { 32 })
                    .unwrap_or_else(|_| unreachable!("full-length prefix is valid"))
            };
            dnat.push(Rule::new(
                family,
                vec![
                    Match::Daddr(full(f.external.ip())),
                    Match::L4(l4),
                    Match::Dport(f.external.port()),
                ],
                Action::Dnat(a.target, Some(f.internal_port)),
            ));
            let m = Rule::new(
                family,
                vec![
                    Match::Daddr(full(a.target)),
                    Match::L4(l4),
                    Match::Dport(f.internal_port),
                ],
                Action::Masquerade,
            );
            if !masq.contains(&m) {
                masq.push(m);
            }
        }
        self.table.replace(&[
            Chain::new(Hook::Prerouting, dnat.clone()),
            Chain::new(Hook::Output, dnat),
            Chain::new(Hook::Postrouting, masq),
        ])
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if !self.closed {
            if let Err(e) = self.table.delete() {
                tracing::warn!(table = %self.table.name, error = %e, "forwarder cleanup failed");
            }
        }
    }
}

/// Deletes forwarder tables whose owning process is gone.
fn sweep_stale_tables() -> Result<()> {
    for table in nft::list_tables()? {
        let Some(rest) = table.name.strip_prefix(TABLE_PREFIX) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('_') else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            tracing::info!(table = %table.name, "removing table of a dead forwarder");
            table.delete()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ext: &str) -> String {
        format!(
            r#"[{{"netns":"ark0","internalPort":"6379","protocol":"tcp","externalAddr":"{ext}"}}]"#
        )
    }

    #[test]
    fn parses_the_reference_format() {
        let list = PortForward::parse_list(&entry("127.0.0.1:3333")).unwrap();
        assert_eq!(
            list,
            vec![PortForward {
                netns: "ark0".into(),
                internal_port: 6379,
                protocol: Protocol::Tcp,
                external: "127.0.0.1:3333".parse().unwrap(),
            }]
        );
        let v6 = PortForward::parse_list(&entry("[fd00::5]:80")).unwrap();
        assert!(v6[0].external.is_ipv6());
        let named = PortForward::parse_list(&entry("localhost:3333")).unwrap();
        assert_eq!(named[0].external.to_string(), "127.0.0.1:3333");
    }

    #[test]
    fn refuses_wildcards_and_malformed_entries() {
        let cases = [
            (entry("0.0.0.0:3333"), "wildcard"),
            (entry("[::]:3333"), "wildcard"),
            (entry("127.0.0.1"), "IP:PORT"),
            (entry("127.0.0.1:0"), "port 0"),
            (entry("[::1]:80"), "loopback"),
            (
                r#"[{"netns":"ark0","internalPort":"x","protocol":"tcp","externalAddr":"127.0.0.1:1"}]"#.into(),
                "internalPort",
            ),
            (
                r#"[{"netns":"ark0","internalPort":"1","protocol":"sctp","externalAddr":"127.0.0.1:1"}]"#.into(),
                "sctp",
            ),
            (
                r#"[{"netns":"ark0","internalPort":"1","protocol":"tcp"}]"#.into(),
                "malformed JSON",
            ),
            (r#"[{"netns":"ark0""#.into(), "malformed JSON"),
            (
                r#"[{"netns":"ark0","internalPort":"1","protocol":"tcp","externalAddr":"127.0.0.1:1","x":1}]"#.into(),
                "unknown field",
            ),
        ];
        for (json, want) in cases {
            let err = PortForward::parse_list(&json).unwrap_err().to_string();
            assert!(err.contains(want), "{json}: {err} should mention {want}");
            assert!(!err.contains('\n'));
        }
    }
}
