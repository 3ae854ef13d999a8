//! The auth file: who may do what, as the operator writes it.
//!
//! A JSON5 file listing principals. Each is matched by exactly one kind of credential
//! (a bearer token, known here only by its SHA-256; an htpasswd-style bcrypt user; a
//! client certificate's name) and holds a set of permissions, optionally limited to
//! instance-name prefixes. An optional `anonymous` entry says what a client without
//! credentials may do. Everything is checked when the file is read: a typo in a
//! permission, a token hash that is not 64 hex digits, a principal with two kinds of
//! credential or none, a token or user given to two principals. A file that fails is
//! refused with the line and the reason, because a half-understood access policy is
//! worse than none: the node refuses to start, and a running node keeps the policy it
//! had.
//!
//! This module is a pure function over text (it only refers to `crate::error`), so a
//! fuzz target compiles it from source and feeds it arbitrary files.

use std::collections::HashSet;

use serde::Deserialize;

use crate::error::{Error, Result};

/// One thing a principal may be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// Read blobs and action results (FindMissingBlobs, BatchReadBlobs, GetTree,
    /// ByteStream Read, GetActionResult, HTTP `GET`/`HEAD`).
    Read,
    /// Upload blobs (BatchUpdateBlobs, ByteStream Write, HTTP `PUT /cas/`).
    Write,
    /// Write action results (UpdateActionResult, HTTP `PUT /ac/`).
    WriteAc,
    /// Run actions (Execute, WaitExecution, Operations).
    Execute,
    /// Read `/metrics`.
    Metrics,
}

impl Permission {
    /// Every permission.
    pub const ALL: [Permission; 5] = [
        Permission::Read,
        Permission::Write,
        Permission::WriteAc,
        Permission::Execute,
        Permission::Metrics,
    ];

    /// The name the auth file uses.
    pub fn name(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::WriteAc => "write_ac",
            Permission::Execute => "execute",
            Permission::Metrics => "metrics",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Permissions(u8);

impl Permissions {
    /// Every permission.
    pub fn all() -> Self {
        Permission::ALL.into_iter().collect()
    }

    /// Whether `permission` is in the set.
    pub fn contains(self, permission: Permission) -> bool {
        self.0 & permission.bit() != 0
    }
}

impl FromIterator<Permission> for Permissions {
    fn from_iter<I: IntoIterator<Item = Permission>>(iter: I) -> Self {
        Permissions(iter.into_iter().fold(0, |bits, p| bits | p.bit()))
    }
}

/// What a principal (or an anonymous client) may do, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The permissions held.
    pub permissions: Permissions,
    /// Instance-name prefixes the permissions hold for; `None`: every instance.
    pub instances: Option<Vec<String>>,
}

impl Grant {
    /// Every permission on every instance.
    pub fn everything() -> Self {
        Grant {
            permissions: Permissions::all(),
            instances: None,
        }
    }

    /// Whether `instance` lies under one of the prefixes. Prefixes match whole
    /// path segments: `a` (or `a/`) covers `a` and `a/x`, not `ab`; an empty prefix
    /// covers everything.
    pub fn covers(&self, instance: &str) -> bool {
        let Some(prefixes) = &self.instances else {
            return true;
        };
        prefixes.iter().any(|prefix| {
            let prefix = prefix.trim_end_matches('/');
            prefix.is_empty()
                || instance == prefix
                || instance
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    }
}

/// How a principal proves who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A bearer token whose SHA-256 is this.
    Token([u8; 32]),
    /// HTTP basic authentication: a user and the bcrypt hash of its password.
    Basic {
        /// The user name.
        user: String,
        /// The htpasswd-compatible bcrypt hash (`$2y$…`, `$2b$…`, `$2a$…`).
        hash: String,
    },
    /// A client certificate whose subject CN or a DNS/URI SAN is this.
    Cert(String),
}

/// A named client of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The name logs and error messages use.
    pub name: String,
    /// How it is recognised.
    pub identity: Identity,
    /// What it may do.
    pub grant: Grant,
}

/// A parsed auth file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFile {
    /// The principals, in file order.
    pub principals: Vec<Principal>,
    /// What clients without credentials may do; `None`: nothing.
    pub anonymous: Option<Grant>,
}

