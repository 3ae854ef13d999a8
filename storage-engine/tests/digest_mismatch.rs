mod common;

use bytes::Bytes;
use cairn_storage::{EngineConfig, ErrorKind};
use common::*;

fn sizes() -> [usize; 3] {
    [5000, 500_000, 3 * MIB as usize] // packed, extent, huge
}

#[test]
fn mismatching_content_is_refused_and_never_visible() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(config(dir.path()));
    for size in sizes() {
        let data = blob(size as u64, size);
        let mut claimed = digest(&data);
        claimed.hash[0] ^= 1;
        let err = block_on(engine.put(claimed, data.clone())).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert!(!block_on(engine.contains(claimed)).unwrap());
        assert_eq!(
            block_on(engine.get_bytes(claimed)).unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }
    block_on(engine.shutdown()).unwrap();
    // Not after a restart either.
    let engine = start(config(dir.path()));
    assert_eq!(block_on(engine.stats()).unwrap().objects(), 0);
    block_on(engine.shutdown()).unwrap();
}

#[test]
fn short_and_long_streams_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(config(dir.path()));
    for size in sizes() {
        let data = blob(size as u64 + 1, size);
        let d = digest(&data);
        // Short: ends one byte early.
        let err = block_on(async {
            let mut u = engine.begin_put(d).await?;
            u.write(data.slice(..size - 1)).await?;
            u.finish().await
        })
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        // Whole blobs of the wrong length, short and long.
        for wrong in [
            data.slice(..size - 1),
            Bytes::from([&data[..], b"x"].concat()),
        ] {
            let err = block_on(engine.put(d, wrong)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        }
        // Long: one byte too many.
        let err = block_on(async {
            let mut u = engine.begin_put(d).await?;
            u.write(data.clone()).await?;
            u.write(Bytes::from_static(b"x")).await?;
            u.finish().await
        })
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        // Abandoned halfway: the client went away.
        block_on(async {
            let mut u = engine.begin_put(d).await.unwrap();
            u.write(data.slice(..size / 2)).await.unwrap();
            drop(u);
        });
        assert!(
            !block_on(engine.contains(d)).unwrap(),
            "partial {d} visible"
        );
        // The same blob uploaded properly afterwards is fine.
        block_on(engine.put(d, data.clone())).unwrap();
        assert!(block_on(engine.get_bytes(d)).unwrap() == data);
    }
    block_on(engine.shutdown()).unwrap();
}

/// Failed uploads leave dead space in their segments; reclaiming those segments frees
/// it, so failures cannot leak disk.
#[test]
fn space_of_failed_uploads_is_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = EngineConfig {
        max_size: 32 * MIB,
        partitions: 1,
        segment_size: Some(MIB),
        small_blob_max: 16 << 10,
        max_ac_value: 16 << 10,
        ..config(dir.path())
    };
    let budget = cfg.max_size;
    let engine = start(cfg);
    let before: Vec<_> = segment_files(dir.path());
    let mut failed_segments = Vec::new();
    for i in 0..40u64 {
        let data = blob(i, 200_000);
        let mut wrong = digest(&data);
        wrong.hash[5] ^= 0xff;
        assert!(block_on(engine.put(wrong, data)).is_err());
    }
    for f in segment_files(dir.path()) {
        if !before.contains(&f) {
            failed_segments.push(f);
        }
    }
    assert!(!failed_segments.is_empty());
    for i in 0..(3 * budget / 100_000) {
        put(&engine, &blob(10_000 + i, 100_000));
        assert!(disk_usage(dir.path()) <= budget);
    }
    for f in &failed_segments {
        assert!(
            !f.exists(),
            "{} holding dead extents was never reclaimed",
            f.display()
        );
    }
    block_on(engine.shutdown()).unwrap();
}
