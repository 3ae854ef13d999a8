//! ByteStream reads and writes against the real binary, including every bad input.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_proto::bytestream::{QueryWriteStatusRequest, WriteRequest};
use cairn_proto::reapi::FindMissingBlobsRequest;
use cairn_storage::{Digest, DigestFunction};
use common::{
    blob, read_blob, read_name, sha256, upload_name, wait_committed, wire, write_blob,
    write_requests, Node,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

#[tokio::test]
async fn write_then_read_with_and_without_instance_names() {
    let node = Node::start();
    let mut client = node.bytestream().await;
    for (index, instance) in ["", "main", "team/a/b"].into_iter().enumerate() {
        let data = blob(10 + index as u64, 300_000);
        let digest = sha256(&data);
        let committed = write_blob(&mut client, &upload_name(instance, &digest), &data)
            .await
            .unwrap();
        assert_eq!(committed, data.len() as i64);
        let read = read_blob(&mut client, &read_name(instance, &digest), 0, 0)
            .await
            .unwrap();
        assert_eq!(read, data);
        let part = read_blob(&mut client, &read_name(instance, &digest), 1000, 5000)
            .await
            .unwrap();
        assert_eq!(part, &data[1000..6000]);
        let tail = read_blob(&mut client, &read_name(instance, &digest), 299_990, 0)
            .await
            .unwrap();
        assert_eq!(tail, &data[299_990..]);
        let at_end = read_blob(&mut client, &read_name(instance, &digest), 300_000, 0)
            .await
            .unwrap();
        assert!(at_end.is_empty());
    }
}

#[tokio::test]
async fn the_empty_blob_is_always_there() {
    let node = Node::start();
    let mut client = node.bytestream().await;
    let empty = sha256(b"");
    assert!(read_blob(&mut client, &read_name("", &empty), 0, 0)
        .await
        .unwrap()
        .is_empty());
    let blake3 = Digest::empty(DigestFunction::Blake3);
    let name = format!("x/blobs/blake3/{}/0", blake3.hash_hex());
    assert!(read_blob(&mut client, &name, 0, 0)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn blake3_and_zstd_resource_names() {
    let node = Node::start();
    let mut client = node.bytestream().await;
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i / 1000) as u8).collect();
    let digest = Digest::of(DigestFunction::Blake3, &data);
    let compressed = zstd::bulk::compress(&data, 3).unwrap();
    let name = format!(
        "inst/uploads/0b1e2c6e-1111-4222-8333-444455556666/compressed-blobs/zstd/blake3/{}/{}",
        digest.hash_hex(),
        digest.size
    );
    let committed = write_blob(&mut client, &name, &compressed).await.unwrap();
    assert_eq!(committed, compressed.len() as i64);
    let plain = format!("inst/blobs/blake3/{}/{}", digest.hash_hex(), digest.size);
    assert_eq!(read_blob(&mut client, &plain, 0, 0).await.unwrap(), data);
    let zstd_name = format!(
        "inst/compressed-blobs/zstd/blake3/{}/{}",
        digest.hash_hex(),
        digest.size
    );
    let frame = read_blob(&mut client, &zstd_name, 0, 0).await.unwrap();
    assert!(frame.len() < data.len() / 10);
    assert_eq!(zstd::stream::decode_all(&frame[..]).unwrap(), data);
    let frame = read_blob(&mut client, &zstd_name, 1_500_000, 0)
        .await
        .unwrap();
    assert_eq!(
        zstd::stream::decode_all(&frame[..]).unwrap(),
        &data[1_500_000..]
    );
    let status = read_blob(&mut client, &zstd_name, 0, 10).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let again = write_blob(&mut client, &name, &compressed).await.unwrap();
    assert_eq!(
        again, -1,
        "an existing blob ends a compressed upload with -1"
    );
}

/// `len` bytes of repeated English text followed by `noise` random bytes: the shape
/// of a log or a generated source file, compressing about 5000:1 at 1 MiB.
fn text(len: usize, noise: usize) -> Vec<u8> {
    let sentence = b"The build cache stores every output once and serves it to every build. ";
    let mut data: Vec<u8> = sentence.iter().copied().cycle().take(len).collect();
    data.extend(blob(len as u64, noise));
    data
}

fn zstd_frame(data: &[u8], level: i32, content_size: bool, checksum: bool) -> Vec<u8> {
    let mut encoder = zstd::bulk::Compressor::new(level).unwrap();
    encoder.include_contentsize(content_size).unwrap();
    encoder.include_checksum(checksum).unwrap();
    encoder.compress(data).unwrap()
}

fn compressed_upload_name(digest: &Digest, upload: usize) -> String {
    format!(
        "inst/uploads/0b1e2c6e-1111-4222-8333-{upload:012}/compressed-blobs/zstd/{}/{}",
        digest.hash_hex(),
        digest.size
    )
}

#[tokio::test]
async fn compressed_uploads_round_trip_at_any_ratio() {
    let node = Node::start();
    let mut client = node.bytestream().await;
    let zeros = vec![0u8; 64 << 20];
    let mut mixed = text(1 << 20, 0);
    mixed.extend(blob(5, 1 << 20));
    // (what, data, the frames it is sent as, bytes per WriteRequest)
    let mut cases: Vec<(&str, Vec<u8>, Vec<u8>, usize)> = Vec::new();
    for (len, level, content_size) in [
        (1 << 20, 3, true),
        (1 << 20 | 17, 1, false),
        (3 << 20, 3, true),
    ] {
        let data = text(len, 64);
        let frame = zstd_frame(&data, level, content_size, false);
        assert!(frame.len() < 4096, "{} compressed bytes", frame.len());
        cases.push(("text in one message", data, frame, usize::MAX));
    }
    let frame = zstd_frame(&zeros, 3, true, true);
    cases.push(("64 MiB of zeros in one message", zeros, frame, usize::MAX));
    let zeros = vec![0u8; 48 << 20];
    let frame = zstd_frame(&zeros, 3, false, true);
    cases.push(("48 MiB of zeros, a byte per message", zeros, frame, 1));
    let frame = zstd_frame(&mixed, 3, false, true);
    cases.push((
        "half text, half noise, 1000-byte messages",
        mixed,
        frame,
        1000,
    ));
    let noise = blob(6, 2 << 20);
    let frame = zstd_frame(&noise, 1, true, false);
    cases.push(("incompressible, 64 KiB messages", noise, frame, 64 << 10));
    let (first, second) = (text(300_000, 10), blob(7, 50_000));
    let mut two = zstd_frame(&first, 3, true, true);
    two.extend(zstd_frame(&second, 19, false, false));
    cases.push((
        "two frames back to back",
        [first, second].concat(),
        two,
        333,
    ));

    for (upload, (what, data, compressed, chunk)) in cases.into_iter().enumerate() {
        let digest = sha256(&data);
        let requests = write_requests(
            &compressed_upload_name(&digest, upload),
            &compressed,
            chunk.min(compressed.len()),
        );
        let committed = client
            .write(tokio_stream::iter(requests))
            .await
            .unwrap_or_else(|status| panic!("{what}: {status:?}"))
            .into_inner()
            .committed_size;
        assert_eq!(committed, compressed.len() as i64, "{what}");
        let read = read_blob(&mut client, &read_name("inst", &digest), 0, 0)
            .await
            .unwrap();
        assert!(read == data, "{what}: plain read");
        let zstd_name = format!(
            "inst/compressed-blobs/zstd/{}/{}",
            digest.hash_hex(),
            digest.size
        );
        for offset in [0, data.len() / 3, data.len() - 1] {
            let frame = read_blob(&mut client, &zstd_name, offset as i64, 0)
                .await
                .unwrap();
            let plain = zstd::stream::decode_all(&frame[..]).unwrap();
            assert!(
                plain == data[offset..],
                "{what}: compressed read from {offset}"
            );
        }
    }
}

#[tokio::test]
async fn valid_frames_of_other_content_are_refused() {
    let node = Node::start();
    let mut client = node.bytestream().await;
    let claimed = text(200_000, 16);
    let digest = sha256(&claimed);
    // The same length, one byte different: a valid frame of exactly the declared size.
    let mut other = claimed.clone();
    other[100_000] ^= 1;
    let frame = zstd_frame(&other, 3, true, true);
    let status = write_blob(&mut client, &compressed_upload_name(&digest, 1), &frame)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut cas = node.cas().await;
    let response = cas
        .batch_update_blobs(cairn_proto::reapi::BatchUpdateBlobsRequest {
            requests: vec![cairn_proto::reapi::batch_update_blobs_request::Request {
                digest: Some(wire(&digest)),
                data: Bytes::from(frame),
                compressor: cairn_proto::reapi::compressor::Value::Zstd as i32,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let code = response.responses[0].status.as_ref().unwrap().code;
    assert_eq!(code, Code::InvalidArgument as i32);
    let missing = cas
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![wire(&digest)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(missing.missing_blob_digests.len(), 1, "nothing was stored");
}

#[tokio::test]
async fn compressed_uploads_that_lie_are_refused() {
    let node = Node::start();
    let mut client = node.bytestream().await;
    let data = vec![42u8; 100_000];
    let digest = sha256(&data);
    let name = |size: u64| {
        format!(
            "uploads/u/compressed-blobs/zstd/{}/{size}",
            digest.hash_hex()
        )
    };
    let bomb = zstd::bulk::compress(&vec![42u8; 50_000_000], 3).unwrap();
    let status = write_blob(&mut client, &name(digest.size), &bomb)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let compressed = zstd::bulk::compress(&data, 3).unwrap();
    let status = write_blob(
        &mut client,
        &name(digest.size),
        &compressed[..compressed.len() - 4],
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = write_blob(&mut client, &name(digest.size), b"not zstd at all")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn bad_read_requests() {
    let node = Node::start();
    let mut client = node.bytestream().await;
    let data = blob(20, 1000);
    let digest = sha256(&data);
    write_blob(&mut client, &upload_name("", &digest), &data)
        .await
        .unwrap();
    let name = read_name("", &digest);
    let cases: Vec<(String, i64, i64, Code)> = vec![
        (name.clone(), -1, 0, Code::OutOfRange),
        (name.clone(), 1001, 0, Code::OutOfRange),
        (name.clone(), 0, -5, Code::InvalidArgument),
        (read_name("", &sha256(b"absent")), 0, 0, Code::NotFound),
        ("blobs/xyz/1000".into(), 0, 0, Code::InvalidArgument),
        (
            format!("blobs/{}/1000", "A".repeat(64)),
            0,
            0,
            Code::InvalidArgument,
        ),
        (
            format!("blobs/{}/1000", &digest.hash_hex()[1..]),
            0,
            0,
            Code::InvalidArgument,
        ),
        (
            format!("blobs/{}/-3", digest.hash_hex()),
            0,
            0,
            Code::InvalidArgument,
        ),
        (
            format!("blobs/{}", digest.hash_hex()),
            0,
            0,
            Code::InvalidArgument,
        ),
        (
            format!("nothing/{}/1000", digest.hash_hex()),
            0,
            0,
            Code::InvalidArgument,
        ),
        (
            format!("blobs/sha1/{}/1000", digest.hash_hex()),
            0,
            0,
            Code::InvalidArgument,
        ),
        (
            format!("compressed-blobs/lz4/{}/1000", digest.hash_hex()),
            0,
            0,
            Code::InvalidArgument,
        ),
        (String::new(), 0, 0, Code::InvalidArgument),
    ];
    for (name, offset, limit, code) in cases {
        let status = read_blob(&mut client, &name, offset, limit)
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            code,
            "{name} offset {offset} limit {limit}: {status:?}"
        );
    }
}

#[tokio::test]
async fn bad_write_requests() {
    let node = Node::start();
    let mut client = node.bytestream().await;
    let data = blob(21, 200_000);
    let digest = sha256(&data);
    let name = upload_name("", &digest);

    let short = write_blob(&mut client, &name, &data[..100_000])
        .await
        .unwrap_err();
    assert_eq!(short.code(), Code::InvalidArgument, "{short:?}");
    let mut longer = data.clone();
    longer.extend_from_slice(b"extra");
    let long = write_blob(&mut client, &name, &longer).await.unwrap_err();
    assert_eq!(long.code(), Code::InvalidArgument, "{long:?}");
    let mut flipped = data.clone();
    flipped[5] ^= 1;
    let mismatch = write_blob(&mut client, &name, &flipped).await.unwrap_err();
    assert_eq!(mismatch.code(), Code::InvalidArgument, "{mismatch:?}");

    let mut skipping = write_requests(&name, &data, 50_000);
    skipping[2].write_offset += 10;
    let status = client
        .write(tokio_stream::iter(skipping))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut rewinding = write_requests(&name, &data, 50_000);
    rewinding[2].write_offset -= 10;
    let status = client
        .write(tokio_stream::iter(rewinding))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let fresh = upload_name("", &sha256(b"fresh"));
    let mut resume_nothing = write_requests(&fresh, b"fresh", 5);
    resume_nothing[0].write_offset = 3;
    let status = client
        .write(tokio_stream::iter(resume_nothing))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    for bad in [
        "uploads/u/blobs/xyz/5".to_string(),
        format!("blobs/{}/{}", digest.hash_hex(), digest.size),
        format!("uploads/blobs/{}/{}", digest.hash_hex(), digest.size),
        format!("uploads/u/blobs/{}/-1", digest.hash_hex()),
    ] {
        let status = write_blob(&mut client, &bad, b"hello").await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}");
    }
    let empty_stream: Vec<WriteRequest> = Vec::new();
    let status = client
        .write(tokio_stream::iter(empty_stream))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let missing = node
        .cas()
        .await
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![wire(&digest)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing.len(), 1, "no failed upload may become visible");
}

#[tokio::test]
async fn blobs_over_the_size_limit_are_refused() {
    let temp = tempfile::tempdir().unwrap();
    let config = temp.path().join("small.json5");
    std::fs::write(&config, "{ max_cas_blob_size: '64KiB' }").unwrap();
    let node = Node::start_in(
        &temp.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let mut client = node.bytestream().await;
    let data = blob(22, 65 * 1024);
    let digest = sha256(&data);
    let status = write_blob(&mut client, &upload_name("", &digest), &data)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

#[tokio::test]
async fn existing_blobs_end_the_upload_early() {
    let node = Node::start();
    let mut client = node.bytestream().await;
    let data = blob(23, 500_000);
    let digest = sha256(&data);
    write_blob(&mut client, &upload_name("", &digest), &data)
        .await
        .unwrap();
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let first = write_requests(&upload_name("", &digest), &data, 16 << 10).remove(0);
    sender.send(first).await.unwrap();
    let response = client.write(ReceiverStream::new(receiver)).await.unwrap();
    assert_eq!(response.into_inner().committed_size, digest.size as i64);
    drop(sender);
}

async fn committed_size(node: &Node, name: &str) -> (i64, bool) {
    let status = node
        .bytestream()
        .await
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    (status.committed_size, status.complete)
}

#[tokio::test]
async fn interrupted_uploads_resume_from_the_committed_size() {
    let node = Node::start();
    let data = blob(24, 1 << 20);
    let digest = sha256(&data);
    let name = upload_name("resume", &digest);
    let requests = write_requests(&name, &data, 64 << 10);

    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    let mut client = node.bytestream().await;
    let call = tokio::spawn(async move { client.write(ReceiverStream::new(receiver)).await });
    for request in requests.iter().take(6).cloned() {
        sender.send(request).await.unwrap();
    }
    let sent = 6 * (64 << 10);
    let deadline = Instant::now() + Duration::from_secs(20);
    while committed_size(&node, &name).await.0 != sent {
        assert!(
            Instant::now() < deadline,
            "the server never committed the sent bytes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The client vanishes: the call is torn down mid-stream.
    call.abort();
    drop(sender);
    assert!(call.await.is_err());

    let mut invisible = node.cas().await;
    let missing = invisible
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![wire(&digest)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing.len(), 1, "a partial upload is never visible");

    // Like any client, resume from what the server reports, retrying while the
    // server has not yet noticed that the old stream is gone.
    let mut client = node.bytestream().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (committed, complete) = committed_size(&node, &name).await;
        assert_eq!((committed, complete), (sent, false));
        let rest: Vec<WriteRequest> = requests
            .iter()
            .skip(6)
            .cloned()
            .enumerate()
            .map(|(index, mut request)| {
                if index == 0 {
                    request.resource_name = name.clone();
                }
                request
            })
            .collect();
        match client.write(tokio_stream::iter(rest)).await {
            Ok(response) => {
                assert_eq!(response.into_inner().committed_size, data.len() as i64);
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                assert!(
                    Instant::now() < deadline,
                    "the upload never became resumable"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    assert_eq!(
        committed_size(&node, &name).await,
        (data.len() as i64, true)
    );
    let read = read_blob(&mut client, &read_name("resume", &digest), 0, 0)
        .await
        .unwrap();
    assert_eq!(read, data);
}

/// A parked upload holds disk space; it used to be dropped only when another upload
/// happened to touch the registry after it expired. Now it expires on time with no
/// other traffic at all (only /metrics is asked here).
#[tokio::test]
async fn parked_uploads_expire_on_time_without_other_traffic() {
    let temp = tempfile::tempdir().unwrap();
    let config = temp.path().join("resume.json5");
    std::fs::write(&config, "{ upload_resume_seconds: 1 }").unwrap();
    let node = Node::start_in(
        &temp.path().join("data"),
        &["--no-execution", "--config", config.to_str().unwrap()],
    );
    let data = blob(25, 1 << 20);
    let digest = sha256(&data);
    let name = upload_name("expire", &digest);
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    let mut client = node.bytestream().await;
    let call = tokio::spawn(async move { client.write(ReceiverStream::new(receiver)).await });
    for request in write_requests(&name, &data, 64 << 10).into_iter().take(4) {
        sender.send(request).await.unwrap();
    }
    wait_committed(&node, &name, 4 * (64 << 10)).await;
    call.abort();
    drop(sender);
    assert!(call.await.is_err());

    let parked = |count: f64| {
        let node = &node;
        async move {
            for _ in 0..600 {
                if node.metric_sum("cairn_parked_uploads") == count {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        }
    };
    assert!(parked(1.0).await, "the interrupted upload was never parked");
    assert!(
        parked(0.0).await,
        "the parked upload was still kept 60 s after it expired"
    );
    assert_eq!(committed_size(&node, &name).await, (0, false));
    assert!(node.terminate().success());
}

/// 200 uploads in flight at once, together 78% of the budget, on 200 connections:
/// each used to reserve its whole blob in its partition up front, so a partition that
/// drew more than its even share of them ran out of room it could free (every segment
/// held an upload in flight) and refused some (12 of 200 failed). Within the node's
/// budget, uploads never fail because of each other.
#[tokio::test]
async fn two_hundred_concurrent_uploads_within_the_budget_all_succeed() {
    const UPLOADS: u64 = 200;
    const SIZE: usize = 2 << 20;
    let temp = tempfile::tempdir().unwrap();
    let node = Node::start_in(
        &temp.path().join("data"),
        &["--no-execution", "--max-size", "512MiB"],
    );
    let mut uploads = Vec::new();
    for seed in 0..UPLOADS {
        let data = blob(3000 + seed, SIZE);
        let digest = sha256(&data);
        let name = upload_name("", &digest);
        let mut requests = write_requests(&name, &data, 256 << 10).into_iter();
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        sender.send(requests.next().unwrap()).await.unwrap();
        let mut client = node.bytestream().await;
        let call = tokio::spawn(async move { client.write(ReceiverStream::new(receiver)).await });
        uploads.push((digest, name, sender, requests, call));
    }
    // Every upload has its first chunk stored (or has failed) before any goes on.
    for (_, name, _, _, call) in &uploads {
        for _ in 0..600 {
            if call.is_finished() || committed_size(&node, name).await.0 >= 256 << 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut calls = Vec::new();
    for (digest, _, sender, requests, call) in uploads {
        for request in requests {
            if sender.send(request).await.is_err() {
                break;
            }
        }
        calls.push((digest, call));
    }
    let mut failed = Vec::new();
    let mut digests = Vec::new();
    for (digest, call) in calls {
        match call.await.unwrap() {
            Ok(response) => assert_eq!(response.into_inner().committed_size, SIZE as i64),
            Err(status) => failed.push(format!("{:?}: {}", status.code(), status.message())),
        }
        digests.push(wire(&digest));
    }
    assert!(
        failed.is_empty(),
        "{} of {UPLOADS} uploads failed, the first: {}",
        failed.len(),
        failed[0]
    );
    let missing = node
        .cas()
        .await
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: digests,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    // A partition that drew more than its share borrowed from the node's overflow pool
    // while the uploads were in flight, and gives it back afterwards by evicting its
    // oldest blobs down to its own budget: a full cache evicts. The rest stays.
    assert!(
        missing.len() as u64 <= UPLOADS / 4,
        "{} of {UPLOADS} acknowledged blobs gone right after the uploads",
        missing.len()
    );
    assert!(node.terminate().success());
}

/// The blobs among `digests` the node holds.
async fn present(
    node: &Node,
    digests: Vec<cairn_proto::reapi::Digest>,
) -> Vec<cairn_proto::reapi::Digest> {
    let missing = node
        .cas()
        .await
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: digests.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    digests
        .into_iter()
        .filter(|digest| !missing.contains(digest))
        .collect()
}

/// 128 uploads that each declare the largest blob the node accepts, send one byte and
/// are cancelled used to evict every large blob the node held: each reserved, and
/// made room for, its whole declared size at its first message. Uploads are now
/// charged for the bytes they send, so they evict nothing, open or cancelled.
#[tokio::test]
async fn declared_but_unsent_uploads_evict_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let node = Node::start_in(
        &temp.path().join("data"),
        &["--no-execution", "--max-size", "1GiB"],
    );
    let limit = node
        .capabilities()
        .await
        .get_capabilities(cairn_proto::reapi::GetCapabilitiesRequest::default())
        .await
        .expect("capabilities")
        .into_inner()
        .cache_capabilities
        .map(|cache| cache.max_cas_blob_size_bytes as u64)
        .expect("cache capabilities");
    let mut client = node.bytestream().await;
    let mut stored = Vec::new();
    for (seed, size) in (0..40u64)
        .map(|seed| (4000 + seed, 8 << 20))
        .chain((0..500u64).map(|seed| (5000 + seed, 4096)))
    {
        let data = blob(seed, size);
        let digest = sha256(&data);
        write_blob(&mut client, &upload_name("", &digest), &data)
            .await
            .unwrap();
        stored.push(wire(&digest));
    }
    let before = present(&node, stored.clone()).await;
    assert!(
        before.len() > stored.len() / 2,
        "the node kept only {} of the {} blobs it was given",
        before.len(),
        stored.len()
    );

    let mut uploads = Vec::new();
    for seed in 0..128u64 {
        let declared = Digest {
            function: DigestFunction::Sha256,
            hash: sha256(&seed.to_le_bytes()).hash,
            size: limit,
        };
        let name = upload_name("", &declared);
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        sender
            .send(WriteRequest {
                resource_name: name.clone(),
                write_offset: 0,
                finish_write: false,
                data: Bytes::from_static(b"x"),
            })
            .await
            .unwrap();
        let mut writer = node.bytestream().await;
        let call = tokio::spawn(async move { writer.write(ReceiverStream::new(receiver)).await });
        uploads.push((name, sender, call));
    }
    // Every upload has begun (its byte is committed) before anything is checked.
    for (name, _, _) in &uploads {
        wait_committed(&node, name, 1).await;
    }
    let open = present(&node, before.clone()).await;
    for (_, sender, call) in uploads {
        call.abort();
        drop(sender);
        let _ = call.await;
    }
    let cancelled = present(&node, before.clone()).await;
    assert_eq!(
        (open.len(), cancelled.len()),
        (before.len(), before.len()),
        "stored blobs were evicted by uploads that sent one byte each \
         (held while they were open, and after they were cancelled)"
    );
    assert!(node.terminate().success());
}

#[tokio::test]
async fn sixty_four_concurrent_one_mebibyte_writes_and_reads() {
    let node = Node::start();
    let channel = node.channel().await;
    let tasks: Vec<_> = (0..64u64)
        .map(|seed| {
            let channel = channel.clone();
            tokio::spawn(async move {
                let mut client =
                    cairn_proto::bytestream::byte_stream_client::ByteStreamClient::new(channel)
                        .max_decoding_message_size(64 << 20);
                let data = blob(1000 + seed, 1 << 20);
                let digest = sha256(&data);
                let committed = write_blob(&mut client, &upload_name("", &digest), &data)
                    .await
                    .unwrap();
                assert_eq!(committed, 1 << 20);
                (digest, Bytes::from(data))
            })
        })
        .collect();
    let mut written = Vec::new();
    for task in tasks {
        written.push(task.await.unwrap());
    }
    let reads: Vec<_> = written
        .into_iter()
        .map(|(digest, data)| {
            let channel = channel.clone();
            tokio::spawn(async move {
                let mut client =
                    cairn_proto::bytestream::byte_stream_client::ByteStreamClient::new(channel)
                        .max_decoding_message_size(64 << 20);
                let read = read_blob(&mut client, &read_name("", &digest), 0, 0)
                    .await
                    .unwrap();
                assert_eq!(read, data);
            })
        })
        .collect();
    for read in reads {
        read.await.unwrap();
    }
}

/// Deterministic content for the `index`-th 1 MiB piece of a large blob, made on the
/// fly so the test itself never holds the blob either.
fn piece(index: u64) -> Bytes {
    Bytes::from(blob(7_000 + index, 1 << 20))
}

/// Streams are never buffered whole: writing and then reading a blob several times
/// larger than the allowed growth leaves the node's peak memory within that bound.
/// The bound covers HTTP/2 windows (16 MiB per connection), the engine's write units
/// and read-ahead; a path that collected the blob would exceed it by the blob's size.
#[tokio::test]
async fn large_blobs_stream_through_bounded_memory() {
    const GROWTH_BOUND: u64 = 48 << 20;
    let node = Node::start();
    let capabilities = node
        .capabilities()
        .await
        .get_capabilities(cairn_proto::reapi::GetCapabilitiesRequest::default())
        .await
        .expect("capabilities")
        .into_inner();
    let limit = capabilities
        .cache_capabilities
        .map(|cache| cache.max_cas_blob_size_bytes as u64)
        .expect("cache capabilities");
    // The blob limit follows the disk the test runs on (a budget the disk cannot hold
    // is lowered to what it can); a path holding the blob whole grows by at least the
    // blob's size, so a blob half again the bound is enough to tell the two apart.
    let pieces = (limit >> 20).min(384);
    assert!(
        pieces << 20 >= GROWTH_BOUND * 3 / 2,
        "the node's blob limit ({limit} bytes) is too small for this test: the disk \
         holding the temporary directory has under 3 GiB free"
    );
    let size = pieces << 20;
    let mut hasher = DigestFunction::Sha256.hasher();
    for index in 0..pieces {
        hasher.update(&piece(index));
    }
    let digest = Digest {
        function: DigestFunction::Sha256,
        hash: hasher.finalize(),
        size,
    };
    let before = node.peak_rss();

    let name = upload_name("", &digest);
    let requests = tokio_stream::iter((0..pieces).map(move |index| WriteRequest {
        resource_name: if index == 0 {
            name.clone()
        } else {
            String::new()
        },
        write_offset: (index << 20) as i64,
        finish_write: index + 1 == pieces,
        data: piece(index),
    }));
    let mut client = node.bytestream().await;
    let committed = client.write(requests).await.expect("write").into_inner();
    assert_eq!(committed.committed_size as u64, size);

    let mut stream = client
        .read(cairn_proto::bytestream::ReadRequest {
            resource_name: read_name("", &digest),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .expect("read")
        .into_inner();
    let mut hasher = DigestFunction::Sha256.hasher();
    let mut read = 0u64;
    while let Some(response) = stream.message().await.expect("read stream") {
        read += response.data.len() as u64;
        hasher.update(&response.data);
    }
    assert_eq!(read, size);
    assert!(
        hasher.finalize() == digest.hash,
        "the blob read back differs"
    );

    let growth = node.peak_rss().saturating_sub(before);
    eprintln!(
        "peak RSS grew by {} MiB moving a {} MiB blob each way",
        growth >> 20,
        size >> 20
    );
    assert!(
        growth < GROWTH_BOUND,
        "peak RSS grew by {growth} bytes for a {size}-byte blob: something holds it whole"
    );
}

/// Every file under `dir` whose name ends with one of `extensions`.
fn files_under(dir: &std::path::Path, extensions: &[&str]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if extensions
                .iter()
                .any(|extension| path.extension().is_some_and(|found| found == *extension))
            {
                found.push(path);
            }
        }
    }
    found
}

/// A damaged byte in the fourth 1 MiB chunk of a stored 5 MiB blob: a ByteStream read
/// delivers the three intact chunks, then fails with DATA_LOSS instead of sending the
/// damaged one; the failure is counted, the blob is dropped, and it can be uploaded
/// again.
#[tokio::test]
async fn corrupted_later_chunk_fails_the_read_at_that_chunk() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let data = blob(90, 5 << 20);
    let digest = sha256(&data);
    let node = Node::start_in(&dir, &["--no-execution"]);
    let mut client = node.bytestream().await;
    write_blob(&mut client, &upload_name("", &digest), &data)
        .await
        .unwrap();
    drop(client);
    assert!(node.terminate().success());

    let damaged_at = (3 << 20) + 12_345;
    let needle = &data[damaged_at..damaged_at + 64];
    let mut damaged = 0;
    for path in files_under(&dir, &["extents", "huge", "packed"]) {
        let mut image = std::fs::read(&path).unwrap();
        if let Some(at) = image
            .windows(needle.len())
            .position(|window| window == needle)
        {
            image[at] ^= 0x55;
            std::fs::write(&path, &image).unwrap();
            damaged += 1;
        }
    }
    assert_eq!(damaged, 1, "the blob's fourth chunk is stored exactly once");

    let node = Node::start_in(&dir, &["--no-execution"]);
    let mut client = node.bytestream().await;
    let mut stream = client
        .read(cairn_proto::bytestream::ReadRequest {
            resource_name: read_name("", &digest),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = Vec::new();
    let status = loop {
        match stream.message().await {
            Ok(Some(response)) => received.extend_from_slice(&response.data),
            Ok(None) => panic!("a damaged blob was read to its end"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert_eq!(
        received.len(),
        3 << 20,
        "the intact chunks before the damage"
    );
    assert!(
        received == data[..3 << 20],
        "the intact chunks are the blob's"
    );
    assert_eq!(node.metric_sum("cairn_partition_crc_failures"), 1.0);

    let missing = node
        .cas()
        .await
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![wire(&digest)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        missing.missing_blob_digests.len(),
        1,
        "the damaged blob is dropped"
    );
    write_blob(&mut client, &upload_name("", &digest), &data)
        .await
        .unwrap();
    let read = read_blob(&mut client, &read_name("", &digest), 0, 0)
        .await
        .unwrap();
    assert!(read == data, "the blob uploaded again reads back whole");
}

/// A 1 MiB resource name used to come back whole in `grpc-message`, past every
/// client's metadata limit, so the client failed on its own limit and never saw the
/// error. The message now quotes a bounded part of it.
#[tokio::test]
async fn a_huge_resource_name_gets_a_readable_error() {
    let node = Node::start();
    let name = format!("{}/blobs/{}/huge", "x".repeat(1 << 20), "0".repeat(64));
    let mut client = node.bytestream().await;
    let status = client
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "{:.200}",
        status.message()
    );
    assert!(
        status.message().len() <= 1024,
        "{} bytes",
        status.message().len()
    );
    assert!(
        status.message().contains("resource name"),
        "{}",
        status.message()
    );
    let mut reading = client
        .read(cairn_proto::bytestream::ReadRequest {
            resource_name: name,
            read_offset: 0,
            read_limit: 0,
        })
        .await;
    let status = match reading.as_mut() {
        Ok(stream) => stream.get_mut().message().await.unwrap_err(),
        Err(status) => status.clone(),
    };
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "{:.200}",
        status.message()
    );
    assert!(
        status.message().len() <= 1024,
        "{} bytes",
        status.message().len()
    );
    assert!(node.terminate().success());
}
