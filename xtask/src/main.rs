//! `cargo xtask`: build, lab and test tooling for the drafter workspace.

mod cpio;
mod debs;
mod guest;
mod lab;
mod paths;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "drafter's build, lab and test tooling")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct LabArgs {
    /// Lab memory in MiB.
    #[arg(long, default_value_t = 4096)]
    mem: u32,
    /// Lab vCPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Seconds allowed for the lab to come up.
    #[arg(long, default_value_t = 120)]
    boot_timeout: u64,
    /// Seconds allowed for the whole run.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Echo the lab's kernel console to stderr.
    #[arg(long)]
    console: bool,
}

impl LabArgs {
    fn options(&self) -> lab::LabOptions {
        lab::LabOptions {
            mem_mib: self.mem,
            cpus: self.cpus,
            boot_timeout: Duration::from_secs(self.boot_timeout),
            timeout: Duration::from_secs(self.timeout),
            console: self.console,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run COMMAND inside the lab VM (real KVM via nested SVM), in the same
    /// working directory; exits with COMMAND's status.
    Lab {
        #[command(flatten)]
        lab: LabArgs,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// Fetch (once) the guest kernel, modules and busybox; print their folder.
    GuestKernel,
}

fn main() {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::exit(125);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Lab { lab, cmd } => lab::run(&lab.options(), &cmd),
        Cmd::GuestKernel => {
            println!("{}", guest::ensure()?.display());
            Ok(0)
        }
    }
}
