//! nfnetlink encoding of nf_tables batches (tables, chains, rules) and their transaction.

use std::net::IpAddr;
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use super::{Action, Chain, Family, Hook, Match, Rule, L4};
use crate::error::{NetworkError, Result};

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_ROOT: u16 = 0x100;
const NLM_F_MATCH: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;

const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_FORWARD: u32 = 2;
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_INET_POST_ROUTING: u32 = 4;

const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_NAT_SNAT: u32 = 0;
const NFT_NAT_DNAT: u32 = 1;

/// Netlink attributes being built (type-length-value, 4-byte aligned, nestable).
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn put(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = 4 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }

    fn str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.put(kind, &v)
    }

    fn be32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put(kind, &v.to_be_bytes())
    }

    fn nest(&mut self, kind: u16, inner: Attrs) -> &mut Self {
        self.put(kind | NLA_F_NESTED, &inner.0)
    }
}

/// One expression of a rule: its name and attributes.
fn expr(name: &str, data: Attrs) -> Attrs {
    let mut e = Attrs::default();
    e.str(NFTA_EXPR_NAME, name);
    if !data.0.is_empty() {
        e.nest(NFTA_EXPR_DATA, data);
    }
    e
}

fn data_value(bytes: &[u8]) -> Attrs {
    let mut d = Attrs::default();
    d.put(NFTA_DATA_VALUE, bytes);
    d
}

fn meta(key: u32) -> Attrs {
    let mut a = Attrs::default();
    a.be32(1, NFT_REG_1).be32(2, key);
    expr("meta", a)
}

fn cmp_eq(bytes: &[u8]) -> Attrs {
    let mut a = Attrs::default();
    a.be32(1, NFT_REG_1).be32(2, 0).nest(3, data_value(bytes));
    expr("cmp", a)
}

fn payload(base: u32, offset: u32, len: u32) -> Attrs {
    let mut a = Attrs::default();
    a.be32(1, NFT_REG_1)
        .be32(2, base)
        .be32(3, offset)
        .be32(4, len);
    expr("payload", a)
}

fn bitwise_mask(mask: &[u8]) -> Attrs {
    let mut a = Attrs::default();
    a.be32(1, NFT_REG_1)
        .be32(2, NFT_REG_1)
        .be32(3, mask.len() as u32)
        .nest(4, data_value(mask))
        .nest(5, data_value(&vec![0; mask.len()]));
    expr("bitwise", a)
}

fn immediate_value(reg: u32, bytes: &[u8]) -> Attrs {
    let mut a = Attrs::default();
    a.be32(1, reg).nest(2, data_value(bytes));
    expr("immediate", a)
}

fn verdict(code: u32) -> Attrs {
    let mut v = Attrs::default();
    v.be32(NFTA_VERDICT_CODE, code);
    let mut d = Attrs::default();
    d.nest(NFTA_DATA_VERDICT, v);
    let mut a = Attrs::default();
    a.be32(1, NFT_REG_VERDICT).nest(2, d);
    expr("immediate", a)
}

fn ip_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn ifname(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (d, s) in out.iter_mut().zip(name.as_bytes().iter().take(15)) {
        *d = *s;
    }
    out
}

fn nat(kind: u32, family: Family, with_port: bool) -> Attrs {
    let mut a = Attrs::default();
    a.be32(1, kind)
        .be32(
            2,
            u32::from(match family {
                Family::V4 => NFPROTO_IPV4,
                Family::V6 => NFPROTO_IPV6,
            }),
        )
        .be32(3, NFT_REG_1);
    if with_port {
        a.be32(5, NFT_REG_2);
    }
    expr("nat", a)
}

