//! `drafter-packager`: see [`drafter_cli::commands::packager`].

fn main() -> std::process::ExitCode {
    drafter_cli::commands::packager::main()
}
