//! A budget larger than the disk, against the real binary on a real filesystem: a
//! loop-mounted ext4 of 320 MiB with `--max-size 2GiB`. The node lowers the budget to
//! what the disk can hold and says so, writes of three times the disk's size all
//! succeed (old blobs are evicted, the newest read back), no error names a server
//! path, and a restart with the same flags takes writes again. When another process
//! fills the disk instead, writes get RESOURCE_EXHAUSTED naming no server path and
//! `/healthz` answers 503 until the space is freed. Needs root (as CI has) for `mount`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use cairn_proto::reapi::batch_update_blobs_request::Request as UpdateRequest;
use cairn_proto::reapi::{BatchUpdateBlobsRequest, FindMissingBlobsRequest};
use common::{blob, http, read_blob, read_name, sha256, upload_name, wire, write_blob, Node};
use tonic::Code;

/// Size of the test filesystem. ext4 leaves about 286 MiB of it free; 90% of that,
/// less the overflow pool (an eighth), over 16 partitions allows blobs of just over
/// 7 MiB.
const FS_MIB: u64 = 320;
const BIG: usize = 6 << 20;
const SMALL: usize = 4 << 10;
/// 4 KiB blobs per BatchUpdateBlobs call (2 MiB, under the 4 MiB batch limit).
const BATCH: u64 = 512;
/// Rounds of one 6 MiB blob and one batch: 120 × 8 MiB, three times the filesystem.
const ROUNDS: u64 = 120;

/// An ext4 filesystem in a file, loop-mounted for one test and unmounted on drop.
struct Ext4 {
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl Ext4 {
    /// Creates and mounts it, or fails the test saying why.
    fn mount(size_mib: u64) -> Ext4 {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            root,
            "this test loop-mounts an ext4 filesystem and needs root: run the suite as root \
             (CI does)"
        );
        let dir = tempfile::tempdir().expect("temporary directory");
        let image = dir.path().join("fs.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).expect("mount point");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size_mib << 20))
            .expect("filesystem image");
        // No blocks reserved for root: the node's free-space figure is then the
        // filesystem's, whoever runs it.
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&image));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mount));
        Ext4 { mount, _dir: dir }
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

fn run(command: &mut Command) {
    let output = command.output();
    let ok = output.as_ref().is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{command:?} failed (this test needs mkfs.ext4, loop devices and root): {output:?}"
    );
}

fn start(dir: &Path) -> Node {
    Node::start_in(dir, &["--no-execution", "--max-size", "2GiB"])
}

fn big(round: u64) -> Vec<u8> {
    blob(1_000_000 + round, BIG)
}

fn small(round: u64, i: u64) -> Vec<u8> {
    blob(round * 10_000 + i, SMALL)
}

/// Every write of one round: the 6 MiB blob over ByteStream and a batch of 4 KiB
/// blobs; returns the messages of those that failed.
async fn write_round(node: &Node, round: u64) -> Vec<String> {
    let mut failures = Vec::new();
    let data = big(round);
    let mut bytestream = node.bytestream().await;
    if let Err(status) = write_blob(&mut bytestream, &upload_name("", &sha256(&data)), &data).await
    {
        failures.push(format!("{:?}: {}", status.code(), status.message()));
    }
    let requests = (0..BATCH)
        .map(|i| {
            let data = small(round, i);
            UpdateRequest {
                digest: Some(wire(&sha256(&data))),
                data: Bytes::from(data),
                compressor: 0,
            }
        })
        .collect();
    let response = node
        .cas()
        .await
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests,
            ..Default::default()
        })
        .await;
    match response {
        Err(status) => failures.push(format!("{:?}: {}", status.code(), status.message())),
        Ok(response) => {
            for r in response.into_inner().responses {
                let status = r.status.unwrap_or_default();
                if status.code != 0 {
                    failures.push(format!("{}: {}", status.code, status.message));
                }
            }
        }
    }
    failures
}

