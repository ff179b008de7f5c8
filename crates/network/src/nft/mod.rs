//! nftables tables owned by drafter, talked to directly over netlink (`NETLINK_NETFILTER`).
//!
//! A table is always written whole: one nfnetlink batch declares it, deletes it and
//! recreates it with its chains and rules, so the kernel applies all of it or nothing, and
//! re-applying never duplicates rules. Operations act on the network namespace of the
//! calling thread; use [`crate::netns::NetNs::run`] to act inside a namespace.

mod wire;

use std::fmt;
use std::net::IpAddr;

use crate::cidr::Cidr;
use crate::error::Result;

/// IP version a rule applies to (an `inet` table sees both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Family of an address.
    pub fn of(addr: IpAddr) -> Self {
        if addr.is_ipv6() {
            Family::V6
        } else {
            Family::V4
        }
    }
}

/// Transport protocol matched by a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// One condition of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// Input interface name.
    Iif(String),
    /// Output interface name.
    Oif(String),
    /// Source address inside a block.
    Saddr(Cidr),
    /// Destination address inside a block.
    Daddr(Cidr),
    /// Transport protocol.
    L4(L4),
    /// Destination port (needs an [`Match::L4`] before it).
    Dport(u16),
}

/// What a rule does with matching packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Drop the packet.
    Drop,
    /// Source NAT to the outgoing interface's address.
    Masquerade,
    /// Source NAT to an address.
    Snat(IpAddr),
    /// Destination NAT to an address and optionally a port.
    Dnat(IpAddr, Option<u16>),
}

/// A rule: all matches, then the action, for one IP family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// IP family the rule is for.
    pub family: Family,
    /// Conditions, all of which must hold.
    pub matches: Vec<Match>,
    /// Action.
    pub action: Action,
}

impl Rule {
    /// A rule for `family`.
    pub fn new(family: Family, matches: Vec<Match>, action: Action) -> Self {
        Self {
            family,
            matches,
            action,
        }
    }
}

/// Netfilter hook of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Before routing (destination NAT).
    Prerouting,
    /// Forwarded packets (filtering).
    Forward,
    /// Locally generated packets (destination NAT of local connections).
    Output,
    /// After routing (source NAT).
    Postrouting,
}

/// A base chain with its rules (policy accept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Chain name.
    pub name: &'static str,
    /// Hook it is attached to; NAT chains for pre/postrouting and output, filter otherwise.
    pub hook: Hook,
    /// Rules in order.
    pub rules: Vec<Rule>,
}

impl Chain {
    /// The standard chain for `hook` (nat at dstnat/srcnat/-100 priority, filter at 0).
    pub fn new(hook: Hook, rules: Vec<Rule>) -> Self {
        let name = match hook {
            Hook::Prerouting => "prerouting",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        };
        Self { name, hook, rules }
    }
}

/// An `inet` table owned by drafter, replaced or deleted as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Table name.
    pub name: String,
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "inet {}", self.name)
    }
}

impl Table {
    /// An `inet` (IPv4 + IPv6) table.
    pub fn inet(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    /// Atomically replaces the table with `chains`.
    pub fn replace(&self, chains: &[Chain]) -> Result<()> {
        wire::transaction(&wire::replace_table(&self.name, chains))
    }

    /// Deletes the table if it exists (atomically, no error if it is absent).
    pub fn delete(&self) -> Result<()> {
        wire::transaction(&wire::delete_table(&self.name))
    }
}

/// Names of the `inet` tables in the calling thread's namespace.
pub fn list_tables() -> Result<Vec<Table>> {
    Ok(wire::list_inet_tables()?
        .into_iter()
        .map(|name| Table { name })
        .collect())
}
