mod common;

use bytes::Bytes;
use cairn_storage::{Digest, DigestFunction, ErrorKind};
use common::*;

#[test]
fn blobs_of_every_size_class_read_back_intact() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(config(dir.path()));
    let sizes = [
        0,
        1,
        4095,
        4096,
        4097,
        (64 << 10) + 1,         // just past the packed path: an extent
        MIB as usize,           // an extent spanning two write units
        (3 * MIB / 2) as usize, // an extent with a chunk table
        (9 * MIB) as usize,     // larger than a segment: a huge segment of its own
    ];
    let mut stored = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let data = blob(i as u64, size);
        stored.push((put(&engine, &data), data));
    }
    for (d, data) in &stored {
        let got = block_on(engine.get_bytes(*d)).unwrap();
        assert_eq!(got.len(), data.len(), "size of {d}");
        assert!(got == *data, "content of {d}");
    }
    let missing = block_on(engine.find_missing(stored.iter().map(|(d, _)| *d).collect())).unwrap();
    assert!(missing.is_empty());
    block_on(engine.shutdown()).unwrap();

    // And again after a restart, from the checkpoint.
    let engine = start(config(dir.path()));
    for (d, data) in &stored {
        assert!(
            block_on(engine.get_bytes(*d)).unwrap() == *data,
            "{d} after restart"
        );
    }
    block_on(engine.shutdown()).unwrap();
}

#[test]
fn ranged_reads_return_exactly_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(config(dir.path()));
    for size in [10_000usize, (3 * MIB) as usize + 123, (9 * MIB) as usize] {
        let data = blob(size as u64, size);
        let d = put(&engine, &data);
        let cases = [
            (0, None),
            (1, Some(1)),
            (4095, Some(4098)),
            (size as u64 - 1, None),
            (size as u64, None),
            (MIB - 7, Some(MIB + 14)),
            (100, Some(0)),
        ];
        for (offset, limit) in cases {
            if offset > size as u64 {
                continue;
            }
            let got = block_on(async { engine.get(d, offset, limit).await?.collect_bytes().await })
                .unwrap();
            let end = limit.map_or(size as u64, |l| (offset + l).min(size as u64));
            let limit_means_all = limit == Some(0);
            let want = if limit_means_all {
                &data[offset as usize..]
            } else {
                &data[offset as usize..end as usize]
            };
            if limit_means_all {
                // A zero limit is the caller's "no limit" in REAPI, translated by the node;
                // the engine reads zero bytes.
                assert!(got.is_empty());
            } else {
                assert!(got == *want, "size {size} offset {offset} limit {limit:?}");
            }
        }
        let err = block_on(engine.get(d, size as u64 + 1, None))
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::OutOfRange);
    }
    block_on(engine.shutdown()).unwrap();
}

#[test]
fn empty_blob_is_always_present_and_functions_are_separate_keys() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(config(dir.path()));
    for f in [DigestFunction::Sha256, DigestFunction::Blake3] {
        let empty = Digest::empty(f);
        assert!(block_on(engine.contains(empty)).unwrap());
        assert!(block_on(engine.get_bytes(empty)).unwrap().is_empty());
    }
    let data = blob(1, 5000);
    let b3 = Digest::of(DigestFunction::Blake3, &data);
    block_on(engine.put(b3, data.clone())).unwrap();
    assert!(block_on(engine.get_bytes(b3)).unwrap() == data);
    let sha = digest(&data);
    assert_eq!(
        block_on(engine.get_bytes(sha)).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        block_on(engine.find_missing(vec![sha, b3])).unwrap(),
        vec![sha]
    );
    block_on(engine.put(sha, Bytes::new())).unwrap_err();
    block_on(engine.shutdown()).unwrap();
}

#[test]
fn blob_over_the_size_limit_is_refused_without_evicting_anything() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(config(dir.path()));
    let kept = put(&engine, &blob(1, 5000));
    let limit = engine.max_blob_size();
    let huge = Digest {
        size: limit + 1,
        ..digest(b"whatever")
    };
    let err = block_on(engine.begin_put(huge)).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err}");
    assert!(block_on(engine.contains(kept)).unwrap());
    assert_eq!(block_on(engine.stats()).unwrap().evictions(), 0);
    block_on(engine.shutdown()).unwrap();
}

#[test]
fn get_by_hash_finds_a_blob_without_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(config(dir.path()));
    for (seed, size) in [(1, 10), (2, 70_000), (3, 3 * MIB as usize)] {
        let data = blob(seed, size);
        let d = put(&engine, &data);
        let (found, stream) = block_on(engine.get_by_hash(d.function, d.hash)).unwrap();
        assert_eq!(found, d, "the size comes from the record");
        assert!(block_on(stream.collect_bytes()).unwrap() == data);
        let mut blake = d;
        blake.function = DigestFunction::Blake3;
        let err = block_on(engine.get_by_hash(blake.function, blake.hash)).err();
        assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::NotFound));
    }
    let absent = digest(b"never stored");
    let err = block_on(engine.get_by_hash(absent.function, absent.hash)).err();
    assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::NotFound));
    let empty = Digest::empty(DigestFunction::Sha256);
    let (found, stream) = block_on(engine.get_by_hash(empty.function, empty.hash)).unwrap();
    assert_eq!(found, empty);
    assert!(block_on(stream.collect_bytes()).unwrap().is_empty());
    block_on(engine.shutdown()).unwrap();
}

/// The index finds CAS blobs by hash alone; the answer for a (hash, size) pair must
/// still be exact, for reads, existence and uploads.
#[test]
fn a_right_hash_with_a_wrong_size_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(config(dir.path()));
    for (seed, size) in [(1, 10), (2, 70_000), (3, 3 * MIB as usize)] {
        let data = blob(seed, size);
        let d = put(&engine, &data);
        let wrong = [
            Digest {
                size: d.size + 1,
                ..d
            },
            Digest {
                size: d.size - 1,
                ..d
            },
            Digest { size: 5 << 30, ..d },
        ];
        let missing = block_on(engine.find_missing(wrong.to_vec())).unwrap();
        assert_eq!(missing, wrong.to_vec());
        assert_eq!(block_on(engine.find_missing(vec![d])).unwrap(), vec![]);
        for w in &wrong[..2] {
            assert!(!block_on(engine.contains(*w)).unwrap());
            let err = block_on(engine.get_bytes(*w)).err();
            assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::NotFound));
            let mut claimed = data.to_vec();
            claimed.resize(w.size as usize, 0);
            let err = block_on(engine.put(*w, Bytes::from(claimed))).err();
            assert_eq!(
                err.map(|e| e.kind()),
                Some(ErrorKind::InvalidArgument),
                "an upload under a wrong size is not taken as already stored"
            );
        }
    }
    block_on(engine.shutdown()).unwrap();
}
