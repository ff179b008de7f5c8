//! `drafter-forwarder`: see [`drafter_cli::commands::forwarder`].

fn main() -> std::process::ExitCode {
    drafter_cli::commands::forwarder::main()
}
