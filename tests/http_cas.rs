//! One store, one answer: Bazel's HTTP cache protocol (`/cas/{sha256}`, blobs named by
//! hash alone) and REAPI over gRPC (blobs named by hash and size) see the same blobs,
//! whichever protocol stored them, and lose them together when they are evicted.

mod common;

use bytes::Bytes;
use cairn_proto::reapi::batch_update_blobs_request::Request as UpdateRequest;
use cairn_proto::reapi::{BatchUpdateBlobsRequest, FindMissingBlobsRequest};
use cairn_storage::Digest;
use common::{blob, http, read_blob, read_name, sha256, upload_name, wire, write_blob, Node};

/// Whether gRPC's FindMissingBlobs calls `digest` present.
async fn grpc_has(node: &Node, digest: &Digest) -> bool {
    node.cas()
        .await
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![wire(digest)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests
        .is_empty()
}

/// The HTTP answers for `data`'s hash agree with gRPC's: both present with the same
/// bytes, or both absent. Returns whether it is present.
async fn agree(node: &Node, data: &[u8]) -> bool {
    let digest = sha256(data);
    let path = format!("/cas/{}", digest.hash_hex());
    let present = grpc_has(node, &digest).await;
    let (head, _) = http(node.http, "HEAD", &path, b"");
    let (get, body) = http(node.http, "GET", &path, b"");
    if present {
        assert_eq!((head, get), (200, 200), "gRPC has {path}, HTTP does not");
        assert!(body == data, "HTTP served other bytes for {path}");
        let mut bytestream = node.bytestream().await;
        let name = read_name("", &digest);
        assert!(read_blob(&mut bytestream, &name, 0, 0).await.unwrap() == data);
    } else {
        assert_eq!((head, get), (404, 404), "HTTP has {path}, gRPC does not");
    }
    present
}

#[tokio::test]
async fn blobs_stored_over_grpc_are_served_over_http() {
    let node = Node::start();
    let streamed = blob(1, 300_000);
    let digest = sha256(&streamed);
    let committed = write_blob(
        &mut node.bytestream().await,
        &upload_name("", &digest),
        &streamed,
    )
    .await
    .unwrap();
    assert_eq!(committed, streamed.len() as i64);
    let batched = blob(2, 1000);
    let response = node
        .cas()
        .await
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![UpdateRequest {
                digest: Some(wire(&sha256(&batched))),
                data: Bytes::from(batched.clone()),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.responses[0].status.as_ref().unwrap().code, 0);
    assert!(agree(&node, &streamed).await);
    assert!(agree(&node, &batched).await);
    assert!(!agree(&node, b"never stored").await);
    assert_eq!(node.terminate().code(), Some(0));
}

#[tokio::test]
async fn blobs_put_over_http_are_read_over_grpc() {
    let node = Node::start();
    let data = blob(3, 70_000);
    let digest = sha256(&data);
    let path = format!("/cas/{}", digest.hash_hex());
    assert_eq!(http(node.http, "PUT", &path, &data).0, 200);
    assert!(agree(&node, &data).await);
    assert_eq!(node.terminate().code(), Some(0));
}

#[tokio::test]
async fn find_missing_with_the_right_hash_and_a_wrong_size_is_missing() {
    let node = Node::start();
    let data = blob(4, 5000);
    let digest = sha256(&data);
    let path = format!("/cas/{}", digest.hash_hex());
    assert_eq!(http(node.http, "PUT", &path, &data).0, 200);
    assert!(grpc_has(&node, &digest).await);
    for size in [digest.size - 1, digest.size + 1, 5 << 30] {
        assert!(
            !grpc_has(&node, &Digest { size, ..digest }).await,
            "right hash, size {size} instead of {}, called present",
            digest.size
        );
    }
    assert_eq!(node.terminate().code(), Some(0));
}

/// A budget small enough that the writes below evict and reclaim; every blob, stored
/// over either protocol, must then be present or absent for both alike.
#[tokio::test]
async fn after_eviction_http_and_grpc_still_agree() {
    let temp = tempfile::tempdir().unwrap();
    let node = Node::start_in(&temp.path().join("data"), &["--max-size", "64MiB"]);
    let mut blobs = Vec::new();
    let mut bytestream = node.bytestream().await;
    for seed in 0..400u64 {
        let data = blob(100 + seed, 256 << 10);
        let digest = sha256(&data);
        if seed % 2 == 0 {
            let path = format!("/cas/{}", digest.hash_hex());
            assert_eq!(http(node.http, "PUT", &path, &data).0, 200);
        } else {
            write_blob(&mut bytestream, &upload_name("", &digest), &data)
                .await
                .unwrap();
        }
        blobs.push(data);
    }
    let mut present = 0;
    for data in &blobs {
        present += usize::from(agree(&node, data).await);
    }
    assert!(present > 0, "everything was evicted");
    assert!(present < blobs.len(), "nothing was evicted");
    assert_eq!(node.terminate().code(), Some(0));
}
