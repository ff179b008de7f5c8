//! `drafter-agent`: runs inside the guest and serves the host's
//! `BeforeSuspend` / `AfterResume` calls over vsock.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use drafter_guest::{vsock, Agent, AgentConfig, DEFAULT_AGENT_PORT};

/// Guest agent: connects to the host over vsock and runs lifecycle hooks.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// VSock port of the agent on the host (CID 2).
    #[arg(long, default_value_t = DEFAULT_AGENT_PORT)]
    vsock_port: u32,
    /// How long to keep retrying each (re)connection before giving up.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    vsock_timeout: Duration,
    /// Command run (through the shell) before the VM is suspended.
    #[arg(long, default_value = "")]
    before_suspend_cmd: String,
    /// Command run (through the shell) after the VM has been resumed.
    #[arg(long, default_value = "")]
    after_resume_cmd: String,
    /// Shell used to run the commands, as `<shell> -c <command>`.
    #[arg(long, default_value = "sh")]
    shell_cmd: String,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let agent = Agent::new(AgentConfig {
        shell: args.shell_cmd,
        before_suspend: args.before_suspend_cmd,
        after_resume: args.after_resume_cmd,
    });
    let port = args.vsock_port;
    let err = agent.run(|| vsock::connect_host(port), args.vsock_timeout);
    eprintln!("drafter-agent: cannot connect to host vsock port {port}: {err}");
    ExitCode::FAILURE
}
