//! Port forwarder on the host: host ports reach a server in the guest position, and are
//! closed again once the forwarder process exits (or crashed and a new one started).

mod common;

use std::net::{IpAddr, SocketAddr, TcpListener};

use common::{ask, tcp_who_am_i_server, unique, Guests, Remote, ServiceChild};
use drafter_network::forwarder::{Forwarder, ForwarderConfig, PortForward};
use drafter_network::nat::NatPool;
use drafter_network::nft;

/// Not a test: the entry point when this binary is re-run as a service child process.
#[test]
fn child_process_entry_point() {
    common::child_main();
}

fn pool(p: &str, k: u8, remote: &Remote, guests: &Guests) -> NatPool {
    NatPool::create(common::test_config(p, k, &remote.uplink, guests, 1)).unwrap()
}

fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn entry(netns: &str, internal: u16, external: SocketAddr) -> String {
    format!(
        r#"{{"netns":"{netns}","internalPort":"{internal}","protocol":"tcp","externalAddr":"{external}"}}"#
    )
}

#[test]
fn forwarded_host_ports_reach_the_guest_until_the_forwarder_exits() {
    let p = unique('f');
    let remote = Remote::new(&p, 5);
    let guests = Guests::new(&format!("{p}g"), 1);
    let pool = pool(&p, 5, &remote, &guests);
    let info = pool.namespaces()[0].clone();
    let server = tcp_who_am_i_server(&guests.namespaces[0], "[::]:0".parse().unwrap());
    let internal = server.port();
    let v6 = info.ipv6.unwrap();

    let loopback = SocketAddr::from(([127, 0, 0, 1], free_port([127, 0, 0, 1].into())));
    let host_veth = SocketAddr::new(
        info.host_veth_external_ip.into(),
        free_port(info.host_veth_external_ip.into()),
    );
    let uplink6 = SocketAddr::new(remote.host_ip6, free_port(remote.host_ip6));
    let json = format!(
        "[{},{},{}]",
        entry(&info.name, internal, loopback),
        entry(&info.name, internal, host_veth),
        entry(&info.name, internal, uplink6)
    );
    // Nothing listens on these host ports before the forwarder runs.
    assert!(ask(loopback).is_err());

    let mut child = ServiceChild::start(
        "child_process_entry_point",
        "forwarder",
        &[
            "--host-veth-cidr".into(),
            "10.200.5.0/28".into(),
            "--host-veth-cidr-ipv6".into(),
            "fd00:d4af:5:8::/120".into(),
            "--port-forwards".into(),
            json,
        ],
        None,
    );
    let ready = child.wait_ready();
    let table = ready.trim_start_matches("READY ").to_string();

    // The guest sees its gateway as the source (incoming traffic is masqueraded in the namespace).
    let gw = info.gateway.to_string();
    assert_eq!(ask(loopback).expect("127.0.0.1 forward"), gw);
    assert_eq!(ask(host_veth).expect("host-veth address forward"), gw);
    assert_eq!(ask(uplink6).expect("IPv6 forward"), v6.gateway.to_string());
    // --allow-incoming-traffic: the namespace's host-veth-internal address reaches the guest directly.
    assert_eq!(
        ask(SocketAddr::new(info.host_veth_internal_ip.into(), internal)).unwrap(),
        gw
    );

    assert!(child.terminate(), "forwarder must exit cleanly on SIGTERM");
    assert!(
        ask(loopback).is_err(),
        "port must be closed after the forwarder exits"
    );
    assert!(
        ask(host_veth).is_err(),
        "port must be closed after the forwarder exits"
    );
    assert!(!nft::list_tables().unwrap().iter().any(|t| t.name == table));
    drop(pool);
}

#[test]
fn tables_of_a_killed_forwarder_are_removed_by_the_next_one() {
    let p = unique('g');
    let remote = Remote::new(&p, 6);
    let guests = Guests::new(&format!("{p}g"), 1);
    let pool = pool(&p, 6, &remote, &guests);
    let info = pool.namespaces()[0].clone();
    let loopback = SocketAddr::from(([127, 0, 0, 1], free_port([127, 0, 0, 1].into())));
    let mut child = ServiceChild::start(
        "child_process_entry_point",
        "forwarder",
        &[
            "--host-veth-cidr".into(),
            "10.200.6.0/28".into(),
            "--port-forwards".into(),
            format!("[{}]", entry(&info.name, 80, loopback)),
        ],
        None,
    );
    let table = child.wait_ready().trim_start_matches("READY ").to_string();
    child.kill9();
    assert!(
        nft::list_tables().unwrap().iter().any(|t| t.name == table),
        "kill -9 leaves the table"
    );
    let fresh = Forwarder::new(ForwarderConfig::default()).unwrap();
    assert!(
        !nft::list_tables().unwrap().iter().any(|t| t.name == table),
        "stale table must be swept"
    );
    fresh.close().unwrap();
    drop(pool);
}

#[test]
fn unknown_namespace_is_a_one_line_error() {
    let mut fwd = Forwarder::new(ForwarderConfig::default()).unwrap();
    let name = format!("{}nons", unique('h'));
    let forward = PortForward::parse_list(&format!(
        "[{}]",
        entry(&name, 80, "127.0.0.1:9".parse().unwrap())
    ))
    .unwrap()
    .remove(0);
    let err = fwd.add(forward).unwrap_err().to_string();
    assert!(
        err.contains(&name) && err.contains("not found") && !err.contains('\n'),
        "{err}"
    );
    assert_eq!(fwd.forwards().count(), 0);
}

#[test]
fn udp_forward_reaches_the_guest_and_goes_away_with_the_forwarder() {
    use std::net::UdpSocket;
    use std::time::Duration;

    let p = unique('u');
    let remote = Remote::new(&p, 8);
    let guests = Guests::new(&format!("{p}g"), 1);
    let pool = pool(&p, 8, &remote, &guests);
    let info = pool.namespaces()[0].clone();
    let echo = guests.namespaces[0]
        .run(|| {
            UdpSocket::bind("0.0.0.0:0").map_err(|e| drafter_network::NetworkError::io("bind", e))
        })
        .unwrap();
    let internal = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let external = SocketAddr::from(([127, 0, 0, 1], free_port([127, 0, 0, 1].into())));
    let mut fwd = Forwarder::new(ForwarderConfig {
        host_veth_cidr: "10.200.8.0/28".parse().unwrap(),
        host_veth_cidr_ipv6: None,
    })
    .unwrap();
    let json = format!(
        r#"[{{"netns":"{}","internalPort":"{internal}","protocol":"udp","externalAddr":"{external}"}}]"#,
        info.name
    );
    let id = fwd
        .add(PortForward::parse_list(&json).unwrap().remove(0))
        .unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.send_to(b"ping", external).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = client
        .recv_from(&mut buf)
        .expect("UDP echo through the forward");
    assert_eq!(&buf[..n], b"ping");
    fwd.remove(id).unwrap();
    assert_eq!(fwd.forwards().count(), 0);
    fwd.close().unwrap();
    drop(pool);
}
