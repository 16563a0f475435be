use proptest::prelude::*;

use super::*;

const A: i64 = -3488128144981237669;
const B: i64 = -3787494577174227566;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// Python's `msgpack.packb` of SGLang >= 0.5.20's batch: map events, dp rank 0.
const MAP_BATCH: &str = "93cb41d954fc402000009387a474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657392d3cf97adeedb59e05bd3cb701dbfc2cfd592b1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f696473950102030405aa626c6f636b5f73697a6504a76c6f72615f6964c0a66d656469756da347505583a474797065ac426c6f636b52656d6f766564ac626c6f636b5f68617368657391d3cb701dbfc2cfd592a66d656469756daa4350555f50494e4e454481a474797065b0416c6c426c6f636b73436c656172656400";
/// msgspec's array_like encoding of older engines: tag first, trailing defaults omitted, no
/// dp rank.
const ARRAY_BATCH: &str = "92cb41d954fc402000009396ab426c6f636b53746f72656492d3cf97adeedb59e05bd3cb701dbfc2cfd592c095010203040504c092ac426c6f636b52656d6f76656491d3cb701dbfc2cfd59291b0416c6c426c6f636b73436c6561726564";
/// SGLang's `LoadStat(3, 2, 1500, 80000, attn_dp_rank=0)`.
const LOAD_STAT: &str = "96a84c6f6164537461740302cd05dcce0001388000";
/// A LoRA request's blocks (lora_id 3): namespaced.
const LORA_BATCH: &str = "93cb3ff00000000000009187a474797065ab426c6f636b53746f726564ac626c6f636b5f6861736865739107b1706172656e745f626c6f636b5f68617368d3cf97adeedb59e05ba9746f6b656e5f6964739109aa626c6f636b5f73697a6504a76c6f72615f696403a66d656469756da3475055c0";

fn stored(hashes: Vec<i64>, parent: Option<i64>, tokens: usize, namespaced: bool) -> Event {
    Event::Stored { hashes, parent, tokens, block_size: 4, medium: Medium::Gpu, namespaced }
}

#[test]
fn golden_map_encoding() {
    let b = decode(&hex(MAP_BATCH)).unwrap();
    assert_eq!(b.ts, 1_700_000_000.5);
    assert_eq!(b.dp_rank, Some(0));
    assert_eq!(
        b.events,
        vec![
            stored(vec![A, B], None, 5, false),
            Event::Removed { hashes: vec![B], medium: Medium::CpuPinned },
            Event::Cleared,
        ]
    );
}

#[test]
fn golden_array_encoding() {
    let b = decode(&hex(ARRAY_BATCH)).unwrap();
    assert_eq!(b.dp_rank, None);
    assert_eq!(
        b.events,
        vec![
            stored(vec![A, B], None, 5, false),
            Event::Removed { hashes: vec![B], medium: Medium::Gpu },
            Event::Cleared,
        ]
    );
}

#[test]
fn lora_blocks_are_namespaced() {
    let b = decode(&hex(LORA_BATCH)).unwrap();
    assert_eq!(b.events, vec![stored(vec![7], Some(A), 1, true)]);
}

#[test]
fn the_encoder_writes_what_sglang_writes() {
    let mut e = Encoder::new();
    e.stored(&[A, B], None, &[1, 2, 3, 4, 5], 4);
    e.removed(&[B]);
    e.cleared();
    let payload = e.finish(1.0, Some(2));
    assert!(e.is_empty());
    let b = decode(&payload).unwrap();
    assert_eq!(b.dp_rank, Some(2));
    assert_eq!(
        b.events,
        vec![
            stored(vec![A, B], None, 5, false),
            Event::Removed { hashes: vec![B], medium: Medium::Gpu },
            Event::Cleared
        ]
    );
}

#[test]
fn frames() {
    let m = message(vec![b"kv".to_vec(), 7u64.to_be_bytes().to_vec(), vec![0x90]]).unwrap();
    assert_eq!((m.topic.as_slice(), m.seq), (&b"kv"[..], 7));
    let end = message(vec![(-1i64).to_be_bytes().to_vec(), vec![]]).unwrap();
    assert_eq!(end.seq, -1);
    assert_eq!(message(vec![vec![1]]), Err(WireError::Frames(1)));
    assert_eq!(message(vec![vec![], vec![1, 2], vec![]]), Err(WireError::Seq(2)));
}

