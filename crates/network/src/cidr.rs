//! IPv4/IPv6 CIDR blocks: parsing, overlap checks and address allocation.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::error::NetworkError;

/// An IP network given as `address/prefix-length`, normalised to its network address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// Builds a CIDR from any address inside it and a prefix length.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, NetworkError> {
        let max = max_prefix(addr);
        if prefix_len > max {
            return Err(NetworkError::InvalidCidr(format!(
                "{addr}/{prefix_len}: prefix length above {max}"
            )));
        }
        let bits = to_bits(addr) & mask(prefix_len, max);
        Ok(Self {
            network: from_bits(bits, addr.is_ipv6()),
            prefix_len,
        })
    }

    /// Network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// Prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether this is an IPv6 network.
    pub fn is_ipv6(&self) -> bool {
        self.network.is_ipv6()
    }

    /// Number of addresses in the block (saturating at `u128::MAX`).
    pub fn size(&self) -> u128 {
        let host_bits = u32::from(max_prefix(self.network) - self.prefix_len);
        1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
    }

    /// Whether `addr` lies inside this block.
    pub fn contains(&self, addr: IpAddr) -> bool {
        if addr.is_ipv6() != self.is_ipv6() {
            return false;
        }
        let max = max_prefix(addr);
        to_bits(addr) & mask(self.prefix_len, max) == to_bits(self.network)
    }

    /// Whether the two blocks share at least one address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }

    /// The address `offset` positions after the network address, if still inside the block.
    pub fn nth(&self, offset: u128) -> Option<IpAddr> {
        if offset >= self.size() {
            return None;
        }
        Some(from_bits(to_bits(self.network) + offset, self.is_ipv6()))
    }

    /// Splits the block into sub-blocks of `prefix_len` and returns the `index`-th one.
    pub fn subnet(&self, prefix_len: u8, index: u128) -> Option<Cidr> {
        if prefix_len < self.prefix_len || prefix_len > max_prefix(self.network) {
            return None;
        }
        let count = self.subnet_count(prefix_len);
        if index >= count {
            return None;
        }
        let step = 1u128 << u32::from(max_prefix(self.network) - prefix_len);
        let addr = from_bits(to_bits(self.network) + index * step, self.is_ipv6());
        Cidr::new(addr, prefix_len).ok()
    }

    /// How many sub-blocks of `prefix_len` fit in this block.
    pub fn subnet_count(&self, prefix_len: u8) -> u128 {
        if prefix_len < self.prefix_len || prefix_len > max_prefix(self.network) {
            return 0;
        }
        1u128
            .checked_shl(u32::from(prefix_len - self.prefix_len))
            .unwrap_or(u128::MAX)
    }

    /// Usable host addresses: IPv4 skips the network and broadcast addresses (except
    /// for /31 and /32), IPv6 skips the subnet-router anycast address (`::0`).
    pub fn host_count(&self) -> u128 {
        let size = self.size();
        match (self.is_ipv6(), size) {
            (false, 1 | 2) => size,
            (false, _) => size - 2,
            (true, 1) => 1,
            (true, _) => size - 1,
        }
    }

    /// The `index`-th usable host address (see [`Cidr::host_count`]).
    pub fn host(&self, index: u128) -> Option<IpAddr> {
        if index >= self.host_count() {
            return None;
        }
        let skip = u128::from(self.size() > 2 || (self.is_ipv6() && self.size() > 1));
        self.nth(index + skip)
    }
}

impl FromStr for Cidr {
    type Err = NetworkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetworkError::InvalidCidr(format!("{s:?}: expected ADDRESS/PREFIX"));
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        Cidr::new(addr, len)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv6() {
        128
    } else {
        32
    }
}

fn to_bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_bits(bits: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(bits))
    } else {
        // Only ever called with values derived from 32-bit addresses.
        IpAddr::V4(Ipv4Addr::from((bits & u128::from(u32::MAX)) as u32))
    }
}

fn mask(prefix_len: u8, max: u8) -> u128 {
    let host_bits = u32::from(max - prefix_len);
    let all = if max == 128 {
        u128::MAX
    } else {
        (1u128 << max) - 1
    };
    all & !(1u128.checked_shl(host_bits).map_or(u128::MAX, |v| v - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        let c: Cidr = "10.0.8.7/22".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.8.0/22");
        assert_eq!(c.size(), 1024);
        assert_eq!(c.subnet_count(30), 256);
        assert_eq!(c.subnet(30, 1).unwrap().to_string(), "10.0.8.4/30");
        assert!(c.subnet(30, 256).is_none());
        let v6: Cidr = "fd00:d4af:1::9/64".parse().unwrap();
        assert_eq!(v6.to_string(), "fd00:d4af:1::/64");
        assert_eq!(v6.subnet(126, 2).unwrap().to_string(), "fd00:d4af:1::8/126");
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/8", "::/129", "10.0.0.0/-1"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts_skip_reserved_addresses() {
        let c: Cidr = "10.0.15.0/24".parse().unwrap();
        assert_eq!(c.host_count(), 254);
        assert_eq!(c.host(0).unwrap().to_string(), "10.0.15.1");
        assert_eq!(c.host(253).unwrap().to_string(), "10.0.15.254");
        assert!(c.host(254).is_none());
        let v6: Cidr = "fd00::/120".parse().unwrap();
        assert_eq!(v6.host_count(), 255);
        assert_eq!(v6.host(0).unwrap().to_string(), "fd00::1");
    }

    #[test]
    fn overlap_and_contains() {
        let a: Cidr = "10.0.8.0/22".parse().unwrap();
        let b: Cidr = "10.0.10.0/24".parse().unwrap();
        let c: Cidr = "10.0.15.0/24".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
        assert!(a.contains("10.0.11.255".parse().unwrap()));
        assert!(!a.contains("10.0.12.0".parse().unwrap()));
        assert!(!a.contains("::1".parse().unwrap()));
    }
}
