//! nftables transactions: a ruleset text is handed to `nft -f -` (libnftables), which
//! commits it as one atomic netlink batch — either all of it applies or nothing does.
//!
//! The commands run in the calling thread's network namespace (the child inherits it), so
//! call them through [`crate::netns::NetNs::run`] to act inside a namespace.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::error::{NetworkError, Result};

/// A table owned by drafter, replaced or deleted as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Family (`inet`, `ip`, `ip6`).
    pub family: &'static str,
    /// Table name.
    pub name: String,
}

impl Table {
    /// An `inet` (IPv4 + IPv6) table.
    pub fn inet(name: impl Into<String>) -> Self {
        Self {
            family: "inet",
            name: name.into(),
        }
    }

    /// Atomically replaces the table with `body` (chains and rules, nft syntax).
    ///
    /// The batch declares the table (a no-op if it exists), deletes it and recreates it,
    /// so re-applying never duplicates rules and a failure leaves the previous table intact.
    pub fn replace(&self, body: &str) -> Result<()> {
        let script = format!(
            "table {f} {n}\ndelete table {f} {n}\ntable {f} {n} {{\n{body}}}\n",
            f = self.family,
            n = self.name
        );
        apply(&script)
    }

    /// Deletes the table if it exists (atomically, no error if it is absent).
    pub fn delete(&self) -> Result<()> {
        apply(&format!(
            "table {f} {n}\ndelete table {f} {n}\n",
            f = self.family,
            n = self.name
        ))
    }
}

/// Runs one `nft -f -` transaction.
pub fn apply(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetworkError::Nftables(format!("cannot run nft: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| NetworkError::Nftables(format!("writing to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NetworkError::Nftables(format!("waiting for nft: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr
        .lines()
        .find(|l| l.contains("Error"))
        .or_else(|| stderr.lines().next())
        .unwrap_or("no diagnostics");
    tracing::debug!(script, "nft transaction failed");
    Err(NetworkError::Nftables(format!(
        "transaction refused ({}): {}",
        out.status,
        first.trim()
    )))
}

/// Lists the tables of the calling thread's namespace.
pub fn list_tables() -> Result<Vec<Table>> {
    let out = Command::new("nft")
        .args(["list", "tables"])
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| NetworkError::Nftables(format!("cannot run nft: {e}")))?;
    if !out.status.success() {
        return Err(NetworkError::Nftables(format!(
            "list tables: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("table")).then_some(())?;
            let family = match words.next()? {
                "inet" => "inet",
                "ip" => "ip",
                "ip6" => "ip6",
                "arp" => "arp",
                "bridge" => "bridge",
                "netdev" => "netdev",
                _ => return None,
            };
            Some(Table {
                family,
                name: words.next()?.to_string(),
            })
        })
        .collect())
}

/// Quotes an interface name for nft (names were validated to be plain ASCII).
pub fn quote(name: &str) -> String {
    format!("\"{name}\"")
}
