//! Server-sent events re-framed whole: a worker's event stream arrives in arbitrary pieces,
//! and an answer whose events are edited (the PD logprob merge) must relay each event only once
//! it is complete. `Events` cuts the payload at blank lines (`\n\n`, or `\r\n\r\n`), whatever
//! the pieces; `edit` rewrites one event's `data:` JSON. Fuzzed by `fuzz/fuzz_targets/sse.rs`.

use memchr::memmem;

/// Whole events out of an event stream's payload, fed in any pieces.
#[derive(Debug, Default)]
pub struct Events {
    pending: Vec<u8>,
}

impl Events {
    pub fn push(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
    }

    /// The next complete event, blank line included.
    pub fn next_event(&mut self) -> Option<Vec<u8>> {
        let lf = memmem::find(&self.pending, b"\n\n").map(|i| i + 2);
        let crlf = memmem::find(&self.pending, b"\r\n\r\n").map(|i| i + 4);
        let end = match (lf, crlf) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(self.pending.drain(..end).collect())
    }

    /// What is left once the stream ended: an unterminated last event (relayed as it is).
    pub fn finish(self) -> Vec<u8> {
        self.pending
    }
}

/// `event` with `edit` applied to the JSON of its `data:` line; any other event (comments,
/// `[DONE]`, several lines, not JSON) unchanged.
pub fn edit(event: Vec<u8>, edit: &mut dyn FnMut(&mut serde_json::Value)) -> Vec<u8> {
    let Some(data) = event.strip_prefix(b"data:").map(|d| d.trim_ascii()) else { return event };
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(data) else { return event };
    edit(&mut v);
    match serde_json::to_vec(&v) {
        Ok(json) => [&b"data: "[..], &json, b"\n\n"].concat(),
        Err(_) => event,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_cut_at_blank_lines_whatever_the_pieces() {
        let stream =
            b"data: {\"a\":1}\n\n: keep-alive\n\ndata: {\"b\":2}\r\n\r\ndata: [DONE]\n\ntail";
        for piece in 1..stream.len() {
            let mut ev = Events::default();
            let mut out = Vec::new();
            for p in stream.chunks(piece) {
                ev.push(p);
                while let Some(e) = ev.next_event() {
                    out.push(e);
                }
            }
            assert_eq!(out.len(), 4, "piece {piece}");
            assert_eq!(out[2], b"data: {\"b\":2}\r\n\r\n");
            assert_eq!(ev.finish(), b"tail");
        }
    }

    #[test]
    fn only_json_data_is_edited() {
        let mut add = |v: &mut serde_json::Value| v["x"] = serde_json::json!(1);
        assert_eq!(
            edit(b"data: {\"a\": 0}\n\n".to_vec(), &mut add),
            b"data: {\"a\":0,\"x\":1}\n\n"
        );
        for same in [&b"data: [DONE]\n\n"[..], b": comment\n\n", b"event: e\ndata: {}\n\n"] {
            assert_eq!(edit(same.to_vec(), &mut add), same);
        }
    }
}
