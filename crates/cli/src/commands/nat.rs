//! `drafter-nat`: create the NAT namespace pool (`<prefix>0..N`, a tap and a veth pair each,
//! IPv4 + IPv6 NAT through the host interface), run until SIGINT/SIGTERM, then remove it all.
//! A restart after a crash first removes what the crashed run left behind.

use std::process::ExitCode;

use clap::Parser;
use drafter_network::service::{one_line, serve_nat, NatArgs};
use indicatif::{ProgressBar, ProgressStyle};

/// NAT for drafter VMs: one network namespace per VM, NATed to a host interface.
#[derive(Parser, Debug)]
#[command(name = "drafter-nat", version)]
pub struct Args {
    #[command(flatten)]
    nat: NatArgs,
}

fn parse_cli(argv: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Args, ExitCode> {
    Args::try_parse_from(argv).map_err(|e| {
        use clap::error::ErrorKind;
        if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        // One line naming the problem (clap adds usage hints on further lines).
        let text = e.to_string();
        eprintln!("{}", text.lines().next().unwrap_or("invalid arguments"));
        ExitCode::from(2)
    })
}

/// Runs `drafter-nat` on this process's command line.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs `drafter-nat` on `argv` (`argv[0]` names the command in usage
/// lines, e.g. `drafter nat` when run as a subcommand of `drafter`).
pub fn main_from(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match parse_cli(argv) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("creating namespaces");
    let result = serve_nat(
        cli.nat.config(),
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
        |pool| {
            bar.finish_and_clear();
            for ns in pool.namespaces() {
                tracing::debug!(
                    namespace = %ns.name,
                    tap = %ns.tap_name,
                    guest_ip = %ns.guest_ip,
                    incoming = %ns.host_veth_internal_ip,
                    "ready"
                );
            }
            tracing::info!(
                namespaces = pool.namespaces().len(),
                host_interface = pool.host_interface(),
                "NAT running; SIGINT/SIGTERM to stop"
            );
        },
    );
    bar.finish_and_clear();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drafter-nat: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}
