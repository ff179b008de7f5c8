//! `drafter-blueprint`: see [`drafter_blueprint::cli`].

fn main() -> std::process::ExitCode {
    drafter_blueprint::cli::main()
}
