//! The liveness signal: the guest connects once; the connection is the signal.

use std::io::{self, Write};
use std::time::Duration;

use crate::agent::connect_with_retry;

/// Connects with `connect` (retrying until `timeout`) and closes the
/// connection again. The host treats the accepted connection as "guest up".
pub fn signal<S, F>(mut connect: F, timeout: Duration) -> io::Result<()>
where
    S: Write,
    F: FnMut() -> io::Result<S>,
{
    let mut stream = connect_with_retry(&mut connect, timeout)?;
    stream.flush()
}
