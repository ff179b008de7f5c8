//! The agent RPC over vsock, both directions: the input is split into lines
//! by the agent's line reader (with a small limit, so over-long lines are
//! exercised too); each line is parsed as a request the way the agent in the
//! guest does, and as the greeting and replies the host reads from a guest.
#![no_main]

use drafter_guest::host::interpret;
use drafter_guest::line::{Line, LineReader};
use drafter_guest::protocol::{parse_request, to_line, Call, Hello, Reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&limit, stream)) = data.split_first() else {
        return;
    };
    let mut reader = LineReader::new(stream, 64 + usize::from(limit) * 64);
    for _ in 0..256 {
        let line = match reader.next_line() {
            Ok(Line::Message(line)) => line,
            Ok(Line::TooLong) => continue,
            Ok(Line::Eof) | Err(_) => return,
        };
        // Agent side: a request or the error reply to send back.
        match parse_request(&line) {
            Ok(req) => drop(to_line(&req)),
            Err(reply) => drop(to_line(&reply)),
        }
        // Host side: the greeting and a reply to either call.
        if let Ok(hello) = serde_json::from_slice::<Hello>(&line) {
            drop(to_line(&hello));
        }
        if let Ok(reply) = serde_json::from_slice::<Reply>(&line) {
            drop(to_line(&reply));
            let _ = interpret(Call::BeforeSuspend, reply.clone());
            let _ = interpret(Call::AfterResume, reply);
        }
    }
});
