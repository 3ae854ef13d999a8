//! The memory tier through the node: a warm read is served from memory (the hit
//! counter in `/metrics` rises), and `--memory-cache 0` turns the tier off.

mod common;

use common::{blob, read_blob, read_name, sha256, upload_name, write_blob, Node};

/// Writes a blob, reads it three times, and returns the node's tier hits and bytes.
async fn warm_reads(node: &Node) -> (f64, f64) {
    let data = blob(1, 10_000);
    let digest = sha256(&data);
    let mut client = node.bytestream().await;
    let committed = write_blob(&mut client, &upload_name("", &digest), &data)
        .await
        .unwrap();
    assert_eq!(committed, data.len() as i64);
    for _ in 0..3 {
        let read = read_blob(&mut client, &read_name("", &digest), 0, 0)
            .await
            .unwrap();
        assert_eq!(read, data);
    }
    (
        node.metric_sum("cairn_memory_tier_hits"),
        node.metric_sum("cairn_memory_tier_bytes"),
    )
}

#[tokio::test]
async fn warm_reads_are_served_from_memory() {
    let node = Node::start();
    let (hits, bytes) = warm_reads(&node).await;
    assert_eq!(hits, 3.0, "warm reads went to the disk");
    assert!(bytes >= 10_000.0);
}

#[tokio::test]
async fn memory_cache_zero_turns_the_tier_off() {
    let temp = tempfile::tempdir().unwrap();
    let node = Node::start_in(&temp.path().join("data"), &["--memory-cache", "0"]);
    let (hits, bytes) = warm_reads(&node).await;
    assert_eq!(hits, 0.0);
    assert_eq!(bytes, 0.0);
}
