//! HTTP/1 chunked transfer coding, read incrementally: finds where a chunked message ends and
//! which of its bytes are payload, without copying. The relay forwards chunked bodies verbatim
//! and only needs to know where they end; request bodies are decoded with the same reader.

/// Longest chunk-size line (size, extensions) or trailer line accepted.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size { value: u64, digits: u8 },
    Extension { value: u64, len: usize },
    SizeLf { value: u64 },
    Data { left: u64 },
    DataCr,
    DataLf,
    Trailer { len: usize },
    TrailerLf { empty: bool },
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked encoding: {0}")]
pub struct ChunkError(&'static str);

#[derive(Debug, Clone)]
pub struct Chunked {
    state: State,
}

impl Default for Chunked {
    fn default() -> Self {
        Self { state: State::Size { value: 0, digits: 0 } }
    }
}

impl Chunked {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Between two chunks: nothing of a chunk has been read yet.
    pub fn at_chunk_start(&self) -> bool {
        self.state == State::Size { value: 0, digits: 0 }
    }

    /// Reads `input` up to the end of the message; returns how many bytes belong to it and
    /// calls `payload` with each slice of chunk data among them.
    pub fn feed(
        &mut self,
        input: &[u8],
        mut payload: impl FnMut(&[u8]),
    ) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                State::Done => return Ok(i),
                State::Data { left } => {
                    let take = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    payload(&input[i..i + take]);
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 { State::DataCr } else { State::Data { left } };
                    continue;
                }
                State::Size { value, digits } => match (b as char).to_digit(16) {
                    Some(d) if digits < 15 => {
                        State::Size { value: value * 16 + u64::from(d), digits: digits + 1 }
                    }
                    Some(_) => return Err(ChunkError("chunk size too large")),
                    None if digits == 0 => return Err(ChunkError("chunk size expected")),
                    None if b == b'\r' => State::SizeLf { value },
                    // Extensions (and whitespace before them) are allowed and ignored.
                    None if b == b';' || b == b' ' || b == b'\t' => {
                        State::Extension { value, len: 0 }
                    }
                    None => return Err(ChunkError("invalid character in chunk size")),
                },
                State::Extension { value, len } => match b {
                    b'\r' => State::SizeLf { value },
                    b'\n' => return Err(ChunkError("bare LF in chunk extension")),
                    _ if len >= MAX_LINE => return Err(ChunkError("chunk extension too long")),
                    _ => State::Extension { value, len: len + 1 },
                },
                State::SizeLf { value } => match (b, value) {
                    (b'\n', 0) => State::Trailer { len: 0 },
                    (b'\n', left) => State::Data { left },
                    _ => return Err(ChunkError("CRLF expected after chunk size")),
                },
                State::DataCr => match b {
                    b'\r' => State::DataLf,
                    _ => return Err(ChunkError("CRLF expected after chunk data")),
                },
                State::DataLf => match b {
                    b'\n' => State::Size { value: 0, digits: 0 },
                    _ => return Err(ChunkError("CRLF expected after chunk data")),
                },
                State::Trailer { len } => match b {
                    b'\r' => State::TrailerLf { empty: len == 0 },
                    _ if len >= MAX_LINE => return Err(ChunkError("trailer line too long")),
                    _ => State::Trailer { len: len + 1 },
                },
                State::TrailerLf { empty } => match (b, empty) {
                    (b'\n', true) => State::Done,
                    (b'\n', false) => State::Trailer { len: 0 },
                    _ => return Err(ChunkError("CRLF expected after trailer")),
                },
            };
            i += 1;
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode(parts: &[&[u8]]) -> Result<(Vec<u8>, usize, bool), ChunkError> {
        let mut c = Chunked::default();
        let (mut out, mut used) = (Vec::new(), 0);
        for p in parts {
            used += c.feed(p, |d| out.extend_from_slice(d))?;
        }
        Ok((out, used, c.is_done()))
    }

    #[test]
    fn decodes_and_stops_at_the_end() {
        let msg = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let (out, used, done) = decode(&[msg]).unwrap();
        assert_eq!(out, b"hello world");
        assert!(done);
        assert_eq!(&msg[used..], b"NEXT");
        let (out, _, done) = decode(&[b"A\r\n0123", b"456789\r", b"\n0\r\n\r"]).unwrap();
        assert_eq!((out.as_slice(), done), (&b"0123456789"[..], false));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            &b"\r\n"[..],
            b"zz\r\n",
            b"5\nhello",
            b"1\r\nab",
            b"1\r\na\n",
            b"fffffffffffffffff\r\n",
        ] {
            assert!(decode(&[bad]).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    proptest! {
        #[test]
        fn any_split_decodes_the_same(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..6), cut in 0usize..400) {
            let mut msg = Vec::new();
            let mut want = Vec::new();
            for c in &chunks {
                msg.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                msg.extend_from_slice(c);
                msg.extend_from_slice(b"\r\n");
                want.extend_from_slice(c);
            }
            msg.extend_from_slice(b"0\r\n\r\n");
            let cut = cut.min(msg.len());
            let (out, used, done) = decode(&[&msg[..cut], &msg[cut..]]).unwrap();
            prop_assert_eq!(out, want);
            prop_assert_eq!(used, msg.len());
            prop_assert!(done);
        }
    }
}
