//! The NAT namespace pool: creates `<prefix><N>` namespaces wired to the host, hands them
//! out to VMs, and removes every trace of them on close, drop, or the next start.

use std::fs::{self, File, OpenOptions};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::fcntl::{Flock, FlockArg};

use super::config::{GuestLink, NamespaceInfo, NatConfig, NatPlan};
use super::rules::{host_table, host_table_name, namespace_table, NAMESPACE_TABLE};
use crate::error::{NetworkError, Result};
use crate::netlink::{is_not_found, RouteSocket};
use crate::netns::{self, write_sysctl, NetNs};
use crate::nft::Table;
use crate::tap::create_persistent_tap;

/// Directory of the per-prefix lock files.
pub const LOCK_DIR: &str = "/run/drafter";

/// Name of the guest-side interface with [`GuestLink::VethIntoNamespace`].
pub const GUEST_VETH_NAME: &str = "eth0";

struct Shared {
    namespaces: Vec<NamespaceInfo>,
    claimed: Mutex<Vec<bool>>,
}

impl Shared {
    fn claimed(&self) -> MutexGuard<'_, Vec<bool>> {
        self.claimed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A pool of NAT'd network namespaces, one per VM.
///
/// Dropping the pool (or [`NatPool::close`]) removes the namespaces, their host veths and the
/// pool's nftables table. Creating a pool first removes leftovers of a crashed pool with the
/// same prefix; a lock file under [`LOCK_DIR`] keeps two live pools from sharing a prefix.
pub struct NatPool {
    prefix: String,
    host_interface: String,
    shared: Arc<Shared>,
    closed: bool,
    _lock: Flock<File>,
}

/// A namespace claimed from the pool; released again when dropped.
pub struct ClaimedNamespace {
    shared: Arc<Shared>,
    index: usize,
}

impl ClaimedNamespace {
    /// Addresses and names of the claimed namespace.
    pub fn info(&self) -> &NamespaceInfo {
        &self.shared.namespaces[self.index]
    }

    /// Gives the namespace back to the pool (same as dropping it).
    pub fn release(self) {}
}

impl Drop for ClaimedNamespace {
    fn drop(&mut self) {
        if let Some(slot) = self.shared.claimed().get_mut(self.index) {
            *slot = false;
        }
    }
}

impl NatPool {
    /// Validates `config`, removes leftovers of a previous run and creates every namespace.
    pub fn create(config: NatConfig) -> Result<Self> {
        Self::create_with_progress(config, |_, _| {})
    }

    /// Like [`NatPool::create`], calling `progress(done, total)` after each namespace.
    pub fn create_with_progress(
        config: NatConfig,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let plan = config.plan()?;
        let prefix = config.namespace_prefix.clone();
        let lock = lock_prefix(&prefix)?;
        let mut host = RouteSocket::open()?;
        let host_interface = if config.host_interface.is_empty() {
            host.default_route_interface()?
        } else {
            config.host_interface.clone()
        };
        host.link_index(&host_interface)?;
        sweep(&prefix)?;
        check_ranges_unused(&mut host, &config)?;
        write_sysctl("net/ipv4/ip_forward", "1")?;
        if config.ipv6.is_some() {
            keep_accepting_router_advertisements(&host_interface)?;
            write_sysctl("net/ipv6/conf/all/forwarding", "1")?;
        }
        let pool = Self {
            prefix,
            host_interface,
            shared: Arc::new(Shared {
                claimed: Mutex::new(vec![false; plan.namespaces.len()]),
                namespaces: plan.namespaces.clone(),
            }),
            closed: false,
            _lock: lock,
        };
        // On any failure below, dropping `pool` removes what was already created.
        let total = plan.namespaces.len();
        for (done, info) in plan.namespaces.iter().enumerate() {
            create_namespace(&mut host, &plan, info)?;
            progress(done + 1, total);
        }
        Table::inet(host_table_name(&pool.prefix)).replace(&host_table(
            &plan.config,
            &pool.host_interface,
            &plan.namespaces,
        ))?;
        tracing::info!(
            prefix = %pool.prefix,
            namespaces = total,
            host_interface = %pool.host_interface,
            "NAT pool ready"
        );
        Ok(pool)
    }

    /// Every namespace of the pool.
    pub fn namespaces(&self) -> &[NamespaceInfo] {
        &self.shared.namespaces
    }

    /// The interface the namespaces' traffic leaves through.
    pub fn host_interface(&self) -> &str {
        &self.host_interface
    }

