//! Who may do what on the node: credentials, principals and the decision per request.
//!
//! Without `--auth` the node is as open as its listeners: everything is allowed, as a
//! cache on loopback should be. With `--auth FILE` every request is matched to a
//! principal of the file ([`file`]) by the credential it presents ([`credentials`]),
//! and the principal's permissions and instance prefixes decide. Two answers are kept
//! apart because clients act on them differently: UNAUTHENTICATED (no credential, or
//! one nobody has) means "log in", PERMISSION_DENIED (a known principal asking for
//! something it lacks) means "ask for more rights", and its message names the
//! permission and the instance so an operator can tell which. Neither ever quotes a
//! secret.
//!
//! Secrets are compared in constant time: tokens by their SHA-256 (the file holds only
//! that), basic passwords by bcrypt. bcrypt is slow on purpose (milliseconds at the
//! costs htpasswd uses) and Bazel sends the header with every HTTP request, so a
//! verified user and password is remembered, by a SHA-256 of both, until the file
//! changes.
//!
//! The file is polled ([`RELOAD_POLL`], and at once on SIGHUP) and a changed file replaces the policy in
//! force for the requests that follow; one that does not parse is logged and the
//! previous policy stays, so a broken edit never opens or closes the node by accident.
//!
//! `--read-only` is independent of the file: it refuses every write, whoever asks. A
//! single node's own scheduler and worker present a token made for the process
//! ([`Access::with_internal_token`]), which holds every permission.

pub mod credentials;
pub mod file;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

pub use credentials::Presented;
pub use file::{AuthFile, Grant, Identity, Permission, Permissions, Principal};

use crate::error::{Error, Result};

/// How often the auth file is read to see whether it changed.
pub const RELOAD_POLL: Duration = Duration::from_secs(1);

/// At most one log line about refused requests per this interval; the rest are
/// counted and the count is logged with the next line. A client retrying with a bad
/// token in a loop must not fill the disk with logs.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Verified basic credentials remembered per auth file, at most.
const VERIFIED_MAX: usize = 1024;

/// What a request needs to be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Any known principal (or anonymous access), for the instance.
    Authenticated,
    /// This permission.
    One(Permission),
    /// Either of these permissions (FindMissingBlobs serves readers and uploaders).
    Either(Permission, Permission),
}

impl Need {
    fn met_by(self, permissions: Permissions) -> bool {
        match self {
            Need::Authenticated => true,
            Need::One(p) => permissions.contains(p),
            Need::Either(a, b) => permissions.contains(a) || permissions.contains(b),
        }
    }

    fn writes(self) -> bool {
        matches!(
            self,
            Need::One(Permission::Write | Permission::WriteAc)
                | Need::Either(Permission::Write, Permission::WriteAc)
        )
    }

    fn describe(self) -> String {
        match self {
            Need::Authenticated => "access".to_string(),
            Need::One(p) => format!("the `{}` permission", p.name()),
            Need::Either(a, b) => format!("the `{}` or `{}` permission", a.name(), b.name()),
        }
    }
}

/// The names of the verified client certificate of a request's connection (subject
/// CN, DNS and URI SANs), attached to each request by the runtime under mutual TLS.
#[derive(Debug, Clone)]
pub struct PeerNames(pub Arc<[String]>);

/// The credentials one request presents.
#[derive(Debug, Default)]
pub struct Credentials {
    /// The `authorization` header, parsed; `None` when absent.
    authorization: Option<Result<Presented>>,
    /// The names of a verified client certificate (subject CN, DNS and URI SANs).
    cert_names: Vec<String>,
}

impl Credentials {
    /// The credentials of a request whose `authorization` header is `value`.
    pub fn from_authorization(value: Option<&[u8]>) -> Self {
        Credentials {
            authorization: value.map(credentials::parse),
            cert_names: Vec::new(),
        }
    }

    /// The credentials of an HTTP request.
    pub fn from_headers(headers: &http::HeaderMap) -> Self {
        Self::from_authorization(
            headers
                .get(http::header::AUTHORIZATION)
                .map(|value| value.as_bytes()),
        )
    }

