//! NAT pool on the host: a client in the guest position reaches a server in a "remote"
//! namespace over IPv4 and IPv6 through the real NAT path, and the server sees the host
//! interface's address (masquerade).

mod common;

use std::net::SocketAddr;

use common::{ask_from, tcp_who_am_i_server, test_config, unique, Guests, Remote};
use drafter_network::nat::NatPool;
use drafter_network::NetworkError;

#[test]
fn guest_reaches_remote_server_over_ipv4_and_ipv6_with_nated_source() {
    let p = unique('a');
    let remote = Remote::new(&p, 1);
    let guests = Guests::new(&format!("{p}g"), 2);
    let pool = NatPool::create(test_config(&p, 1, &remote.uplink, &guests, 2)).unwrap();

    let server4 = tcp_who_am_i_server(&remote.ns, SocketAddr::new(remote.remote_ip4, 0));
    let server6 = tcp_who_am_i_server(&remote.ns, SocketAddr::new(remote.remote_ip6, 0));
    for guest in &guests.namespaces {
        let seen4 = ask_from(guest, server4).expect("IPv4 through the NAT");
        assert_eq!(
            seen4,
            remote.host_ip4.to_string(),
            "server must see the masqueraded source"
        );
        let seen6 = ask_from(guest, server6).expect("IPv6 through the NAT");
        assert_eq!(
            seen6,
            remote.host_ip6.to_string(),
            "server must see the masqueraded source"
        );
    }
    // Without the NAT the guest has no way out: after closing the pool the same request fails.
    pool.close().unwrap();
    assert!(ask_from(&guests.namespaces[0], server4).is_err());
}

#[test]
fn claims_are_exclusive_until_released() {
    let p = unique('b');
    let remote = Remote::new(&p, 2);
    let guests = Guests::new(&format!("{p}g"), 2);
    let pool = NatPool::create(test_config(&p, 2, &remote.uplink, &guests, 2)).unwrap();
    let a = pool.claim().unwrap();
    let b = pool.claim().unwrap();
    assert_ne!(a.info().name, b.info().name);
    assert!(matches!(pool.claim(), Err(NetworkError::PoolExhausted(2))));
    let released = a.info().name.clone();
    a.release();
    assert_eq!(pool.claim().unwrap().info().name, released);
    let info = b.info();
    assert_eq!(info.tap_name, "tap0");
    assert_eq!(info.namespace_veth_ip.to_string(), "10.202.2.2");
    assert_eq!(info.host_veth_internal_ip.to_string(), "10.200.2.5");
}

#[test]
fn a_second_pool_with_the_same_prefix_is_refused_while_the_first_lives() {
    let p = unique('c');
    let remote = Remote::new(&p, 3);
    let guests = Guests::new(&format!("{p}g"), 1);
    let _pool = NatPool::create(test_config(&p, 3, &remote.uplink, &guests, 1)).unwrap();
    let err = NatPool::create(test_config(&p, 3, &remote.uplink, &guests, 1))
        .err()
        .unwrap();
    assert!(matches!(err, NetworkError::PrefixInUse { .. }), "{err}");
    // The refused attempt must not have torn down the live pool's namespace.
    assert!(drafter_network::netns::list()
        .unwrap()
        .contains(&format!("{p}n0")));
}

#[test]
fn missing_host_interface_is_a_clear_error() {
    let p = unique('d');
    let guests = Guests::new(&format!("{p}g"), 1);
    let mut cfg = test_config(&p, 4, "nosuchif0", &guests, 1);
    cfg.host_interface = format!("{p}nope");
    let err = NatPool::create(cfg).err().unwrap().to_string();
    assert!(
        err.contains("not found") && err.contains(&format!("{p}nope")),
        "{err}"
    );
    common::assert_no_namespaces(&p);
}

