//! Newline-delimited message reading with a length limit.

use std::io::{self, Read};

/// What [`LineReader::next_line`] produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// One complete line, without its newline.
    Message(Vec<u8>),
    /// A line longer than the limit; its bytes were discarded.
    TooLong,
    /// The peer closed the stream (a trailing partial line is dropped).
    Eof,
}

/// Reads `\n`-terminated lines from a stream, keeping partial input across
/// read timeouts so a timed-out read loses nothing.
#[derive(Debug)]
pub struct LineReader<S> {
    stream: S,
    buf: Vec<u8>,
    limit: usize,
    discarding: bool,
}

impl<S: Read> LineReader<S> {
    /// Wraps `stream`; lines longer than `limit` bytes are reported as
    /// [`Line::TooLong`].
    pub fn new(stream: S, limit: usize) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            limit,
            discarding: false,
        }
    }

    /// The underlying stream (e.g. to write replies or set timeouts).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// Reads the next line. Errors from the stream (including read
    /// timeouts) are returned as-is; buffered input is kept for the next call.
    pub fn next_line(&mut self) -> io::Result<Line> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let rest = self.buf.split_off(pos + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.pop();
                if std::mem::take(&mut self.discarding) {
                    return Ok(Line::TooLong);
                }
                return Ok(Line::Message(line));
            }
            if self.buf.len() > self.limit {
                self.buf.clear();
                self.discarding = true;
            }
            let mut chunk = [0u8; 8192];
            let n = match self.stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(Line::Eof);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_flags_overlong_ones() {
        let mut input = b"a\nbc\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 50_000));
        input.extend_from_slice(b"\nd\npartial");
        let mut r = LineReader::new(&input[..], 100);
        assert_eq!(r.next_line().unwrap(), Line::Message(b"a".to_vec()));
        assert_eq!(r.next_line().unwrap(), Line::Message(b"bc".to_vec()));
        assert_eq!(r.next_line().unwrap(), Line::TooLong);
        assert_eq!(r.next_line().unwrap(), Line::Message(b"d".to_vec()));
        assert_eq!(r.next_line().unwrap(), Line::Eof);
    }
}
