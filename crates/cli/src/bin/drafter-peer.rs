//! `drafter-peer`: see [`drafter_cli::commands::peer`].

fn main() -> std::process::ExitCode {
    drafter_cli::commands::peer::main()
}
