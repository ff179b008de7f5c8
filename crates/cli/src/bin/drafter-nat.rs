//! `drafter-nat`: see [`drafter_cli::commands::nat`].

fn main() -> std::process::ExitCode {
    drafter_cli::commands::nat::main()
}
