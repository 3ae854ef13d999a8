//! Capabilities and ContentAddressableStorage against the real binary.

mod common;

use bytes::Bytes;
use cairn_proto::reapi::batch_update_blobs_request::Request as UpdateRequest;
use cairn_proto::reapi::compressor::Value as Compressor;
use cairn_proto::reapi::digest_function::Value as FunctionValue;
use cairn_proto::reapi::{
    BatchReadBlobsRequest, BatchUpdateBlobsRequest, Directory, DirectoryNode, FileNode,
    FindMissingBlobsRequest, GetCapabilitiesRequest, GetTreeRequest,
};
use cairn_storage::{Digest, DigestFunction};
use common::{blob, sha256, wire, Node};
use prost::Message;
use tonic::Code;

#[tokio::test]
async fn capabilities_advertise_the_cache() {
    let node = Node::start();
    let capabilities = node
        .capabilities()
        .await
        .get_capabilities(GetCapabilitiesRequest {
            instance_name: "any/instance".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let cache = capabilities.cache_capabilities.unwrap();
    assert!(cache
        .digest_functions
        .contains(&(FunctionValue::Sha256 as i32)));
    assert!(cache
        .digest_functions
        .contains(&(FunctionValue::Blake3 as i32)));
    assert!(cache
        .supported_compressors
        .contains(&(Compressor::Zstd as i32)));
    assert_eq!(cache.max_batch_total_size_bytes, 4 << 20);
    assert!(cache.max_cas_blob_size_bytes > 0);
    assert!(
        cache
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    );
    assert_eq!(capabilities.low_api_version.unwrap().major, 2);
    assert_eq!(capabilities.high_api_version.unwrap().minor, 3);
}

#[tokio::test]
async fn batch_update_find_missing_and_batch_read() {
    let node = Node::start();
    let mut cas = node.cas().await;
    let good = blob(1, 1000);
    let other = blob(2, 5000);
    let bad_digest = sha256(b"something else");
    let response = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![
                UpdateRequest {
                    digest: Some(wire(&sha256(&good))),
                    data: Bytes::from(good.clone()),
                    compressor: 0,
                },
                UpdateRequest {
                    digest: Some(wire(&bad_digest)),
                    data: Bytes::from_static(b"not what the digest says"),
                    compressor: 0,
                },
                UpdateRequest {
                    digest: Some(wire(&sha256(&other))),
                    data: Bytes::from(zstd::bulk::compress(&other, 3).unwrap()),
                    compressor: Compressor::Zstd as i32,
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = response
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    assert_eq!(codes, vec![0, Code::InvalidArgument as i32, 0]);

    let empty = sha256(b"");
    let missing = cas
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![
                wire(&sha256(&good)),
                wire(&bad_digest),
                wire(&sha256(&other)),
                wire(&empty),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing, vec![wire(&bad_digest)]);

    let read = cas
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![wire(&sha256(&good)), wire(&bad_digest), wire(&empty)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .responses;
    assert_eq!(read[0].data, good);
    assert_eq!(read[1].status.as_ref().unwrap().code, Code::NotFound as i32);
    assert_eq!(read[2].status.as_ref().unwrap().code, 0);
    assert!(read[2].data.is_empty());
}

#[tokio::test]
async fn blake3_blobs_are_kept_apart_from_sha256() {
    let node = Node::start();
    let mut cas = node.cas().await;
    let data = blob(3, 300);
    let digest = Digest::of(DigestFunction::Blake3, &data);
    let response = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![UpdateRequest {
                digest: Some(wire(&digest)),
                data: Bytes::from(data.clone()),
                compressor: 0,
            }],
            digest_function: FunctionValue::Blake3 as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.responses[0].status.as_ref().unwrap().code, 0);
    let missing = |function: FunctionValue| FindMissingBlobsRequest {
        blob_digests: vec![wire(&digest)],
        digest_function: function as i32,
        ..Default::default()
    };
    let as_blake3 = cas
        .find_missing_blobs(missing(FunctionValue::Blake3))
        .await
        .unwrap();
    assert!(as_blake3.into_inner().missing_blob_digests.is_empty());
    let as_sha256 = cas
        .find_missing_blobs(missing(FunctionValue::Sha256))
        .await
        .unwrap();
    assert_eq!(as_sha256.into_inner().missing_blob_digests.len(), 1);
}

#[tokio::test]
async fn batches_over_the_limit_and_bad_digests_are_refused() {
    let node = Node::start();
    let mut cas = node.cas().await;
    let big = blob(4, (4 << 20) + 1);
    let status = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![UpdateRequest {
                digest: Some(wire(&sha256(&big))),
                data: Bytes::from(big.clone()),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = cas
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![wire(&sha256(&big))],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    for (hash, size) in [
        ("xyz", 1),
        (&"g".repeat(64)[..], 1),
        (&"a".repeat(63)[..], 1),
    ] {
        let status = cas
            .find_missing_blobs(FindMissingBlobsRequest {
                blob_digests: vec![cairn_proto::reapi::Digest {
                    hash: hash.to_string(),
                    size_bytes: size,
                }],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{hash}");
    }
    let status = cas
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![cairn_proto::reapi::Digest {
                hash: sha256(b"x").hash_hex(),
                size_bytes: -1,
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

fn put_directory(directory: &Directory) -> (Digest, Bytes) {
    let bytes = Bytes::from(directory.encode_to_vec());
    (sha256(&bytes), bytes)
}

#[tokio::test]
async fn get_tree_pages_through_a_tree() {
    let node = Node::start();
    let mut cas = node.cas().await;
    let file = blob(5, 10);
    let mut uploads = Vec::new();
    let leaves: Vec<Directory> = (0..5)
        .map(|i| Directory {
            files: vec![FileNode {
                name: format!("file{i}"),
                digest: Some(wire(&sha256(&file))),
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    let mut root = Directory::default();
    for (i, leaf) in leaves.iter().enumerate() {
        let (digest, bytes) = put_directory(leaf);
        uploads.push((digest, bytes));
        root.directories.push(DirectoryNode {
            name: format!("dir{i}"),
            digest: Some(wire(&digest)),
        });
    }
    root.directories.push(DirectoryNode {
        name: "missing".into(),
        digest: Some(wire(&sha256(b"a directory nobody uploaded"))),
    });
    let (root_digest, root_bytes) = put_directory(&root);
    uploads.push((root_digest, root_bytes));
    put_directories(&node, &uploads).await;

    let (seen, pages) = page_through(&node, &root_digest, 2, false).await;
    assert_eq!(pages, 3);
    assert_eq!(
        seen.len(),
        6,
        "the root and five leaves; the missing one left out"
    );
    assert_eq!(seen[0], root);

    let status = cas
        .get_tree(GetTreeRequest {
            root_digest: Some(wire(&sha256(b"no such root"))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = cas
        .get_tree(GetTreeRequest {
            root_digest: Some(wire(&root_digest)),
            page_token: "not a number".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// Stores `uploads` (digest, encoded Directory) through BatchUpdateBlobs.
async fn put_directories(node: &Node, uploads: &[(Digest, Bytes)]) {
    let mut cas = node.cas().await;
    for batch in uploads.chunks(500) {
        cas.batch_update_blobs(BatchUpdateBlobsRequest {
            requests: batch
                .iter()
                .map(|(digest, bytes)| UpdateRequest {
                    digest: Some(wire(digest)),
                    data: bytes.clone(),
                    compressor: 0,
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

/// Pages through the tree under `root`, `page_size` directories a page; with `strip`,
/// each token loses its walk id, so every page walks again from the root. Returns the
/// directories and the number of pages.
async fn page_through(
    node: &Node,
    root: &Digest,
    page_size: i32,
    strip: bool,
) -> (Vec<Directory>, usize) {
    let mut cas = node.cas().await;
    let mut token = String::new();
    let mut all = Vec::new();
    let mut pages = 0;
    loop {
        let response = cas
            .get_tree(GetTreeRequest {
                root_digest: Some(wire(root)),
                page_size,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .unwrap();
        assert!(response.directories.len() <= page_size as usize);
        all.extend(response.directories);
        pages += 1;
        if response.next_page_token.is_empty() {
            return (all, pages);
        }
        token = response.next_page_token;
        if strip {
            token = token.split('.').next().unwrap_or_default().to_string();
        }
    }
}

/// A chain 1,500 directories deep under a diamond (the root's two children share
/// it), read one directory a page: every directory arrives once, and the walk reads
/// each about once, where a walk restarted from the root for every page read
/// over a million.
#[tokio::test]
async fn get_tree_pages_resume_where_the_previous_ended() {
    let node = Node::start();
    let mut uploads = Vec::new();
    let mut chain_top = Directory::default();
    for depth in 0..1500 {
        let (digest, bytes) = put_directory(&chain_top);
        uploads.push((digest, bytes));
        chain_top = Directory {
            directories: vec![DirectoryNode {
                name: format!("level{depth}"),
                digest: Some(wire(&digest)),
            }],
            ..Default::default()
        };
    }
    let (top, bytes) = put_directory(&chain_top);
    uploads.push((top, bytes));
    let side = |name: &str| Directory {
        directories: vec![DirectoryNode {
            name: name.into(),
            digest: Some(wire(&top)),
        }],
        ..Default::default()
    };
    let mut root = Directory::default();
    for name in ["a", "b"] {
        let (digest, bytes) = put_directory(&side(name));
        uploads.push((digest, bytes));
        root.directories.push(DirectoryNode {
            name: name.into(),
            digest: Some(wire(&digest)),
        });
    }
    let (root_digest, bytes) = put_directory(&root);
    uploads.push((root_digest, bytes));
    put_directories(&node, &uploads).await;
    let total = uploads.len();

    let read_before = node.metric_sum("cairn_get_tree_directories_read_total");
    let (one_a_page, _) = page_through(&node, &root_digest, 1, false).await;
    let reads = node.metric_sum("cairn_get_tree_directories_read_total") - read_before;
    assert_eq!(
        one_a_page.len(),
        total,
        "every directory, the shared chain once"
    );
    let distinct: std::collections::HashSet<Vec<u8>> =
        one_a_page.iter().map(|d| d.encode_to_vec()).collect();
    assert_eq!(distinct.len(), total, "a directory arrived twice");
    assert_eq!(one_a_page[0], root);
    // One read per directory plus one per page (the first of the next page).
    assert!(
        reads <= (3 * total) as f64,
        "{reads} directory reads for {total} directories in {total} pages"
    );

    // Tokens whose walk is gone (another node, a restart) still page correctly.
    let (walked_again, _) = page_through(&node, &root_digest, 100, true).await;
    assert!(walked_again == one_a_page, "a re-walked page differs");
    assert_eq!(node.terminate().code(), Some(0));
}

/// BatchUpdateBlobs with 100,000 blobs of 12 bytes (8.6 MB on the wire) used to take
/// the node from 37 MB to 394 MB: every entry's store future was created at once. The
/// entries are now stored a bounded number at a time, so the batch costs a small
/// multiple of its wire size.
#[tokio::test]
async fn a_batch_of_many_tiny_blobs_costs_a_small_multiple_of_its_size() {
    let node = Node::start();
    let mut cas = node.cas().await;
    let blobs: Vec<Vec<u8>> = (0..100_000u32)
        .map(|i| format!("tiny {i:07}").into_bytes())
        .collect();
    let request = BatchUpdateBlobsRequest {
        requests: blobs
            .iter()
            .map(|data| UpdateRequest {
                digest: Some(wire(&sha256(data))),
                data: Bytes::from(data.clone()),
                compressor: 0,
            })
            .collect(),
        ..Default::default()
    };
    let wire_size = request.encoded_len() as u64;
    let before = node.peak_rss();
    let resident_before = node.resident();
    let response = cas.batch_update_blobs(request).await.unwrap().into_inner();
    let grown = node.peak_rss().saturating_sub(before);
    assert_eq!(response.responses.len(), blobs.len());
    assert!(response
        .responses
        .iter()
        .all(|r| r.status.as_ref().is_some_and(|s| s.code == 0)));
    assert!(
        grown <= 12 * wire_size,
        "peak memory grew {} MB for a {} MB batch",
        grown >> 20,
        wire_size >> 20
    );
    let missing = cas
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: blobs.iter().map(|data| wire(&sha256(data))).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert!(missing.is_empty(), "{} blobs missing", missing.len());
    // And the memory goes back: what stays is the index entries of the new blobs,
    // well under three times the batch. With glibc's malloc the node kept 37 MB
    // after this batch (twice that with mimalloc), for good; jemalloc's purging
    // thread returns it within its 10 s decay. The memory tier keeps the new blobs
    // too, as configured: what it is charged (payloads plus 320 bytes an entry) is
    // allowed on top.
    let tier = node.metric_sum("cairn_memory_tier_bytes") as u64;
    let mut resident_after = node.resident();
    for _ in 0..600 {
        if resident_after <= resident_before + 3 * wire_size + tier {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        resident_after = node.resident();
    }
    assert!(
        resident_after <= resident_before + 3 * wire_size + tier,
        "resident memory stayed {} MB above what it was before a {} MB batch \
         (memory tier: {} MB)",
        (resident_after - resident_before) >> 20,
        wire_size >> 20,
        tier >> 20
    );
    assert!(node.terminate().success());
}
