//! `--numa-node`: the CPUs and memory of one node, from
//! `/sys/devices/system/node`, applied with `sched_setaffinity` and
//! `set_mempolicy(MPOL_BIND)`.

use std::path::Path;

use crate::{io_err, sys_err, JailError};

const NODE_DIR: &str = "/sys/devices/system/node";
/// `MPOL_BIND` from `<linux/mempolicy.h>`.
const MPOL_BIND: libc::c_int = 2;
/// Nodes the memory policy mask can name.
const MAX_NODES: usize = 1024;

/// Where a VM process runs: CPUs and (when the host has NUMA) one node.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    /// The node.
    pub node: u32,
    /// Its CPUs, those this process may use.
    pub cpus: Vec<usize>,
    /// Whether the host describes its nodes (else node 0 is the machine and
    /// no memory policy is set).
    pub numa: bool,
}

/// Parses a kernel CPU/node list (`0-3,8,10-11`).
pub(crate) fn parse_list(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                if b < a {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// Formats a CPU/node list for cgroup files (`0,1,2`).
pub(crate) fn format_list(v: &[usize]) -> String {
    v.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn read_list(path: &Path) -> Result<Vec<usize>, JailError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path.display().to_string()))?;
    parse_list(&text)
        .ok_or_else(|| JailError::Invalid(format!("{}: not a CPU list: {text:?}", path.display())))
}

impl Placement {
    /// The CPUs of `node` this process may run on.
    pub(crate) fn of_node(node: u32) -> Result<Placement, JailError> {
        let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
            .map_err(sys_err("sched_getaffinity"))?;
        let allowed: Vec<usize> = (0..nix::sched::CpuSet::count())
            .filter(|&c| allowed.is_set(c).unwrap_or(false))
            .collect();
        let dir = Path::new(NODE_DIR);
        let (cpus, numa) = if dir.is_dir() {
            let node_dir = dir.join(format!("node{node}"));
            if !node_dir.is_dir() {
                let nodes = read_list(&dir.join("online"))
                    .map(|n| format_list(&n))
                    .unwrap_or_default();
                return Err(JailError::Invalid(format!(
                    "NUMA node {node} does not exist (this host has node(s) {nodes})"
                )));
            }
            (read_list(&node_dir.join("cpulist"))?, true)
        } else if node == 0 {
            (allowed.clone(), false)
        } else {
            return Err(JailError::Invalid(format!(
                "NUMA node {node} does not exist (this host has no NUMA nodes but 0)"
            )));
        };
        let cpus: Vec<usize> = cpus.into_iter().filter(|c| allowed.contains(c)).collect();
        if cpus.is_empty() {
            return Err(JailError::Invalid(format!(
                "NUMA node {node} has no CPU this process may use"
            )));
        }
        Ok(Placement { node, cpus, numa })
    }

    /// Pins the calling thread (and the threads it starts later) to the
    /// node's CPUs and its memory.
    pub(crate) fn apply(&self) -> Result<(), JailError> {
        let mut set = nix::sched::CpuSet::new();
        for &c in &self.cpus {
            set.set(c).map_err(sys_err(format!("CPU {c}")))?;
        }
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
            .map_err(sys_err("sched_setaffinity"))?;
        if !self.numa {
            return Ok(());
        }
        let node = self.node as usize;
        if node >= MAX_NODES {
            return Err(JailError::Invalid(format!("NUMA node {node} is too large")));
        }
        let bits = libc::c_ulong::BITS as usize;
        let mut mask = [0 as libc::c_ulong; MAX_NODES / 64];
        mask[node / bits] |= 1 << (node % bits);
        // SAFETY: set_mempolicy reads `maxnode - 1` bits from `mask`, which
        // holds MAX_NODES bits and lives for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_set_mempolicy,
                MPOL_BIND,
                mask.as_ptr(),
                (MAX_NODES + 1) as libc::c_ulong,
            )
        };
        if r < 0 {
            return Err(JailError::Sys {
                what: format!("set_mempolicy(MPOL_BIND, node {node})"),
                source: nix::errno::Errno::last(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(
            parse_list("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_list(""), Some(vec![]));
        assert_eq!(parse_list("3-1"), None);
        assert_eq!(parse_list("x"), None);
        assert_eq!(format_list(&[0, 1, 5]), "0,1,5");
    }

    #[test]
    fn a_missing_node_is_refused_in_one_line() {
        let e = Placement::of_node(4095)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("NUMA node 4095 does not exist"), "{e}");
        let here = Placement::of_node(0).unwrap_or_else(|e| panic!("{e}"));
        assert!(!here.cpus.is_empty());
    }
}
