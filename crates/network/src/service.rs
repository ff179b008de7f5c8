//! The `drafter-nat` and `drafter-forwarder` services: their flags (as in the Go drafter,
//! plus IPv6 and a namespace count) and their run-until-SIGINT/SIGTERM loops.

use std::net::{Ipv4Addr, Ipv6Addr};

use clap::{ArgAction, Args};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::cidr::Cidr;
use crate::error::{NetworkError, Result};
use crate::forwarder::{Forwarder, ForwarderConfig, PortForward};
use crate::nat::{GuestLink, Ipv6Config, MacAddr, NatConfig, NatPool};

/// Flags of `drafter-nat`.
#[derive(Args, Debug, Clone)]
pub struct NatArgs {
    /// Whether to allow incoming traffic to the namespaces (at host-veth-internal-ip:port)
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub allow_incoming_traffic: bool,
    /// CIDR to block for the namespace
    #[arg(long, default_value = "10.0.15.0/24")]
    pub blocked_subnet_cidr: Cidr,
    /// Host gateway interface [default: the interface of the default route]
    #[arg(long)]
    pub host_interface: Option<String>,
    /// CIDR for the veths outside the namespace
    #[arg(long, default_value = "10.0.8.0/22")]
    pub host_veth_cidr: Cidr,
    /// Name for the interface inside the namespace
    #[arg(long, default_value = "tap0")]
    pub namespace_interface: String,
    /// Gateway for the interface inside the namespace
    #[arg(long, default_value = "172.100.100.1")]
    pub namespace_interface_gateway: Ipv4Addr,
    /// IP for the interface inside the namespace
    #[arg(long, default_value = "172.100.100.2")]
    pub namespace_interface_ip: Ipv4Addr,
    /// MAC address for the interface inside the namespace
    #[arg(long, default_value = "02:0e:d9:fd:68:3d")]
    pub namespace_interface_mac: MacAddr,
    /// Netmask for the interface inside the namespace
    #[arg(long, default_value_t = 30)]
    pub namespace_interface_netmask: u8,
    /// Prefix for the namespace IDs
    #[arg(long, default_value = "ark")]
    pub namespace_prefix: String,
    /// CIDR for the veths inside the namespace
    #[arg(long, default_value = "10.0.15.0/24")]
    pub namespace_veth_cidr: Cidr,
    /// Number of namespaces (default: as many as the CIDRs allow, at most 64)
    #[arg(long)]
    pub namespace_count: Option<usize>,
    /// Disable IPv6 (NAT66) for the namespaces
    #[arg(long)]
    pub disable_ipv6: bool,
    /// IPv6 CIDR for the veths outside the namespace (split into /126 pairs)
    #[arg(long, default_value = "fd64:d4af:8::/64")]
    pub host_veth_cidr_ipv6: Cidr,
    /// IPv6 CIDR for the veths inside the namespace
    #[arg(long, default_value = "fd64:d4af:15::/64")]
    pub namespace_veth_cidr_ipv6: Cidr,
    /// IPv6 CIDR to block for the namespace
    #[arg(long, default_value = "fd64:d4af:15::/64")]
    pub blocked_subnet_cidr_ipv6: Cidr,
    /// IPv6 gateway for the interface inside the namespace
    #[arg(long, default_value = "fd64:d4af:100::1")]
    pub namespace_interface_gateway_ipv6: Ipv6Addr,
    /// IPv6 address for the interface inside the namespace
    #[arg(long, default_value = "fd64:d4af:100::2")]
    pub namespace_interface_ip_ipv6: Ipv6Addr,
    /// IPv6 prefix length for the interface inside the namespace
    #[arg(long, default_value_t = 64)]
    pub namespace_interface_netmask_ipv6: u8,
}