#[test]
fn blocked_subnet_keeps_namespaces_apart_but_the_host_reaches_them() {
    use std::net::TcpStream;
    use std::time::Duration;

    let p = unique('e');
    let remote = Remote::new(&p, 7);
    let guests = Guests::new(&format!("{p}g"), 2);
    let pool = NatPool::create(test_config(&p, 7, &remote.uplink, &guests, 2)).unwrap();
    let server = tcp_who_am_i_server(&guests.namespaces[1], "[::]:0".parse().unwrap());
    let target = pool.namespaces()[1].clone();
    let v6 = target.ipv6.unwrap();
    let to4 = SocketAddr::new(target.namespace_veth_ip.into(), server.port());
    let to6 = SocketAddr::new(v6.namespace_veth_ip.into(), server.port());

    // The host reaches guest 1 at its namespace address (routed to the namespace, DNATed).
    assert_eq!(common::ask(to4).unwrap(), target.gateway.to_string());
    assert_eq!(common::ask(to6).unwrap(), v6.gateway.to_string());
    // Guest 0 may not: the namespace addresses are the blocked subnet.
    let from_guest0 = |to: SocketAddr| {
        guests.namespaces[0]
            .run(|| Ok(TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok()))
            .unwrap()
    };
    assert!(
        !from_guest0(to4),
        "IPv4 namespace-to-namespace traffic must be dropped"
    );
    assert!(
        !from_guest0(to6),
        "IPv6 namespace-to-namespace traffic must be dropped"
    );
}

#[test]
fn ranges_already_used_on_the_host_are_refused() {
    let p = unique('o');
    let remote = Remote::new(&p, 10);
    let guests = Guests::new(&format!("{p}g"), 1);
    // The uplink holds 10.201.10.1: a host-veth-cidr covering it must be refused.
    let mut cfg = test_config(&p, 10, &remote.uplink, &guests, 1);
    cfg.host_veth_cidr = "10.201.10.0/28".parse().unwrap();
    let err = NatPool::create(cfg).err().unwrap().to_string();
    assert!(
        err.contains("10.201.10.1") && err.contains(&remote.uplink),
        "{err}"
    );
    common::assert_no_namespaces(&p);
}

#[test]
fn a_vmm_attached_to_the_tap_gets_arp_answers_from_the_gateway() {
    use std::io::{Read, Write};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use drafter_network::nat::GuestLink;
    use drafter_network::netns::NetNs;
    use drafter_network::tap::open_tap;

    let p = unique('t');
    let remote = Remote::new(&p, 11);
    let guests = Guests::new(&format!("{p}g"), 0);
    let mut cfg = test_config(&p, 11, &remote.uplink, &guests, 1);
    cfg.guest_link = GuestLink::Tap;
    let pool = NatPool::create(cfg).unwrap();
    let info = pool.claim().unwrap().info().clone();
    let ns = NetNs::open(&info.name).unwrap();
    let mut tap = ns.run(|| open_tap(&info.tap_name, false)).unwrap();

    // ARP who-has <gateway> tell <guest>, from the guest's MAC, as a booting guest sends.
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&info.guest_mac.0);
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&info.guest_mac.0);
    frame.extend_from_slice(&info.guest_ip.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&info.gateway.octets());
    let mut reader = tap.try_clone().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok(n) = reader.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    // Like a guest, repeat the request until answered: right after the VMM attaches, the
    // kernel activates the tap's queue asynchronously (linkwatch) and drops earlier replies.
    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = 'found: loop {
        assert!(Instant::now() < deadline, "no ARP reply from the gateway");
        tap.write_all(&frame).unwrap();
        while let Ok(f) = rx.recv_timeout(Duration::from_millis(300)) {
            if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
                break 'found f;
            }
        }
    };
    assert_eq!(
        &reply[0..6],
        &info.guest_mac.0,
        "reply goes to the guest MAC"
    );
    assert_eq!(
        &reply[22..28],
        &info.tap_mac.0,
        "gateway answers with the tap's MAC"
    );
    assert_eq!(
        &reply[28..32],
        &info.gateway.octets(),
        "for the gateway address"
    );
}
