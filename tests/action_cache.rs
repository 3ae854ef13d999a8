//! ActionCache against the real binary: namespacing, completeness and inlining.

mod common;

use bytes::Bytes;
use cairn_proto::reapi::batch_update_blobs_request::Request as UpdateRequest;
use cairn_proto::reapi::{
    ActionResult, BatchUpdateBlobsRequest, Directory, DirectoryNode, FileNode,
    GetActionResultRequest, OutputDirectory, OutputFile, Tree, UpdateActionResultRequest,
};
use common::{blob, http, sha256, wire, Node};
use prost::Message;
use tonic::Code;

async fn upload(node: &Node, blobs: &[&[u8]]) {
    let response = node
        .cas()
        .await
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: blobs
                .iter()
                .map(|data| UpdateRequest {
                    digest: Some(wire(&sha256(data))),
                    data: Bytes::copy_from_slice(data),
                    compressor: 0,
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response
        .responses
        .iter()
        .all(|r| r.status.as_ref().unwrap().code == 0));
}

fn get(instance: &str, action: &[u8]) -> GetActionResultRequest {
    GetActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(wire(&sha256(action))),
        ..Default::default()
    }
}

fn update(instance: &str, action: &[u8], result: &ActionResult) -> UpdateActionResultRequest {
    UpdateActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(wire(&sha256(action))),
        action_result: Some(result.clone()),
        ..Default::default()
    }
}

