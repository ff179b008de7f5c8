//! Shared fixtures of the host networking tests: unique names, a "remote" namespace playing
//! the internet behind a test-owned uplink veth, guest-position namespaces, tiny servers,
//! and re-running this test binary as a `drafter-nat` / `drafter-forwarder` child process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use clap::Parser;
use drafter_network::nat::{GuestLink, Ipv6Config, NatConfig};
use drafter_network::netlink::RouteSocket;
use drafter_network::netns::{self, NetNs};
use drafter_network::service::{self, ForwarderArgs, NatArgs};

/// A name prefix unique to this test process and `tag`, short enough for interface names.
pub fn unique(tag: char) -> String {
    let mut pid = std::process::id();
    let mut digits = Vec::new();
    loop {
        digits.push(std::char::from_digit(pid % 36, 36).unwrap_or('0'));
        pid /= 36;
        if pid == 0 {
            break;
        }
    }
    let b36: String = digits.into_iter().rev().collect();
    format!("d{b36}{tag}")
}

/// The "internet": a namespace reachable only through the uplink veth, which the test
/// passes to the NAT as `--host-interface`.
pub struct Remote {
    pub ns: NetNs,
    pub uplink: String,
    pub host_ip4: IpAddr,
    pub remote_ip4: IpAddr,
    pub host_ip6: IpAddr,
    pub remote_ip6: IpAddr,
}

impl Remote {
    /// Creates `<prefix>r` and the uplink `<prefix>up`, on 10.201.<k>.0/24 and fd00:d4af:<k>::/64.
    pub fn new(prefix: &str, k: u8) -> Self {
        let name = format!("{prefix}r");
        let uplink = format!("{prefix}up");
        let ns = NetNs::create(&name).expect("create remote namespace");
        let host_ip4 = IpAddr::from([10, 201, k, 1]);
        let remote_ip4 = IpAddr::from([10, 201, k, 2]);
        let host_ip6 = IpAddr::from([0xfd00, 0xd4af, u16::from(k), 0, 0, 0, 0, 1]);
        let remote_ip6 = IpAddr::from([0xfd00, 0xd4af, u16::from(k), 0, 0, 0, 0, 2]);
        let mut host = RouteSocket::open().unwrap();
        host.add_veth(&uplink, "eth0", ns.fd())
            .expect("create uplink");
        let up = host.link_index(&uplink).unwrap();
        host.add_address(up, host_ip4, 24).unwrap();
        host.add_address(up, host_ip6, 64).unwrap();
        host.set_up(up, None).unwrap();
        let mut r = ns.route_socket().unwrap();
        let lo = r.link_index("lo").unwrap();
        r.set_up(lo, None).unwrap();
        let eth = r.link_index("eth0").unwrap();
        r.add_address(eth, remote_ip4, 24).unwrap();
        r.add_address(eth, remote_ip6, 64).unwrap();
        r.set_up(eth, None).unwrap();
        Remote {
            ns,
            uplink,
            host_ip4,
            remote_ip4,
            host_ip6,
            remote_ip6,
        }
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

/// Namespaces standing where guests would be (`<prefix>0..count`); removed on drop.
pub struct Guests {
    pub prefix: String,
    pub namespaces: Vec<NetNs>,
}

impl Guests {
    pub fn new(prefix: &str, count: usize) -> Self {
        let namespaces = (0..count)
            .map(|i| NetNs::create(&format!("{prefix}{i}")).expect("create guest namespace"))
            .collect();
        Guests {
            prefix: prefix.to_string(),
            namespaces,
        }
    }

    pub fn link(&self) -> GuestLink {
        GuestLink::VethIntoNamespace {
            prefix: self.prefix.clone(),
        }
    }
}

impl Drop for Guests {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = netns::delete(ns.name());
        }
    }
}

/// Binds a TCP listener inside `ns` and answers every connection with the peer's IP.
pub fn tcp_who_am_i_server(ns: &NetNs, addr: SocketAddr) -> SocketAddr {
    let listener = ns
        .run(|| TcpListener::bind(addr).map_err(|e| drafter_network::NetworkError::io("bind", e)))
        .unwrap();
    let local = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let peer = conn
                .peer_addr()
                .map(|p| p.ip().to_canonical().to_string())
                .unwrap_or_default();
            let _ = conn.write_all(peer.as_bytes());
        }
    });
    local
}

