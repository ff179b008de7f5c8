//! `drafter-blueprint`: builds VM blueprints (the command line; the
//! binary and `drafter blueprint` call [`main`]).
//!
//! - `drafter-blueprint os --out-dir out/blueprint` writes `vmlinux`,
//!   `initramfs` and `rootfs.ext4`.
//! - `drafter-blueprint oci --image docker://valkey/valkey:latest --output
//!   out/blueprint/oci.ext4` converts an OCI image (layout dir, `docker save`
//!   tarball or registry reference) into an ext4 runtime-bundle disk.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::oci::{self, ImageSource, OciOptions};
use crate::os::{self, OsOptions};
use clap::{Parser, Subcommand};

/// Builds drafter VM blueprints.
#[derive(Parser)]
#[command(version)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the guest OS: vmlinux, initramfs and rootfs.ext4 (needs root for debootstrap).
    Os {
        /// Output directory.
        #[arg(long, default_value = "out/blueprint")]
        out_dir: PathBuf,
        /// Guest artifact folder (vmlinuz, busybox, modules/); default:
        /// target/lab/guest/current above the working directory, else `cargo xtask guest-kernel`.
        #[arg(long)]
        guest_dir: Option<PathBuf>,
        /// Cache for the debootstrap result.
        #[arg(long, default_value = "target/blueprint")]
        cache_dir: PathBuf,
        /// Static drafter-agent binary (default: next to this program, else
        /// built with cargo from this workspace).
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        /// Static drafter-liveness binary (default: like --agent-bin).
        #[arg(long)]
        liveness_bin: Option<PathBuf>,
        /// Debian mirror.
        #[arg(long, default_value = "http://deb.debian.org/debian")]
        mirror: String,
        /// Debian suite.
        #[arg(long, default_value = "bookworm")]
        suite: String,
        /// Command the agent runs before the VM is suspended.
        #[arg(long, default_value = "sync")]
        before_suspend_cmd: String,
        /// Command the agent runs after the VM is resumed.
        #[arg(long, default_value = "")]
        after_resume_cmd: String,
        /// Free space left in rootfs.ext4, in MiB.
        #[arg(long, default_value_t = 256)]
        headroom_mib: u64,
    },
    /// Convert an OCI image into oci.ext4 (label `oci`) holding a runtime bundle.
    Oci {
        /// Image: `oci:<layout dir>`, `docker-archive:<file>`, `docker://<ref>`,
        /// or an existing directory / file / registry reference.
        #[arg(long)]
        image: String,
        /// Output disk.
        #[arg(long, default_value = "out/blueprint/oci.ext4")]
        output: PathBuf,
        /// Architecture picked from multi-platform images.
        #[arg(long, default_value = "amd64")]
        arch: String,
        /// Talk plain HTTP to the registry (loopback registries always do).
        #[arg(long)]
        plain_http: bool,
        /// Free space left in the disk, in MiB.
        #[arg(long, default_value_t = 64)]
        headroom_mib: u64,
    },
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The guest binaries: as given, else static ones next to this program,
/// else built statically with cargo.
fn guest_binaries(
    agent: Option<PathBuf>,
    liveness: Option<PathBuf>,
) -> crate::Result<(PathBuf, PathBuf)> {
    let explicit = agent.is_some() || liveness.is_some();
    let agent = agent.unwrap_or_else(|| sibling("drafter-agent"));
    let liveness = liveness.unwrap_or_else(|| sibling("drafter-liveness"));
    let is_static = |p: &PathBuf| os::is_static_elf(p).unwrap_or(false);
    if explicit || (is_static(&agent) && is_static(&liveness)) {
        // Explicit paths are checked (with a clear message) by the build.
        return Ok((agent, liveness));
    }
    os::build_guest_binaries()
}

/// Runs `drafter-blueprint` on this process's command line.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs `drafter-blueprint` on `argv` (`argv[0]` names the command in usage
/// lines, e.g. `drafter blueprint` when run as a subcommand of `drafter`).
pub fn main_from(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Args::parse_from(argv).command {
        Command::Os {
            out_dir,
            guest_dir,
            cache_dir,
            agent_bin,
            liveness_bin,
            mirror,
            suite,
            before_suspend_cmd,
            after_resume_cmd,
            headroom_mib,
        } => guest_binaries(agent_bin, liveness_bin).and_then(|(agent_bin, liveness_bin)| {
            os::build(&OsOptions {
                out_dir,
                guest_dir,
                cache_dir,
                agent_bin,
                liveness_bin,
                mirror,
                suite,
                before_suspend_cmd,
                after_resume_cmd,
                headroom: headroom_mib * 1024 * 1024,
            })
        }),
        Command::Oci {
            image,
            output,
            arch,
            plain_http,
            headroom_mib,
        } => oci::convert(&OciOptions {
            source: ImageSource::parse(&image),
            output,
            arch,
            plain_http,
            headroom: headroom_mib * 1024 * 1024,
        })
        .map(|_| ()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drafter-blueprint: {e}");
            ExitCode::FAILURE
        }
    }
}
