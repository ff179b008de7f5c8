//! Every host-side command, as a library: each `drafter-<name>` binary is
//! `commands::<name>::main()`, and `drafter <name> ...` (the multi-call
//! binary, [`main`]) runs the very same code with the same flags, help,
//! output and exit codes.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

pub mod forwarder;
pub mod nat;
pub mod packager;
pub mod peer;
pub mod registry;
pub mod runner;
pub mod snapshotter;
pub mod terminator;
pub mod vmm;

/// Logs to stderr at `RUST_LOG`'s level, or at `default` when it is unset.
/// A listen address as the reference's users type it: Go's `:port` means
/// every interface.
fn listen_addr(laddr: &str) -> String {
    match laddr.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => laddr.to_owned(),
    }
}

fn init_tracing(default: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .init();
}

/// Parses `argv` into `A` and keeps the matches, which tell whether a flag
/// was given at all (the jailer flags); a bad command line exits as clap does.
fn parse_with_matches<A: CommandFactory + clap::FromArgMatches>(
    argv: impl IntoIterator<Item = OsString>,
) -> (A, clap::ArgMatches) {
    let matches = A::command().get_matches_from(argv);
    match A::from_arg_matches(&matches) {
        Ok(a) => (a, matches),
        Err(e) => e.exit(),
    }
}

/// Jails this process when jailer flags were given (`jail` builds the
/// jail). `Some` is the exit code to end with: the supervisor's, once its
/// VM process ended, or 1 when the jail could not be made (one line naming
/// `command`). `None`: run the command here (unjailed, or as the jailed VM
/// process).
fn enter_jail_if_requested<E: std::fmt::Display>(
    command: &str,
    matches: &clap::ArgMatches,
    jail: impl FnOnce() -> Result<Option<drafter_jail::Supervisor>, E>,
) -> Option<ExitCode> {
    if !crate::JailArgs::requested(matches) {
        return None;
    }
    match jail() {
        Err(e) => {
            eprintln!("{command}: {e}");
            Some(ExitCode::from(1))
        }
        Ok(Some(supervisor)) => Some(ExitCode::from(supervisor.run().clamp(0, 255) as u8)),
        Ok(None) => None,
    }
}

/// What `drafter --help` adds below the list of commands.
const AFTER_HELP: &str = "\
Every command is also a binary of its own: `drafter peer ...` is \
`drafter-peer ...` (same flags, output and exit codes). The guest-side \
drafter-agent and drafter-liveness run inside the VM and are not here.";

/// Drafter: build, snapshot, package, run, serve and live-migrate microVMs.
#[derive(Parser)]
#[command(name = "drafter", version, after_help = AFTER_HELP)]
pub struct Drafter {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands of `drafter`, one per `drafter-<name>` binary.
#[derive(Subcommand)]
enum Command {
    /// Build VM blueprints: the guest OS and OCI images as ext4 disks (drafter-blueprint).
    Blueprint(drafter_blueprint::cli::Args),
    /// NAT network namespaces for VMs (drafter-nat).
    Nat(nat::Args),
    /// Forward host ports to guests in NAT namespaces (drafter-forwarder).
    Forwarder(forwarder::Args),
    /// Create a VM package from a blueprint (drafter-snapshotter).
    Snapshotter(snapshotter::Args),
    /// Archive a package's devices, or extract them (drafter-packager).
    Packager(packager::Args),
    /// Resume a package in place; suspend it back on SIGINT (drafter-runner).
    Runner(runner::Args),
    /// Serve a package to peers (drafter-registry).
    Registry(registry::Args),
    /// Run a VM and live-migrate it between peers (drafter-peer).
    Peer(peer::Args),
    /// Back up a running peer's VM into a package (drafter-terminator).
    Terminator(terminator::Args),
    /// Run one microVM with a control socket (drafter-vmm).
    Vmm(vmm::Args),
}

/// The entry point of subcommand `name`: its binary's `main_from`.
pub fn entry(name: &str) -> Option<fn(Vec<OsString>) -> ExitCode> {
    let f: fn(Vec<OsString>) -> ExitCode = match name {
        "blueprint" => drafter_blueprint::cli::main_from,
        "nat" => nat::main_from,
        "forwarder" => forwarder::main_from,
        "snapshotter" => snapshotter::main_from,
        "packager" => packager::main_from,
        "runner" => runner::main_from,
        "registry" => registry::main_from,
        "peer" => peer::main_from,
        "terminator" => terminator::main_from,
        "vmm" => vmm::main_from,
        _ => return None,
    };
    Some(f)
}

/// Runs `drafter` on this process's command line: `drafter <name> ARGS`
/// runs `drafter-<name> ARGS` in this process (its usage lines say
/// `drafter <name>`); `--help`, `--version`, no or an unknown subcommand
/// are answered by clap (a usage error exits with status 2).
pub fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    // The subcommand is the first argument; everything after it is its own.
    // Handing it the rest unparsed keeps its own error handling (some
    // commands print one line, others clap's usage) exactly as it is.
    if let Some(name) = argv.get(1).and_then(|a| a.to_str()) {
        if let Some(run) = entry(name) {
            let mut sub = vec![OsString::from(format!("drafter {name}"))];
            sub.extend(argv.into_iter().skip(2));
            return run(sub);
        }
    }
    let matches = Drafter::command().get_matches_from(&argv);
    // Only reached if clap found a subcommand somewhere other than first.
    match matches.subcommand_name() {
        Some(name) => {
            eprintln!("drafter: give the subcommand first: drafter {name} ...");
            ExitCode::from(2)
        }
        None => ExitCode::from(2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subcommand_has_an_entry_point() {
        let cmd = Drafter::command();
        let names: Vec<&str> = cmd.get_subcommands().map(|s| s.get_name()).collect();
        assert_eq!(names.len(), 10, "{names:?}");
        for n in names {
            assert!(entry(n).is_some(), "no entry point for {n}");
        }
        assert!(entry("agent").is_none());
        cmd.debug_assert();
    }
}
