//! `drafter-forwarder`: forward host ports to guests in NAT namespaces until SIGINT/SIGTERM,
//! then remove the forwarding rules.

use std::process::ExitCode;

use clap::Parser;
use drafter_network::service::{one_line, serve_forwarder, ForwarderArgs};

/// Port forwarding from the host to drafter VMs.
#[derive(Parser, Debug)]
#[command(name = "drafter-forwarder", version)]
pub struct Args {
    #[command(flatten)]
    forwarder: ForwarderArgs,
}

/// Runs `drafter-forwarder` on this process's command line.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs `drafter-forwarder` on `argv` (`argv[0]` names the command in usage
/// lines, e.g. `drafter forwarder` when run as a subcommand of `drafter`).
pub fn main_from(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Args::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.to_string();
            eprintln!("{}", text.lines().next().unwrap_or("invalid arguments"));
            return ExitCode::from(2);
        }
    };
    let result = cli.forwarder.config().and_then(|(config, forwards)| {
        serve_forwarder(config, forwards, |f| {
            tracing::info!(
                forwards = f.forwards().count(),
                table = f.table_name(),
                "forwarding; SIGINT/SIGTERM to stop"
            );
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drafter-forwarder: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}