fn address_match(family: Family, cidr: &crate::cidr::Cidr, source: bool, out: &mut Vec<Attrs>) {
    let (offset, len) = match (family, source) {
        (Family::V4, true) => (12, 4),
        (Family::V4, false) => (16, 4),
        (Family::V6, true) => (8, 16),
        (Family::V6, false) => (24, 16),
    };
    out.push(payload(NFT_PAYLOAD_NETWORK_HEADER, offset, len));
    let full = if family == Family::V4 { 32 } else { 128 };
    if cidr.prefix_len() < full {
        let mut mask = vec![0u8; len as usize];
        for bit in 0..usize::from(cidr.prefix_len()) {
            mask[bit / 8] |= 0x80 >> (bit % 8);
        }
        out.push(bitwise_mask(&mask));
    }
    out.push(cmp_eq(&ip_bytes(cidr.network())));
}

fn rule_exprs(rule: &Rule) -> Vec<Attrs> {
    let mut out = vec![
        meta(NFT_META_NFPROTO),
        cmp_eq(&[match rule.family {
            Family::V4 => NFPROTO_IPV4,
            Family::V6 => NFPROTO_IPV6,
        }]),
    ];
    for m in &rule.matches {
        match m {
            Match::Iif(name) => {
                out.push(meta(NFT_META_IIFNAME));
                out.push(cmp_eq(&ifname(name)));
            }
            Match::Oif(name) => {
                out.push(meta(NFT_META_OIFNAME));
                out.push(cmp_eq(&ifname(name)));
            }
            Match::Saddr(c) => address_match(rule.family, c, true, &mut out),
            Match::Daddr(c) => address_match(rule.family, c, false, &mut out),
            Match::L4(p) => {
                out.push(meta(NFT_META_L4PROTO));
                out.push(cmp_eq(&[match p {
                    L4::Tcp => 6,
                    L4::Udp => 17,
                }]));
            }
            Match::Dport(port) => {
                out.push(payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2));
                out.push(cmp_eq(&port.to_be_bytes()));
            }
        }
    }
    match rule.action {
        Action::Drop => out.push(verdict(NF_DROP)),
        Action::Masquerade => out.push(expr("masq", Attrs::default())),
        Action::Snat(addr) => {
            out.push(immediate_value(NFT_REG_1, &ip_bytes(addr)));
            out.push(nat(NFT_NAT_SNAT, rule.family, false));
        }
        Action::Dnat(addr, port) => {
            out.push(immediate_value(NFT_REG_1, &ip_bytes(addr)));
            if let Some(p) = port {
                out.push(immediate_value(NFT_REG_2, &p.to_be_bytes()));
            }
            out.push(nat(NFT_NAT_DNAT, rule.family, port.is_some()));
        }
    }
    out
}

/// One nfnetlink message before framing.
pub(super) struct Msg {
    kind: u16,
    flags: u16,
    family: u8,
    attrs: Attrs,
}

fn table_msg(kind: u16, flags: u16, name: &str) -> Msg {
    let mut attrs = Attrs::default();
    attrs.str(NFTA_TABLE_NAME, name);
    Msg {
        kind,
        flags,
        family: NFPROTO_INET,
        attrs,
    }
}

/// Batch that deletes `table` if present: declare (no-op if it exists), then delete.
pub(super) fn delete_table(table: &str) -> Vec<Msg> {
    vec![
        table_msg(NFT_MSG_NEWTABLE, NLM_F_CREATE, table),
        table_msg(NFT_MSG_DELTABLE, 0, table),
    ]
}

