//! The QEMU baseline: how long `qemu-system-x86_64 -enable-kvm -M microvm`
//! takes, inside the lab, from process start to the guest's initramfs marker.
//! Our VMM's boot benchmark is measured against this figure in the same run.

use crate::guest;
use crate::lab::{self, LabOptions};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Builds what the baseline needs and runs it in the lab.
pub fn qemu_baseline(opts: &LabOptions, runs: u32) -> Result<i32> {
    let dir = guest::ensure()?;
    let exe = std::env::current_exe()?;
    let cmd = vec![
        exe.to_string_lossy().into_owned(),
        "qemu-baseline-inner".into(),
        "--kernel".into(),
        dir.join("vmlinuz").to_string_lossy().into_owned(),
        "--initrd".into(),
        dir.join(guest::MARKER_INITRAMFS)
            .to_string_lossy()
            .into_owned(),
        "--runs".into(),
        runs.to_string(),
    ];
    lab::run(opts, &cmd)
}

/// Time from spawning QEMU to the marker line on its serial console.
fn one_boot(kernel: &Path, initrd: &Path) -> Result<Duration> {
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm", "-enable-kvm", "-cpu", "host", "-m", "256"])
        .args([
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .args(["-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1 reboot=t"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let mut found = None;
    for line in BufReader::new(stdout).lines() {
        if line?.contains(guest::BOOT_MARKER) {
            found = Some(start.elapsed());
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    found.context("qemu exited without printing the boot marker")
}

/// The lab side: boots `runs` times and prints each time and the median.
pub fn inner(kernel: &Path, initrd: &Path, runs: u32) -> Result<i32> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut times = Vec::new();
    for i in 0..runs {
        let t = one_boot(kernel, initrd)?;
        println!(
            "qemu-microvm boot {}: {:.1} ms",
            i + 1,
            t.as_secs_f64() * 1e3
        );
        times.push(t);
    }
    times.sort();
    println!(
        "qemu-microvm boot-to-marker median: {:.1} ms over {runs} runs (min {:.1}, max {:.1})",
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
    );
    Ok(0)
}
