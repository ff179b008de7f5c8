//! The VM's own cgroup, `<hierarchy>/drafter/<vm-id>`: v2 (one hierarchy,
//! the `memory` and `cpu` controllers, `cpuset` when available) or v1 (the
//! `memory`, `cpu` and `cpuset` hierarchies). The supervisor creates it, the
//! VM process joins it before it is locked down, the supervisor writes the
//! limits once the VM's size is known and removes it when the VM is gone.

use std::path::{Path, PathBuf};

use crate::numa::{format_list, parse_list, Placement};
use crate::{cpu_limit, memory_limit, JailError};

/// The cgroup all jails' cgroups are made in, under each hierarchy's root.
pub(crate) const PARENT: &str = "drafter";
/// `cpu.max` / `cpu.cfs_period_us`, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// `--cgroup-version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// The legacy per-controller hierarchies.
    V1,
    /// The unified hierarchy.
    V2,
}

impl CgroupVersion {
    /// `1` or `2`.
    pub fn from_number(n: u32) -> Result<Self, JailError> {
        match n {
            1 => Ok(CgroupVersion::V1),
            2 => Ok(CgroupVersion::V2),
            _ => Err(JailError::Invalid(format!(
                "cgroup version {n} does not exist (1 or 2)"
            ))),
        }
    }
}

fn cg(msg: String) -> JailError {
    JailError::Cgroup(msg)
}

fn write(path: &Path, value: &str) -> Result<(), JailError> {
    std::fs::write(path, value)
        .map_err(|e| cg(format!("writing {value:?} to {}: {e}", path.display())))
}

fn read(path: &Path) -> Result<String, JailError> {
    std::fs::read_to_string(path).map_err(|e| cg(format!("reading {}: {e}", path.display())))
}

/// Undoes the kernel's octal escapes in mountinfo paths (`\040` for space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Cgroup mounts: (mount point, fstype, super options).
fn mounts() -> Result<Vec<(PathBuf, String, String)>, JailError> {
    let text = read(Path::new("/proc/self/mountinfo"))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = pre.split(' ').nth(4).unwrap_or_default();
        let mut post = post.split(' ');
        let fstype = post.next().unwrap_or_default();
        let _source = post.next();
        let opts = post.next().unwrap_or_default();
        if fstype == "cgroup" || fstype == "cgroup2" {
            out.push((
                PathBuf::from(unescape(mount_point)),
                fstype.to_owned(),
                opts.to_owned(),
            ));
        }
    }
    Ok(out)
}

/// The v1 hierarchy holding `controller`.
fn v1_mount(controller: &str) -> Result<PathBuf, JailError> {
    mounts()?
        .into_iter()
        .find(|(_, t, o)| t == "cgroup" && o.split(',').any(|x| x == controller))
        .map(|(m, ..)| m)
        .ok_or_else(|| {
            cg(format!(
                "no cgroup v1 hierarchy has the {controller} controller (is cgroup v1 mounted?)"
            ))
        })
}

fn v2_mount() -> Result<PathBuf, JailError> {
    mounts()?
        .into_iter()
        .find(|(_, t, _)| t == "cgroup2")
        .map(|(m, ..)| m)
        .ok_or_else(|| cg("no cgroup v2 hierarchy is mounted".into()))
}

/// The VM's cgroups: one directory per hierarchy joined.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Cgroups {
    /// v2 (else v1).
    pub v2: bool,
    /// Leaf directories (v2: one; v1: memory, cpu, cpuset).
    pub leaves: Vec<PathBuf>,
}

fn mkdir(dir: &Path) -> Result<bool, JailError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(cg(format!("creating {}: {e}", dir.display()))),
    }
}

impl Cgroups {
    /// Creates the VM's cgroups (limited to the CPUs and memory of
    /// `placement` where the cpuset controller is there).
    pub(crate) fn create(
        version: crate::CgroupVersion,
        vm_id: &str,
        placement: &Placement,
    ) -> Result<Cgroups, JailError> {
        let mut made = Cgroups {
            v2: version == CgroupVersion::V2,
            leaves: Vec::new(),
        };
        let result = match version {
            CgroupVersion::V2 => made.create_v2(vm_id, placement),
            CgroupVersion::V1 => made.create_v1(vm_id, placement),
        };
        if let Err(e) = result {
            made.remove();
            return Err(e);
        }
        Ok(made)
    }