    /// Claims a free namespace.
    pub fn claim(&self) -> Result<ClaimedNamespace> {
        let mut claimed = self.shared.claimed();
        let index = claimed
            .iter()
            .position(|c| !c)
            .ok_or(NetworkError::PoolExhausted(claimed.len()))?;
        claimed[index] = true;
        Ok(ClaimedNamespace {
            shared: Arc::clone(&self.shared),
            index,
        })
    }

    /// Removes everything the pool created.
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        sweep(&self.prefix)
    }
}

impl Drop for NatPool {
    fn drop(&mut self) {
        if !self.closed {
            if let Err(e) = sweep(&self.prefix) {
                tracing::warn!(prefix = %self.prefix, error = %e, "NAT pool cleanup incomplete");
            }
        }
    }
}

fn lock_prefix(prefix: &str) -> Result<Flock<File>> {
    fs::create_dir_all(LOCK_DIR).map_err(|e| NetworkError::io(format!("create {LOCK_DIR}"), e))?;
    let path = format!("{LOCK_DIR}/nat-{prefix}.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| NetworkError::io(format!("open {path}"), e))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            NetworkError::PrefixInUse {
                prefix: prefix.to_string(),
                path: path.clone(),
            }
        } else {
            NetworkError::io(format!("lock {path}"), errno)
        }
    })
}

/// Turning on IPv6 forwarding makes interfaces with `accept_ra=1` ignore router
/// advertisements, which would drop a SLAAC-configured uplink; `2` keeps accepting them.
fn keep_accepting_router_advertisements(interface: &str) -> Result<()> {
    let key = format!("net/ipv6/conf/{interface}/accept_ra");
    let path = format!("/proc/sys/{key}");
    match fs::read_to_string(&path) {
        Ok(v) if v.trim() == "1" => {
            tracing::info!(
                interface,
                "setting accept_ra=2 so IPv6 forwarding keeps SLAAC"
            );
            write_sysctl(&key, "2")
        }
        // IPv6 disabled on the interface, or already 0/2: nothing to preserve.
        _ => Ok(()),
    }
}

/// Refuses ranges that already hold an address on this host (another pool, a LAN, ...).
fn check_ranges_unused(host: &mut RouteSocket, config: &NatConfig) -> Result<()> {
    let mut ranges = vec![
        ("host-veth-cidr", config.host_veth_cidr),
        ("namespace-veth-cidr", config.namespace_veth_cidr),
    ];
    if let Some(v6) = &config.ipv6 {
        ranges.push(("host-veth-cidr-ipv6", v6.host_veth_cidr));
        ranges.push(("namespace-veth-cidr-ipv6", v6.namespace_veth_cidr));
    }
    let addresses = host.addresses()?;
    for (flag, range) in ranges {
        if let Some(a) = addresses.iter().find(|a| range.contains(a.addr)) {
            let link = host
                .links()?
                .into_iter()
                .find(|l| l.index == a.index)
                .map_or_else(|| format!("index {}", a.index), |l| l.name);
            return Err(NetworkError::InvalidConfig(format!(
                "{flag} {range} overlaps address {} already on interface {link}",
                a.addr
            )));
        }
    }
    Ok(())
}

