//! virtio-net against a real tap inside a network namespace the test creates.

use std::process::Command;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::testing::{page_dirty, Buf, TestDriver, DATA_START};

const MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];
const HOST_IP: [u8; 4] = [10, 231, 0, 1];
const GUEST_IP: [u8; 4] = [10, 231, 0, 2];
const RX_POOL: u64 = DATA_START;
const TX_BUF: u64 = DATA_START + 0x80_0000;

/// A network namespace that is deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("drafter-dt-{}-{tag}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?} failed");
}

fn arp_request() -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&HOST_IP);
    f
}

#[test]
fn guest_arp_through_a_tap_in_a_named_netns_gets_an_answer() {
    let ns = Netns::new("arp");
    let net = Net::new("dtap0", Some(&ns.0), MAC).unwrap();
    assert!(
        !std::path::Path::new("/sys/class/net/dtap0").exists(),
        "tap must be created inside the namespace, not here"
    );
    run(&[
        "ip",
        "-n",
        &ns.0,
        "addr",
        "add",
        "10.231.0.1/24",
        "dev",
        "dtap0",
    ]);
    run(&["ip", "-n", &ns.0, "link", "set", "dtap0", "up"]);

    let mut d = TestDriver::new(Box::new(net), 64);
    assert_eq!(d.reg(0x008), TYPE_NET);
    let mut mac = [0u8; 6];
    d.transport.read(0x100, &mut mac);
    assert_eq!(mac, MAC);

    let mut rx_heads = std::collections::HashMap::new();
    for i in 0..16u64 {
        let addr = RX_POOL + i * 0x1000;
        rx_heads.insert(d.add_chain(0, &[Buf::w(addr, 1526)]), addr);
    }
    d.kick(0);

    let frame = arp_request();
    d.mem.write_slice(&frame, GuestAddress(TX_BUF)).unwrap();
    d.add_chain(
        1,
        &[
            Buf::r(TX_BUF, 12),
            Buf::r(TX_BUF + 12, frame.len() as u32 - 12),
        ],
    );
    d.kick(1);
    d.wait_used(1);

    // The kernel answers; skip whatever else it sends (IPv6 ND and such).
    for _ in 0..64 {
        let (id, len) = d.wait_used(0);
        let addr = rx_heads.remove(&(id as u16)).unwrap();
        let mut f = vec![0u8; len as usize];
        d.mem.read_slice(&mut f, GuestAddress(addr)).unwrap();
        let again = d.add_chain(0, &[Buf::w(addr, 1526)]);
        rx_heads.insert(again, addr);
        d.kick(0);
        assert_eq!(u16::from_le_bytes([f[10], f[11]]), 1, "num_buffers");
        let eth = &f[VNET_HDR_LEN..];
        if eth.len() >= 42 && eth[12..14] == [0x08, 0x06] && eth[20..22] == [0, 2] {
            assert_eq!(&eth[0..6], &MAC, "reply addressed to the guest MAC");
            assert_eq!(&eth[28..32], &HOST_IP);
            assert_eq!(&eth[38..42], &GUEST_IP);
            assert!(
                page_dirty(&d.mem, addr),
                "RX write must mark the page dirty"
            );
            return;
        }
    }
    panic!("no ARP reply from the tap's namespace");
}

#[test]
fn tap_errors_name_the_problem() {
    let err = Tap::open("dtap1", Some("drafter-no-such-netns")).unwrap_err();
    assert!(err.to_string().contains("drafter-no-such-netns"), "{err}");
    let err = Tap::open("a-name-that-is-too-long", None).unwrap_err();
    assert!(matches!(err, TapError::BadName(_)), "{err}");
}

#[test]
fn save_carries_the_mac() {
    let ns = Netns::new("save");
    let net = Net::new("dtap2", Some(&ns.0), MAC).unwrap();
    let DeviceState::Net(s) = net.save() else {
        panic!("not a net state")
    };
    assert_eq!(s.mac, MAC);
}