    /// The credentials of a gRPC request: its `authorization` metadata and its
    /// connection's client certificate.
    pub fn of_grpc<T>(request: &tonic::Request<T>) -> Self {
        let authorization = request.metadata().get("authorization");
        let credentials = Self::from_authorization(authorization.map(|value| value.as_bytes()));
        if let Some(PeerNames(names)) = request.extensions().get::<PeerNames>() {
            return credentials.with_cert_names(names.to_vec());
        }
        // tonic's own TLS listener (the scheduler's) keeps the verified chain instead.
        match request.peer_certs() {
            Some(chain) => match chain.first() {
                Some(certificate) => {
                    credentials.with_cert_names(crate::tls::peer_names(certificate).0.to_vec())
                }
                None => credentials,
            },
            None => credentials,
        }
    }

    /// Adds the names of a verified client certificate.
    pub fn with_cert_names(mut self, names: Vec<String>) -> Self {
        self.cert_names = names;
        self
    }

    /// Whether these credentials are `Bearer TOKEN` for the one token whose SHA-256
    /// is `expected`, compared in constant time (a node's own loopback listener, which
    /// serves that token alone).
    pub fn bears(&self, expected: &[u8; 32]) -> bool {
        match &self.authorization {
            Some(Ok(Presented::Bearer(token))) => {
                let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                bool::from(expected.ct_eq(&hash))
            }
            _ => false,
        }
    }
}

/// The access policy of a node. Cheap to clone: one per service.
#[derive(Clone)]
pub struct Access {
    inner: Arc<Inner>,
}

struct Inner {
    /// The auth file in force; `None` without `--auth`.
    policy: Option<Policy>,
    read_only: bool,
    /// SHA-256 of the token of the node's own scheduler and worker.
    internal: Option<[u8; 32]>,
    failures: prometheus::IntCounterVec,
    log: LogLimiter,
}

struct Policy {
    path: PathBuf,
    current: RwLock<Arc<Loaded>>,
}

/// One parsed version of the auth file.
struct Loaded {
    file: AuthFile,
    /// SHA-256 of the text it was parsed from.
    fingerprint: [u8; 32],
    /// SHA-256 of `user \0 password` for basic credentials already verified, with the
    /// principal's index.
    verified: Mutex<HashMap<[u8; 32], usize>>,
}

/// Who a request was found to be.
struct Who<'a> {
    name: &'a str,
    grant: &'a Grant,
}

impl Access {
    /// A policy that allows everything except, with `read_only`, writes. `failures`
    /// counts refused requests by reason.
    pub fn open(read_only: bool, failures: prometheus::IntCounterVec) -> Self {
        Self::build(None, read_only, failures)
    }

    /// The policy of the auth file at `path`, which must parse.
    pub fn from_file(
        path: &Path,
        read_only: bool,
        failures: prometheus::IntCounterVec,
    ) -> Result<Self> {
        let loaded = load(path)?;
        let policy = Policy {
            path: path.to_path_buf(),
            current: RwLock::new(Arc::new(loaded)),
        };
        Ok(Self::build(Some(policy), read_only, failures))
    }

    fn build(policy: Option<Policy>, read_only: bool, failures: prometheus::IntCounterVec) -> Self {
        Access {
            inner: Arc::new(Inner {
                policy,
                read_only,
                internal: None,
                failures,
                log: LogLimiter::default(),
            }),
        }
    }

