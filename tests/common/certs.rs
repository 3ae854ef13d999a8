//! Certificates for TLS tests, made by the `openssl` CLI in a test's directory.

use std::path::Path;
use std::process::Command as Process;

/// Runs `openssl` with `args` in `dir`, failing the test on an error.
pub fn openssl(dir: &Path, args: &[&str]) {
    let output = Process::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (scripts/install-deps.sh installs it)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA named `name`: `name.pem` and `name.key` in `dir`.
pub fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// A certificate `name.pem` (key `name.key`) for subject `cn`, signed by CA `ca`,
/// with the extensions `extensions` (an openssl extension file's lines), valid for two
/// days.
pub fn make_cert(dir: &Path, ca: &str, name: &str, cn: &str, extensions: &str) {
    make_cert_for_days(dir, ca, name, cn, extensions, "2");
}

/// [`make_cert`] valid for `days` days from now; `-1` makes one that expired a day ago.
pub fn make_cert_for_days(
    dir: &Path,
    ca: &str,
    name: &str,
    cn: &str,
    extensions: &str,
    days: &str,
) {
    std::fs::write(dir.join(format!("{name}.ext")), extensions).expect("write extensions");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            days,
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// Everything the tests need, in `dir`: CAs `ca` and `other-ca`, `server` for
/// 127.0.0.1 and localhost, `client` of `ca`, `stranger` of `other-ca` and `expired`
/// of `ca`, which expired yesterday.
pub fn certificates(dir: &Path) {
    make_ca(dir, "ca");
    make_ca(dir, "other-ca");
    make_cert(
        dir,
        "ca",
        "server",
        "localhost",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    );
    let client = "extendedKeyUsage=clientAuth\n";
    make_cert(dir, "ca", "client", "ci-client", client);
    make_cert(dir, "other-ca", "stranger", "ci-client", client);
    make_cert_for_days(dir, "ca", "expired", "ci-client", client, "-1");
}
