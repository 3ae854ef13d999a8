mod common;

use bytes::Bytes;
use cairn_storage::EngineConfig;
use common::*;

/// 64 uploads into one partition, their chunks interleaved, each read back intact.
#[test]
fn interleaved_uploads_into_one_partition_stay_intact() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(EngineConfig {
        partitions: 1,
        shards: 1,
        max_size: 64 * MIB,
        ..config(dir.path())
    });
    let sizes: Vec<usize> = (0..64)
        .map(|i| match i % 4 {
            0 => 3000 + i,           // packed
            1 => 40_000 + i,         // packed, several chunks
            2 => 300_000 + i * 7,    // extent
            _ => 1_200_000 + i * 13, // extent with a chunk table
        })
        .collect();
    let blobs: Vec<Bytes> = sizes
        .iter()
        .enumerate()
        .map(|(i, &s)| blob(1000 + i as u64, s))
        .collect();
    let digests: Vec<_> = blobs.iter().map(|b| digest(b)).collect();
    block_on(async {
        let mut uploads = Vec::new();
        for d in &digests {
            uploads.push(engine.begin_put(*d).await.unwrap());
        }
        const CHUNK: usize = 16 << 10;
        let rounds = sizes.iter().max().unwrap().div_ceil(CHUNK);
        for round in 0..rounds {
            for (u, data) in uploads.iter_mut().zip(&blobs) {
                let start = round * CHUNK;
                if start < data.len() {
                    let end = (start + CHUNK).min(data.len());
                    u.write(data.slice(start..end)).await.unwrap();
                }
            }
        }
        let results = futures::future::join_all(uploads.into_iter().map(|u| u.finish())).await;
        for r in results {
            r.unwrap();
        }
    });
    for (d, data) in digests.iter().zip(&blobs) {
        let got = block_on(engine.get_bytes(*d)).unwrap();
        assert!(got == *data, "{d} corrupted by a neighbour");
    }
    block_on(engine.shutdown()).unwrap();
}