    /// Also accepts `token` as a principal with every permission: the node's own
    /// scheduler and worker present it. Call before cloning.
    pub fn with_internal_token(mut self, token: &str) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.internal = Some(Sha256::digest(token.as_bytes()).into());
        }
        self
    }

    /// Whether requests need credentials (`--auth` was given).
    pub fn enforced(&self) -> bool {
        self.inner.policy.is_some()
    }

    /// Starts a thread that reloads the auth file when its contents change, for as
    /// long as this policy (or a clone) exists, counting each change in `reloads` by
    /// result (`ok`, `refused`). Does nothing without `--auth`.
    pub fn watch(&self, reloads: prometheus::IntCounterVec) -> Result<()> {
        if self.inner.policy.is_none() {
            return Ok(());
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        std::thread::Builder::new()
            .name("auth-reload".to_string())
            .spawn(move || {
                let mut refused: Option<[u8; 32]> = None;
                loop {
                    crate::reload::wait(RELOAD_POLL);
                    let Some(inner) = weak.upgrade() else {
                        return;
                    };
                    let outcome = match &inner.policy {
                        Some(policy) => policy.reload(&mut refused),
                        None => None,
                    };
                    match outcome {
                        Some(true) => reloads.with_label_values(&["ok"]).inc(),
                        Some(false) => reloads.with_label_values(&["refused"]).inc(),
                        None => {}
                    }
                }
            })
            .map_err(|error| {
                Error::internal(format!("cannot start the auth reload thread: {error}"))
            })?;
        Ok(())
    }

    /// Decides a request presenting `credentials` that needs `need` on `instance`
    /// (`None`: a call not tied to one instance). Refusals are counted and logged.
    pub fn check(
        &self,
        credentials: &Credentials,
        need: Need,
        instance: Option<&str>,
    ) -> Result<()> {
        let decided = self.decide(credentials, need, instance);
        if let Err((reason, error)) = &decided {
            self.inner.failures.with_label_values(&[reason]).inc();
            self.inner
                .log
                .warn(|| format!("refused ({reason}): {error}"));
        }
        decided.map_err(|(_, error)| error)
    }

    /// [`Access::check`] for a gRPC request.
    pub fn check_grpc<T>(
        &self,
        request: &tonic::Request<T>,
        need: Need,
        instance: Option<&str>,
    ) -> Result<(), tonic::Status> {
        let credentials = Credentials::of_grpc(request);
        self.check(&credentials, need, instance)
            .map_err(tonic::Status::from)
    }

    fn decide(
        &self,
        credentials: &Credentials,
        need: Need,
        instance: Option<&str>,
    ) -> Result<(), (&'static str, Error)> {
        let inner = &self.inner;
        let loaded = inner.policy.as_ref().map(Policy::current);
        let everything = Grant::everything();
        let who = match &loaded {
            None => Who {
                name: "every client",
                grant: &everything,
            },
            Some(loaded) => self.identify(loaded, credentials, &everything)?,
        };
        if inner.read_only && need.writes() {
            return Err((
                "read_only",
                Error::permission_denied(format!(
                    "the node is read-only (--read-only): {} on instance `{}` is refused",
                    need.describe(),
                    instance.unwrap_or("")
                )),
            ));
        }
        let on_instance = instance.is_none_or(|instance| who.grant.covers(instance));
        if need.met_by(who.grant.permissions) && on_instance {
            return Ok(());
        }
        let message = match instance {
            Some(instance) => format!(
                "{} lacks {} on instance `{instance}`",
                who.name,
                need.describe()
            ),
            None => format!("{} lacks {}", who.name, need.describe()),
        };
        Err(("denied", Error::permission_denied(message)))
    }

    /// The principal `credentials` identify in `loaded`, or anonymous access.
    fn identify<'a>(
        &self,
        loaded: &'a Loaded,
        credentials: &Credentials,
        everything: &'a Grant,
    ) -> Result<Who<'a>, (&'static str, Error)> {
        let unknown = |reason| {
            (
                reason,
                Error::unauthenticated(
                    "unknown credentials: no principal of the auth file has them",
                ),
            )
        };
        match &credentials.authorization {
            Some(Err(error)) => Err(("malformed", error.clone())),
            Some(Ok(Presented::Bearer(token))) => {
                let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                if let Some(internal) = &self.inner.internal {
                    if bool::from(internal.ct_eq(&hash)) {
                        return Ok(Who {
                            name: "the node's own scheduler and worker",
                            grant: everything,
                        });
                    }
                }
                // Every principal is compared, so the time taken does not tell how far
                // down the list a match was.
                let mut found = None;
                for principal in &loaded.file.principals {
                    if let Identity::Token(expected) = &principal.identity {
                        if bool::from(expected.ct_eq(&hash)) && found.is_none() {
                            found = Some(principal);
                        }
                    }
                }
                found.map(Who::of).ok_or_else(|| unknown("unknown_token"))
            }
            Some(Ok(Presented::Basic { user, password })) => {
                let index = loaded
                    .verify_basic(user, password)
                    .ok_or_else(|| unknown("bad_password"))?;
                Ok(Who::of(&loaded.file.principals[index]))
            }
            None => {
                let by_cert = loaded.file.principals.iter().find(|principal| {
                    matches!(&principal.identity, Identity::Cert(name)
                        if credentials.cert_names.iter().any(|presented| presented == name))
                });
                if let Some(principal) = by_cert {
                    return Ok(Who::of(principal));
                }
                match &loaded.file.anonymous {
                    Some(grant) => Ok(Who {
                        name: "anonymous clients",
                        grant,
                    }),
                    None => Err((
                        "missing",
                        Error::unauthenticated(
                            "credentials required: send `authorization: Bearer <token>` \
                             (HTTP: basic authentication also works)",
                        ),
                    )),
                }
            }
        }
    }
}

