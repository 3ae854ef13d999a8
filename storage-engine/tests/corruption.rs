//! Damage on disk: flipped payload bytes, a flipped header, a truncated tail. The
//! damaged records are never served; every other record is, both when the index comes
//! from a checkpoint and when it is rebuilt by scanning.

mod common;

use bytes::Bytes;
use cairn_storage::format::HEADER_LEN;
use cairn_storage::{Digest, ErrorKind};
use common::*;
use std::path::Path;

struct Layout {
    intact: Vec<(Digest, Bytes)>,
    damaged: Vec<Digest>,
}

/// Writes blobs of every class into one partition, then damages some of them.
fn write_and_damage(dir: &Path) -> Layout {
    let cfg = cairn_storage::EngineConfig {
        partitions: 1,
        ..config(dir)
    };
    let engine = start(cfg);
    let mut all = Vec::new();
    for i in 0..30u64 {
        let size = match i % 6 {
            0..=3 => 500 + i as usize * 37,
            4 => 200_000,
            _ => 1_300_000,
        };
        let data = blob(i, size);
        all.push((put(&engine, &data), data));
    }
    let big = blob(99, 9 * MIB as usize);
    all.push((put(&engine, &big), big));
    block_on(engine.shutdown()).unwrap();

    let mut damaged = Vec::new();
    // A payload byte of a packed record, of an extent and of the huge blob.
    for idx in [2usize, 4, 30] {
        let (d, _) = &all[idx];
        let (file, pos) = locate(dir, d);
        flip_byte(&file, pos + HEADER_LEN + 100);
        damaged.push(*d);
    }
    // A header byte of another packed record.
    let (d, _) = &all[7];
    let (file, pos) = locate(dir, d);
    flip_byte(&file, pos + 20);
    damaged.push(*d);
    // A truncated tail: cut the packed segment in the middle of its last record.
    let (last_small, _) = all.iter().rev().find(|(_, b)| b.len() < 64 << 10).unwrap();
    let (file, pos) = locate(dir, last_small);
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len((pos + HEADER_LEN + 10) as u64).unwrap();
    damaged.push(*last_small);

    let intact = all
        .into_iter()
        .filter(|(d, _)| !damaged.contains(d))
        .collect();
    Layout { intact, damaged }
}

fn check(dir: &Path, layout: &Layout) {
    let engine = start(cairn_storage::EngineConfig {
        partitions: 1,
        ..config(dir)
    });
    for d in &layout.damaged {
        match block_on(engine.get_bytes(*d)) {
            Ok(_) => panic!("damaged {d} was served"),
            Err(e) => assert!(
                matches!(e.kind(), ErrorKind::NotFound | ErrorKind::DataLoss),
                "{d}: {e}"
            ),
        }
        // Once detected, it is gone: the next read is a plain miss.
        assert_eq!(
            block_on(engine.get_bytes(*d)).unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }
    for (d, data) in &layout.intact {
        let got = block_on(engine.get_bytes(*d)).unwrap_or_else(|e| panic!("intact {d} lost: {e}"));
        assert!(got == *data, "intact {d} corrupted");
    }
    block_on(engine.shutdown()).unwrap();
}

#[test]
fn corrupted_records_are_not_served_with_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let layout = write_and_damage(dir.path());
    check(dir.path(), &layout);
}

#[test]
fn corrupted_records_are_not_served_after_full_scan() {
    let dir = tempfile::tempdir().unwrap();
    let layout = write_and_damage(dir.path());
    std::fs::remove_file(dir.path().join("p000/checkpoint")).unwrap();
    check(dir.path(), &layout);
}

#[test]
fn crc_failures_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let layout = write_and_damage(dir.path());
    let engine = start(cairn_storage::EngineConfig {
        partitions: 1,
        ..config(dir.path())
    });
    for d in &layout.damaged {
        let _ = block_on(engine.get_bytes(*d));
    }
    assert!(block_on(engine.stats()).unwrap().crc_failures() >= 3);
    block_on(engine.shutdown()).unwrap();
}
