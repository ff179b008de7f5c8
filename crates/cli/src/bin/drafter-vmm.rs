//! `drafter-vmm`: see [`drafter_cli::commands::vmm`].

fn main() -> std::process::ExitCode {
    drafter_cli::commands::vmm::main()
}
