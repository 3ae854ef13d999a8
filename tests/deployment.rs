//! What an operator installs next to the binaries: the systemd units in
//! `config/systemd/`, the Docker image's seccomp profile, `--version` on every binary,
//! and logs a shipper can read.

mod common;

use std::path::Path;
use std::process::Command;

/// The three programs, by name, and where they were built.
fn binaries() -> [(&'static str, String); 3] {
    let path = |name| common::exec_binary(name).display().to_string();
    [
        ("cairn", common::BINARY.to_string()),
        (common::SCHEDULER, path(common::SCHEDULER)),
        (common::WORKER, path(common::WORKER)),
    ]
}

/// The commit checked out, as build scripts record it (`unknown` outside git).
fn checked_out_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

/// Every unit passes `systemd-analyze verify` without a warning (an unknown or
/// misspelt key is only a warning to systemd, and a silently ignored hardening line).
/// The units name the installed binaries; here they point at the ones just built.
#[test]
fn the_systemd_units_verify_without_warnings() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        analyze.is_ok_and(|output| output.status.success()),
        "systemd-analyze is missing: scripts/install-deps.sh installs it (package systemd)"
    );
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/systemd");
    let temp = tempfile::tempdir().unwrap();
    for (name, built) in binaries() {
        let text = std::fs::read_to_string(units.join(format!("{name}.service"))).unwrap();
        let installed = format!("ExecStart=/usr/local/bin/{name} ");
        assert!(
            text.contains(&installed),
            "{name}.service does not start /usr/local/bin/{name}"
        );
        let unit = temp.path().join(format!("{name}.service"));
        std::fs::write(
            &unit,
            text.replace(&installed, &format!("ExecStart={built} ")),
        )
        .unwrap();
        let output = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stderr.trim().is_empty(),
            "{name}.service does not verify: {stderr}"
        );
    }
}

/// `--version` names the binary, the version and the commit it was built from.
#[test]
fn every_binary_reports_its_version_and_commit() {
    let expected_commit = checked_out_commit();
    assert!(!expected_commit.is_empty());
    for (name, built) in binaries() {
        let output = Command::new(built).arg("--version").output().unwrap();
        assert!(output.status.success(), "{name} --version failed");
        let printed = String::from_utf8_lossy(&output.stdout);
        assert_eq!(
            printed.trim(),
            format!(
                "{name} {} (commit {expected_commit})",
                env!("CARGO_PKG_VERSION")
            )
        );
    }
}

/// `--log-format json` makes every line a node writes, and every line of the
/// scheduler and worker it starts (they share its standard error), one JSON object
/// with a level and a message, for log shippers.
#[test]
fn json_logs_are_one_object_a_line_from_all_three_processes() {
    let temp = tempfile::tempdir().unwrap();
    let log = temp.path().join("node.log");
    let grpc = common::free_port();
    let http = common::free_port();
    let mut command = Command::new(common::BINARY);
    command
        .args(["--log-format", "json", "--max-size", "1GiB"])
        .args(["--listen", &grpc.to_string()])
        .args(["--http-listen", &http.to_string()])
        .arg("--data-dir")
        .arg(temp.path().join("data"))
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap());
    let node = common::Node::spawn(command, grpc, http, temp.path().join("data"));
    assert!(node.terminate().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let mut targets = std::collections::BTreeSet::new();
    for line in text.lines() {
        let object: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("a log line is not JSON ({error}): {line}"));
        assert!(object["level"].is_string(), "no level: {line}");
        assert!(
            object["fields"]["message"].is_string(),
            "no message: {line}"
        );
        if let Some(target) = object["target"].as_str() {
            targets.insert(target.split("::").nth(1).unwrap_or(target).to_string());
        }
    }
    for process in ["scheduler", "worker"] {
        assert!(
            targets.contains(process),
            "no JSON line from the {process} (targets seen: {targets:?})"
        );
    }
}

/// The seccomp profile the Dockerfile tells operators to run the node with is one
/// Docker reads (a default action and rules by name), lets the io_uring calls through
/// (Docker's default profile blocks them and the node cannot start), and still refuses
/// the calls that administer the host.
#[test]
fn the_docker_seccomp_profile_allows_io_uring_and_refuses_host_administration() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("--security-opt seccomp=config/docker/seccomp-io-uring.json"));
    assert!(dockerfile.contains("--ulimit memlock=-1:-1"));
    assert!(dockerfile.contains("cargo build --release --bins"));
    let text = std::fs::read_to_string(root.join("config/docker/seccomp-io-uring.json")).unwrap();
    let profile: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ALLOW");
    let mut refused = Vec::new();
    for rule in profile["syscalls"].as_array().expect("syscalls") {
        assert_eq!(rule["action"], "SCMP_ACT_ERRNO");
        for name in rule["names"].as_array().expect("names") {
            refused.push(name.as_str().expect("a name").to_string());
        }
    }
    assert!(
        !refused.iter().any(|name| name.starts_with("io_uring")),
        "{refused:?}"
    );
    for call in [
        "mount",
        "ptrace",
        "kexec_load",
        "init_module",
        "bpf",
        "setns",
    ] {
        assert!(refused.iter().any(|name| name == call), "{call} is allowed");
    }
}
