//! NAT namespace pool and port forwarder (netlink + nftables), crash-safe.