#[tokio::test]
async fn results_are_namespaced_by_instance_and_inlined_on_request() {
    let node = Node::start();
    let stdout = b"compiled 3 files\n".to_vec();
    let output = blob(30, 2000);
    upload(&node, &[&stdout, &output]).await;
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "out/a.o".into(),
            digest: Some(wire(&sha256(&output))),
            ..Default::default()
        }],
        stdout_digest: Some(wire(&sha256(&stdout))),
        exit_code: 0,
        ..Default::default()
    };
    let mut ac = node.ac().await;
    ac.update_action_result(update("team-a", b"action 1", &result))
        .await
        .unwrap();
    let found = ac
        .get_action_result(get("team-a", b"action 1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found, result);
    let status = ac
        .get_action_result(get("team-b", b"action 1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let inlined = ac
        .get_action_result(GetActionResultRequest {
            inline_stdout: true,
            inline_output_files: vec!["out/a.o".into()],
            ..get("team-a", b"action 1")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inlined.stdout_raw, stdout);
    assert_eq!(inlined.output_files[0].contents, output);
}

#[tokio::test]
async fn incomplete_results_are_not_found() {
    let node = Node::start();
    let present = blob(31, 100);
    let in_tree = blob(32, 100);
    upload(&node, &[&present]).await;
    let tree = Tree {
        root: Some(Directory {
            files: vec![FileNode {
                name: "f".into(),
                digest: Some(wire(&sha256(&in_tree))),
                ..Default::default()
            }],
            ..Default::default()
        }),
        children: Vec::new(),
    };
    let tree_bytes = tree.encode_to_vec();
    upload(&node, &[&tree_bytes]).await;
    let mut ac = node.ac().await;

    let missing_file = ActionResult {
        output_files: vec![OutputFile {
            path: "gone".into(),
            digest: Some(wire(&sha256(b"never uploaded"))),
            ..Default::default()
        }],
        ..Default::default()
    };
    let missing_stderr = ActionResult {
        stderr_digest: Some(wire(&sha256(b"never uploaded either"))),
        ..Default::default()
    };
    let missing_in_tree = ActionResult {
        output_directories: vec![OutputDirectory {
            path: "dir".into(),
            tree_digest: Some(wire(&sha256(&tree_bytes))),
            ..Default::default()
        }],
        ..Default::default()
    };
    for (action, result) in [
        (&b"a"[..], &missing_file),
        (&b"b"[..], &missing_stderr),
        (&b"c"[..], &missing_in_tree),
    ] {
        ac.update_action_result(update("", action, result))
            .await
            .unwrap();
        let status = ac.get_action_result(get("", action)).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    upload(&node, &[&in_tree]).await;
    let complete = ac.get_action_result(get("", b"c")).await.unwrap();
    assert_eq!(complete.into_inner(), missing_in_tree);
}

fn file(name: &str, data: &[u8]) -> FileNode {
    FileNode {
        name: name.into(),
        digest: Some(wire(&sha256(data))),
        ..Default::default()
    }
}

fn subdirectory(name: &str, directory: &Directory) -> DirectoryNode {
    DirectoryNode {
        name: name.into(),
        digest: Some(wire(&sha256(&directory.encode_to_vec()))),
    }
}

/// Stores `result` for `action`, then expects GetActionResult to answer NOT_FOUND over
/// gRPC and 404 over HTTP (both ask the same completeness question).
async fn expect_incomplete(node: &Node, action: &[u8], result: &ActionResult, what: &str) {
    let mut ac = node.ac().await;
    ac.update_action_result(update("", action, result))
        .await
        .unwrap();
    let status = ac.get_action_result(get("", action)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{what}: {status:?}");
    assert!(
        status.message().contains("incomplete"),
        "{what}: {}",
        status.message()
    );
    let path = format!("/ac/{}", sha256(action).hash_hex());
    let (code, _) = http(node.http, "GET", &path, b"");
    assert_eq!(code, 404, "{what} over HTTP");
}

#[tokio::test]
async fn incomplete_trees_stdout_and_hierarchies_are_not_found() {
    let node = Node::start();
    let shallow = blob(40, 300);
    let deep = blob(41, 500);
    let stdout = b"built\n".to_vec();
    let child = Directory {
        files: vec![file("deep", &deep)],
        ..Default::default()
    };
    let root = Directory {
        files: vec![file("shallow", &shallow)],
        directories: vec![subdirectory("sub", &child)],
        ..Default::default()
    };
    let tree = Tree {
        root: Some(root.clone()),
        children: vec![child.clone()],
    };
    let tree_bytes = tree.encode_to_vec();
    let root_bytes = root.encode_to_vec();
    let child_bytes = child.encode_to_vec();
    upload(&node, &[&shallow]).await;

    let tree_only = ActionResult {
        output_directories: vec![OutputDirectory {
            path: "out".into(),
            tree_digest: Some(wire(&sha256(&tree_bytes))),
            ..Default::default()
        }],
        ..Default::default()
    };
    expect_incomplete(&node, b"tree missing", &tree_only, "a missing Tree").await;
    upload(&node, &[&tree_bytes]).await;
    expect_incomplete(
        &node,
        b"tree file missing",
        &tree_only,
        "a file of a child directory",
    )
    .await;
    let with_stdout = ActionResult {
        stdout_digest: Some(wire(&sha256(&stdout))),
        ..tree_only.clone()
    };
    upload(&node, &[&deep]).await;
    expect_incomplete(&node, b"stdout missing", &with_stdout, "a missing stdout").await;
    upload(&node, &[&stdout]).await;

    // Tree-only entries need no Directory blobs: nothing in REAPI asks for them.
    let mut ac = node.ac().await;
    let got = ac
        .get_action_result(get("", b"stdout missing"))
        .await
        .unwrap();
    assert_eq!(got.into_inner(), with_stdout);
    let (code, body) = http(
        node.http,
        "GET",
        &format!("/ac/{}", sha256(b"stdout missing").hash_hex()),
        b"",
    );
    assert_eq!(code, 200);
    assert_eq!(ActionResult::decode(&body[..]).unwrap(), with_stdout);

    // An entry that advertises the separately stored hierarchy needs every Directory
    // of it, whether or not it also has the Tree.
    let both = ActionResult {
        output_directories: vec![OutputDirectory {
            path: "out".into(),
            tree_digest: Some(wire(&sha256(&tree_bytes))),
            root_directory_digest: Some(wire(&sha256(&root_bytes))),
            ..Default::default()
        }],
        ..Default::default()
    };
    let directories_only = ActionResult {
        output_directories: vec![OutputDirectory {
            path: "out".into(),
            root_directory_digest: Some(wire(&sha256(&root_bytes))),
            ..Default::default()
        }],
        ..Default::default()
    };
    expect_incomplete(&node, b"both, no root", &both, "Tree and a missing root").await;
    expect_incomplete(&node, b"dirs, no root", &directories_only, "a missing root").await;
    upload(&node, &[&root_bytes]).await;
    expect_incomplete(&node, b"both, no child", &both, "Tree and a missing child").await;
    expect_incomplete(
        &node,
        b"dirs, no child",
        &directories_only,
        "a missing child",
    )
    .await;
    upload(&node, &[&child_bytes]).await;
    for action in [&b"both, no child"[..], b"dirs, no child"] {
        let got = ac.get_action_result(get("", action)).await.unwrap();
        assert!(!got.into_inner().output_directories.is_empty());
    }

    // A hierarchy whose deepest file is gone is as incomplete as a Tree's.
    let lost = blob(42, 700);
    let lost_child = Directory {
        files: vec![file("lost", &lost)],
        ..Default::default()
    };
    let lost_root = Directory {
        directories: vec![subdirectory("sub", &lost_child)],
        ..Default::default()
    };
    upload(
        &node,
        &[&lost_child.encode_to_vec(), &lost_root.encode_to_vec()],
    )
    .await;
    let lost_result = ActionResult {
        output_directories: vec![OutputDirectory {
            path: "out".into(),
            root_directory_digest: Some(wire(&sha256(&lost_root.encode_to_vec()))),
            ..Default::default()
        }],
        ..Default::default()
    };
    expect_incomplete(
        &node,
        b"dirs, no file",
        &lost_result,
        "a file deep in a hierarchy",
    )
    .await;
}

#[tokio::test]
async fn malformed_updates_are_invalid() {
    let node = Node::start();
    let mut ac = node.ac().await;
    let bad = ActionResult {
        output_files: vec![OutputFile {
            path: "x".into(),
            digest: Some(cairn_proto::reapi::Digest {
                hash: "not hex".into(),
                size_bytes: 3,
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let status = ac
        .update_action_result(update("", b"x", &bad))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = ac
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(wire(&sha256(b"x"))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let formless = ActionResult {
        output_directories: vec![OutputDirectory {
            path: "d".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let status = ac
        .update_action_result(update("", b"x", &formless))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("neither"), "{}", status.message());
    let status = ac
        .get_action_result(GetActionResultRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}
