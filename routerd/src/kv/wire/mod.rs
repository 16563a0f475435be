//! The KV-event wire of SGLang (and vLLM): ZMQ messages of three frames `[topic, seq (8 bytes,
//! big-endian), payload]`, the payload a msgpack array `[ts, events, dp_rank?]`. Events are maps
//! tagged by `"type"` (SGLang >= 0.5.20) or arrays with the tag first (older engines); both are
//! read. The decoder is bounded: every declared length is checked against the bytes left and
//! against the caps below before anything is allocated, nesting is limited, and malformed input
//! is an error (counted and dropped by the subscriber), never a panic.

use rmp::Marker;

use super::hash::BlockHash;

/// At most this many events in one batch, hashes in one event, and token ids in one event.
pub const MAX_EVENTS: usize = 1 << 16;
pub const MAX_HASHES: usize = 1 << 16;
pub const MAX_TOKENS: usize = 1 << 20;
/// Unknown values are skipped up to this nesting depth.
const MAX_DEPTH: usize = 16;

/// Where a block lives. Lower tiers are cheaper to keep and slower to reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Medium {
    Gpu,
    CpuPinned,
    Disk,
    External,
}

impl Medium {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "GPU" | "gpu" => Some(Self::Gpu),
            "CPU_PINNED" | "CPU" | "cpu" | "cpu_pinned" => Some(Self::CpuPinned),
            "DISK" | "disk" => Some(Self::Disk),
            "EXTERNAL" | "external" => Some(Self::External),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gpu => "GPU",
            Self::CpuPinned => "CPU_PINNED",
            Self::Disk => "DISK",
            Self::External => "EXTERNAL",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Stored {
        hashes: Vec<BlockHash>,
        parent: Option<BlockHash>,
        /// How many token ids the event carried (the router keys on hashes only).
        tokens: usize,
        block_size: usize,
        medium: Medium,
        /// A LoRA adapter, cache salt or session namespaced the hashes: a router cannot
        /// compute them from a prompt, so these blocks are never matched.
        namespaced: bool,
    },
    Removed {
        hashes: Vec<BlockHash>,
        medium: Medium,
    },
    Cleared,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub ts: f64,
    pub events: Vec<Event>,
    pub dp_rank: Option<u32>,
}

