//! nftables over netlink, inside a private namespace: replacing a table is atomic (a refused
//! batch leaves the previous table untouched), re-applying does not duplicate rules, and
//! delete is idempotent.

mod common;

use std::process::Command;

use common::unique;
use drafter_network::netns::{self, NetNs};
use drafter_network::nft::{self, Action, Chain, Family, Hook, Match, Rule, Table};

fn ruleset(ns: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "ruleset"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Private(NetNs);

impl Drop for Private {
    fn drop(&mut self) {
        let _ = netns::delete(self.0.name());
    }
}

#[test]
fn table_replacement_is_atomic_and_idempotent() {
    let ns = Private(NetNs::create(&format!("{}x", unique('n'))).unwrap());
    let name = ns.0.name().to_string();
    let table = Table::inet("drafter_test");
    let good = vec![Chain::new(
        Hook::Forward,
        vec![Rule::new(
            Family::V4,
            vec![
                Match::Iif("eth9".into()),
                Match::Daddr("10.9.0.0/16".parse().unwrap()),
            ],
            Action::Drop,
        )],
    )];
    ns.0.run(|| table.replace(&good)).unwrap();
    ns.0.run(|| table.replace(&good)).unwrap();
    let first = ruleset(&name);
    assert_eq!(
        first
            .matches("iifname \"eth9\" ip daddr 10.9.0.0/16 drop")
            .count(),
        1,
        "{first}"
    );

    // NAT in a filter chain is refused by the kernel: nothing of the batch may apply.
    let bad = vec![
        Chain::new(Hook::Postrouting, vec![]),
        Chain::new(
            Hook::Forward,
            vec![Rule::new(
                Family::V4,
                vec![],
                Action::Dnat("10.9.0.1".parse().unwrap(), Some(80)),
            )],
        ),
    ];
    let err = ns.0.run(|| table.replace(&bad)).unwrap_err().to_string();
    assert!(err.contains("add rule") && !err.contains('\n'), "{err}");
    assert_eq!(
        ruleset(&name),
        first,
        "a refused batch must leave the table as it was"
    );

    assert!(ns.0.run(nft::list_tables).unwrap().contains(&table));
    ns.0.run(|| table.delete()).unwrap();
    ns.0.run(|| table.delete()).unwrap();
    assert!(ns.0.run(nft::list_tables).unwrap().is_empty());
    assert_eq!(ruleset(&name).trim(), "");
}

#[test]
fn large_tables_apply_in_one_batch() {
    let ns = Private(NetNs::create(&format!("{}y", unique('n'))).unwrap());
    let name = ns.0.name().to_string();
    // 2000 rules: far more acknowledgements than a default socket buffer holds.
    let rules: Vec<Rule> = (0..2000u16)
        .map(|i| {
            Rule::new(
                Family::V4,
                vec![
                    Match::Iif(format!("x{i}")),
                    Match::Saddr("10.9.0.0/16".parse().unwrap()),
                ],
                Action::Drop,
            )
        })
        .collect();
    let table = Table::inet("drafter_big");
    ns.0.run(|| table.replace(&[Chain::new(Hook::Forward, rules.clone())]))
        .unwrap();
    let listed = ruleset(&name);
    assert_eq!(listed.matches(" drop").count(), 2000);
    assert!(listed.contains("iifname \"x1999\" ip saddr 10.9.0.0/16 drop"));
}
