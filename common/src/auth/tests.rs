use super::*;
use crate::error::ErrorKind;

const CI_TOKEN: &str = "ci-token-0123456789";
const RO_TOKEN: &str = "read-only-token";
const A_TOKEN: &str = "team-a-token";

fn sha(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn counter() -> prometheus::IntCounterVec {
    prometheus::IntCounterVec::new(
        prometheus::Opts::new("auth_failures_total", "test"),
        &["reason"],
    )
    .unwrap()
}

fn policy_text(extra: &str) -> String {
    // Cost 4, the lowest bcrypt allows: the tests verify passwords many times.
    let hash = bcrypt::hash("open sesame", 4).unwrap();
    format!(
        "{{ principals: [
            {{ name: 'ci', token_sha256: '{}', permissions: ['read', 'write', 'write_ac', 'execute'] }},
            {{ name: 'ro', token_sha256: '{}', permissions: ['read'] }},
            {{ name: 'uploader', cert: 'uploader.example', permissions: ['read', 'write'] }},
            {{ name: 'team-a', token_sha256: '{}', permissions: ['read', 'write'], instances: ['a/'] }},
            {{ name: 'alice', basic: {{ user: 'alice', hash: '{hash}' }}, permissions: ['read', 'write'] }},
          ], {extra} }}",
        sha(CI_TOKEN),
        sha(RO_TOKEN),
        sha(A_TOKEN),
    )
}

/// A policy from `text` in a temporary file (kept alive by the returned directory).
fn policy(text: &str, read_only: bool) -> (Access, tempfile::TempDir, prometheus::IntCounterVec) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.json5");
    std::fs::write(&path, text).unwrap();
    let failures = counter();
    let access = Access::from_file(&path, read_only, failures.clone()).unwrap();
    (access, dir, failures)
}

fn bearer(token: &str) -> Credentials {
    Credentials::from_authorization(Some(format!("Bearer {token}").as_bytes()))
}

fn basic(user: &str, password: &str) -> Credentials {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    Credentials::from_authorization(Some(format!("Basic {encoded}").as_bytes()))
}

fn kind(result: Result<()>) -> Option<ErrorKind> {
    result.err().map(|error| error.kind())
}

const READ: Need = Need::One(Permission::Read);
const WRITE: Need = Need::One(Permission::Write);
const WRITE_AC: Need = Need::One(Permission::WriteAc);

#[test]
fn tokens_decide_by_permission_and_instance() {
    let (access, _dir, failures) = policy(&policy_text(""), false);
    assert!(access.enforced());
    let ci = bearer(CI_TOKEN);
    for need in [READ, WRITE, WRITE_AC, Need::One(Permission::Execute)] {
        access.check(&ci, need, Some("any")).unwrap();
    }
    let error = access
        .check(&ci, Need::One(Permission::Metrics), None)
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PermissionDenied);
    assert_eq!(error.message(), "ci lacks the `metrics` permission");

    let ro = bearer(RO_TOKEN);
    access.check(&ro, READ, Some("")).unwrap();
    let error = access.check(&ro, WRITE, Some("main")).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PermissionDenied);
    assert_eq!(
        error.message(),
        "ro lacks the `write` permission on instance `main`"
    );

    let a = bearer(A_TOKEN);
    access.check(&a, WRITE, Some("a")).unwrap();
    access.check(&a, READ, Some("a/sub")).unwrap();
    let error = access.check(&a, READ, Some("b")).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PermissionDenied);
    assert!(error.message().contains("`read`"), "{error}");
    assert!(error.message().contains("instance `b`"), "{error}");
    assert_eq!(
        kind(access.check(&a, Need::Authenticated, Some("b"))),
        Some(ErrorKind::PermissionDenied)
    );
    access.check(&a, Need::Authenticated, Some("a")).unwrap();
    assert_eq!(failures.with_label_values(&["denied"]).get(), 4);
}