    fn create_v2(&mut self, vm_id: &str, placement: &Placement) -> Result<(), JailError> {
        let root = v2_mount()?;
        let available = read(&root.join("cgroup.controllers"))?;
        let has = |c: &str| available.split_whitespace().any(|x| x == c);
        for needed in ["memory", "cpu"] {
            if !has(needed) {
                return Err(cg(format!(
                    "the cgroup v2 hierarchy at {} has no {needed} controller (available: {:?}; \
                     on a host whose controllers are bound to cgroup v1 use --cgroup-version 1)",
                    root.display(),
                    available.trim()
                )));
            }
        }
        let mut enable = vec!["+memory", "+cpu"];
        if has("cpuset") {
            enable.push("+cpuset");
        }
        let parent = root.join(PARENT);
        mkdir(&parent)?;
        for dir in [&root, &parent] {
            for c in &enable {
                write(&dir.join("cgroup.subtree_control"), c)?;
            }
        }
        let leaf = parent.join(vm_id);
        mkdir(&leaf)?;
        self.leaves.push(leaf.clone());
        if has("cpuset") {
            write(&leaf.join("cpuset.cpus"), &format_list(&placement.cpus))?;
            if placement.numa {
                write(&leaf.join("cpuset.mems"), &placement.node.to_string())?;
            }
        }
        Ok(())
    }

    fn create_v1(&mut self, vm_id: &str, placement: &Placement) -> Result<(), JailError> {
        for controller in ["memory", "cpu", "cpuset"] {
            let root = v1_mount(controller)?;
            let parent = root.join(PARENT);
            mkdir(&parent)?;
            let leaf = parent.join(vm_id);
            if controller == "cpuset" {
                // A v1 cpuset starts empty and takes no task until both are
                // set; the parent's must hold the child's.
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    if read(&parent.join(file))?.trim().is_empty() {
                        write(&parent.join(file), read(&root.join(file))?.trim())?;
                    }
                }
                mkdir(&leaf)?;
                self.leaves.push(leaf.clone());
                let parent_cpus =
                    parse_list(&read(&parent.join("cpuset.cpus"))?).unwrap_or_default();
                let cpus: Vec<usize> = placement
                    .cpus
                    .iter()
                    .copied()
                    .filter(|c| parent_cpus.contains(c))
                    .collect();
                if cpus.is_empty() {
                    return Err(cg(format!(
                        "{} allows none of NUMA node {}'s CPUs",
                        parent.display(),
                        placement.node
                    )));
                }
                write(&leaf.join("cpuset.cpus"), &format_list(&cpus))?;
                let mems = if placement.numa {
                    placement.node.to_string()
                } else {
                    read(&parent.join("cpuset.mems"))?.trim().to_owned()
                };
                write(&leaf.join("cpuset.mems"), &mems)?;
            } else {
                mkdir(&leaf)?;
                self.leaves.push(leaf);
            }
        }
        Ok(())
    }

    /// Moves process `pid` into every one of the VM's cgroups.
    pub(crate) fn join(&self, pid: u32) -> Result<(), JailError> {
        for leaf in &self.leaves {
            write(&leaf.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Writes the limits of a VM of `guest_bytes` RAM and `vcpus` vCPUs.
    pub(crate) fn limit(&self, guest_bytes: u64, vcpus: u32) -> Result<(), JailError> {
        let mem = memory_limit(guest_bytes);
        let quota = u64::from(cpu_limit(vcpus)) * CPU_PERIOD_US;
        for leaf in &self.leaves {
            if self.v2 {
                write(&leaf.join("memory.max"), &mem.to_string())?;
                write(&leaf.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            } else if leaf.join("memory.limit_in_bytes").exists() {
                write(&leaf.join("memory.limit_in_bytes"), &mem.to_string())?;
            } else if leaf.join("cpu.cfs_quota_us").exists() {
                write(&leaf.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(&leaf.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
        }
        Ok(())
    }

    /// Removes the VM's cgroups (they must hold no process any more).
    pub(crate) fn remove(&self) {
        for leaf in &self.leaves {
            remove_dir(leaf);
        }
    }
}

/// Removes an empty cgroup; a cgroup whose last task was just reaped may
/// report busy for a moment, so a few tries are made.
pub(crate) fn remove_dir(leaf: &Path) {
    for attempt in 0..100 {
        match std::fs::remove_dir(leaf) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 99 => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => {
                tracing::warn!("cannot remove cgroup {}: {e}", leaf.display());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\"), "/end\\");
    }

    #[test]
    fn versions_are_one_or_two() {
        assert!(CgroupVersion::from_number(1).is_ok());
        assert!(CgroupVersion::from_number(2).is_ok());
        let e = CgroupVersion::from_number(3)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("cgroup version 3"), "{e}");
    }
}
