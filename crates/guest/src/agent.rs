//! The guest agent: serves the host's lifecycle calls over one connection,
//! and reconnects when that connection drops.

use std::io::{self, Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::hook::run_hook;
use crate::line::{Line, LineReader};
use crate::protocol::{parse_request, to_line, Call, ErrorKind, Hello, Reply, MAX_LINE};

/// Pause between connection attempts.
const RETRY_INTERVAL: Duration = Duration::from_millis(50);

/// What the agent runs for each call.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Shell used as `<shell> -c <command>`.
    pub shell: String,
    /// Command for `BeforeSuspend` (empty: do nothing).
    pub before_suspend: String,
    /// Command for `AfterResume` (empty: do nothing).
    pub after_resume: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            shell: "sh".to_owned(),
            before_suspend: String::new(),
            after_resume: String::new(),
        }
    }
}

/// The agent side of the protocol.
#[derive(Debug, Clone)]
pub struct Agent {
    config: AgentConfig,
}

impl Agent {
    /// An agent running the configured hooks.
    pub fn new(config: AgentConfig) -> Self {
        Self { config }
    }

    /// Greets the host on `stream` and answers requests until the host
    /// closes it (`Ok`) or it fails (`Err`). Malformed input never ends it.
    pub fn serve<S: Read + Write>(&self, stream: S) -> io::Result<()> {
        let mut reader = LineReader::new(stream, MAX_LINE);
        reader.get_mut().write_all(&to_line(&Hello::agent()))?;
        loop {
            let reply = match reader.next_line()? {
                Line::Eof => return Ok(()),
                Line::TooLong => Reply::error(
                    None,
                    ErrorKind::TooLong,
                    format!("line exceeds {MAX_LINE} bytes"),
                ),
                Line::Message(line) => match parse_request(&line) {
                    Err(reply) => {
                        warn!(error = ?reply.error, "rejected request");
                        *reply
                    }
                    Ok(req) => self.handle(req.id, req.call, Duration::from_millis(req.timeout_ms)),
                },
            };
            reader.get_mut().write_all(&to_line(&reply))?;
        }
    }

    fn handle(&self, id: u64, call: Call, timeout: Duration) -> Reply {
        let command = match call {
            Call::BeforeSuspend => &self.config.before_suspend,
            Call::AfterResume => &self.config.after_resume,
        };
        info!(%call, id, "running hook");
        match run_hook(&self.config.shell, command, timeout) {
            Ok(report) => {
                info!(%call, id, exit = ?report.exit_code, timed_out = report.timed_out, "hook done");
                Reply::ok(id, report)
            }
            Err(e) => Reply::error(
                Some(id),
                ErrorKind::SpawnFailed,
                format!("could not run `{} -c …`: {e}", self.config.shell),
            ),
        }
    }

    /// Connects with `connect` and serves; after the connection ends,
    /// connects again. Each (re)connection is retried until `connect_timeout`
    /// passes, which ends the loop with the last connection error.
    pub fn run<S, F>(&self, mut connect: F, connect_timeout: Duration) -> io::Error
    where
        S: Read + Write,
        F: FnMut() -> io::Result<S>,
    {
        loop {
            let stream = match connect_with_retry(&mut connect, connect_timeout) {
                Ok(s) => s,
                Err(e) => return e,
            };
            info!("connected to host");
            match self.serve(stream) {
                Ok(()) => info!("host closed the connection; reconnecting"),
                Err(e) => info!(error = %e, "connection lost; reconnecting"),
            }
        }
    }
}

/// Calls `connect` until it succeeds or `timeout` passes.
pub fn connect_with_retry<S, F>(connect: &mut F, timeout: Duration) -> io::Result<S>
where
    F: FnMut() -> io::Result<S>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match connect() {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => {
                debug!(error = %e, "connect failed; retrying");
                thread::sleep(RETRY_INTERVAL);
            }
        }
    }
}
