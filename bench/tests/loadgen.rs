//! The load generator against a real node: every scenario, briefly, with verification.
//!
//! Needs the `cairn` binary next to `cairn-bench` in the target directory; `cargo test
//! --workspace` (scripts/test.sh) builds it. Alone: `cargo build -p cairn` first.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the node when the test ends, however it ends.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cairn_binary() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_cairn-bench"));
    let cairn = bench.with_file_name("cairn");
    assert!(
        cairn.exists(),
        "{} is missing: run `cargo build -p cairn` (or `cargo test --workspace`) first",
        cairn.display()
    );
    cairn
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

fn start(args: &[&str], dir: &std::path::Path) -> (Node, u16) {
    let port = free_port();
    let child = Command::new(cairn_binary())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir)
        .args(["--shards", "1"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cairn");
    let node = Node(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "cairn did not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (node, port)
}

fn run_all(port: u16) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_cairn-bench"))
        .args(["--addr", &format!("grpc://127.0.0.1:{port}")])
        .args(["--scenario", "all", "--ops", "24", "--blob-size", "1MiB"])
        .args(["--concurrency", "4", "--connections", "2"])
        .output()
        .expect("run cairn-bench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "cairn-bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn check(report: &str) {
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(lines.len(), 9, "one line per scenario phase:\n{report}");
    for line in lines {
        assert!(line.contains(" 24 ops"), "every operation ran: {line}");
        assert!(line.contains("errors 0  verify-failures 0"), "{line}");
    }
}

#[test]
fn every_scenario_verifies_against_a_real_node() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (_node, port) = start(&["--max-size", "4GiB"], dir.path());
    check(&run_all(port));
}

#[test]
fn every_scenario_verifies_against_a_sink() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (_node, port) = start(&["--sink", "--max-size", "512MiB"], dir.path());
    check(&run_all(port));
}