impl<'a> Who<'a> {
    fn of(principal: &'a Principal) -> Self {
        Who {
            name: &principal.name,
            grant: &principal.grant,
        }
    }
}

impl Policy {
    fn current(&self) -> Arc<Loaded> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Reads the file and, if its contents changed and parse, puts them in force.
    /// `refused` remembers the last contents that failed, so a broken file is logged
    /// once, not every poll. Returns whether new contents were put in force (`None`:
    /// nothing new to look at).
    fn reload(&self, refused: &mut Option<[u8; 32]>) -> Option<bool> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(error) => {
                if refused.is_none() {
                    tracing::warn!(
                        "cannot read the auth file {}: {error}; the previous one stays in force",
                        self.path.display()
                    );
                    *refused = Some([0; 32]);
                    return Some(false);
                }
                return None;
            }
        };
        let fingerprint: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        if fingerprint == self.current().fingerprint || *refused == Some(fingerprint) {
            return None;
        }
        match parse_loaded(&text, fingerprint) {
            Ok(loaded) => {
                tracing::info!(
                    "auth file {} reloaded: {} principals",
                    self.path.display(),
                    loaded.file.principals.len()
                );
                *refused = None;
                match self.current.write() {
                    Ok(mut current) => *current = Arc::new(loaded),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(loaded),
                }
                Some(true)
            }
            Err(error) => {
                tracing::warn!(
                    "auth file {} not reloaded, the previous one stays in force: {error}",
                    self.path.display()
                );
                *refused = Some(fingerprint);
                Some(false)
            }
        }
    }
}

impl Loaded {
    /// The index of the principal with basic user `user` whose hash `password`
    /// matches.
    fn verify_basic(&self, user: &str, password: &[u8]) -> Option<usize> {
        let mut hasher = Sha256::new();
        hasher.update(user.as_bytes());
        hasher.update([0]);
        hasher.update(password);
        let key: [u8; 32] = hasher.finalize().into();
        if let Ok(verified) = self.verified.lock() {
            if let Some(index) = verified.get(&key) {
                return Some(*index);
            }
        }
        let (index, hash) = self.file.principals.iter().enumerate().find_map(
            |(index, principal)| match &principal.identity {
                Identity::Basic { user: name, hash } if name == user => Some((index, hash)),
                _ => None,
            },
        )?;
        if !bcrypt::verify(password, hash).unwrap_or(false) {
            return None;
        }
        if let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= VERIFIED_MAX {
                verified.clear();
            }
            verified.insert(key, index);
        }
        Some(index)
    }
}

/// Reads and parses the auth file at `path`.
fn load(path: &Path) -> Result<Loaded> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        Error::invalid_argument(format!(
            "cannot read the auth file {}: {error}",
            path.display()
        ))
    })?;
    let fingerprint = Sha256::digest(text.as_bytes()).into();
    parse_loaded(&text, fingerprint)
        .map_err(|error| Error::new(error.kind(), format!("{}: {error}", path.display())))
}

fn parse_loaded(text: &str, fingerprint: [u8; 32]) -> Result<Loaded> {
    Ok(Loaded {
        file: file::parse(text)?,
        fingerprint,
        verified: Mutex::new(HashMap::new()),
    })
}

/// Logs at most one line per [`LOG_INTERVAL`], with the number left out since.
#[derive(Default)]
struct LogLimiter {
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimiter {
    fn warn(&self, line: impl FnOnce() -> String) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let (last, skipped) = &mut *state;
        if last.is_some_and(|last| last.elapsed() < LOG_INTERVAL) {
            *skipped += 1;
            return;
        }
        let line = line();
        if *skipped > 0 {
            tracing::warn!("{line} ({skipped} more refusals not logged)");
        } else {
            tracing::warn!("{line}");
        }
        *last = Some(Instant::now());
        *skipped = 0;
    }
}

#[cfg(test)]
mod tests;