#[test]
fn unknown_missing_and_malformed_credentials_are_unauthenticated() {
    let (access, _dir, failures) = policy(&policy_text(""), false);
    let error = access
        .check(&bearer("wrong-token"), READ, Some(""))
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unauthenticated);
    assert!(!error.message().contains("wrong-token"), "{error}");
    let error = access
        .check(&Credentials::default(), READ, Some(""))
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unauthenticated);
    assert!(error.message().contains("Bearer"), "{error}");
    let malformed = Credentials::from_authorization(Some(b"Token secret-value"));
    let error = access.check(&malformed, READ, Some("")).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unauthenticated);
    assert!(!error.message().contains("secret-value"), "{error}");
    // A wrong token is refused even where anonymous clients may read: a client that
    // sends a credential wants to be that principal, and must learn it is not.
    let (open, _dir2, _) = policy(&policy_text("anonymous: { permissions: ['read'] }"), false);
    assert_eq!(
        kind(open.check(&bearer("wrong-token"), READ, Some(""))),
        Some(ErrorKind::Unauthenticated)
    );
    assert_eq!(failures.with_label_values(&["unknown_token"]).get(), 1);
    assert_eq!(failures.with_label_values(&["missing"]).get(), 1);
    assert_eq!(failures.with_label_values(&["malformed"]).get(), 1);
}

#[test]
fn anonymous_access() {
    let (access, _dir, _) = policy(
        &policy_text("anonymous: { permissions: ['read'], instances: ['public'] }"),
        false,
    );
    let nobody = Credentials::default();
    access.check(&nobody, READ, Some("public")).unwrap();
    let error = access.check(&nobody, WRITE, Some("public")).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PermissionDenied);
    assert!(
        error.message().starts_with("anonymous clients lack"),
        "{error}"
    );
    assert_eq!(
        kind(access.check(&nobody, READ, Some("private"))),
        Some(ErrorKind::PermissionDenied)
    );
}

#[test]
fn basic_credentials_are_verified_with_bcrypt() {
    let (access, _dir, failures) = policy(&policy_text(""), false);
    access
        .check(&basic("alice", "open sesame"), WRITE, Some(""))
        .unwrap();
    // Remembered: the second check takes the verified path, with the same answer.
    access
        .check(&basic("alice", "open sesame"), WRITE, Some(""))
        .unwrap();
    assert_eq!(
        kind(access.check(&basic("alice", "open sesame"), WRITE_AC, Some(""))),
        Some(ErrorKind::PermissionDenied)
    );
    let error = access
        .check(&basic("alice", "wrong"), READ, Some(""))
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unauthenticated);
    assert_eq!(
        kind(access.check(&basic("mallory", "open sesame"), READ, Some(""))),
        Some(ErrorKind::Unauthenticated)
    );
    assert_eq!(failures.with_label_values(&["bad_password"]).get(), 2);
}

#[test]
fn client_certificate_names() {
    let (access, _dir, _) = policy(&policy_text(""), false);
    let uploader = Credentials::default()
        .with_cert_names(vec!["other".to_string(), "uploader.example".to_string()]);
    access.check(&uploader, WRITE, Some("x")).unwrap();
    assert_eq!(
        kind(access.check(&uploader, WRITE_AC, Some("x"))),
        Some(ErrorKind::PermissionDenied)
    );
    let stranger = Credentials::default().with_cert_names(vec!["stranger".to_string()]);
    assert_eq!(
        kind(access.check(&stranger, READ, Some("x"))),
        Some(ErrorKind::Unauthenticated)
    );
}

#[test]
fn without_a_file_everything_is_allowed() {
    let access = Access::open(false, counter());
    assert!(!access.enforced());
    for need in [READ, WRITE, WRITE_AC, Need::One(Permission::Metrics)] {
        access
            .check(&Credentials::default(), need, Some("x"))
            .unwrap();
        access.check(&bearer("anything"), need, Some("x")).unwrap();
    }
}