/// One message off the PUB socket (or a replayed one).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: Vec<u8>,
    /// `-1` marks the end of a replay.
    pub seq: i64,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    #[error("msgpack ends early")]
    Truncated,
    #[error("expected {expected}, found marker {found:?}")]
    Type { expected: &'static str, found: Marker },
    #[error("{what} has {len} elements, more than the cap of {cap}")]
    TooLong { what: &'static str, len: usize, cap: usize },
    #[error("unknown event type {0:?}")]
    UnknownEvent(String),
    #[error("event is missing {0}")]
    Missing(&'static str),
    #[error("nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("seq frame is {0} bytes, not 8")]
    Seq(usize),
    #[error("message has {0} frames")]
    Frames(usize),
    #[error("{0} bytes after the payload")]
    Trailing(usize),
}

/// Frames of a live message: `[topic, seq, payload]`, or `[seq, payload]` from engines that
/// publish no topic frame.
pub fn message(mut frames: Vec<Vec<u8>>) -> Result<Message, WireError> {
    let (topic, seq, payload) = match frames.len() {
        3 => {
            let payload = frames.pop().expect("3");
            let seq = frames.pop().expect("2");
            (frames.pop().expect("1"), seq, payload)
        }
        2 => {
            let payload = frames.pop().expect("2");
            (Vec::new(), frames.pop().expect("1"), payload)
        }
        n => return Err(WireError::Frames(n)),
    };
    let seq: [u8; 8] = seq.as_slice().try_into().map_err(|_| WireError::Seq(seq.len()))?;
    Ok(Message { topic, seq: i64::from_be_bytes(seq), payload })
}

/// Decodes a batch payload.
pub fn decode(payload: &[u8]) -> Result<Batch, WireError> {
    let mut r = Reader { buf: payload };
    let n = r.array_len("batch", 8)?;
    if n < 2 {
        return Err(WireError::Missing("events"));
    }
    let ts = r.float()?;
    let count = r.array_len("events", MAX_EVENTS)?;
    let events = (0..count).map(|_| r.event()).collect::<Result<Vec<_>, _>>()?;
    let dp_rank = if n >= 3 { r.opt_int()?.and_then(|v| u32::try_from(v).ok()) } else { None };
    for _ in 3..n {
        r.skip(0)?;
    }
    if !r.buf.is_empty() {
        return Err(WireError::Trailing(r.buf.len()));
    }
    Ok(Batch { ts, events, dp_rank })
}

/// A worker's load report (SGLang's `LoadStat`, `--load-publish-endpoint`): requests running
/// and waiting, KV tokens in use and the KV capacity (0 when unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadStat {
    pub running: u64,
    pub waiting: u64,
    pub tokens: u64,
    pub max_tokens: u64,
    pub dp_rank: Option<u32>,
}

/// Decodes a load payload: `["LoadStat", num_running_reqs, num_waiting_reqs, num_tokens,
/// max_total_num_tokens, attn_dp_rank, ...]` as SGLang sends it (msgspec, tagged and
/// array-like), or the same fields as a map with `"type": "LoadStat"`. Later fields are skipped;
/// negative counts are refused.
pub fn decode_load(payload: &[u8]) -> Result<LoadStat, WireError> {
    let mut r = Reader { buf: payload };
    let count = |v: i64| u64::try_from(v).map_err(|_| WireError::Missing("a count >= 0"));
    let stat = match r.marker()? {
        m @ (Marker::FixArray(_) | Marker::Array16 | Marker::Array32) => {
            let n = r.array_len_of(m, "LoadStat", 64)?;
            if n < 5 {
                return Err(WireError::Missing("LoadStat's four counts"));
            }
            match r.str()? {
                "LoadStat" => {}
                other => return Err(WireError::UnknownEvent(other.to_owned())),
            }
            let mut s = LoadStat {
                running: count(r.int()?)?,
                waiting: count(r.int()?)?,
                tokens: count(r.int()?)?,
                max_tokens: count(r.int()?)?,
                dp_rank: None,
            };
            if n > 5 {
                s.dp_rank = r.opt_int()?.and_then(|v| u32::try_from(v).ok());
            }
            for _ in 6..n {
                r.skip(0)?;
            }
            s
        }
        m @ (Marker::FixMap(_) | Marker::Map16 | Marker::Map32) => {
            let n = r.map_len(m)?;
            let (mut kind, mut s) = (None, LoadStat::default());
            let mut seen = 0;
            for _ in 0..n {
                match r.str()? {
                    "type" => kind = Some(r.str()?),
                    "num_running_reqs" => (s.running, seen) = (count(r.int()?)?, seen | 1),
                    "num_waiting_reqs" => (s.waiting, seen) = (count(r.int()?)?, seen | 2),
                    "num_tokens" => s.tokens = count(r.int()?)?,
                    "max_total_num_tokens" => s.max_tokens = count(r.int()?)?,
                    "attn_dp_rank" => s.dp_rank = r.opt_int()?.and_then(|v| u32::try_from(v).ok()),
                    _ => r.skip(0)?,
                }
            }
            match kind {
                Some("LoadStat") | None => {}
                Some(other) => return Err(WireError::UnknownEvent(other.to_owned())),
            }
            if seen != 3 {
                return Err(WireError::Missing("num_running_reqs and num_waiting_reqs"));
            }
            s
        }
        found => return Err(WireError::Type { expected: "LoadStat array or map", found }),
    };
    if !r.buf.is_empty() {
        return Err(WireError::Trailing(r.buf.len()));
    }
    Ok(stat)
}

/// Encodes a load report as SGLang does (for the simulated worker and tests).
pub fn encode_load(s: &LoadStat) -> Vec<u8> {
    let mut w = Vec::with_capacity(32);
    rmp::encode::write_array_len(&mut w, 6).expect("vec");
    w_str(&mut w, "LoadStat");
    for v in [s.running, s.waiting, s.tokens, s.max_tokens] {
        rmp::encode::write_uint(&mut w, v).expect("vec");
    }
    match s.dp_rank {
        Some(r) => w_int(&mut w, i64::from(r)),
        None => rmp::encode::write_nil(&mut w).expect("vec"),
    }
    w
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn be(&mut self, n: usize) -> Result<u64, WireError> {
        Ok(self.take(n)?.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b)))
    }

    fn marker(&mut self) -> Result<Marker, WireError> {
        Ok(Marker::from_u8(self.take(1)?[0]))
    }

    fn peek(&self) -> Result<Marker, WireError> {
        self.buf.first().map(|b| Marker::from_u8(*b)).ok_or(WireError::Truncated)
    }

    /// A declared element count, checked against the cap and the bytes left (every element
    /// takes at least one byte), so no allocation follows a lying header.
    fn checked(&self, what: &'static str, len: usize, cap: usize) -> Result<usize, WireError> {
        if len > cap {
            return Err(WireError::TooLong { what, len, cap });
        }
        if len > self.buf.len() {
            return Err(WireError::Truncated);
        }
        Ok(len)
    }

    fn array_len(&mut self, what: &'static str, cap: usize) -> Result<usize, WireError> {
        let m = self.marker()?;
        self.array_len_of(m, what, cap)
    }

    /// The element count of an array whose marker `m` was just read.
    fn array_len_of(
        &mut self,
        m: Marker,
        what: &'static str,
        cap: usize,
    ) -> Result<usize, WireError> {
        let len = match m {
            Marker::FixArray(n) => n as usize,
            Marker::Array16 => self.be(2)? as usize,
            Marker::Array32 => self.be(4)? as usize,
            found => return Err(WireError::Type { expected: "array", found }),
        };
        self.checked(what, len, cap)
    }

    fn map_len(&mut self, m: Marker) -> Result<usize, WireError> {
        let len = match m {
            Marker::FixMap(n) => n as usize,
            Marker::Map16 => self.be(2)? as usize,
            Marker::Map32 => self.be(4)? as usize,
            found => return Err(WireError::Type { expected: "map", found }),
        };
        self.checked("map", len, 64)
    }

    fn str_of(&mut self, m: Marker) -> Result<&'a str, WireError> {
        let len = match m {
            Marker::FixStr(n) => n as usize,
            Marker::Str8 => self.be(1)? as usize,
            Marker::Str16 => self.be(2)? as usize,
            Marker::Str32 => self.be(4)? as usize,
            found => return Err(WireError::Type { expected: "string", found }),
        };
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map_err(|_| WireError::Type { expected: "utf-8", found: m })
    }

    fn str(&mut self) -> Result<&'a str, WireError> {
        let m = self.marker()?;
        self.str_of(m)
    }

    fn int_of(&mut self, m: Marker) -> Result<i64, WireError> {
        Ok(match m {
            Marker::FixPos(v) => i64::from(v),
            Marker::FixNeg(v) => i64::from(v),
            Marker::U8 => self.be(1)? as i64,
            Marker::U16 => self.be(2)? as i64,
            Marker::U32 => self.be(4)? as i64,
            // A u64 above i64::MAX is a hash published unsigned: the same 8 bytes.
            Marker::U64 => self.be(8)? as i64,
            Marker::I8 => self.be(1)? as u8 as i8 as i64,
            Marker::I16 => self.be(2)? as u16 as i16 as i64,
            Marker::I32 => self.be(4)? as u32 as i32 as i64,
            Marker::I64 => self.be(8)? as i64,
            found => return Err(WireError::Type { expected: "integer", found }),
        })
    }

    fn int(&mut self) -> Result<i64, WireError> {
        let m = self.marker()?;
        self.int_of(m)
    }

    fn opt_int(&mut self) -> Result<Option<i64>, WireError> {
        if self.peek()? == Marker::Null {
            self.take(1)?;
            return Ok(None);
        }
        self.int().map(Some)
    }

    fn float(&mut self) -> Result<f64, WireError> {
        Ok(match self.marker()? {
            Marker::F64 => f64::from_bits(self.be(8)?),
            Marker::F32 => f64::from(f32::from_bits(self.be(4)? as u32)),
            m => self.int_of(m)? as f64,
        })
    }

    fn hashes(&mut self) -> Result<Vec<BlockHash>, WireError> {
        let n = self.array_len("block_hashes", MAX_HASHES)?;
        (0..n).map(|_| self.int()).collect()
    }

    /// Token ids: checked and counted, not kept.
    fn token_count(&mut self) -> Result<usize, WireError> {
        let n = self.array_len("token_ids", MAX_TOKENS)?;
        for _ in 0..n {
            self.int()?;
        }
        Ok(n)
    }

    /// A medium string, or nil (GPU). An unknown medium is kept as external.
    fn medium(&mut self) -> Result<Medium, WireError> {
        if self.peek()? == Marker::Null {
            self.take(1)?;
            return Ok(Medium::Gpu);
        }
        Ok(Medium::parse(self.str()?).unwrap_or(Medium::External))
    }

    /// Whether the next value is anything but nil (for namespacing fields); skips it.
    fn present(&mut self) -> Result<bool, WireError> {
        if self.peek()? == Marker::Null {
            self.take(1)?;
            return Ok(false);
        }
        self.skip(0)?;
        Ok(true)
    }

    fn skip(&mut self, depth: usize) -> Result<(), WireError> {
        if depth > MAX_DEPTH {
            return Err(WireError::TooDeep);
        }
        let m = self.marker()?;
        let fixed = match m {
            Marker::Null | Marker::True | Marker::False | Marker::FixPos(_) | Marker::FixNeg(_) => {
                0
            }
            Marker::U8 | Marker::I8 => 1,
            Marker::U16 | Marker::I16 => 2,
            Marker::U32 | Marker::I32 | Marker::F32 => 4,
            Marker::U64 | Marker::I64 | Marker::F64 => 8,
            Marker::FixExt1 => 2,
            Marker::FixExt2 => 3,
            Marker::FixExt4 => 5,
            Marker::FixExt8 => 9,
            Marker::FixExt16 => 17,
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => {
                self.str_of(m)?;
                0
            }
            Marker::Bin8 | Marker::Ext8 => self.be(1)? as usize + usize::from(m == Marker::Ext8),
            Marker::Bin16 | Marker::Ext16 => self.be(2)? as usize + usize::from(m == Marker::Ext16),
            Marker::Bin32 | Marker::Ext32 => self.be(4)? as usize + usize::from(m == Marker::Ext32),
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                let n = self.array_len_of(m, "array", MAX_TOKENS)?;
                for _ in 0..n {
                    self.skip(depth + 1)?;
                }
                0
            }
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                let n = self.map_len(m)?;
                for _ in 0..2 * n {
                    self.skip(depth + 1)?;
                }
                0
            }
            Marker::Reserved => return Err(WireError::Type { expected: "a value", found: m }),
        };
        self.take(fixed)?;
        Ok(())
    }

    /// One event, map-encoded or positional.
    fn event(&mut self) -> Result<Event, WireError> {
        match self.marker()? {
            m @ (Marker::FixMap(_) | Marker::Map16 | Marker::Map32) => {
                let n = self.map_len(m)?;
                self.map_event(n)
            }
            m @ (Marker::FixArray(_) | Marker::Array16 | Marker::Array32) => {
                let n = self.array_len_of(m, "event", 64)?;
                self.array_event(n)
            }
            found => Err(WireError::Type { expected: "event map or array", found }),
        }
    }

    fn map_event(&mut self, n: usize) -> Result<Event, WireError> {
        let mut kind = None;
        let mut hashes = None;
        let mut parent = None;
        let mut tokens = 0;
        let mut block_size = None;
        let mut medium = Medium::Gpu;
        let mut namespaced = false;
        for _ in 0..n {
            match self.str()? {
                "type" => kind = Some(self.str()?),
                "block_hashes" => hashes = Some(self.hashes()?),
                "parent_block_hash" => parent = self.opt_int()?,
                "token_ids" => tokens = self.token_count()?,
                "block_size" => block_size = Some(self.int()?),
                "medium" => medium = self.medium()?,
                "lora_id" | "cache_salt" | "lora_name" | "session_id" => {
                    namespaced |= self.present()?
                }
                _ => self.skip(0)?,
            }
        }
        let kind = kind.ok_or(WireError::Missing("type"))?;
        build(kind, hashes, parent, tokens, block_size, medium, namespaced)
    }

    fn array_event(&mut self, n: usize) -> Result<Event, WireError> {
        if n == 0 {
            return Err(WireError::Missing("type"));
        }
        let kind = self.str()?;
        let mut left = n - 1;
        let mut next = || {
            let has = left > 0;
            left = left.saturating_sub(1);
            has
        };
        let event = match kind {
            "BlockStored" | "BlockStoredWithMetadata" => {
                if !next() {
                    return Err(WireError::Missing("block_hashes"));
                }
                let hashes = self.hashes()?;
                let parent = if next() { self.opt_int()? } else { None };
                let tokens = if next() { self.token_count()? } else { 0 };
                let block_size = if next() { Some(self.int()?) } else { None };
                let namespaced = if next() { self.present()? } else { false };
                let medium = if next() { self.medium()? } else { Medium::Gpu };
                build(kind, Some(hashes), parent, tokens, block_size, medium, namespaced)?
            }
            "BlockRemoved" => {
                if !next() {
                    return Err(WireError::Missing("block_hashes"));
                }
                let hashes = self.hashes()?;
                let medium = if next() { self.medium()? } else { Medium::Gpu };
                Event::Removed { hashes, medium }
            }
            "AllBlocksCleared" => Event::Cleared,
            other => return Err(WireError::UnknownEvent(other.to_owned())),
        };
        while next() {
            self.skip(0)?;
        }
        Ok(event)
    }
}

