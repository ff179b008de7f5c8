//! Issue 6 "Done when" 5, in the lab: a busybox guest under `drafter-vmm`, with its tap in a
//! namespace claimed from `drafter-nat`, reaches a TCP server in a test "remote" namespace
//! (IPv4 and IPv6, NATed through the test's uplink veth), and a host port forwarded by
//! `drafter-forwarder` reaches a server in the guest.

#[path = "../../vmm/tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

use drafter_network::netlink::RouteSocket;
use drafter_network::netns::{self, NetNs};
use drafter_network::NetworkError;
use support::{guest_dir, scratch, write_initramfs, MARKER};

/// Budget for each wait on the guest (booting on nested KVM inside the lab is slow).
const GUEST: Duration = Duration::from_secs(300);
/// Budget for the services to come up.
const SERVICE: Duration = Duration::from_secs(60);

/// drafter-nat's defaults for the guest side of the tap.
const GUEST_IP: &str = "172.100.100.2";
const GATEWAY: &str = "172.100.100.1";
const GUEST_MAC: &str = "02:0e:d9:fd:68:3d";
const GUEST_IP6: &str = "fd64:d4af:100::2";
const GATEWAY6: &str = "fd64:d4af:100::1";

/// Test-only addresses: the uplink ("internet") and the NAT's veth CIDRs.
const UPLINK_HOST4: [u8; 4] = [10, 210, 0, 1];
const UPLINK_REMOTE4: [u8; 4] = [10, 210, 0, 2];
const UPLINK_HOST6: [u16; 8] = [0xfd00, 0xd4b0, 1, 0, 0, 0, 0, 1];
const UPLINK_REMOTE6: [u16; 8] = [0xfd00, 0xd4b0, 1, 0, 0, 0, 0, 2];
const HOST_VETH_CIDR: &str = "10.211.0.0/28";
const NAMESPACE_VETH_CIDR: &str = "10.212.0.0/29";
const HOST_VETH_CIDR6: &str = "fd00:d4b0:8::/120";
const NAMESPACE_VETH_CIDR6: &str = "fd00:d4b0:15::/120";

/// The port the guest's `nc -l` serves.
const GUEST_PORT: u16 = 8080;

/// A short name prefix unique to this process (interface names stay under 16 bytes).
fn unique_prefix() -> String {
    let mut pid = std::process::id();
    let mut digits = Vec::new();
    loop {
        digits.push(std::char::from_digit(pid % 36, 36).unwrap_or('0'));
        pid /= 36;
        if pid == 0 {
            break;
        }
    }
    format!("l{}", digits.into_iter().rev().collect::<String>())
}

fn net<T>(what: &str, r: Result<T, NetworkError>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// The "internet": a namespace reachable only through the uplink veth that the test hands
/// drafter-nat as `--host-interface`. Removed on drop.
struct Remote {
    ns: NetNs,
    uplink: String,
}

impl Remote {
    fn new(prefix: &str) -> Remote {
        let uplink = format!("{prefix}up");
        let ns = net(
            "create remote namespace",
            NetNs::create(&format!("{prefix}r")),
        );
        let remote = Remote { ns, uplink };
        let mut host = net("route socket", RouteSocket::open());
        net(
            "create uplink",
            host.add_veth(&remote.uplink, "eth0", remote.ns.fd()),
        );
        let up = net("uplink index", host.link_index(&remote.uplink));
        net("uplink v4", host.add_address(up, UPLINK_HOST4.into(), 24));
        net("uplink v6", host.add_address(up, UPLINK_HOST6.into(), 64));
        net("uplink up", host.set_up(up, None));
        let mut r = net("remote route socket", remote.ns.route_socket());
        let lo = net("remote lo", r.link_index("lo"));
        net("remote lo up", r.set_up(lo, None));
        let eth = net("remote eth0", r.link_index("eth0"));
        net("remote v4", r.add_address(eth, UPLINK_REMOTE4.into(), 24));
        net("remote v6", r.add_address(eth, UPLINK_REMOTE6.into(), 64));
        net("remote eth0 up", r.set_up(eth, None));
        remote
    }

    /// A TCP server in the remote namespace (dual stack) that answers each connection with
    /// `REMOTE-SAW <peer ip>`, closes it, and reports the peer on the returned channel.
    fn serve(&self) -> (u16, Receiver<IpAddr>) {
        let listener = net(
            "bind remote server",
            self.ns.run(|| {
                TcpListener::bind("[::]:0").map_err(|e| NetworkError::io("bind [::]:0", e))
            }),
        );
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let Ok(peer) = conn.peer_addr() else { continue };
                let peer = peer.ip().to_canonical();
                let _ = writeln!(conn, "REMOTE-SAW {peer}");
                drop(conn);
                if tx.send(peer).is_err() {
                    return;
                }
            }
        });
        (port, rx)
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        if let Ok(mut host) = RouteSocket::open() {
            if let Ok(i) = host.link_index(&self.uplink) {
                let _ = host.delete_link(i);
            }
        }
        let _ = netns::delete(self.ns.name());
    }
}

