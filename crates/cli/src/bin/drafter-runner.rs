//! `drafter-runner`: see [`drafter_cli::commands::runner`].

fn main() -> std::process::ExitCode {
    drafter_cli::commands::runner::main()
}