impl NatArgs {
    /// The pool configuration these flags describe.
    pub fn config(&self) -> NatConfig {
        NatConfig {
            host_interface: self.host_interface.clone().unwrap_or_default(),
            host_veth_cidr: self.host_veth_cidr,
            namespace_veth_cidr: self.namespace_veth_cidr,
            blocked_subnet_cidr: self.blocked_subnet_cidr,
            namespace_interface: self.namespace_interface.clone(),
            namespace_interface_gateway: self.namespace_interface_gateway,
            namespace_interface_netmask: self.namespace_interface_netmask,
            namespace_interface_ip: self.namespace_interface_ip,
            namespace_interface_mac: self.namespace_interface_mac,
            namespace_prefix: self.namespace_prefix.clone(),
            allow_incoming_traffic: self.allow_incoming_traffic,
            ipv6: (!self.disable_ipv6).then_some(Ipv6Config {
                host_veth_cidr: self.host_veth_cidr_ipv6,
                namespace_veth_cidr: self.namespace_veth_cidr_ipv6,
                blocked_subnet_cidr: self.blocked_subnet_cidr_ipv6,
                gateway: self.namespace_interface_gateway_ipv6,
                ip: self.namespace_interface_ip_ipv6,
                prefix_len: self.namespace_interface_netmask_ipv6,
            }),
            namespace_count: self.namespace_count,
            guest_link: GuestLink::Tap,
        }
    }
}

/// Flags of `drafter-forwarder`.
#[derive(Args, Debug, Clone)]
pub struct ForwarderArgs {
    /// CIDR for the veths outside the namespace
    #[arg(long, default_value = "10.0.8.0/22")]
    pub host_veth_cidr: Cidr,
    /// IPv6 CIDR for the veths outside the namespace (for IPv6 external addresses)
    #[arg(long, default_value = "fd64:d4af:8::/64")]
    pub host_veth_cidr_ipv6: Cidr,
    /// Port forwards configuration (wildcard IPs like 0.0.0.0 are not valid, be explict)
    #[arg(
        long,
        default_value = r#"[{"netns":"ark0","internalPort":"6379","protocol":"tcp","externalAddr":"127.0.0.1:3333"}]"#
    )]
    pub port_forwards: String,
}

impl ForwarderArgs {
    /// The forwarder configuration and the parsed forwards.
    pub fn config(&self) -> Result<(ForwarderConfig, Vec<PortForward>)> {
        let forwards = PortForward::parse_list(&self.port_forwards)?;
        Ok((
            ForwarderConfig {
                host_veth_cidr: self.host_veth_cidr,
                host_veth_cidr_ipv6: Some(self.host_veth_cidr_ipv6),
            },
            forwards,
        ))
    }
}

fn termination_signals() -> Result<Signals> {
    Signals::new([SIGINT, SIGTERM]).map_err(|e| NetworkError::io("install signal handlers", e))
}

fn wait_for_termination(signals: &mut Signals) {
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "stopping");
    }
}

/// Runs the NAT until SIGINT/SIGTERM, then removes everything it created.
///
/// `progress(done, total)` follows namespace creation; `ready` runs once the pool is up.
pub fn serve_nat(
    config: NatConfig,
    progress: impl FnMut(usize, usize),
    ready: impl FnOnce(&NatPool),
) -> Result<()> {
    // Installed first: a signal during setup is held and handled once setup finished.
    let mut signals = termination_signals()?;
    let pool = NatPool::create_with_progress(config, progress)?;
    ready(&pool);
    wait_for_termination(&mut signals);
    pool.close()
}

/// Runs the forwarder until SIGINT/SIGTERM, then removes its rules.
pub fn serve_forwarder(
    config: ForwarderConfig,
    forwards: Vec<PortForward>,
    ready: impl FnOnce(&Forwarder),
) -> Result<()> {
    let mut signals = termination_signals()?;
    let mut forwarder = Forwarder::new(config)?;
    forwarder.add_all(forwards)?;
    ready(&forwarder);
    wait_for_termination(&mut signals);
    forwarder.close()
}

