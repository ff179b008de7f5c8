//! A minimal QMP client for the benches that drive QEMU: one command at a
//! time, one JSON object per line, events skipped.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A QMP connection out of capabilities negotiation mode.
pub struct Qmp {
    read: BufReader<UnixStream>,
    write: UnixStream,
}

impl Qmp {
    /// Connects to the socket at `path`, retrying until QEMU has created it
    /// or `within` has passed, and leaves capabilities negotiation mode.
    /// Replies are awaited for at most `reply_timeout`.
    pub fn connect(path: &Path, within: Duration, reply_timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + within;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    bail!("QMP socket {}: {e}", path.display())
                }
                // Polls for the socket QEMU creates at start-up.
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(reply_timeout))?;
        let mut q = Self {
            read: BufReader::new(stream.try_clone()?),
            write: stream,
        };
        let mut greeting = String::new();
        q.read.read_line(&mut greeting)?;
        if !greeting.contains("QMP") {
            bail!("not a QMP greeting: {greeting:?}");
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// Runs `command` with `arguments` (an empty object for none); returns
    /// its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        writeln!(self.write, "{msg}")?;
        loop {
            let mut line = String::new();
            if self.read.read_line(&mut line)? == 0 {
                bail!("QMP closed during {command}");
            }
            let v: Value = serde_json::from_str(&line)
                .with_context(|| format!("QMP reply to {command}: {line:?}"))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {command}: {e}");
            }
        }
    }
}