/// Parses the text of an auth file. Errors name the line (and column) and the reason;
/// a principal refused as a whole is named, and the line is that of its list.
pub fn parse(text: &str) -> Result<AuthFile> {
    let raw: RawFile = json5::from_str(text)
        .map_err(|error| Error::invalid_argument(format!("invalid auth file: {error}")))?;
    Ok(AuthFile {
        principals: raw.principals.0,
        anonymous: raw
            .anonymous
            .map(Grant::try_from)
            .transpose()
            .map_err(|error| {
                Error::invalid_argument(format!("invalid auth file: `anonymous`: {error}"))
            })?,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    principals: Principals,
    #[serde(default)]
    anonymous: Option<RawGrant>,
}

/// The principal list, checked as a whole: no name, token, user or certificate name
/// twice, since two principals matching one credential would make its permissions
/// depend on their order.
#[derive(Default)]
struct Principals(Vec<Principal>);

impl<'de> Deserialize<'de> for Principals {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let principals = Vec::<Checked>::deserialize(deserializer)?
            .into_iter()
            .map(|checked| checked.0)
            .collect::<Vec<_>>();
        let mut names = HashSet::new();
        let mut identities = HashSet::new();
        for (index, principal) in principals.iter().enumerate() {
            if !names.insert(principal.name.as_str()) {
                return Err(serde::de::Error::custom(format!(
                    "two principals are named `{}` (the second is principals[{index}])",
                    principal.name
                )));
            }
            let key = match &principal.identity {
                Identity::Token(hash) => format!("token_sha256 {}", hex::encode(hash)),
                Identity::Basic { user, .. } => format!("basic user `{user}`"),
                Identity::Cert(name) => format!("cert `{name}`"),
            };
            if !identities.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!(
                    "principal `{}` (principals[{index}]) has the {key} of an earlier \
                     principal",
                    principal.name
                )));
            }
        }
        Ok(Principals(principals))
    }
}

/// A principal checked as it is read, so a refusal points at its line.
#[derive(Deserialize)]
#[serde(try_from = "RawPrincipal")]
struct Checked(Principal);

impl TryFrom<RawPrincipal> for Checked {
    type Error = String;

    fn try_from(raw: RawPrincipal) -> Result<Self, String> {
        Principal::try_from(raw).map(Checked)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrincipal {
    name: String,
    #[serde(default)]
    token_sha256: Option<TokenHash>,
    #[serde(default)]
    basic: Option<RawBasic>,
    #[serde(default)]
    cert: Option<String>,
    permissions: Vec<Permission>,
    #[serde(default)]
    instances: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBasic {
    user: String,
    hash: BcryptHash,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    permissions: Vec<Permission>,
    #[serde(default)]
    instances: Option<Vec<String>>,
}

impl TryFrom<RawGrant> for Grant {
    type Error = String;

    fn try_from(raw: RawGrant) -> Result<Self, String> {
        if raw.instances.as_ref().is_some_and(Vec::is_empty) {
            return Err(
                "`instances: []` allows no instance at all; leave it out to allow \
                 every instance"
                    .to_string(),
            );
        }
        Ok(Grant {
            permissions: raw.permissions.into_iter().collect(),
            instances: raw.instances,
        })
    }
}

impl TryFrom<RawPrincipal> for Principal {
    type Error = String;

    fn try_from(raw: RawPrincipal) -> Result<Self, String> {
        let name = raw.name;
        if name.is_empty() {
            return Err("a principal has an empty name".to_string());
        }
        let identity = match (raw.token_sha256, raw.basic, raw.cert) {
            (Some(TokenHash(hash)), None, None) => Identity::Token(hash),
            (None, Some(basic), None) => {
                if basic.user.is_empty() || basic.user.contains(':') {
                    return Err(format!(
                        "principal `{name}`: a basic user name must be non-empty and \
                         without `:`"
                    ));
                }
                Identity::Basic {
                    user: basic.user,
                    hash: basic.hash.0,
                }
            }
            (None, None, Some(cert)) if !cert.is_empty() => Identity::Cert(cert),
            (None, None, Some(_)) => {
                return Err(format!("principal `{name}`: `cert` is empty"));
            }
            (None, None, None) => {
                return Err(format!(
                    "principal `{name}` has no credential: give one of `token_sha256`, \
                     `basic` or `cert`"
                ))
            }
            _ => {
                return Err(format!(
                    "principal `{name}` has more than one of `token_sha256`, `basic` and \
                     `cert`; give each credential its own principal"
                ))
            }
        };
        let grant = Grant::try_from(RawGrant {
            permissions: raw.permissions,
            instances: raw.instances,
        })
        .map_err(|error| format!("principal `{name}`: {error}"))?;
        Ok(Principal {
            name,
            identity,
            grant,
        })
    }
}

/// The hex SHA-256 of a bearer token.
struct TokenHash([u8; 32]);

impl<'de> Deserialize<'de> for TokenHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let mut hash = [0u8; 32];
        match hex::decode_to_slice(text.as_bytes(), &mut hash) {
            Ok(()) => Ok(TokenHash(hash)),
            Err(_) => Err(serde::de::Error::custom(format!(
                "`token_sha256` must be 64 hex digits (the SHA-256 of the token, e.g. \
                 `printf %s TOKEN | sha256sum`), not {} characters",
                text.chars().count()
            ))),
        }
    }
}

/// A bcrypt hash as htpasswd writes it: `$2y$` (or `$2a$`, `$2b$`, `$2x$`), a cost of
/// two digits from 04 to 31, `$`, and 53 characters of bcrypt's base64.
struct BcryptHash(String);

impl<'de> Deserialize<'de> for BcryptHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if is_bcrypt(&text) {
            Ok(BcryptHash(text))
        } else {
            Err(serde::de::Error::custom(
                "`hash` must be a bcrypt hash as `htpasswd -nbB USER PASSWORD` prints it \
                 after the colon (`$2y$05$` and 53 more characters)",
            ))
        }
    }
}