/// Batch that replaces `table` with `chains`.
pub(super) fn replace_table(table: &str, chains: &[Chain]) -> Vec<Msg> {
    let mut msgs = delete_table(table);
    msgs.push(table_msg(NFT_MSG_NEWTABLE, NLM_F_CREATE, table));
    for chain in chains {
        let (hooknum, priority, kind) = match chain.hook {
            Hook::Prerouting => (NF_INET_PRE_ROUTING, -100i32, "nat"),
            Hook::Output => (NF_INET_LOCAL_OUT, -100, "nat"),
            Hook::Postrouting => (NF_INET_POST_ROUTING, 100, "nat"),
            Hook::Forward => (NF_INET_FORWARD, 0, "filter"),
        };
        let mut hook = Attrs::default();
        hook.be32(NFTA_HOOK_HOOKNUM, hooknum)
            .put(NFTA_HOOK_PRIORITY, &priority.to_be_bytes());
        let mut attrs = Attrs::default();
        attrs
            .str(NFTA_CHAIN_TABLE, table)
            .str(NFTA_CHAIN_NAME, chain.name)
            .nest(NFTA_CHAIN_HOOK, hook)
            .be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
            .str(NFTA_CHAIN_TYPE, kind);
        msgs.push(Msg {
            kind: NFT_MSG_NEWCHAIN,
            flags: NLM_F_CREATE,
            family: NFPROTO_INET,
            attrs,
        });
        for rule in &chain.rules {
            let mut list = Attrs::default();
            for e in rule_exprs(rule) {
                list.nest(NFTA_LIST_ELEM, e);
            }
            let mut attrs = Attrs::default();
            attrs
                .str(NFTA_RULE_TABLE, table)
                .str(NFTA_RULE_CHAIN, chain.name)
                .nest(NFTA_RULE_EXPRESSIONS, list);
            msgs.push(Msg {
                kind: NFT_MSG_NEWRULE,
                flags: NLM_F_CREATE | NLM_F_APPEND,
                family: NFPROTO_INET,
                attrs,
            });
        }
    }
    msgs
}

fn frame(
    buf: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) {
    let len = 16 + 4 + attrs.len();
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.push(family);
    buf.push(0);
    buf.extend_from_slice(&res_id.to_be_bytes());
    buf.extend_from_slice(attrs);
}

/// A batch is sent as one datagram and every message of it is acknowledged, all answers
/// delivered at once: size both socket buffers for that (as nft does), so large tables hit
/// neither EMSGSIZE nor ENOBUFS.
fn reserve_buffers(socket: &Socket, batch_bytes: usize, messages: usize) -> Result<()> {
    set_buffer(
        socket,
        [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF],
        batch_bytes.saturating_mul(2),
    )?;
    set_buffer(
        socket,
        [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF],
        messages.saturating_mul(4096),
    )
}