/// Formats an error and its causes on one line.
pub fn one_line(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct NatCli {
        #[command(flatten)]
        nat: NatArgs,
    }

    #[derive(Parser)]
    struct FwdCli {
        #[command(flatten)]
        fwd: ForwarderArgs,
    }

    fn nat_error(args: &[&str]) -> String {
        let argv = std::iter::once("drafter-nat").chain(args.iter().copied());
        match NatCli::try_parse_from(argv) {
            Err(e) => e.to_string().lines().next().unwrap_or_default().to_string(),
            Ok(cli) => one_line(&cli.nat.config().plan().unwrap_err()),
        }
    }

    #[test]
    fn defaults_are_the_go_defaults_plus_ipv6() {
        let cli = NatCli::try_parse_from(["drafter-nat"]).unwrap();
        let c = cli.nat.config();
        assert_eq!(c.host_veth_cidr.to_string(), "10.0.8.0/22");
        assert_eq!(c.namespace_veth_cidr.to_string(), "10.0.15.0/24");
        assert_eq!(c.blocked_subnet_cidr.to_string(), "10.0.15.0/24");
        assert_eq!(c.namespace_interface, "tap0");
        assert_eq!(c.namespace_interface_gateway.to_string(), "172.100.100.1");
        assert_eq!(c.namespace_interface_ip.to_string(), "172.100.100.2");
        assert_eq!(c.namespace_interface_netmask, 30);
        assert_eq!(c.namespace_interface_mac.to_string(), "02:0e:d9:fd:68:3d");
        assert_eq!(c.namespace_prefix, "ark");
        assert!(c.allow_incoming_traffic);
        assert!(c.ipv6.is_some());
        assert!(
            c.host_interface.is_empty(),
            "empty = interface of the default route"
        );
        let off = NatCli::try_parse_from([
            "drafter-nat",
            "--disable-ipv6",
            "--allow-incoming-traffic=false",
        ])
        .unwrap();
        assert!(off.nat.config().ipv6.is_none());
        assert!(!off.nat.config().allow_incoming_traffic);
        let fwd = FwdCli::try_parse_from(["drafter-forwarder"]).unwrap();
        let (cfg, forwards) = fwd.fwd.config().unwrap();
        assert_eq!(cfg.host_veth_cidr.to_string(), "10.0.8.0/22");
        assert_eq!(forwards[0].netns, "ark0");
        assert_eq!(forwards[0].external.to_string(), "127.0.0.1:3333");
    }

    #[test]
    fn bad_flags_give_one_line_errors_naming_the_problem() {
        let cases: [(&[&str], &str); 6] = [
            (&["--host-veth-cidr", "10.0.8.0/33"], "--host-veth-cidr"),
            (&["--namespace-interface-mac", "nope"], "MAC"),
            (&["--namespace-veth-cidr", "10.0.10.0/24"], "overlaps"),
            (&["--host-veth-cidr", "10.0.8.0/31"], "too small"),
            (
                &[
                    "--namespace-veth-cidr",
                    "10.0.15.0/32",
                    "--namespace-count",
                    "2",
                ],
                "exceeds",
            ),
            (
                &["--namespace-veth-cidr-ipv6", "fd64:d4af:8::/96"],
                "overlaps",
            ),
        ];
        for (args, want) in cases {
            let err = nat_error(args);
            assert!(
                err.contains(want),
                "{args:?}: {err:?} should mention {want}"
            );
            assert!(!err.contains('\n'));
        }
        let bad_json = FwdCli::try_parse_from(["drafter-forwarder", "--port-forwards", "[{"])
            .unwrap()
            .fwd
            .config()
            .map(|_| ())
            .unwrap_err();
        let line = one_line(&bad_json);
        assert!(
            line.contains("malformed JSON") && !line.contains('\n'),
            "{line}"
        );
    }
}
