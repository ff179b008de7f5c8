//! `drafter-terminator`: see [`drafter_cli::commands::terminator`].

fn main() -> std::process::ExitCode {
    drafter_cli::commands::terminator::main()
}
