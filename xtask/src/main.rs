//! `cargo xtask`: build, lab and test tooling for the drafter workspace.

mod bench;
mod bench_migration;
mod bench_resume;
mod debs;
mod fuzz;
mod guest;
mod lab;
mod paths;
mod qmp;
mod testrun;

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
    /// The main job on a fresh machine: build everything, then in the lab a
    /// Linux guest booted, snapshotted and restored under our VMM.
    Demo {
        #[command(flatten)]
        lab: LabArgs,
    },
    /// Run the whole suite: fmt, clippy, host tests, fuzz smoke, then the lab tests.
    Test {
        #[command(flatten)]
        lab: LabArgs,
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Skip the host tests.
        #[arg(long)]
        no_host: bool,
        /// Skip the lab tests.
        #[arg(long)]
        no_lab: bool,
        /// Skip the fuzz smoke run.
        #[arg(long)]
        no_fuzz: bool,
    },
    /// Build the libFuzzer targets of `fuzz/` and run TARGET (default: all,
    /// one after the other) for N seconds each; prints executions and coverage.
    Fuzz {
        /// One of the targets (see fuzz/README.md); all when omitted.
        target: Option<String>,
        /// Seconds of fuzzing per target (after a pass over its seeds).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Build with 16 codegen units (quicker build, slower runs).
        #[arg(long)]
        quick: bool,
        /// Rewrite the seed corpus `fuzz/corpus/` instead of fuzzing.
        #[arg(long)]
        seeds: bool,
    },
    /// Run only the lab tests (`lab_*`), optionally those whose name contains FILTER.
    LabTest {
        #[command(flatten)]
        lab: LabArgs,
        /// Substring of the test names to run.
        filter: Option<String>,
    },
    /// Benchmark: QEMU microvm boot-to-marker inside the lab (the baseline).
    BenchQemu {
        #[command(flatten)]
        lab: LabArgs,
        /// Boots to measure.
        #[arg(long, default_value_t = 5)]
        runs: u32,
    },
    /// Benchmark: resume from a package with our runner vs QEMU `-incoming`
    /// from a migration file, same guest, in one lab run (prints medians).
    BenchResume {
        #[command(flatten)]
        lab: LabArgs,
        /// Timed resumes per side and memory size.
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Guest memory sizes in MiB (repeat the flag).
        #[arg(long, default_values_t = [256, 1024])]
        sizes: Vec<u32>,
    },
    /// (inside the lab) the measuring side of `bench-resume`.
    #[command(hide = true)]
    BenchResumeInner {
        #[arg(long)]
        kernel: std::path::PathBuf,
        #[arg(long)]
        initrd: std::path::PathBuf,
        #[arg(long)]
        bin_dir: std::path::PathBuf,
        #[arg(long)]
        runs: u32,
        #[arg(long)]
        sizes: Vec<u32>,
    },
    /// Benchmark: QEMU's live migration and drafter's side by side in one lab
    /// boot (heartbeat blackout, reported downtime, total time, bytes, ratios);
    /// prints, asserts nothing.
    BenchMigration {
        #[command(flatten)]
        lab: LabArgs,
        /// Runs per workload (the table shows medians).
        #[arg(long, default_value_t = 1)]
        runs: u32,
        /// Only this workload: writer-1g, writer-256m or idle-1g.
        #[arg(long)]
        workload: Option<String>,
    },
    /// (inside the lab) the measuring side of `bench-migration`.
    #[command(hide = true)]
    BenchMigrationInner {
        #[arg(long)]
        kernel: std::path::PathBuf,
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long)]
        peer: std::path::PathBuf,
        #[arg(long)]
        runs: u32,
        #[arg(long)]
        workload: Option<String>,
    },
    /// (inside the lab) the measuring side of `bench-qemu`.
    #[command(hide = true)]
    QemuBaselineInner {
        #[arg(long)]
        kernel: std::path::PathBuf,
        #[arg(long)]
        initrd: std::path::PathBuf,
        #[arg(long)]
        runs: u32,
    },
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
        Cmd::Test {
            lab,
            no_lint,
            no_host,
            no_lab,
            no_fuzz,
        } => testrun::run(
            testrun::Parts {
                lint: !no_lint,
                host: !no_host,
                fuzz: !no_fuzz,
                lab: !no_lab,
            },
            &lab.options(),
        ),
        Cmd::Demo { lab } => demo(&lab.options()),
        Cmd::Fuzz { seeds: true, .. } => fuzz::write_seeds(),
        Cmd::Fuzz {
            target,
            seconds,
            quick,
            seeds: false,
        } => fuzz::run(
            if quick {
                fuzz::Build::Quick
            } else {
                fuzz::Build::Full
            },
            target.as_deref(),
            seconds,
        ),
        Cmd::LabTest { lab, filter } => {
            let filters: Vec<&str> = filter.as_deref().into_iter().collect();
            testrun::run_lab_tests(&lab.options(), &filters)
        }
        Cmd::BenchQemu { lab, runs } => bench::qemu_baseline(&lab.options(), runs),
        Cmd::BenchMigration {
            lab,
            runs,
            workload,
        } => bench_migration::run(&lab.options(), runs, workload.as_deref()),
        Cmd::BenchMigrationInner {
            kernel,
            dir,
            peer,
            runs,
            workload,
        } => bench_migration::inner(&kernel, &dir, &peer, runs, workload.as_deref()),
        Cmd::QemuBaselineInner {
            kernel,
            initrd,
            runs,
        } => bench::inner(&kernel, &initrd, runs),
        Cmd::BenchResume { lab, runs, sizes } => bench_resume::run(
            &lab.options(),
            &bench_resume::BenchResumeArgs { runs, sizes },
        ),
        Cmd::BenchResumeInner {
            kernel,
            initrd,
            bin_dir,
            runs,
            sizes,
        } => bench_resume::inner(&kernel, &initrd, &bin_dir, runs, &sizes),
        Cmd::GuestKernel => {
            println!("{}", guest::ensure()?.display());
            Ok(0)
        }
    }
}

/// Builds the workspace and the guest artifacts, then, in the lab: real KVM;
/// a Linux guest under our VMM snapshotted mid-workload and restored in new
/// processes (twice) where its counter carries on; and a running guest
/// live-migrated between `drafter-peer` processes (pre-copy over two hops,
/// then post-copy with userfaultfd), its counter never restarting.
fn demo(opts: &lab::LabOptions) -> Result<i32> {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--workspace", "--release"])
        .current_dir(paths::workspace_root())
        .status()?;
    if !status.success() {
        anyhow::bail!("build failed");
    }
    eprintln!("demo: guest artifacts in {}", guest::ensure()?.display());
    testrun::run_lab_tests_with(
        opts,
        &[
            "lab_long_mode_guest_on_real_kvm",
            "lab_snapshot_restores_in_a_new_process_twice",
            "lab_workflow_snapshot_run_suspend_resume_keeps_redis_keys",
            "lab_live_migration_keeps_the_guest_counting",
            "lab_post_copy_migration_resumes_at_authority",
        ],
        true,
    )
}
