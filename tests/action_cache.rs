//! ActionCache against the real binary: namespacing, completeness and inlining.

mod common;

use bytes::Bytes;
use cairn_proto::reapi::batch_update_blobs_request::Request as UpdateRequest;
use cairn_proto::reapi::{
    ActionResult, BatchUpdateBlobsRequest, Directory, FileNode, GetActionResultRequest,
    OutputDirectory, OutputFile, Tree, UpdateActionResultRequest,
};
use common::{blob, sha256, wire, Node};
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
    let status = ac
        .get_action_result(GetActionResultRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}