/// Whether `name` is `<prefix><digits><suffix>`.
fn matches_prefix(name: &str, prefix: &str, suffix: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(suffix))
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes every namespace, host veth and table of pools with this prefix. Idempotent.
pub fn sweep(prefix: &str) -> Result<()> {
    let mut first_error = None;
    let mut note = |r: Result<()>| {
        if let Err(e) = r {
            tracing::warn!(error = %e, "cleanup step failed");
            first_error.get_or_insert(e);
        }
    };
    note(Table::inet(host_table_name(prefix)).delete());
    match RouteSocket::open().and_then(|mut s| {
        let links = s.links()?;
        for link in links
            .iter()
            .filter(|l| matches_prefix(&l.name, prefix, "-veth1"))
        {
            match s.delete_link(link.index) {
                Err(e) if !is_not_found(&e) => return Err(e),
                _ => tracing::debug!(link = %link.name, "removed host veth"),
            }
        }
        Ok(())
    }) {
        Ok(()) => {}
        Err(e) => note(Err(e)),
    }
    match netns::list() {
        Ok(names) => {
            for name in names.iter().filter(|n| matches_prefix(n, prefix, "")) {
                note(netns::delete(name));
                tracing::debug!(namespace = %name, "removed namespace");
            }
        }
        Err(e) => note(Err(e)),
    }
    match first_error {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

fn create_namespace(host: &mut RouteSocket, plan: &NatPlan, info: &NamespaceInfo) -> Result<()> {
    let ns = NetNs::create(&info.name)?;
    host.add_veth(&info.host_veth_name, &info.namespace_veth_name, ns.fd())?;
    let host_veth = host.link_index(&info.host_veth_name)?;
    host.add_address(host_veth, info.host_veth_external_ip.into(), 30)?;
    if let Some(v6) = &info.ipv6 {
        host.add_address(host_veth, v6.host_veth_external_ip.into(), 126)?;
    }
    host.set_up(host_veth, None)?;

    ns.sysctl("net/ipv4/ip_forward", "1")?;
    if info.ipv6.is_some() {
        ns.sysctl("net/ipv6/conf/all/forwarding", "1")?;
    }
    let mut sock = ns.route_socket()?;
    let lo = sock.link_index("lo")?;
    sock.set_up(lo, None)?;
    let veth = sock.link_index(&info.namespace_veth_name)?;
    sock.add_address(veth, info.host_veth_internal_ip.into(), 30)?;
    if let Some(v6) = &info.ipv6 {
        sock.add_address(veth, v6.host_veth_internal_ip.into(), 126)?;
    }
    sock.set_up(veth, None)?;

    match &plan.config.guest_link {
        GuestLink::Tap => ns.run(|| create_persistent_tap(&info.tap_name))?,
        GuestLink::VethIntoNamespace { prefix } => {
            let guest_ns = NetNs::open(&format!("{prefix}{}", info.index))?;
            sock.add_veth(&info.tap_name, GUEST_VETH_NAME, guest_ns.fd())?;
            configure_guest(&guest_ns, info)?;
        }
    }
    let tap = sock.link_index(&info.tap_name)?;
    sock.add_address(tap, info.gateway.into(), info.netmask)?;
    if let Some(v6) = &info.ipv6 {
        sock.add_address(tap, v6.gateway.into(), v6.prefix_len)?;
    }
    sock.set_up(tap, Some(info.tap_mac.0))?;

    sock.add_route(
        IpAddr::from([0, 0, 0, 0]),
        0,
        info.host_veth_external_ip.into(),
    )?;
    if let Some(v6) = &info.ipv6 {
        sock.add_route(IpAddr::from([0u16; 8]), 0, v6.host_veth_external_ip.into())?;
    }
    let chains = namespace_table(info, plan.config.allow_incoming_traffic);
    ns.run(|| Table::inet(NAMESPACE_TABLE).replace(&chains))?;

    host.add_route(
        info.namespace_veth_ip.into(),
        32,
        info.host_veth_internal_ip.into(),
    )?;
    if let Some(v6) = &info.ipv6 {
        host.add_route(
            v6.namespace_veth_ip.into(),
            128,
            v6.host_veth_internal_ip.into(),
        )?;
    }
    tracing::debug!(namespace = %info.name, "namespace ready");
    Ok(())
}

/// Configures the guest side of a [`GuestLink::VethIntoNamespace`] link as a guest would.
fn configure_guest(guest_ns: &NetNs, info: &NamespaceInfo) -> Result<()> {
    let mut g = guest_ns.route_socket()?;
    let lo = g.link_index("lo")?;
    g.set_up(lo, None)?;
    let eth = g.link_index(GUEST_VETH_NAME)?;
    g.add_address(eth, info.guest_ip.into(), info.netmask)?;
    if let Some(v6) = &info.ipv6 {
        g.add_address(eth, v6.guest_ip.into(), v6.prefix_len)?;
    }
    g.set_up(eth, Some(info.guest_mac.0))?;
    g.add_route(IpAddr::from([0, 0, 0, 0]), 0, info.gateway.into())?;
    if let Some(v6) = &info.ipv6 {
        g.add_route(IpAddr::from([0u16; 8]), 0, v6.gateway.into())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::matches_prefix;

    #[test]
    fn prefix_matching_is_exact() {
        assert!(matches_prefix("ark0", "ark", ""));
        assert!(matches_prefix("ark12-veth1", "ark", "-veth1"));
        assert!(!matches_prefix("ark", "ark", ""));
        assert!(!matches_prefix("arkham", "ark", ""));
        assert!(!matches_prefix("ark1-veth0", "ark", "-veth1"));
        assert!(!matches_prefix("xark1", "ark", ""));
    }
}
