//! What an operator installs next to the binaries: the systemd units in
//! `config/systemd/`, and `--version` on every binary.

use std::path::Path;
use std::process::Command;

const BINARIES: [(&str, &str); 3] = [
    ("cairn", env!("CARGO_BIN_EXE_cairn")),
    ("cairn-scheduler", env!("CARGO_BIN_EXE_cairn-scheduler")),
    ("cairn-worker", env!("CARGO_BIN_EXE_cairn-worker")),
];

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
    for (name, built) in BINARIES {
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
    let expected_commit = env!("CAIRN_COMMIT");
    assert!(!expected_commit.is_empty());
    for (name, built) in BINARIES {
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
