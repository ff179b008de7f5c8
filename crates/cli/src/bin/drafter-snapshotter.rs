//! `drafter-snapshotter`: see [`drafter_cli::commands::snapshotter`].

fn main() -> std::process::ExitCode {
    drafter_cli::commands::snapshotter::main()
}
