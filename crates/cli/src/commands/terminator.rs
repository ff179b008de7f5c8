//! `drafter-terminator`: connects to a `drafter-peer --laddr` that runs a
//! VM, takes the VM as the last hop of a migration and writes every device
//! into its `output` file: a package that `drafter-runner` resumes. The VM
//! stops on the peer only once every file is complete and on stable
//! storage; if anything fails before, it keeps running there.
//! With the `--tls-*` flags ([`crate::tls::TlsDialArgs`]) it connects over
//! TLS 1.3 with mutual certificate authentication, as `drafter-peer` does.
//!
//! Report: text on stderr, or with `--json` one JSON object on stdout
//! (bytes, times, each device's output and size). Exit status: 0 once the
//! package is written; 1 on any error (one line on stderr), with the VM
//! still on the peer unless the line says otherwise.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use drafter::devices::{TerminatorDevices, DEFAULT_TERMINATOR_DEVICES};
use drafter::terminator::{terminate_from, TerminatorError, TerminatorOptions, TerminatorReport};
use drafter_storage::{MigrationConfig, Secret};
use indicatif::{ProgressBar, ProgressStyle};

use crate::tls::{TlsArgsError, TlsDialArgs};

/// Back up a running VM from a peer into a package.
#[derive(Parser, Debug)]
#[command(name = "drafter-terminator", version)]
pub struct Args {
    /// Devices configuration: [{"name","output"}]; state and memory are
    /// required, and every drive of the peer's VM. A config the peer does
    /// not have is made from the VM's state
    #[arg(long, default_value = DEFAULT_TERMINATOR_DEVICES)]
    devices: String,
    /// Remote address to connect to
    #[arg(long, default_value = "localhost:1337")]
    raddr: String,
    /// Shared secret the peer expects (default: $DRAFTER_SECRET)
    #[arg(long)]
    secret: Option<String>,
    #[command(flatten)]
    tls: TlsDialArgs,
    /// Seconds without any sign of life from the peer after which the
    /// transfer fails and the VM keeps running there (0 waits forever)
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = seconds)]
    link_timeout: Duration,
    /// Print the report as one JSON object on stdout
    #[arg(long)]
    json: bool,
}

fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
    Duration::try_from_secs_f64(v).map_err(|e| format!("{s:?}: {e}"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn progress_bar(hidden: bool) -> ProgressBar {
    let bar = if hidden {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("receiving [{bar:30}] {pos}/{len} blocks ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn report(json: bool, r: &TerminatorReport) {
    if json {
        println!("{}", serde_json::to_value(r).unwrap_or_default());
        return;
    }
    let total: u64 = r.devices.iter().map(|d| d.bytes).sum();
    eprintln!(
        "drafter-terminator: wrote {} devices ({:.1} MiB, {:.1} MiB over the wire) in {:.0} ms (received in {:.0} ms, flushed in {:.0} ms); the VM stopped on the peer",
        r.devices.len(),
        mib(total),
        mib(r.bytes_received),
        r.total_ms,
        r.transfer_ms,
        r.sync_ms
    );
    for d in &r.devices {
        let note = if d.source == "received" {
            String::new()
        } else {
            format!(" ({})", d.source)
        };
        eprintln!(
            "  {:<10} {:>10.1} MiB  {}{note}",
            d.name,
            mib(d.bytes),
            d.output.display()
        );
    }
    if !r.dropped.is_empty() {
        eprintln!(
            "  not written (no output in --devices): {}",
            r.dropped.join(", ")
        );
    }
}

/// Why the terminator failed: bad flags, or the library's error.
enum Error {
    Tls(TlsArgsError),
    Terminator(TerminatorError),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Tls(e) => write!(f, "{e}"),
            Error::Terminator(e) => write!(f, "{e}"),
        }
    }
}

impl From<TerminatorError> for Error {
    fn from(e: TerminatorError) -> Self {
        Error::Terminator(e)
    }
}

fn run(a: Args) -> Result<(), Error> {
    let devices = TerminatorDevices::parse(&a.devices).map_err(TerminatorError::from)?;
    let tls = a.tls.load().map_err(Error::Tls)?;
    let secret = a
        .secret
        .clone()
        .unwrap_or_else(|| std::env::var("DRAFTER_SECRET").unwrap_or_default());
    let bar = progress_bar(a.json);
    let b = bar.clone();
    let result = terminate_from(
        &a.raddr,
        TerminatorOptions {
            devices,
            migration: MigrationConfig {
                secret: Secret::new(secret),
                link_timeout: a.link_timeout,
                ..MigrationConfig::default()
            },
            progress: Some(Arc::new(move |done, total| {
                b.set_length(total);
                b.set_position(done);
            })),
            tls,
        },
    );
    bar.finish_and_clear();
    report(a.json, &result?);
    Ok(())
}

/// Runs `drafter-terminator` on this process's command line.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs `drafter-terminator` on `argv` (`argv[0]` names the command in usage
/// lines, e.g. `drafter terminator` when run as a subcommand of `drafter`).
pub fn main_from(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    super::init_tracing("error");
    let args = Args::parse_from(argv);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drafter-terminator: {e}");
            ExitCode::from(1)
        }
    }
}
