//! `drafter`: every host-side command as a subcommand (`drafter peer ...`
//! is `drafter-peer ...`); see [`drafter_cli::commands`].

fn main() -> std::process::ExitCode {
    drafter_cli::commands::main()
}
