//! Starting the real `cairn` binary on loopback for integration tests.
//!
//! Each test gets its own node: a fresh data directory, ports picked from the kernel's
//! ephemeral range, and readiness detected by polling until the gRPC port accepts a
//! connection. Nodes are stopped with SIGTERM (checking the clean exit) or SIGKILL
//! when a test wants a crash, and killed on drop so a failing test leaves nothing
//! behind.

#![allow(dead_code)]

pub mod certs;
pub mod exec;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use cairn_proto::bytestream::byte_stream_client::ByteStreamClient;
use cairn_proto::bytestream::{ReadRequest, WriteRequest};
use cairn_proto::reapi::action_cache_client::ActionCacheClient;
use cairn_proto::reapi::capabilities_client::CapabilitiesClient;
use cairn_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use cairn_proto::reapi::Digest as WireDigest;
use cairn_storage::{Digest, DigestFunction};
use tonic::transport::Channel;

/// The binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_cairn");

/// The scheduler's binary; see [`exec_binary`].
pub const SCHEDULER: &str = "cairn-scheduler";

/// The worker's binary; see [`exec_binary`].
pub const WORKER: &str = "cairn-worker";

/// The path of `cairn-scheduler` or `cairn-worker`. They belong to the `cairn-exec`
/// package, so cargo defines no `CARGO_BIN_EXE_` for them in this package's tests;
/// they are built into the directory of `cairn` (by `cargo test --workspace`, for
/// cairn-exec's own tests, or by `cargo build --workspace --bins`).
#[allow(dead_code)]
pub fn exec_binary(name: &str) -> PathBuf {
    let path = Path::new(BINARY).with_file_name(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build -p cairn-exec --bins` (`cargo test --workspace` builds it)",
        path.display()
    );
    path
}

/// A running node.
pub struct Node {
    child: Option<Child>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

/// A port nobody listens on right now, for a server the test starts.
///
/// Taken below the kernel's ephemeral range (32768 and up by default) and never twice
/// by one test process: a port the kernel handed out for a moment (`bind(:0)`) was
/// soon handed again, to a client connection or another test's server, and the
/// node then failed to start with "Address already in use" (seen in full runs).
pub fn free_port() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 12_000;
    const SPAN: u32 = 20_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Test binaries run one after another; the process id spreads them apart anyway.
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        let addr = SocketAddr::from(([127, 0, 0, 1], (FIRST + offset) as u16));
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free port between {FIRST} and {}", FIRST + SPAN);
}

impl Node {
    /// Starts a node with a fresh data directory.
    pub fn start() -> Node {
        let temp = tempfile::tempdir().expect("temporary directory");
        let dir = temp.path().join("data");
        let mut node = Node::start_in(&dir, &[]);
        node._temp = Some(temp);
        node
    }

    /// Starts a node on `dir` with extra arguments; the budget is 4 GiB unless they
    /// give `--max-size`.
    pub fn start_in(dir: &Path, extra: &[&str]) -> Node {
        let grpc = free_port();
        let http = free_port();
        let mut command = Command::new(BINARY);
        command
            .arg("--listen")
            .arg(grpc.to_string())
            .arg("--http-listen")
            .arg(http.to_string())
            .arg("--data-dir")
            .arg(dir)
            .args(extra);
        if !extra.contains(&"--max-size") {
            command.args(["--max-size", "4GiB"]);
        }
        Node::spawn(command, grpc, http, dir.to_path_buf())
    }

    /// Starts `command`, which must make the node listen on `grpc`.
    pub fn spawn(mut command: Command, grpc: SocketAddr, http: SocketAddr, dir: PathBuf) -> Node {
        command.stdin(Stdio::null());
        if !command.get_envs().any(|(name, _)| name == "RUST_LOG") {
            command.env("RUST_LOG", "error");
        }
        let child = command.spawn().expect("start cairn");
        let mut node = Node {
            child: Some(child),
            grpc,
            http,
            data_dir: dir,
            _temp: None,
        };
        node.wait_ready();
        node
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::net::TcpStream::connect(self.grpc).is_ok() {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("cairn exited before listening: {status}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "cairn did not listen within 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .map(|child| child.id() as i32)
            .unwrap_or(0)
    }

    /// The node's peak resident memory (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        proc_status_bytes(self.pid(), "VmHWM:")
    }

    /// The node's resident memory now (VmRSS), in bytes.
    pub fn resident(&self) -> u64 {
        proc_status_bytes(self.pid(), "VmRSS:")
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("node is running");
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().expect("wait for cairn")
    }

    /// Sends `signal` without waiting for the exit.
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Waits for the node to exit on its own (after [`Node::signal`]).
    pub fn wait(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("node is running");
        child.wait().expect("wait for cairn")
    }

    /// The sum of the `name` samples in `/metrics` (every label set).
    pub fn metric_sum(&self, name: &str) -> f64 {
        let (status, body) = http(self.http, "GET", "/metrics", b"");
        assert_eq!(status, 200, "GET /metrics");
        String::from_utf8_lossy(&body)
            .lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// Kills the process with SIGKILL, keeping the data directory.
    pub fn kill(mut self) -> Option<tempfile::TempDir> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self._temp.take()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to cairn")
    }

    pub async fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel().await)
            .max_decoding_message_size(64 << 20)
    }

    pub async fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    pub async fn ac(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel().await)
    }

    pub async fn capabilities(&self) -> CapabilitiesClient<Channel> {
        CapabilitiesClient::new(self.channel().await)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The SHA-256 digest of `data`, computed by the `sha2` crate rather than the
/// server's own hasher, so that a wrong hash in the server cannot hide behind a test
/// that asks the server what the right one is.
pub fn sha256(data: &[u8]) -> Digest {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(data);
    Digest::from_hex(
        DigestFunction::Sha256,
        &hex::encode(hash),
        data.len() as u64,
    )
    .expect("a SHA-256 digest")
}

pub fn wire(digest: &Digest) -> WireDigest {
    WireDigest {
        hash: digest.hash_hex(),
        size_bytes: digest.size as i64,
    }
}

/// Deterministic pseudo-random bytes, so every blob is distinct and incompressible.
pub fn blob(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

pub fn upload_name(instance: &str, digest: &Digest) -> String {
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    format!(
        "{prefix}uploads/{}/blobs/{}/{}",
        uuid_like(digest),
        digest.hash_hex(),
        digest.size
    )
}

pub fn read_name(instance: &str, digest: &Digest) -> String {
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    format!("{prefix}blobs/{}/{}", digest.hash_hex(), digest.size)
}

fn uuid_like(digest: &Digest) -> String {
    let hex = digest.hash_hex();
    format!(
        "{}-{}-4{}-8{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

/// The WriteRequests of a whole upload in `chunk`-byte pieces.
pub fn write_requests(name: &str, data: &[u8], chunk: usize) -> Vec<WriteRequest> {
    let mut requests = Vec::new();
    let mut offset = 0;
    loop {
        let end = (offset + chunk).min(data.len());
        requests.push(WriteRequest {
            resource_name: if offset == 0 {
                name.to_string()
            } else {
                String::new()
            },
            write_offset: offset as i64,
            finish_write: end == data.len(),
            data: bytes::Bytes::copy_from_slice(&data[offset..end]),
        });
        if end == data.len() {
            return requests;
        }
        offset = end;
    }
}

/// Uploads `data` with ByteStream and returns the committed size.
pub async fn write_blob(
    client: &mut ByteStreamClient<Channel>,
    name: &str,
    data: &[u8],
) -> Result<i64, tonic::Status> {
    let requests = write_requests(name, data, 64 << 10);
    let response = client.write(tokio_stream::iter(requests)).await?;
    Ok(response.into_inner().committed_size)
}

/// Reads a blob with ByteStream.
pub async fn read_blob(
    client: &mut ByteStreamClient<Channel>,
    name: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = client
        .read(ReadRequest {
            resource_name: name.to_string(),
            read_offset: offset,
            read_limit: limit,
        })
        .await?
        .into_inner();
    let mut data = Vec::new();
    while let Some(response) = stream.message().await? {
        data.extend_from_slice(&response.data);
    }
    Ok(data)
}

/// One HTTP/1.1 request on a fresh connection; returns the status and the body.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let (status, _, body) = http_with_headers(addr, method, path, &[], body);
    (status, body)
}

/// One HTTP/1.1 request with extra headers on a fresh connection; returns the status,
/// the response head and the body.
pub fn http_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the HTTP listener");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("send the head");
    // A refused PUT may be answered and closed before the body is read.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response head");
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status code");
    (status, head, response[split + 4..].to_vec())
}

/// Waits until the upload `name` has `committed` bytes committed, as QueryWriteStatus
/// reports (at most 20 s).
pub async fn wait_committed(node: &Node, name: &str, committed: i64) {
    let mut client = node.bytestream().await;
    for _ in 0..2000 {
        let status = client
            .query_write_status(cairn_proto::bytestream::QueryWriteStatusRequest {
                resource_name: name.to_string(),
            })
            .await
            .expect("QueryWriteStatus")
            .into_inner();
        if status.committed_size == committed {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the upload {name} never reached {committed} bytes");
}

/// A tmpfs mounted for one test (root only), unmounted on drop: a filesystem whose
/// size and free space nothing else on the machine changes.
pub struct Tmpfs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_mib` MiB, or fails the test saying it needs root.
    pub fn mount(size_mib: u64) -> Tmpfs {
        let dir = tempfile::tempdir().expect("temporary directory");
        let target = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes())
            .expect("a path without NUL");
        let options = std::ffi::CString::new(format!("size={size_mib}m")).expect("options");
        // SAFETY: every pointer is a valid NUL-terminated string for the call.
        let mounted = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        } == 0;
        assert!(
            mounted,
            "this test mounts a {size_mib} MiB tmpfs and needs root: run the suite as root \
             (CI does): {}",
            std::io::Error::last_os_error()
        );
        Tmpfs {
            path: dir.path().to_path_buf(),
            _dir: dir,
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Ok(target) = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()) {
            // SAFETY: unmounting the tmpfs this value mounted.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// A size in kB from `/proc/<pid>/status`, in bytes.
fn proc_status_bytes(pid: i32, field: &str) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the node's /proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    kib << 10
}

/// `message` with `authorization: Bearer token`, as a client of an `--auth` node sends it.
pub fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("metadata value"),
    );
    request
}

/// The hex SHA-256 of `token`: what an auth file's `token_sha256` holds.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}
