//! Server-sent events relayed whole: a worker's event stream arrives in arbitrary pieces, and
//! the client must only ever stand between two events, so that a stream cut early can still end
//! with an error event (and an edited answer, the PD logprob merge, needs whole events anyway).
//! `Events` cuts the payload at blank lines (`\n\n`, or `\r\n\r\n`), whatever the pieces;
//! `edit` rewrites one event's `data:` JSON; `Cutter` is what the relay feeds. Fuzzed by
//! `fuzz/fuzz_targets/sse.rs`.

use memchr::memmem;
use serde_json::Value;

/// Most bytes of one unfinished event held back; a larger event is relayed as it comes (and if
/// the stream is then cut inside it, a blank line ends it before the error event).
pub const MAX_HELD: usize = 1 << 20;

/// What a filter says about one whole event (`Cutter::with_filter`).
pub enum Verdict {
    /// Relay it as it came.
    Pass,
    /// Relay this instead.
    Replace(Vec<u8>),
    /// Relay nothing of it.
    Drop,
    /// The worker reported a failure in it (an error event): relay nothing more of this
    /// stream; the relay treats it as the worker failing mid-stream.
    Failed(String),
}

/// A per-event filter: sees every whole event (blank line included), in order.
pub type Filter<'a> = &'a mut (dyn FnMut(&[u8]) -> Verdict + Send);

/// Payload out, whole events only (in as few pieces as possible).
pub struct Cutter<'a> {
    pending: Vec<u8>,
    filter: Option<Filter<'a>>,
    /// The last event relayed was `data: [DONE]`: the stream said all it had to say.
    done_seen: bool,
    /// Part of an event too large to hold was relayed before its end.
    mid_event: bool,
    /// The filter found the worker's failure in an event: nothing more is relayed.
    failed: Option<String>,
    /// Scratch for filtered output.
    out: Vec<u8>,
}

fn ends_at_boundary(d: &[u8]) -> bool {
    d.ends_with(b"\n\n") || d.ends_with(b"\r\n\r\n")
}

/// The end of the last complete event in `d`.
fn last_boundary(d: &[u8]) -> Option<usize> {
    let lf = memmem::rfind(d, b"\n\n").map(|i| i + 2);
    let crlf = memmem::rfind(d, b"\r\n\r\n").map(|i| i + 4);
    lf.max(crlf)
}