fn build(
    kind: &str,
    hashes: Option<Vec<BlockHash>>,
    parent: Option<BlockHash>,
    tokens: usize,
    block_size: Option<i64>,
    medium: Medium,
    namespaced: bool,
) -> Result<Event, WireError> {
    Ok(match kind {
        "BlockStored" | "BlockStoredWithMetadata" => Event::Stored {
            hashes: hashes.ok_or(WireError::Missing("block_hashes"))?,
            parent,
            tokens,
            block_size: block_size
                .and_then(|b| usize::try_from(b).ok())
                .filter(|b| *b > 0)
                .ok_or(WireError::Missing("block_size"))?,
            medium,
            namespaced,
        },
        "BlockRemoved" => {
            Event::Removed { hashes: hashes.ok_or(WireError::Missing("block_hashes"))?, medium }
        }
        "AllBlocksCleared" => Event::Cleared,
        other => return Err(WireError::UnknownEvent(other.to_owned())),
    })
}

/// Encodes a batch as SGLang >= 0.5.20 does (map events), for the simulated worker and tests.
/// `stored` events carry their token ids.
pub struct Encoder {
    buf: Vec<u8>,
    count: u32,
    body: Vec<u8>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    pub fn new() -> Self {
        Self { buf: Vec::new(), count: 0, body: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn stored(
        &mut self,
        hashes: &[BlockHash],
        parent: Option<BlockHash>,
        tokens: &[u32],
        block_size: usize,
    ) {
        let w = &mut self.body;
        w_map(w, 7);
        w_str(w, "type");
        w_str(w, "BlockStored");
        w_str(w, "block_hashes");
        w_hashes(w, hashes);
        w_str(w, "parent_block_hash");
        match parent {
            Some(p) => w_int(w, p),
            None => rmp::encode::write_nil(w).expect("vec"),
        }
        w_str(w, "token_ids");
        rmp::encode::write_array_len(w, tokens.len() as u32).expect("vec");
        for t in tokens {
            w_int(w, i64::from(*t));
        }
        w_str(w, "block_size");
        w_int(w, block_size as i64);
        w_str(w, "lora_id");
        rmp::encode::write_nil(w).expect("vec");
        w_str(w, "medium");
        w_str(w, "GPU");
        self.count += 1;
    }

    pub fn removed(&mut self, hashes: &[BlockHash]) {
        let w = &mut self.body;
        w_map(w, 3);
        w_str(w, "type");
        w_str(w, "BlockRemoved");
        w_str(w, "block_hashes");
        w_hashes(w, hashes);
        w_str(w, "medium");
        w_str(w, "GPU");
        self.count += 1;
    }

    pub fn cleared(&mut self) {
        w_map(&mut self.body, 1);
        w_str(&mut self.body, "type");
        w_str(&mut self.body, "AllBlocksCleared");
        self.count += 1;
    }

    /// The payload `[ts, events, dp_rank]`; the encoder is empty again after.
    pub fn finish(&mut self, ts: f64, dp_rank: Option<u32>) -> Vec<u8> {
        self.buf.clear();
        let w = &mut self.buf;
        rmp::encode::write_array_len(w, 3).expect("vec");
        rmp::encode::write_f64(w, ts).expect("vec");
        rmp::encode::write_array_len(w, self.count).expect("vec");
        w.extend_from_slice(&self.body);
        match dp_rank {
            Some(r) => w_int(w, i64::from(r)),
            None => rmp::encode::write_nil(w).expect("vec"),
        }
        self.body.clear();
        self.count = 0;
        std::mem::take(&mut self.buf)
    }
}

fn w_map(w: &mut Vec<u8>, n: u32) {
    rmp::encode::write_map_len(w, n).expect("vec");
}

fn w_str(w: &mut Vec<u8>, s: &str) {
    rmp::encode::write_str(w, s).expect("vec");
}

fn w_int(w: &mut Vec<u8>, v: i64) {
    rmp::encode::write_sint(w, v).expect("vec");
}

fn w_hashes(w: &mut Vec<u8>, hashes: &[BlockHash]) {
    rmp::encode::write_array_len(w, hashes.len() as u32).expect("vec");
    for h in hashes {
        w_int(w, *h);
    }
}

#[cfg(test)]
mod tests;
