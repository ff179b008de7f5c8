//! The agent wire protocol, version 1.
//!
//! Every message is one line of UTF-8 JSON terminated by `\n`, at most
//! [`MAX_LINE`] bytes. Every message carries the protocol version `v`.
//!
//! 1. The agent connects and sends a greeting:
//!    `{"v":1,"hello":{"role":"agent","version":"0.1.0"}}`
//! 2. The host sends requests, each with a call id chosen by the host and the
//!    time the hook may take:
//!    `{"v":1,"id":7,"call":"before_suspend","timeout_ms":5000}`
//!    (`call` is `before_suspend` or `after_resume`).
//! 3. The agent answers every request line with exactly one reply carrying the
//!    same id: `{"v":1,"id":7,"ok":{"exit_code":0,"signal":null,"timed_out":false,"stdout":"","stderr":""}}`
//!    or, when the request could not be served,
//!    `{"v":1,"id":7,"error":{"kind":"malformed","message":"..."}}`.
//!    A line that is not a valid request gets an error reply whose `id` is the
//!    request's id if one could be read, else `null`; the connection stays up.
//!
//! A hook that runs but fails (non-zero exit, signal, timeout) is an `ok`
//! reply: the report says what happened. `error` means the call itself was
//! not understood. Unknown fields are ignored, so minor additions stay
//! compatible; a different `v` is answered with `unsupported_version`.

use serde::{Deserialize, Serialize};

use crate::hook::HookReport;

/// The protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest accepted message line in bytes (excluding the newline).
pub const MAX_LINE: usize = 1024 * 1024;

/// The agent's greeting, sent once per connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version.
    pub v: u32,
    /// Who is speaking.
    pub hello: HelloBody,
}

/// Body of [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloBody {
    /// Always `"agent"`.
    pub role: String,
    /// The agent's software version.
    pub version: String,
}

impl Hello {
    /// The greeting this crate's agent sends.
    pub fn agent() -> Self {
        Self {
            v: PROTOCOL_VERSION,
            hello: HelloBody {
                role: "agent".to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
            },
        }
    }
}

/// A lifecycle hook the host can ask the agent to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    /// Runs before the VM is suspended (snapshot, migration).
    BeforeSuspend,
    /// Runs after the VM has been resumed.
    AfterResume,
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Call::BeforeSuspend => "BeforeSuspend",
            Call::AfterResume => "AfterResume",
        })
    }
}

/// A host → agent request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version.
    pub v: u32,
    /// Call id, echoed in the reply.
    pub id: u64,
    /// Which hook to run.
    pub call: Call,
    /// How long the hook may run before it is killed, in milliseconds.
    pub timeout_ms: u64,
}

/// Kinds of [`RemoteError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The line was not valid JSON or not a valid request.
    Malformed,
    /// The request's `v` is not spoken here.
    UnsupportedVersion,
    /// The line exceeded [`MAX_LINE`].
    TooLong,
    /// The hook could not be started at all.
    SpawnFailed,
}

/// Why a request could not be served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    /// Category.
    pub kind: ErrorKind,
    /// Human-readable detail.
    pub message: String,
}

/// An agent → host reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Protocol version.
    pub v: u32,
    /// Id of the request answered, if it could be read.
    pub id: Option<u64>,
    /// The hook's report, when the call was served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<HookReport>,
    /// Why the call was not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RemoteError>,
}

impl Reply {
    /// A successful reply.
    pub fn ok(id: u64, report: HookReport) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            id: Some(id),
            ok: Some(report),
            error: None,
        }
    }

    /// An error reply.
    pub fn error(id: Option<u64>, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            id,
            ok: None,
            error: Some(RemoteError {
                kind,
                message: message.into(),
            }),
        }
    }
}

/// Parses one request line; on failure returns the error reply to send.
pub fn parse_request(line: &[u8]) -> Result<Request, Box<Reply>> {
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
        Box::new(Reply::error(
            None,
            ErrorKind::Malformed,
            format!("not JSON: {e}"),
        ))
    })?;
    let id = value.get("id").and_then(serde_json::Value::as_u64);
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(Box::new(Reply::error(
                id,
                ErrorKind::UnsupportedVersion,
                format!("protocol version {v} not supported (speaking {PROTOCOL_VERSION})"),
            )))
        }
        None => {
            return Err(Box::new(Reply::error(
                id,
                ErrorKind::Malformed,
                "missing protocol version `v`",
            )))
        }
    }
    serde_json::from_value(value).map_err(|e| {
        Box::new(Reply::error(
            id,
            ErrorKind::Malformed,
            format!("invalid request: {e}"),
        ))
    })
}

/// Serialises a message as one line including the trailing newline.
pub fn to_line<T: Serialize>(message: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail (no maps with non-string
    // keys, no custom serialisers); fall back to an empty object regardless.
    let mut line = serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_with_snake_case_call() {
        let req = Request {
            v: 1,
            id: 9,
            call: Call::AfterResume,
            timeout_ms: 100,
        };
        let line = to_line(&req);
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"v\":1,\"id\":9,\"call\":\"after_resume\",\"timeout_ms\":100}\n"
        );
        assert_eq!(parse_request(&line[..line.len() - 1]).unwrap(), req);
    }

    #[test]
    fn bad_requests_get_typed_errors_with_ids_when_readable() {
        let e = parse_request(b"{nope").unwrap_err();
        assert_eq!(e.id, None);
        assert_eq!(e.error.unwrap().kind, ErrorKind::Malformed);

        let e =
            parse_request(br#"{"v":2,"id":4,"call":"after_resume","timeout_ms":1}"#).unwrap_err();
        assert_eq!(e.id, Some(4));
        assert_eq!(e.error.unwrap().kind, ErrorKind::UnsupportedVersion);

        let e = parse_request(br#"{"v":1,"id":5,"call":"reboot","timeout_ms":1}"#).unwrap_err();
        assert_eq!(e.id, Some(5));
        assert_eq!(e.error.unwrap().kind, ErrorKind::Malformed);
    }
}
