//! Crash safety of `drafter-nat`: `kill -9` then a restart comes up without duplicated rules
//! or leaked namespaces/links, and a clean stop leaves `nft list ruleset`, the namespaces and
//! the links exactly as they were before the start.
//!
//! This binary holds a single scenario so nothing else in the process changes host state
//! while it compares before/after snapshots.

mod common;

use common::{inspect, link_names, unique, Remote, ServiceChild};
use drafter_network::nat::host_table_name;
use drafter_network::netns;

/// Not a test: the entry point when this binary is re-run as a service child process.
#[test]
fn child_process_entry_point() {
    common::child_main();
}

fn nat_args(prefix: &str, uplink: &str) -> Vec<String> {
    [
        "--host-interface",
        uplink,
        "--namespace-prefix",
        prefix,
        "--namespace-count",
        "3",
        "--host-veth-cidr",
        "10.200.9.0/28",
        "--namespace-veth-cidr",
        "10.202.9.0/29",
        "--blocked-subnet-cidr",
        "10.202.9.0/29",
        "--host-veth-cidr-ipv6",
        "fd00:d4af:9:8::/120",
        "--namespace-veth-cidr-ipv6",
        "fd00:d4af:9:15::/120",
        "--blocked-subnet-cidr-ipv6",
        "fd00:d4af:9:15::/120",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn ours(prefix: &str) -> (Vec<String>, Vec<String>) {
    let namespaces = netns::list()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect();
    let links = link_names()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect();
    (namespaces, links)
}

#[test]
fn kill_9_restart_and_clean_stop_leave_no_trace() {
    let p = unique('k');
    let remote = Remote::new(&p, 9);
    let prefix = format!("{p}n");
    let args = nat_args(&prefix, &remote.uplink);
    let table = format!("inet {}", host_table_name(&prefix));

    let ruleset_before = inspect("nft", &["list", "ruleset"]);
    let netns_before = inspect("ip", &["netns", "list"]);
    let links_before = link_names();

    let mut first = ServiceChild::start("child_process_entry_point", "nat", &args, None);
    assert_eq!(first.wait_ready(), "READY 3");
    let table_first = inspect("nft", &["list", "table", "inet", &host_table_name(&prefix)]);
    let expected_ns: Vec<String> = (0..3).map(|i| format!("{prefix}{i}")).collect();
    let expected_links: Vec<String> = (0..3).map(|i| format!("{prefix}{i}-veth1")).collect();
    assert_eq!(ours(&prefix), (expected_ns.clone(), expected_links.clone()));

    first.kill9();
    // The crash left everything behind...
    assert_eq!(ours(&prefix), (expected_ns.clone(), expected_links.clone()));
    assert!(inspect("nft", &["list", "tables"]).contains(&table));

    // ...and a restart with the same prefix cleans it up and comes up identically.
    let mut second = ServiceChild::start("child_process_entry_point", "nat", &args, None);
    assert_eq!(second.wait_ready(), "READY 3");
    assert_eq!(ours(&prefix), (expected_ns, expected_links));
    let table_second = inspect("nft", &["list", "table", "inet", &host_table_name(&prefix)]);
    assert_eq!(
        table_first, table_second,
        "restart must not duplicate rules"
    );
    assert_eq!(
        inspect("nft", &["list", "tables"]).matches(&table).count(),
        1
    );
    // Each namespace has exactly one drafter table with its rules once.
    let in_ns = inspect(
        "ip",
        &[
            "netns",
            "exec",
            &format!("{prefix}0"),
            "nft",
            "list",
            "ruleset",
        ],
    );
    assert_eq!(in_ns.matches("snat ip to").count(), 1, "{in_ns}");

    assert!(
        second.terminate(),
        "drafter-nat must exit cleanly on SIGTERM"
    );
    assert_eq!(inspect("nft", &["list", "ruleset"]), ruleset_before);
    assert_eq!(inspect("ip", &["netns", "list"]), netns_before);
    assert_eq!(link_names(), links_before);
}