#[test]
fn malformed_input_is_an_error() {
    // An array header that claims 2^32-1 events in a 6-byte message: refused before allocating.
    assert!(matches!(
        decode(&[0x92, 0x00, 0xdd, 0xff, 0xff, 0xff, 0xff]),
        Err(WireError::TooLong { .. })
    ));
    assert_eq!(decode(&[0x92, 0x00, 0xdc, 0x00, 0x10]), Err(WireError::Truncated));
    assert!(matches!(
        decode(&[0x92, 0x00, 0x91, 0x81, 0xa1, b'x', 0x01]),
        Err(WireError::Missing(_))
    ));
    let unknown = {
        let mut w = Vec::new();
        rmp::encode::write_array_len(&mut w, 2).unwrap();
        rmp::encode::write_f64(&mut w, 0.0).unwrap();
        rmp::encode::write_array_len(&mut w, 1).unwrap();
        rmp::encode::write_array_len(&mut w, 1).unwrap();
        rmp::encode::write_str(&mut w, "Teleported").unwrap();
        w
    };
    assert_eq!(decode(&unknown), Err(WireError::UnknownEvent("Teleported".into())));
    // Deep nesting in an unknown field.
    let mut deep = vec![0x92, 0x00, 0x91, 0x81, 0xa1, b'z'];
    deep.extend(std::iter::repeat_n(0x91, 100));
    deep.push(0x00);
    assert_eq!(decode(&deep), Err(WireError::TooDeep));
    assert_eq!(decode(&[0x92, 0x00, 0x90, 0x00]), Err(WireError::Trailing(1)));
}

/// `LoadStat(3, 2, 1500, 80000, attn_dp_rank=0)` as SGLang's msgspec encoder writes it
/// (tagged, array-like), with a null rank, and as a map.
#[test]
fn load_stats_decode() {
    let want =
        LoadStat { running: 3, waiting: 2, tokens: 1500, max_tokens: 80000, dp_rank: Some(0) };
    assert_eq!(decode_load(&hex(LOAD_STAT)), Ok(want));
    assert_eq!(
        decode_load(&hex("96a84c6f6164537461740302cd05dcce00013880c0")),
        Ok(LoadStat { dp_rank: None, ..want })
    );
    assert_eq!(encode_load(&want), hex(LOAD_STAT));
    let map = hex(concat!(
        "86a474797065a84c6f616453746174b06e756d5f72756e6e696e675f7265717301b06e756d5f77616974696e",
        "675f7265717300aa6e756d5f746f6b656e7305b46d61785f746f74616c5f6e756d5f746f6b656e7300a56578",
        "747261920102"
    ));
    assert_eq!(
        decode_load(&map),
        Ok(LoadStat { running: 1, waiting: 0, tokens: 5, max_tokens: 0, dp_rank: None })
    );
    // A trailing field a later engine adds is skipped.
    let mut longer = hex("97a84c6f6164537461740302cd05dcce0001388000");
    longer.push(0x07);
    assert_eq!(decode_load(&longer), Ok(want));
    assert_eq!(
        decode_load(&hex("94a84c6f61645374617403")),
        Err(WireError::Missing("LoadStat's four counts"))
    );
    assert!(matches!(
        decode_load(&hex("96a8426c6f636b5374610302010000")),
        Err(WireError::UnknownEvent(_))
    ));
    assert!(decode_load(&hex("96a84c6f6164537461740302cd05dc")).is_err(), "cut short");
    assert!(decode_load(&hex("96a84c6f61645374617403ff010000")).is_err(), "a negative count");
}

proptest! {
    /// Arbitrary bytes, and valid batches with bytes flipped or cut: an error or a batch,
    /// never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = (decode(&bytes), decode_load(&bytes));
    }

    #[test]
    fn corrupted_batches_never_panic(flip in prop::collection::vec((0usize..400, any::<u8>()), 1..6), cut in 0usize..400) {
        for golden in [MAP_BATCH, ARRAY_BATCH, LORA_BATCH, LOAD_STAT] {
            let mut b = hex(golden);
            for (at, v) in &flip {
                let n = b.len();
                b[at % n] = *v;
            }
            let _ = (decode(&b), decode_load(&b));
            b.truncate(cut.min(b.len()));
            let _ = (decode(&b), decode_load(&b));
        }
    }
}