/// Connects to `addr` (from the calling thread's namespace) and returns what the server says.
pub fn ask(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// `ask` from inside a namespace.
pub fn ask_from(ns: &NetNs, addr: SocketAddr) -> std::io::Result<String> {
    ns.run(|| ask(addr).map_err(|e| drafter_network::NetworkError::io("ask", e)))
        .map_err(|e| std::io::Error::other(e.to_string()))
}

const CHILD_MODE: &str = "DRAFTER_NETWORK_TEST_CHILD";
const CHILD_ARGS: &str = "DRAFTER_NETWORK_TEST_ARGS";
const CHILD_GUESTS: &str = "DRAFTER_NETWORK_TEST_GUESTS";

/// A service process: this test binary re-run in child mode (see [`child_main`]).
pub struct ServiceChild {
    pub child: Child,
    pub stdout: BufReader<ChildStdout>,
}

impl ServiceChild {
    /// Starts `mode` ("nat" or "forwarder") with CLI flags `args`; the entry test is `entry`.
    pub fn start(entry: &str, mode: &str, args: &[String], guests: Option<&str>) -> Self {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", entry, "--nocapture", "--test-threads=1"])
            .env(CHILD_MODE, mode)
            .env(CHILD_ARGS, args.join("\u{1f}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(g) = guests {
            cmd.env(CHILD_GUESTS, g);
        }
        let mut child = cmd.spawn().expect("spawn service child");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        ServiceChild { child, stdout }
    }

    /// Blocks until the child reports READY (returns that line) or exits (panics).
    pub fn wait_ready(&mut self) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.read_line(&mut line).unwrap() == 0 {
                let status = self.child.wait().unwrap();
                panic!("service child exited before READY: {status}");
            }
            // libtest prints "test <name> ... " without a newline before the child's output.
            if let Some(at) = line.find("READY") {
                return line[at..].trim().to_string();
            }
        }
    }

    /// Sends SIGTERM and waits; returns whether the child exited successfully.
    pub fn terminate(&mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        self.child.wait().unwrap().success()
    }

    /// SIGKILL, like a crash.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ServiceChild {
    fn drop(&mut self) {
        // A failed assertion must not leave a running service behind.
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

/// Entry point of child mode; does nothing unless this process was started by [`ServiceChild`].
pub fn child_main() {
    let Ok(mode) = std::env::var(CHILD_MODE) else {
        return;
    };
    let raw = std::env::var(CHILD_ARGS).unwrap_or_default();
    let args: Vec<&str> = std::iter::once("child")
        .chain(raw.split('\u{1f}').filter(|a| !a.is_empty()))
        .collect();
    let result = match mode.as_str() {
        "nat" => {
            #[derive(Parser)]
            struct Cli {
                #[command(flatten)]
                nat: NatArgs,
            }
            let cli = Cli::try_parse_from(&args).unwrap();
            let mut config = cli.nat.config();
            if let Ok(g) = std::env::var(CHILD_GUESTS) {
                config.guest_link = GuestLink::VethIntoNamespace { prefix: g };
            }
            service::serve_nat(
                config,
                |_, _| {},
                |pool| {
                    println!("READY {}", pool.namespaces().len());
                    let _ = std::io::stdout().flush();
                },
            )
        }
        "forwarder" => {
            #[derive(Parser)]
            struct Cli {
                #[command(flatten)]
                fwd: ForwarderArgs,
            }
            let cli = Cli::try_parse_from(&args).unwrap();
            match cli.fwd.config() {
                Ok((config, forwards)) => service::serve_forwarder(config, forwards, |f| {
                    println!("READY {}", f.table_name());
                    let _ = std::io::stdout().flush();
                }),
                Err(e) => Err(e),
            }
        }
        other => panic!("unknown child mode {other}"),
    };
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("child error: {}", service::one_line(&e));
            std::process::exit(1)
        }
    }
}

/// Runs a command and returns its stdout (for inspecting state with `ip` / `nft`).
pub fn inspect(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .expect("run inspection command");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Host link names (`ip -o link`), sorted.
pub fn link_names() -> Vec<String> {
    let text = inspect("ip", &["-o", "link", "show"]);
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect();
    names.sort();
    names
}

/// A NAT pool config for test `k` (its own IPv4/IPv6 ranges), with `count`
/// namespaces named `<prefix>n<N>`, NATing out through `uplink`.
pub fn test_config(prefix: &str, k: u8, uplink: &str, guests: &Guests, count: usize) -> NatConfig {
    NatConfig {
        host_interface: uplink.to_string(),
        host_veth_cidr: format!("10.200.{k}.0/28").parse().unwrap(),
        namespace_veth_cidr: format!("10.202.{k}.0/29").parse().unwrap(),
        blocked_subnet_cidr: format!("10.202.{k}.0/29").parse().unwrap(),
        namespace_prefix: format!("{prefix}n"),
        namespace_count: Some(count),
        ipv6: Some(Ipv6Config {
            host_veth_cidr: format!("fd00:d4af:{k}:8::/120").parse().unwrap(),
            namespace_veth_cidr: format!("fd00:d4af:{k}:15::/120").parse().unwrap(),
            blocked_subnet_cidr: format!("fd00:d4af:{k}:15::/120").parse().unwrap(),
            gateway: format!("fd00:d4af:{k}:100::1").parse().unwrap(),
            ip: format!("fd00:d4af:{k}:100::2").parse().unwrap(),
            prefix_len: 64,
        }),
        guest_link: guests.link(),
        ..Default::default()
    }
}

/// Asserts that no namespace named `<prefix>n…` exists (nothing leaked).
pub fn assert_no_namespaces(prefix: &str) {
    let leaked: Vec<String> = netns::list()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}n")))
        .collect();
    assert!(leaked.is_empty(), "leaked namespaces: {leaked:?}");
}
