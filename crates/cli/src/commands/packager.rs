//! `drafter-packager`: archives a VM's devices (state, memory, kernel, disk,
//! config, oci, …) into one package — tar + multithreaded zstd whose first
//! entry is a manifest of every device's size and blake3 — or, with
//! `--extract`, verifies and writes any subset of them back.
//!
//! Flags follow the Go Drafter's packager (`--package-path`, `--devices`,
//! `--extract`), plus `--force` (extract over existing files) and `--json`
//! (one JSON report on stdout, no progress bars). Progress bars go to
//! stderr when it is a terminal. Exit status: 0 on success, 1 on any error
//! (one line on stderr); nothing on disk is changed by a failed run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{ArgAction, Parser};
use drafter_package::{
    archive, extract, parse_device_specs, DeviceEntry, PackageError, Progress, DEFAULT_DEVICES_JSON,
};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

/// Package a VM's devices into one archive, or extract them from one.
#[derive(Parser, Debug)]
#[command(name = "drafter-packager", version)]
pub struct Args {
    /// Path to package file.
    #[arg(long, default_value = "out/app.tar.zst")]
    package_path: PathBuf,
    /// Devices configuration: a JSON array of {"name","path"}.
    #[arg(long, default_value = DEFAULT_DEVICES_JSON)]
    devices: String,
    /// Whether to extract (instead of archive).
    #[arg(
        long,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value_t = false,
        action = ArgAction::Set
    )]
    extract: bool,
    /// With --extract: replace output files that already exist.
    #[arg(long)]
    force: bool,
    /// Print one JSON report on stdout (and no progress bars).
    #[arg(long)]
    json: bool,
}

/// What one run did, for the summary or the JSON report.
struct Outcome {
    operation: &'static str,
    devices: Vec<(DeviceEntry, PathBuf)>,
    bytes: u64,
    compressed_bytes: u64,
    seconds: f64,
}

fn progress_bar(hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

fn run(a: &Args) -> Result<Outcome, PackageError> {
    let specs = parse_device_specs(&a.devices)?;
    let bar = progress_bar(a.json);
    let b = bar.clone();
    let mut on_progress = move |p: Progress| {
        b.set_message(p.phase.to_string());
        b.set_length(p.total);
        b.set_position(p.done);
    };
    let start = Instant::now();
    let paths = |entries: Vec<DeviceEntry>| -> Vec<(DeviceEntry, PathBuf)> {
        entries
            .into_iter()
            .map(|e| {
                let path = specs
                    .iter()
                    .find(|(n, _)| *n == e.name)
                    .map(|(_, p)| p.clone())
                    .unwrap_or_default();
                (e, path)
            })
            .collect()
    };
    let in_use = |path: &PathBuf, e: drafter::in_use::InUseError| PackageError::Input {
        name: drafter::devices::STATE.into(),
        path: path.clone(),
        source: std::io::Error::other(e.to_string()),
    };
    let state = specs
        .iter()
        .find(|(n, _)| n == drafter::devices::STATE)
        .map(|(_, p)| p.clone());
    let outcome = if a.extract {
        // A runner running the package being replaced would write it too.
        if let Some(p) = &state {
            drafter::in_use::InUse::ensure_not_running(p).map_err(|e| in_use(p, e))?;
        }
        let r = extract(&a.package_path, &specs, a.force, &mut on_progress);
        bar.finish_and_clear();
        let r = r?;
        // A state extracted with its memory and disks: a mark left by a run
        // of the old package no longer applies.
        if let Some(p) = state
            .as_ref()
            .filter(|_| r.devices.iter().any(|d| d.name == drafter::devices::STATE))
        {
            drafter::in_use::InUse::clear_stale(p).map_err(|e| in_use(p, e))?;
        }
        Outcome {
            operation: "extract",
            devices: paths(r.devices),
            bytes: r.bytes,
            compressed_bytes: r.compressed_bytes,
            seconds: start.elapsed().as_secs_f64(),
        }
    } else {
        // A package a runner runs, or whose last run ended without a
        // suspend, has memory and disks out of step with its state.
        if let Some(p) = &state {
            drafter::in_use::InUse::check(p).map_err(|e| in_use(p, e))?;
        }
        let r = archive(&a.package_path, &specs, &mut on_progress);
        bar.finish_and_clear();
        let r = r?;
        Outcome {
            operation: "archive",
            devices: paths(r.manifest.devices),
            bytes: r.bytes,
            compressed_bytes: r.compressed_bytes,
            seconds: start.elapsed().as_secs_f64(),
        }
    };
    Ok(outcome)
}

fn ratio(o: &Outcome) -> f64 {
    if o.compressed_bytes == 0 {
        0.0
    } else {
        o.bytes as f64 / o.compressed_bytes as f64
    }
}

fn throughput_mbps(o: &Outcome) -> f64 {
    if o.seconds > 0.0 {
        o.bytes as f64 / 1e6 / o.seconds
    } else {
        0.0
    }
}

fn json_report(a: &Args, o: &Outcome) -> serde_json::Value {
    let devices: Vec<serde_json::Value> = o
        .devices
        .iter()
        .map(|(e, p)| {
            serde_json::json!({
                "name": e.name,
                "path": p,
                "size": e.size,
                "blake3": e.blake3,
            })
        })
        .collect();
    serde_json::json!({
        "operation": o.operation,
        "packagePath": a.package_path,
        "devices": devices,
        "bytes": o.bytes,
        "compressedBytes": o.compressed_bytes,
        "ratio": ratio(o),
        "seconds": o.seconds,
        "throughputMBps": throughput_mbps(o),
    })
}

fn summary(a: &Args, o: &Outcome) -> String {
    let (verb, prep) = if o.operation == "extract" {
        ("extracted", "from")
    } else {
        ("archived", "into")
    };
    let mut s = format!(
        "{verb} {} device(s), {}, {prep} {} ({}, ratio {:.1}x) in {:.2} s ({:.0} MB/s)\n",
        o.devices.len(),
        HumanBytes(o.bytes),
        a.package_path.display(),
        HumanBytes(o.compressed_bytes),
        ratio(o),
        o.seconds,
        throughput_mbps(o),
    );
    for (e, p) in &o.devices {
        s.push_str(&format!(
            "  {:<10} {:>12}  blake3 {}…  {}\n",
            e.name,
            HumanBytes(e.size).to_string(),
            e.blake3.get(..16).unwrap_or_default(),
            p.display()
        ));
    }
    s
}

/// Runs `drafter-packager` on this process's command line.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs `drafter-packager` on `argv` (`argv[0]` names the command in usage
/// lines, e.g. `drafter packager` when run as a subcommand of `drafter`).
pub fn main_from(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    super::init_tracing("error,drafter_packager=warn");
    let args = Args::parse_from(argv);
    match run(&args) {
        Ok(o) if args.json => {
            println!("{}", json_report(&args, &o));
            ExitCode::SUCCESS
        }
        Ok(o) => {
            print!("{}", summary(&args, &o));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("drafter-packager: {e}");
            ExitCode::from(1)
        }
    }
}
