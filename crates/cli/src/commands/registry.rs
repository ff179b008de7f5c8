//! `drafter-registry`: serves a VM package (what `drafter-snapshotter` or
//! `drafter-runner` left) to any number of `drafter-peer --raddr` at once,
//! each in pure post-copy: the peer may resume the VM at once, every block
//! is pushed in the background, and the blocks it asks for come first.
//! With the `--tls-*` flags ([`crate::tls::TlsArgs`]) every client must
//! connect over TLS 1.3 with a certificate of the CA; one that does not is
//! a failed pull of its own, and the registry serves on.
//!
//! Reports: a line on stderr when it listens and for each peer served (or
//! failed), or with `--json` one JSON object per line on stdout:
//! `{"event":"listening",…}`, `{"event":"served",…}`, `{"event":"failed",…}`.
//! Runs until killed. Exit status 1 (one line on stderr) if the package
//! cannot be served or the address cannot be listened on.

use std::net::TcpListener;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use drafter::devices::{RegistryDevices, DEFAULT_REGISTRY_DEVICES};
use drafter::registry::{Registry, RegistryError, RegistryOptions, DEFAULT_CONCURRENCY};
use drafter_storage::{MigrationConfig, Secret, TlsError};

use crate::tls::TlsArgs;

/// Serve a VM package to peers over the network.
#[derive(Parser, Debug)]
#[command(name = "drafter-registry", version)]
pub struct Args {
    /// Devices configuration: [{"name","input","blockSize"}]; state and
    /// memory are required, and every drive the package's state names
    #[arg(long, default_value = DEFAULT_REGISTRY_DEVICES)]
    devices: String,
    /// Address to listen on
    #[arg(long, default_value = ":1600")]
    laddr: String,
    /// Amount of concurrent workers to use in migrations: how many peers are
    /// served at once (the next wait until one finishes)
    #[arg(long, default_value_t = DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Shared secret peers must present (default: $DRAFTER_SECRET)
    #[arg(long)]
    secret: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Seconds without any sign of life from a peer after which its pull
    /// fails (0 waits forever)
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = seconds)]
    link_timeout: Duration,
    /// zstd-compress block data (less traffic, more CPU)
    #[arg(long)]
    compress: bool,
    /// Print each report as one JSON object per line on stdout
    #[arg(long)]
    json: bool,
}

fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
    Duration::try_from_secs_f64(v).map_err(|e| format!("{s:?}: {e}"))
}

/// Why the registry stopped or could not start.
enum Error {
    Registry(RegistryError),
    Listen(String, std::io::Error),
    Tls(TlsError),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Registry(e) => write!(f, "{e}"),
            Error::Listen(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            Error::Tls(e) => write!(f, "{e}"),
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn emit(json: bool, event: &str, fields: serde_json::Value, human: String) {
    if json {
        let mut v = serde_json::json!({ "event": event });
        if let (Some(o), serde_json::Value::Object(f)) = (v.as_object_mut(), fields) {
            o.extend(f);
        }
        println!("{v}");
    } else {
        eprintln!("drafter-registry: {human}");
    }
}

fn run(a: Args) -> Result<(), Error> {
    let devices = RegistryDevices::parse(&a.devices).map_err(|e| Error::Registry(e.into()))?;
    let secret = a
        .secret
        .clone()
        .unwrap_or_else(|| std::env::var("DRAFTER_SECRET").unwrap_or_default());
    let no_secret = secret.is_empty();
    let tls = a.tls.load().map_err(Error::Tls)?;
    let registry = Registry::open(RegistryOptions {
        devices,
        migration: MigrationConfig {
            secret: Secret::new(secret),
            link_timeout: a.link_timeout,
            compression: a.compress,
            ..MigrationConfig::default()
        },
        concurrency: a.concurrency,
        tls,
    })
    .map_err(Error::Registry)?;
    let addr = super::listen_addr(&a.laddr);
    let listener = TcpListener::bind(&addr).map_err(|e| Error::Listen(a.laddr.clone(), e))?;
    if no_secret {
        tracing::warn!(
            "no secret given (--secret or DRAFTER_SECRET): any peer can pull the package"
        );
    }
    let bound = listener.local_addr().map(|a| a.to_string()).unwrap_or(addr);
    let served = registry.devices();
    let total: u64 = served.iter().map(|d| d.size).sum();
    emit(
        a.json,
        "listening",
        serde_json::json!({ "addr": bound, "devices": served }),
        format!(
            "serving {} devices ({}; {:.1} MiB) on {bound}",
            served.len(),
            served
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            mib(total)
        ),
    );
    let json = a.json;
    registry
        .serve(&listener, &move |outcome| match outcome {
            Ok(r) => emit(
                json,
                "served",
                serde_json::to_value(&r).unwrap_or_default(),
                format!(
                    "served {}: {:.1} MiB in {:.0} ms ({} blocks on demand)",
                    r.peer,
                    mib(r.bytes_sent),
                    r.total_ms,
                    r.on_demand_blocks
                ),
            ),
            Err((peer, e)) => emit(
                json,
                "failed",
                serde_json::json!({ "peer": peer, "error": e.to_string() }),
                format!("{peer} failed: {e}"),
            ),
        })
        .map_err(Error::Registry)
}

/// Runs `drafter-registry` on this process's command line.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs `drafter-registry` on `argv` (`argv[0]` names the command in usage
/// lines, e.g. `drafter registry` when run as a subcommand of `drafter`).
pub fn main_from(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    super::init_tracing("error,drafter_registry=warn");
    let args = Args::parse_from(argv);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drafter-registry: {e}");
            ExitCode::from(1)
        }
    }
}