/// A child process whose output lines arrive on a channel; on drop it gets SIGTERM (then
/// SIGKILL if still running after a grace period) so nothing outlives a failed test.
struct Service {
    name: &'static str,
    child: Child,
    lines: Receiver<String>,
}

fn forward_lines(name: &'static str, from: impl Read + Send + 'static, tx: Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { return };
            eprintln!("{name}| {line}");
            if tx.send(line).is_err() {
                return;
            }
        }
    });
}

impl Service {
    fn spawn(name: &'static str, exe: &str, args: &[String]) -> Service {
        let mut child = Command::new(exe)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let (tx, lines) = channel();
        if let Some(out) = child.stdout.take() {
            forward_lines(name, out, tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            forward_lines(name, err, tx);
        }
        Service { name, child, lines }
    }

    /// Waits for an output line containing `needle`; panics on timeout or exit.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    panic!(
                        "{} printed no {needle:?} within {timeout:?} (exit status: {status:?})",
                        self.name
                    );
                }
            }
        }
    }

    /// Sends SIGTERM and waits up to `grace`; returns whether it exited successfully.
    fn terminate(&mut self, grace: Duration) -> bool {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status.success();
        }
        let _ = Command::new("sh")
            .args(["-c", &format!("kill -TERM {}", self.child.id())])
            .status();
        self.wait(grace).is_some_and(|s| s.success())
    }

    /// Waits up to `timeout` for the process to exit.
    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    // Polling an exit status, not synchronising on guessed timing.
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => return None,
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if !self.terminate(Duration::from_secs(30)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The guest's work after the basics: network from drafter-nat's defaults, a one-shot
/// `nc -l` server, one request to the remote per address family (retried while links and
/// DAD settle), then wait for the forwarded client before powering off.
fn guest_body(remote_port: u16) -> String {
    let fetch = |family: &str, addr: String| {
        format!(
            "r=; i=0; while [ $i -lt 60 ] && [ -z \"$r\" ]; do \
             r=$(nc -w 5 {addr} {remote_port} </dev/null 2>/dev/null); i=$((i+1)); \
             [ -z \"$r\" ] && sleep 1; done; echo \"{family} $r\"\n"
        )
    };
    format!(
        "ip link set lo up\n\
         ip link set eth0 up\n\
         ip addr add {GUEST_IP}/30 dev eth0\n\
         ip route add default via {GATEWAY}\n\
         ip -6 addr add {GUEST_IP6}/64 dev eth0\n\
         ip -6 route add default via {GATEWAY6}\n\
         (echo GUEST-SERVED-THIS | nc -l -p {GUEST_PORT} >/dev/null 2>&1; echo SERVED) &\n\
         srv=$!\n\
         echo LISTENING\n\
         {v4}{v6}wait $srv\n",
        v4 = fetch("REMOTE4", IpAddr::from(UPLINK_REMOTE4).to_string()),
        v6 = fetch("REMOTE6", IpAddr::from(UPLINK_REMOTE6).to_string()),
    )
}

/// Connects to `addr` until a line arrives or the deadline passes (the guest's listener may
/// not be up yet: each refused attempt is retried).
fn read_line_with_retries(addr: SocketAddr, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut last_err = String::new();
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                let mut line = String::new();
                match BufReader::new(s).read_line(&mut line) {
                    Ok(n) if n > 0 => return line.trim().to_string(),
                    Ok(_) => last_err = "connection closed without a line".into(),
                    Err(e) => last_err = e.to_string(),
                }
            }
            Err(e) => last_err = e.to_string(),
        }
        // Retry interval while the guest's listener comes up (readiness is the reply).
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("no line from {addr} within {timeout:?}: {last_err}");
}

fn free_loopback_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("free port: {e}"))
}

#[test]
fn guest_script_is_valid_shell() {
    let script = support::init_script("virtio_net.ko", &guest_body(4242));
    let ok = Command::new("sh")
        .args(["-n", "-c", &script])
        .status()
        .map(|s| s.success());
    assert_eq!(ok.ok(), Some(true), "{script}");
    assert!(script.contains("nc -w 5 10.210.0.2 4242"), "{script}");
    assert!(script.contains("nc -w 5 fd00:d4b0:1::2 4242"), "{script}");
}