/// The end of the first complete event in `d`.
fn first_boundary(d: &[u8]) -> Option<usize> {
    let lf = memmem::find(d, b"\n\n").map(|i| i + 2);
    // A CRLF boundary only counts before the first LF one: search no further (else each event
    // of a piece would scan the whole rest of it).
    let crlf = memmem::find(&d[..lf.unwrap_or(d.len())], b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl<'a> Cutter<'a> {
    pub fn new() -> Self {
        Self {
            pending: Vec::new(),
            filter: None,
            done_seen: false,
            mid_event: false,
            failed: None,
            out: Vec::new(),
        }
    }

    /// Every whole event goes through `filter` before it is relayed.
    pub fn with_filter(filter: Filter<'a>) -> Self {
        Self { filter: Some(filter), ..Self::new() }
    }

    /// The same stream position without the filter (which gives back what it borrowed).
    pub fn unfiltered(self) -> Cutter<'static> {
        Cutter {
            pending: self.pending,
            filter: None,
            done_seen: self.done_seen,
            mid_event: self.mid_event,
            failed: self.failed,
            out: self.out,
        }
    }

    /// The worker said `[DONE]`: the stream is complete whatever happens next.
    pub fn done_seen(&self) -> bool {
        self.done_seen
    }

    /// The client holds part of an event (one too large to hold back).
    pub fn mid_event(&self) -> bool {
        self.mid_event
    }

    /// The failure a filter found in an event, once.
    pub fn take_failure(&mut self) -> Option<String> {
        self.failed.take()
    }

    fn emit(&mut self, whole: &[u8], out: &mut dyn FnMut(&[u8])) {
        if whole.is_empty() {
            return;
        }
        self.done_seen = whole.trim_ascii_end().ends_with(b"data: [DONE]");
        self.mid_event = !ends_at_boundary(whole);
        out(whole);
    }

    /// Runs the filter over the whole events of `whole`; relays what it lets through.
    fn filtered(&mut self, whole: &[u8], out: &mut dyn FnMut(&[u8])) {
        let Some(filter) = self.filter.as_mut() else { return self.emit(whole, out) };
        let mut kept = std::mem::take(&mut self.out);
        kept.clear();
        // Until an event is changed, `whole` itself is relayed: no copy.
        let mut at = 0;
        let mut changed = false;
        while at < whole.len() {
            let end = at + first_boundary(&whole[at..]).unwrap_or(whole.len() - at);
            let event = &whole[at..end];
            let verdict = filter(event);
            if !changed && !matches!(verdict, Verdict::Pass) {
                kept.extend_from_slice(&whole[..at]);
                changed = true;
            }
            match verdict {
                Verdict::Pass if changed => kept.extend_from_slice(event),
                Verdict::Pass | Verdict::Drop => {}
                Verdict::Replace(r) => kept.extend_from_slice(&r),
                Verdict::Failed(reason) => {
                    self.failed = Some(reason);
                    break;
                }
            }
            at = end;
        }
        if changed {
            if !kept.is_empty() {
                self.emit(&kept, out);
            }
        } else {
            self.emit(whole, out);
        }
        self.out = kept;
    }

    /// Takes the next piece of payload; hands the events it completes to `out`.
    pub fn feed(&mut self, d: &[u8], out: &mut dyn FnMut(&[u8])) {
        if self.failed.is_some() {
            return;
        }
        if self.pending.is_empty() && ends_at_boundary(d) {
            // The common case: the piece is whole events. No copy unless filtered.
            return self.filtered(d, out);
        }
        self.pending.extend_from_slice(d);
        if let Some(end) = last_boundary(&self.pending) {
            let rest = self.pending.split_off(end);
            let whole = std::mem::replace(&mut self.pending, rest);
            self.filtered(&whole, out);
        }
        if self.pending.len() > MAX_HELD && self.failed.is_none() {
            // Too large to hold: relayed unfiltered (a filter only ever sees whole events).
            let held = std::mem::take(&mut self.pending);
            self.emit(&held, out);
        }
    }

    /// The stream ended: an unterminated last event is relayed as it came.
    pub fn finish(&mut self, out: &mut dyn FnMut(&[u8])) {
        let rest = std::mem::take(&mut self.pending);
        if self.failed.is_none() {
            self.filtered(&rest, out);
        }
    }

    /// The stream was cut: what was held of an unfinished event is dropped, and `message` (an
    /// error event and the end marker) ends it, unless the worker had already said `[DONE]`.
    pub fn fail(&mut self, message: &[u8], out: &mut dyn FnMut(&[u8])) {
        self.pending.clear();
        if self.done_seen {
            return;
        }
        self.close_event(out);
        out(message);
    }

    /// Drops what was held of an unfinished event and, when the client holds part of one,
    /// ends it: the client then stands between two events.
    pub fn close_event(&mut self, out: &mut dyn FnMut(&[u8])) {
        self.pending.clear();
        if std::mem::take(&mut self.mid_event) {
            out(b"\n\n");
        }
    }
}

impl Default for Cutter<'_> {
    fn default() -> Self {
        Self::new()
    }
}

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
pub fn edit(event: Vec<u8>, edit: &mut dyn FnMut(&mut Value)) -> Vec<u8> {
    let Some(data) = event.strip_prefix(b"data:").map(|d| d.trim_ascii()) else { return event };
    let Ok(mut v) = serde_json::from_slice::<Value>(data) else { return event };
    edit(&mut v);
    match serde_json::to_vec(&v) {
        Ok(json) => [&b"data: "[..], &json, b"\n\n"].concat(),
        Err(_) => event,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(stream: &[u8], piece: usize, edit: bool) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut add = |e: &[u8]| {
            Verdict::Replace(self::edit(e.to_vec(), &mut |v: &mut Value| {
                v["x"] = serde_json::json!(1)
            }))
        };
        let mut c = if edit { Cutter::with_filter(&mut add) } else { Cutter::new() };
        let mut out = Vec::new();
        for p in stream.chunks(piece) {
            c.feed(p, &mut |e| out.push(e.to_vec()));
        }
        let mut failed = Vec::new();
        c.fail(b"ERR", &mut |e| failed.extend_from_slice(e));
        (out, failed)
    }

    #[test]
    fn the_client_only_ever_gets_whole_events() {
        let stream = b"data: {\"a\":1}\n\n: keep-alive\n\ndata: {\"b\":2}\r\n\r\ndata: {\"c\"";
        for piece in 1..stream.len() {
            for edit in [false, true] {
                let (out, failed) = cut(stream, piece, edit);
                let all: Vec<u8> = out.concat();
                assert!(
                    ends_at_boundary(&all),
                    "piece {piece}: {:?}",
                    String::from_utf8_lossy(&all)
                );
                assert!(!all.windows(5).any(|w| w == b"{\"c\""), "the unfinished event is held");
                assert_eq!(failed, b"ERR", "a cut stream ends with the error event");
            }
        }
        let (_, failed) = cut(b"data: {}\n\ndata: [DONE]\n\n", 4, false);
        assert!(failed.is_empty(), "after [DONE] there is nothing to add");
    }

    #[test]
    fn an_event_too_large_to_hold_is_relayed_and_closed_on_failure() {
        let big = vec![b'x'; MAX_HELD + 10];
        let (out, failed) = cut(&[b"data: ", &big[..]].concat(), 4096, false);
        assert!(!out.is_empty());
        assert_eq!(failed, b"\n\nERR");
    }

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