#[tokio::test]
async fn a_budget_over_the_disk_is_clamped_and_a_full_disk_evicts() {
    let fs = Ext4::mount(FS_MIB);
    let dir = fs.mount.join("data");
    let node = start(&dir);

    let mut failures = Vec::new();
    for round in 0..ROUNDS {
        failures.extend(write_round(&node, round).await);
    }
    let data_dir = dir.to_string_lossy().to_string();
    let mount = fs.mount.to_string_lossy().to_string();
    for message in &failures {
        assert!(
            !message.contains(&mount) && !message.contains(&data_dir),
            "an error names a server path: {message}"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} writes into a full disk failed, e.g. {:?}",
        failures.len(),
        ROUNDS * (BATCH + 1),
        failures.first()
    );

    // The newest blobs are all there and intact.
    let mut bytestream = node.bytestream().await;
    let last = ROUNDS - 1;
    let data = big(last);
    let read = read_blob(&mut bytestream, &read_name("", &sha256(&data)), 0, 0).await;
    assert!(read.unwrap() == data, "the last 6 MiB blob read back wrong");
    for i in (0..BATCH).step_by(37) {
        let data = small(last, i);
        let read = read_blob(&mut bytestream, &read_name("", &sha256(&data)), 0, 0).await;
        assert!(
            read.unwrap() == data,
            "4 KiB blob {i} of the last round read back wrong"
        );
    }
    // The oldest were evicted to make room.
    let data = big(0);
    let read = read_blob(&mut bytestream, &read_name("", &sha256(&data)), 0, 0).await;
    assert_eq!(read.unwrap_err().code(), Code::NotFound);
    let missing = node
        .cas()
        .await
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: (0..BATCH).map(|i| wire(&sha256(&small(0, i)))).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(
        missing.len() as u64,
        BATCH,
        "the first round was not evicted"
    );

    // The start-up lowered the budget, and says so.
    let clamped = node.metric_sum("cairn_budget_clamped_bytes");
    assert!(
        clamped > 0.0,
        "a 2 GiB budget on {FS_MIB} MiB was not clamped"
    );
    let budget = node.metric_sum("cairn_partition_budget_bytes");
    assert!(
        budget <= (FS_MIB << 20) as f64,
        "budget {budget} exceeds the filesystem"
    );
    let (status, body) = http(node.http, "GET", "/healthz", b"");
    let body = String::from_utf8_lossy(&body).to_string();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("budget clamped"), "{body}");

    assert!(node.terminate().success());
    let node = start(&dir);
    assert!(node.metric_sum("cairn_budget_clamped_bytes") > 0.0);
    let data = blob(42, SMALL);
    let digest = sha256(&data);
    let mut bytestream = node.bytestream().await;
    let written = write_blob(&mut bytestream, &upload_name("", &digest), &data).await;
    assert_eq!(
        written.unwrap(),
        SMALL as i64,
        "a 4 KiB write after the restart"
    );
    let read = read_blob(&mut bytestream, &read_name("", &digest), 0, 0).await;
    assert!(read.unwrap() == data);
    assert!(node.terminate().success());
}

/// Bytes free on the filesystem holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs writes into the zeroed struct; the path is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_bavail * s.f_frsize
}

#[tokio::test]
async fn a_disk_another_process_filled_refuses_writes_and_says_so() {
    let fs = Ext4::mount(FS_MIB);
    let dir = fs.mount.join("data");
    let node = start(&dir);
    let filler = fs.mount.join("filler");
    let free = free_bytes(&fs.mount);
    std::fs::write(&filler, vec![1u8; (free - (1 << 20)) as usize]).unwrap();

    let data = big(7);
    let name = upload_name("", &sha256(&data));
    let mut bytestream = node.bytestream().await;
    let status = write_blob(&mut bytestream, &name, &data)
        .await
        .expect_err("a 6 MiB write into a disk with 1 MiB left succeeded");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let mount = fs.mount.to_string_lossy().to_string();
    assert!(
        !status.message().contains(&mount),
        "the error names a server path: {}",
        status.message()
    );
    let (code, body) = http(node.http, "GET", "/healthz", b"");
    let body = String::from_utf8_lossy(&body).to_string();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("writes refused"), "{body}");

    std::fs::remove_file(&filler).unwrap();
    let written = write_blob(&mut bytestream, &name, &data).await;
    assert_eq!(
        written.unwrap(),
        BIG as i64,
        "the write once space was freed"
    );
    let (code, body) = http(node.http, "GET", "/healthz", b"");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert!(node.terminate().success());
}
