//! `drafter-registry`: see [`drafter_cli::commands::registry`].

fn main() -> std::process::ExitCode {
    drafter_cli::commands::registry::main()
}
