//! Recovery never panics on arbitrary directory contents: segment files of random names
//! holding valid frames, frames with wrong offsets, random bytes and zeros. Whatever opens
//! must then read back consistently.

mod common;

use std::fs;

use common::*;
use kefu_protocol::frame::{self, Header, Kind};
use kefu_storage::{Error, Log};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Chunk {
    /// A valid frame; its log offset is `base + rel` (right when rel counts up).
    Frame {
        rel: u64,
        len: usize,
        kind: u8,
    },
    Random(Vec<u8>),
    Zeros(usize),
}

fn chunk() -> impl Strategy<Value = Chunk> {
    prop_oneof![
        6 => (0u64..40, 0usize..200, prop_oneof![Just(1u8), Just(2), Just(3), Just(17)])
            .prop_map(|(rel, len, kind)| Chunk::Frame { rel, len, kind }),
        1 => proptest::collection::vec(any::<u8>(), 0..100).prop_map(Chunk::Random),
        1 => (0usize..300).prop_map(Chunk::Zeros),
    ]
}

fn segment() -> impl Strategy<Value = (u64, bool, Vec<Chunk>)> {
    (
        prop_oneof![0u64..60, Just(u64::MAX), Just(i64::MAX as u64)],
        proptest::bool::weighted(0.15),
        proptest::collection::vec(chunk(), 0..30),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn open_never_panics_and_reads_consistently(
        segs in proptest::collection::vec(segment(), 0..4),
        checkpoint in proptest::option::of(0u64..100),
    ) {
        let dir = tempfile::tempdir().unwrap();
        for (base, zst, chunks) in &segs {
            let mut bytes = Vec::new();
            let mut counter = 0;
            for c in chunks {
                match c {
                    Chunk::Frame { rel, len, kind } => {
                        // Mostly dense offsets, sometimes the chunk's own.
                        let off = if rel % 5 == 0 { base.wrapping_add(*rel) } else { base.wrapping_add(counter) };
                        counter += 1;
                        let kind = Kind::try_from(*kind).unwrap();
                        let mut h = Header::new(kind, rel % 3, counter, 0);
                        h.log_offset = off;
                        frame::encode_into(&h, &payload(off, *len), &mut bytes);
                    }
                    Chunk::Random(r) => bytes.extend_from_slice(r),
                    Chunk::Zeros(n) => bytes.resize(bytes.len() + n, 0),
                }
            }
            let name = format!("{base:020}.log");
            if *zst {
                let z = zstd::bulk::compress(&bytes, 1).unwrap();
                fs::write(dir.path().join(format!("{name}.zst")), z).unwrap();
            } else {
                fs::write(dir.path().join(name), &bytes).unwrap();
            }
        }
        if let Some(cp) = checkpoint {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&cp.to_le_bytes());
            let crc = crc32c_of(&b[..8]);
            b[8..12].copy_from_slice(&crc.to_le_bytes());
            fs::write(dir.path().join("CHECKPOINT"), b).unwrap();
        }
        let Ok((mut log, report)) = Log::open(small_cfg(dir.path())) else {
            return Ok(());
        };
        prop_assert_eq!(report.next_offset, log.next_offset());
        let start = log.start_offset();
        let mut from = start;
        // Read everything readable, stepping over reported damage.
        let mut guard = 0;
        while from < log.next_offset() && guard < 1000 {
            guard += 1;
            match log.read_range(from, 64, |f| assert!(f.header.kind.is_record())) {
                Ok(next) if next > from => from = next,
                _ => from += 1,
            }
        }
        let _ = log.file_runs(start, 1 << 16);
        let _ = log.read_conversation(1, 0, 100, |_| {});
        // It still takes appends and syncs, unless the offsets are used up.
        let appended = log.append(&Header::new(Kind::Event, 1, 0, 0), b"{}");
        if log.next_offset() >= i64::MAX as u64 {
            prop_assert!(matches!(appended, Err(Error::LimitExceeded(_))), "{:?}", appended);
        } else {
            prop_assert_eq!(appended.unwrap() + 1, log.next_offset());
        }
        log.sync(0).unwrap();
    }
}

/// The checkpoint's CRC (CRC32C), computed bit by bit so the test does not trust the code
/// under test for it.
fn crc32c_of(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