#[test]
#[ignore = "lab"]
fn lab_nat_guest_reaches_remote_and_forwarded_port_reaches_guest() {
    let prefix = unique_prefix();
    let dir = scratch("nat");
    let remote = Remote::new(&prefix);
    let (remote_port, remote_peers) = remote.serve();
    let ns_prefix = format!("{prefix}n");
    let guest_ns = format!("{ns_prefix}0");

    let mut nat = Service::spawn(
        "nat",
        env!("CARGO_BIN_EXE_drafter-nat"),
        &[
            "--host-interface",
            remote.uplink.as_str(),
            "--namespace-prefix",
            ns_prefix.as_str(),
            "--namespace-count",
            "1",
            "--host-veth-cidr",
            HOST_VETH_CIDR,
            "--namespace-veth-cidr",
            NAMESPACE_VETH_CIDR,
            "--blocked-subnet-cidr",
            NAMESPACE_VETH_CIDR,
            "--host-veth-cidr-ipv6",
            HOST_VETH_CIDR6,
            "--namespace-veth-cidr-ipv6",
            NAMESPACE_VETH_CIDR6,
            "--blocked-subnet-cidr-ipv6",
            NAMESPACE_VETH_CIDR6,
        ]
        .map(String::from),
    );
    nat.wait_for("NAT running", SERVICE);

    let host_port = free_loopback_port();
    let forwards = format!(
        r#"[{{"netns":"{guest_ns}","internalPort":"{GUEST_PORT}","protocol":"tcp","externalAddr":"127.0.0.1:{host_port}"}}]"#
    );
    let mut forwarder = Service::spawn(
        "forwarder",
        env!("CARGO_BIN_EXE_drafter-forwarder"),
        &[
            "--host-veth-cidr",
            HOST_VETH_CIDR,
            "--host-veth-cidr-ipv6",
            HOST_VETH_CIDR6,
            "--port-forwards",
            forwards.as_str(),
        ]
        .map(String::from),
    );
    forwarder.wait_for("forwarding", SERVICE);

    let initramfs = write_initramfs(&dir, &guest_body(remote_port));
    let g = guest_dir();
    let mut vmm = Service::spawn(
        "vmm",
        env!("CARGO_BIN_EXE_drafter-vmm"),
        &[
            "--kernel".into(),
            g.join("vmlinuz").display().to_string(),
            "--initramfs".into(),
            initramfs.display().to_string(),
            "--boot-args".into(),
            "console=ttyS0 reboot=k panic=1 pci=off quiet".into(),
            "--vcpus".into(),
            "1".into(),
            "--memory-mib".into(),
            "256".into(),
            "--tap".into(),
            "tap0".into(),
            "--mac".into(),
            GUEST_MAC.into(),
            "--netns".into(),
            guest_ns.clone(),
        ],
    );
    vmm.wait_for(MARKER, GUEST);
    vmm.wait_for("LISTENING", GUEST);

    // (1) The guest reaches the remote over IPv4 and IPv6; the remote sees the uplink's
    // address (masquerade through --host-interface), not the guest's.
    let v4 = vmm.wait_for("REMOTE4", GUEST);
    let want4 = format!("REMOTE4 REMOTE-SAW {}", IpAddr::from(UPLINK_HOST4));
    assert_eq!(v4.trim(), want4, "IPv4 request from the guest");
    let v6 = vmm.wait_for("REMOTE6", GUEST);
    let want6 = format!("REMOTE6 REMOTE-SAW {}", IpAddr::from(UPLINK_HOST6));
    assert_eq!(v6.trim(), want6, "IPv6 request from the guest");
    let peers: Vec<IpAddr> = remote_peers.try_iter().collect();
    assert!(
        peers.contains(&IpAddr::from(UPLINK_HOST4)) && peers.contains(&IpAddr::from(UPLINK_HOST6)),
        "remote saw {peers:?}"
    );
    assert!(
        !peers
            .iter()
            .any(|p| p.to_string() == GUEST_IP || p.to_string() == GUEST_IP6),
        "guest address leaked past the NAT: {peers:?}"
    );

    // (2) A client on the host reaches the guest's server through the forwarded port.
    let reply = read_line_with_retries(SocketAddr::from(([127, 0, 0, 1], host_port)), GUEST);
    assert_eq!(reply, "GUEST-SERVED-THIS");
    vmm.wait_for("SERVED", GUEST);
    let status = vmm.wait(GUEST);
    assert!(
        status.is_some_and(|s| s.success()),
        "guest did not power off cleanly: {status:?}"
    );

    assert!(
        forwarder.terminate(SERVICE),
        "drafter-forwarder must exit cleanly on SIGTERM"
    );
    assert!(
        nat.terminate(SERVICE),
        "drafter-nat must exit cleanly on SIGTERM"
    );
    let left = net("list namespaces", netns::list());
    assert!(
        !left.contains(&guest_ns),
        "drafter-nat left {guest_ns} behind"
    );
    drop(remote);
    let _ = std::fs::remove_dir_all(&dir);
}