fn set_buffer(socket: &Socket, opts: [libc::c_int; 2], bytes: usize) -> Result<()> {
    use std::os::fd::AsRawFd;
    let bytes = libc::c_int::try_from(bytes.max(1 << 18)).unwrap_or(libc::c_int::MAX);
    for opt in opts {
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&bytes`, a valid c_int
        // that outlives the call; the fd is an open socket owned by `socket`.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
    }
    Err(NetworkError::io(
        "size a netlink socket buffer",
        std::io::Error::last_os_error(),
    ))
}

fn open_socket() -> Result<Socket> {
    let op = "open nftables netlink socket";
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| NetworkError::io(op, e))?;
    socket.bind_auto().map_err(|e| NetworkError::io(op, e))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|e| NetworkError::io(op, e))?;
    set_receive_timeout(&socket, Duration::from_secs(10))?;
    Ok(socket)
}

fn set_receive_timeout(socket: &Socket, timeout: Duration) -> Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads `size_of::<timeval>()` bytes from `&tv`, a valid timeval that
    // outlives the call; the fd is an open socket owned by `socket`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(NetworkError::io(
            "set netlink receive timeout",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// One netlink message received: type, sequence number, payload after the header.
struct Received {
    kind: u16,
    seq: u32,
    payload: Vec<u8>,
}

fn receive(socket: &Socket) -> Result<Vec<Received>> {
    let (buf, _) = socket
        .recv_from_full()
        .map_err(|e| NetworkError::Nftables(format!("reading the kernel's answer: {e}")))?;
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= buf.len() {
        let word = |at: usize| -> [u8; 4] {
            let mut w = [0u8; 4];
            w.copy_from_slice(&buf[at..at + 4]);
            w
        };
        let len = u32::from_ne_bytes(word(off)) as usize;
        if len < 16 || off + len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        let seq = u32::from_ne_bytes(word(off + 8));
        out.push(Received {
            kind,
            seq,
            payload: buf[off + 16..off + len].to_vec(),
        });
        off += (len + 3) & !3;
    }
    Ok(out)
}

fn error_code(payload: &[u8]) -> i32 {
    let mut w = [0u8; 4];
    if payload.len() >= 4 {
        w.copy_from_slice(&payload[..4]);
    }
    i32::from_ne_bytes(w)
}

/// Sends `msgs` as one batch and waits for the kernel to acknowledge every message.
pub(super) fn transaction(msgs: &[Msg]) -> Result<()> {
    let socket = open_socket()?;
    let mut buf = Vec::new();
    let base = 1u32;
    frame(
        &mut buf,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        base,
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    for (i, m) in msgs.iter().enumerate() {
        frame(
            &mut buf,
            (NFNL_SUBSYS_NFTABLES << 8) | m.kind,
            NLM_F_REQUEST | NLM_F_ACK | m.flags,
            base + 1 + i as u32,
            m.family,
            0,
            &m.attrs.0,
        );
    }
    let end_seq = base + 1 + msgs.len() as u32;
    frame(
        &mut buf,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        end_seq,
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    reserve_buffers(&socket, buf.len(), msgs.len())?;
    socket
        .send(&buf, 0)
        .map_err(|e| NetworkError::Nftables(format!("sending the batch: {e}")))?;
    let mut acked = 0;
    while acked < msgs.len() {
        for r in receive(&socket)? {
            if r.kind != NLMSG_ERROR {
                continue;
            }
            let code = error_code(&r.payload);
            if code != 0 {
                let what = r
                    .seq
                    .checked_sub(base + 1)
                    .and_then(|i| msgs.get(i as usize))
                    .map_or("batch", |m| match m.kind {
                        NFT_MSG_NEWTABLE => "create table",
                        NFT_MSG_DELTABLE => "delete table",
                        NFT_MSG_NEWCHAIN => "create chain",
                        _ => "add rule",
                    });
                return Err(NetworkError::Nftables(format!(
                    "transaction refused at {what}: {}",
                    std::io::Error::from_raw_os_error(-code)
                )));
            }
            acked += 1;
        }
    }
    Ok(())
}

/// Names of the `inet` tables of the calling thread's namespace.
pub(super) fn list_inet_tables() -> Result<Vec<String>> {
    let socket = open_socket()?;
    let mut buf = Vec::new();
    frame(
        &mut buf,
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
        NLM_F_REQUEST | NLM_F_ROOT | NLM_F_MATCH,
        1,
        NFPROTO_INET,
        0,
        &[],
    );
    socket
        .send(&buf, 0)
        .map_err(|e| NetworkError::Nftables(format!("listing tables: {e}")))?;
    let mut names = Vec::new();
    loop {
        for r in receive(&socket)? {
            match r.kind {
                NLMSG_DONE => return Ok(names),
                NLMSG_ERROR => {
                    let code = error_code(&r.payload);
                    if code != 0 {
                        return Err(NetworkError::Nftables(format!(
                            "listing tables: {}",
                            std::io::Error::from_raw_os_error(-code)
                        )));
                    }
                }
                _ if r.seq == 1 && r.payload.len() >= 4 && r.payload[0] == NFPROTO_INET => {
                    if let Some(name) = find_string_attr(&r.payload[4..], NFTA_TABLE_NAME) {
                        names.push(name);
                    }
                }
                _ => {}
            }
        }
    }
}

fn find_string_attr(mut attrs: &[u8], kind: u16) -> Option<String> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let k = u16::from_ne_bytes([attrs[2], attrs[3]]) & !NLA_F_NESTED;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if k == kind {
            let v = &attrs[4..len];
            let v = v.split(|b| *b == 0).next().unwrap_or(v);
            return String::from_utf8(v.to_vec()).ok();
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    None
}
