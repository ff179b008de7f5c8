//! `drafter-liveness`: signals the host that the guest is up by connecting
//! to its vsock port once.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use drafter_guest::{liveness, vsock, DEFAULT_LIVENESS_PORT};

/// Guest liveness signal: one vsock connection to the host (CID 2).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// VSock port of the liveness server on the host.
    #[arg(long, default_value_t = DEFAULT_LIVENESS_PORT)]
    vsock_port: u32,
    /// How long to keep retrying the connection.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    vsock_timeout: Duration,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let port = args.vsock_port;
    match liveness::signal(|| vsock::connect_host(port), args.vsock_timeout) {
        Ok(()) => {
            tracing::info!(port, "liveness signalled");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("drafter-liveness: cannot connect to host vsock port {port}: {e}");
            ExitCode::FAILURE
        }
    }
}
