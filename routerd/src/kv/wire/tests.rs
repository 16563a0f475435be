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

proptest! {
    /// Arbitrary bytes, and valid batches with bytes flipped or cut: an error or a batch,
    /// never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn corrupted_batches_never_panic(flip in prop::collection::vec((0usize..400, any::<u8>()), 1..6), cut in 0usize..400) {
        for golden in [MAP_BATCH, ARRAY_BATCH, LORA_BATCH] {
            let mut b = hex(golden);
            for (at, v) in &flip {
                let n = b.len();
                b[at % n] = *v;
            }
            let _ = decode(&b);
            b.truncate(cut.min(b.len()));
            let _ = decode(&b);
        }
    }
}
