//! A small synchronous rtnetlink client (links, addresses, routes) bound to one namespace.
//!
//! A socket talks to the network namespace it was created in, for its whole life, no matter
//! which thread uses it later; see [`crate::netns::NetNs::route_socket`].

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::error::{NetworkError, Result};

/// A link as reported by the kernel.
#[derive(Debug, Clone)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
}

/// An address assigned to a link.
#[derive(Debug, Clone, Copy)]
pub struct LinkAddress {
    /// Index of the link holding the address.
    pub index: u32,
    /// The address.
    pub addr: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
}

/// A netlink route socket (`NETLINK_ROUTE`) with blocking request/answer helpers.
pub struct RouteSocket {
    socket: Socket,
    seq: u32,
}

impl RouteSocket {
    /// Opens a route socket in the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        let op = "open route socket";
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| NetworkError::io(op, e))?;
        socket.bind_auto().map_err(|e| NetworkError::io(op, e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| NetworkError::io(op, e))?;
        Ok(Self { socket, seq: 0 })
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16, op: &str) -> Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket
            .send(&buf, 0)
            .map_err(|e| NetworkError::Netlink {
                op: op.to_string(),
                source: e,
            })?;
        Ok(self.seq)
    }

    /// Receives every message answering `seq` until the ACK/DONE; returns the inner messages.
    fn collect(&mut self, seq: u32, op: &str) -> Result<Vec<RouteNetlinkMessage>> {
        let mut out = Vec::new();
        loop {
            let (buf, _) = self
                .socket
                .recv_from_full()
                .map_err(|e| NetworkError::Netlink {
                    op: op.to_string(),
                    source: e,
                })?;
            let mut offset = 0;
            while offset < buf.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..])
                    .map_err(|e| NetworkError::NetlinkDecode {
                        op: op.to_string(),
                        detail: e.to_string(),
                    })?;
                let len = msg.header.length as usize;
                if msg.header.sequence_number == seq {
                    match msg.payload {
                        NetlinkPayload::Done(_) => return Ok(out),
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                None => Ok(out),
                                Some(_) => Err(NetworkError::Netlink {
                                    op: op.to_string(),
                                    source: e.to_io(),
                                }),
                            }
                        }
                        NetlinkPayload::InnerMessage(inner) => out.push(inner),
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }

    fn request(&mut self, msg: RouteNetlinkMessage, extra: u16, op: &str) -> Result<()> {
        let seq = self.send(msg, NLM_F_REQUEST | NLM_F_ACK | extra, op)?;
        self.collect(seq, op).map(|_| ())
    }

    fn dump(&mut self, msg: RouteNetlinkMessage, op: &str) -> Result<Vec<RouteNetlinkMessage>> {
        let seq = self.send(msg, NLM_F_REQUEST | NLM_F_DUMP, op)?;
        self.collect(seq, op)
    }

    /// Lists all links of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let answers = self.dump(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            "list links",
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => {
                    let name = link.attributes.iter().find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })?;
                    Some(Link {
                        index: link.header.index,
                        name,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Index of the link called `name`.
    pub fn link_index(&mut self, name: &str) -> Result<u32> {
        self.links()?
            .into_iter()
            .find(|l| l.name == name)
            .map(|l| l.index)
            .ok_or_else(|| NetworkError::InterfaceNotFound(name.to_string()))
    }

    /// Creates a veth pair: `name` here, `peer` directly inside the namespace `peer_ns`.
    pub fn add_veth(&mut self, name: &str, peer: &str, peer_ns: BorrowedFd<'_>) -> Result<()> {
        let mut peer_msg = LinkMessage::default();
        peer_msg.attributes = vec![
            LinkAttribute::IfName(peer.to_string()),
            LinkAttribute::NetNsFd(peer_ns.as_raw_fd()),
        ];
        let mut msg = LinkMessage::default();
        msg.attributes = vec![
            LinkAttribute::IfName(name.to_string()),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
            ]),
        ];
        self.request(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("create veth {name}/{peer}"),
        )
    }

    /// Brings a link up and optionally sets its MAC address.
    pub fn set_up(&mut self, index: u32, mac: Option<[u8; 6]>) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        if let Some(mac) = mac {
            msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        self.request(
            RouteNetlinkMessage::SetLink(msg),
            0,
            &format!("set link {index} up"),
        )
    }

    /// Deletes a link (for a veth, both ends).
    pub fn delete_link(&mut self, index: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request(
            RouteNetlinkMessage::DelLink(msg),
            0,
            &format!("delete link {index}"),
        )
    }

    /// Adds `addr/prefix_len` to a link (IPv6 addresses skip duplicate address detection).
    pub fn add_address(&mut self, index: u32, addr: IpAddr, prefix_len: u8) -> Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = family(addr);
        msg.header.prefix_len = prefix_len;
        msg.header.index = index;
        if addr.is_ipv6() {
            msg.header.flags = AddressHeaderFlags::Nodad;
        }
        msg.attributes.push(AddressAttribute::Local(addr));
        msg.attributes.push(AddressAttribute::Address(addr));
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add address {addr}/{prefix_len}"),
        )
    }

    /// Lists the addresses of all links.
    pub fn addresses(&mut self) -> Result<Vec<LinkAddress>> {
        let answers = self.dump(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            "list addresses",
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => {
                    let addr = a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Local(ip) => Some(*ip),
                        _ => None,
                    });
                    let addr = addr.or_else(|| {
                        a.attributes.iter().find_map(|attr| match attr {
                            AddressAttribute::Address(ip) => Some(*ip),
                            _ => None,
                        })
                    })?;
                    Some(LinkAddress {
                        index: a.header.index,
                        addr,
                        prefix_len: a.header.prefix_len,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Adds a route in the main table to `dst/prefix_len` via `gateway`.
    pub fn add_route(&mut self, dst: IpAddr, prefix_len: u8, gateway: IpAddr) -> Result<()> {
        let mut msg = RouteMessage::default();
        msg.header = RouteHeader {
            address_family: family(dst),
            destination_prefix_length: prefix_len,
            table: RouteHeader::RT_TABLE_MAIN,
            protocol: RouteProtocol::Static,
            scope: RouteScope::Universe,
            kind: RouteType::Unicast,
            ..Default::default()
        };
        if prefix_len > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(dst)));
        }
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gateway)));
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add route {dst}/{prefix_len} via {gateway}"),
        )
    }

    /// Name of the interface used by the IPv4 default route of the main table.
    pub fn default_route_interface(&mut self) -> Result<String> {
        let mut query = RouteMessage::default();
        query.header.address_family = AddressFamily::Inet;
        let answers = self.dump(RouteNetlinkMessage::GetRoute(query), "list routes")?;
        let oif = answers.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r)
                if r.header.destination_prefix_length == 0
                    && r.header.address_family == AddressFamily::Inet
                    && r.header.table == RouteHeader::RT_TABLE_MAIN =>
            {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
            }
            _ => None,
        });
        let oif = oif.ok_or_else(|| {
            NetworkError::InvalidConfig(
                "no IPv4 default route; pass --host-interface explicitly".into(),
            )
        })?;
        self.links()?
            .into_iter()
            .find(|l| l.index == oif)
            .map(|l| l.name)
            .ok_or_else(|| NetworkError::InterfaceNotFound(format!("index {oif}")))
    }
}

fn family(addr: IpAddr) -> AddressFamily {
    if addr.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    }
}

/// Whether an error means "it is already gone" (used by best-effort cleanup).
pub fn is_not_found(err: &NetworkError) -> bool {
    match err {
        NetworkError::Netlink { source, .. } => {
            source.raw_os_error() == Some(libc::ENODEV)
                || source.raw_os_error() == Some(libc::ENOENT)
                || source.kind() == io::ErrorKind::NotFound
        }
        NetworkError::InterfaceNotFound(_) => true,
        _ => false,
    }
}