fn is_bcrypt(text: &str) -> bool {
    let bytes = text.as_bytes();
    if bytes.len() != 60 || !text.is_ascii() {
        return false;
    }
    let (version, rest) = text.split_at(4);
    let (cost, rest) = rest.split_at(2);
    matches!(version, "$2a$" | "$2b$" | "$2x$" | "$2y$")
        && cost
            .parse::<u32>()
            .is_ok_and(|cost| (4..=31).contains(&cost))
        && cost.bytes().all(|b| b.is_ascii_digit())
        && rest.starts_with('$')
        && rest[1..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN_HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const HASH: &str = "$2y$05$c4WoMPo3SXsafkva.HHa6uXQZWr7oboPiC2bT/r7q1BB8I2s0BRqC";

    #[test]
    fn the_documented_shape() {
        let text = format!(
            r#"{{
  principals: [
    {{ name: "ci", token_sha256: "{TOKEN_HASH}", permissions: ["read", "write", "write_ac"] }},
    {{ name: "alice", basic: {{ user: "alice", hash: "{HASH}" }}, permissions: ["read"] }},
    {{ name: "builder", cert: "ci-client", permissions: ["read", "write", "execute"], instances: ["main"] }},
  ],
  anonymous: {{ permissions: ["read"] }},   // optional
}}"#
        );
        let file = parse(&text).unwrap();
        assert_eq!(file.principals.len(), 3);
        let ci = &file.principals[0];
        assert_eq!(ci.name, "ci");
        let mut expected = [0u8; 32];
        hex::decode_to_slice(TOKEN_HASH, &mut expected).unwrap();
        assert_eq!(ci.identity, Identity::Token(expected));
        assert!(ci.grant.permissions.contains(Permission::WriteAc));
        assert!(!ci.grant.permissions.contains(Permission::Execute));
        assert_eq!(
            file.principals[1].identity,
            Identity::Basic {
                user: "alice".to_string(),
                hash: HASH.to_string()
            }
        );
        assert_eq!(
            file.principals[2].identity,
            Identity::Cert("ci-client".to_string())
        );
        assert_eq!(
            file.principals[2].grant.instances,
            Some(vec!["main".to_string()])
        );
        let anonymous = file.anonymous.unwrap();
        assert!(anonymous.permissions.contains(Permission::Read));
        assert!(!anonymous.permissions.contains(Permission::Write));
        assert!(parse("{}").unwrap().anonymous.is_none());
    }

    /// The message of parsing `text`, which must fail.
    fn refusal(text: &str) -> String {
        parse(text).unwrap_err().message().to_string()
    }

    #[test]
    fn malformed_files_are_refused_with_line_and_reason() {
        let bad_permission = format!(
            "{{\n principals: [\n  {{ name: 'ci', token_sha256: '{TOKEN_HASH}',\n    permissions: ['read', 'wrte'] }},\n ],\n}}"
        );
        let message = refusal(&bad_permission);
        assert!(message.contains("wrte"), "{message}");
        assert!(message.contains("line 4"), "{message}");

        let short_hash =
            "{\n principals: [\n  { name: 'ci', token_sha256: 'abc', permissions: [] },\n ],\n}";
        let message = refusal(short_hash);
        assert!(message.contains("64 hex digits"), "{message}");
        assert!(message.contains("line 3"), "{message}");

        let message = refusal("{\n principals: [\n");
        assert!(message.contains("line"), "{message}");

        let typo = format!(
            "{{ principals: [ {{ name: 'ci', token_sha265: '{TOKEN_HASH}', permissions: [] }} ] }}"
        );
        let message = refusal(&typo);
        assert!(message.contains("token_sha265"), "{message}");

        let bad_bcrypt =
            "{ principals: [ { name: 'a', basic: { user: 'a', hash: 'plain' }, permissions: [] } ] }";
        let message = refusal(bad_bcrypt);
        assert!(message.contains("bcrypt"), "{message}");
        assert!(!message.contains("plain"), "{message}");
    }

    #[test]
    fn ambiguous_principals_are_refused() {
        let message = refusal("{\n principals: [\n  { name: 'x', permissions: ['read'] },\n ],\n}");
        assert!(message.contains("no credential"), "{message}");
        // json5 places errors of a whole list element at the list's opening bracket;
        // the principal's name tells which element.
        assert!(message.contains("line 2"), "{message}");
        let two = format!(
            "{{ principals: [ {{ name: 'x', cert: 'c', token_sha256: '{TOKEN_HASH}', permissions: [] }} ] }}"
        );
        assert!(refusal(&two).contains("more than one"));
        let same_token = format!(
            "{{ principals: [ {{ name: 'x', token_sha256: '{TOKEN_HASH}', permissions: [] }},
               {{ name: 'y', token_sha256: '{}', permissions: [] }} ] }}",
            TOKEN_HASH.to_uppercase()
        );
        let message = refusal(&same_token);
        assert!(message.contains("`y`"), "{message}");
        let same_name = "{ principals: [ { name: 'x', cert: 'a', permissions: [] },
               { name: 'x', cert: 'b', permissions: [] } ] }";
        assert!(refusal(same_name).contains("two principals are named `x`"));
        let no_instances =
            "{ principals: [ { name: 'x', cert: 'a', permissions: [], instances: [] } ] }";
        assert!(refusal(no_instances).contains("instances: []"));
        let message = refusal("{ anonymous: { permissions: ['read'], instances: [] } }");
        assert!(message.contains("anonymous"), "{message}");
    }

    #[test]
    fn instance_prefixes_match_whole_segments() {
        let grant = |prefixes: &[&str]| Grant {
            permissions: Permissions::all(),
            instances: Some(prefixes.iter().map(|p| p.to_string()).collect()),
        };
        let a = grant(&["a/"]);
        assert!(a.covers("a"));
        assert!(a.covers("a/x"));
        assert!(!a.covers("b"));
        assert!(!a.covers("ab"));
        assert!(!a.covers(""));
        let nested = grant(&["team/a"]);
        assert!(nested.covers("team/a/x"));
        assert!(!nested.covers("team/b"));
        assert!(grant(&[""]).covers("anything"));
        assert!(Grant::everything().covers("b"));
    }

    #[test]
    fn bcrypt_shapes() {
        assert!(is_bcrypt(HASH));
        assert!(is_bcrypt(&HASH.replacen("$2y$", "$2b$", 1)));
        assert!(!is_bcrypt(&HASH.replacen("$05$", "$03$", 1)));
        assert!(!is_bcrypt(&HASH.replacen("$05$", "$+5$", 1)));
        assert!(!is_bcrypt(&HASH[..59]));
        assert!(!is_bcrypt(&HASH.replacen("$2y$", "$1$x", 1)));
        assert!(!is_bcrypt(&format!("{}!", &HASH[..59])));
    }
}