#[test]
fn read_only_refuses_every_write() {
    let failures = counter();
    let access = Access::open(true, failures.clone());
    access
        .check(&Credentials::default(), READ, Some("x"))
        .unwrap();
    for need in [
        WRITE,
        WRITE_AC,
        Need::Either(Permission::Write, Permission::WriteAc),
    ] {
        let error = access
            .check(&Credentials::default(), need, Some("x"))
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::PermissionDenied);
        assert!(error.message().contains("read-only"), "{error}");
    }
    let (with_file, _dir, _) = policy(&policy_text(""), true);
    assert_eq!(
        kind(with_file.check(&bearer(CI_TOKEN), WRITE, Some(""))),
        Some(ErrorKind::PermissionDenied)
    );
    with_file.check(&bearer(CI_TOKEN), READ, Some("")).unwrap();
    assert_eq!(failures.with_label_values(&["read_only"]).get(), 3);
}

#[test]
fn either_permission() {
    let (access, _dir, _) = policy(&policy_text(""), false);
    let find_missing = Need::Either(Permission::Read, Permission::Write);
    access
        .check(&bearer(RO_TOKEN), find_missing, Some(""))
        .unwrap();
    let error = access
        .check(
            &bearer(RO_TOKEN),
            Need::Either(Permission::Write, Permission::Execute),
            Some(""),
        )
        .unwrap_err();
    assert!(error.message().contains("`write` or `execute`"), "{error}");
}

#[test]
fn the_internal_token_holds_every_permission() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.json5");
    std::fs::write(&path, "{}").unwrap();
    let access = Access::from_file(&path, false, counter())
        .unwrap()
        .with_internal_token("node-secret");
    for permission in Permission::ALL {
        access
            .check(&bearer("node-secret"), Need::One(permission), Some("any"))
            .unwrap();
    }
    assert_eq!(
        kind(access.check(&bearer("node-secre"), READ, Some(""))),
        Some(ErrorKind::Unauthenticated)
    );
}

#[test]
fn a_malformed_file_is_refused_at_start_with_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.json5");
    std::fs::write(
        &path,
        "{\n principals: [\n  { name: 'x', permissions: ['raed'] },\n ] }",
    )
    .unwrap();
    let error = Access::from_file(&path, false, counter())
        .err()
        .expect("refused");
    assert_eq!(error.kind(), ErrorKind::InvalidArgument);
    assert!(error.message().contains("auth.json5"), "{error}");
    assert!(error.message().contains("raed"), "{error}");
    assert!(error.message().contains("line 3"), "{error}");
    let missing = Access::from_file(&dir.path().join("absent"), false, counter());
    assert!(missing.is_err());
}

#[test]
fn reload_takes_a_good_file_and_keeps_the_old_one_on_a_broken_edit() {
    let (access, dir, _) = policy(&policy_text(""), false);
    let path = dir.path().join("auth.json5");
    let policy = access.inner.policy.as_ref().unwrap();
    let mut refused = None;
    access.check(&bearer(RO_TOKEN), READ, Some("")).unwrap();

    let new_token = "new-token";
    std::fs::write(
        &path,
        format!(
            "{{ principals: [ {{ name: 'new', token_sha256: '{}', permissions: ['read'] }} ] }}",
            sha(new_token)
        ),
    )
    .unwrap();
    assert_eq!(policy.reload(&mut refused), Some(true));
    assert_eq!(policy.reload(&mut refused), None, "unchanged");
    access.check(&bearer(new_token), READ, Some("")).unwrap();
    assert_eq!(
        kind(access.check(&bearer(RO_TOKEN), READ, Some(""))),
        Some(ErrorKind::Unauthenticated)
    );

    std::fs::write(&path, "{ principals: [ { name: 'broken' ").unwrap();
    assert_eq!(policy.reload(&mut refused), Some(false));
    assert_eq!(
        policy.reload(&mut refused),
        None,
        "refused once, not every poll"
    );
    access.check(&bearer(new_token), READ, Some("")).unwrap();

    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        policy.reload(&mut refused),
        None,
        "the broken file was reported"
    );
    access.check(&bearer(new_token), READ, Some("")).unwrap();
}

#[test]
fn refusal_logs_are_rate_limited() {
    let limiter = LogLimiter::default();
    let mut built = 0;
    for _ in 0..5 {
        limiter.warn(|| {
            built += 1;
            String::from("refused")
        });
    }
    assert_eq!(built, 1, "only the first line within the interval is built");
    let state = limiter.state.lock().unwrap();
    assert_eq!(state.1, 4);
}
