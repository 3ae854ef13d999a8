//! TLS material from PEM files, shared by every cairn program: the server side
//! (certificate chain, key and, for mutual TLS, the CA client certificates must chain
//! to) and the names a verified client certificate is known by.
//!
//! The files are read again once a second, and at once on SIGHUP ([`crate::reload`]);
//! when their contents changed and still make a working configuration, new handshakes
//! use them ([`Tls`]) while connections already established keep the session they
//! have, so a certificate rotates without dropping anyone. Files that do not load are
//! logged and the previous configuration stays. The node's glommio listeners
//! (`runtime/tls.rs`) and the scheduler's tokio listener (`cairn-exec`'s scheduler) both
//! take their acceptors from here; the ALPN offered is `h2` on gRPC listeners (gRPC is
//! HTTP/2) and `http/1.1` on the node's HTTP listener.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::auth::PeerNames;
use crate::error::{Error, Result};

/// How often the certificate files are read to see whether they changed.
const RELOAD_POLL: Duration = Duration::from_secs(1);

/// The TLS configuration in force, reloaded when its files change.
#[derive(Clone)]
pub struct Tls {
    current: Arc<RwLock<Acceptors>>,
}

impl Tls {
    /// Loads the files (see [`Acceptors::load`]) and starts the thread that reloads
    /// them when their contents change, for as long as the node runs.
    pub fn start(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Tls> {
        let files: Vec<PathBuf> = [Some(cert), Some(key), client_ca]
            .into_iter()
            .flatten()
            .map(Path::to_path_buf)
            .collect();
        let mut seen = contents(&files);
        let tls = Tls {
            current: Arc::new(RwLock::new(Acceptors::load(cert, key, client_ca)?)),
        };
        let current = Arc::downgrade(&tls.current);
        let (cert, key, client_ca) = (
            cert.to_path_buf(),
            key.to_path_buf(),
            client_ca.map(Path::to_path_buf),
        );
        std::thread::Builder::new()
            .name("tls-reload".to_string())
            .spawn(move || loop {
                let signalled = crate::reload::wait(RELOAD_POLL);
                let Some(current) = current.upgrade() else {
                    return;
                };
                let now = contents(&files);
                if now == seen && !signalled {
                    continue;
                }
                seen = now;
                match Acceptors::load(&cert, &key, client_ca.as_deref()) {
                    Ok(acceptors) => {
                        tracing::info!("TLS certificate reloaded from {}", cert.display());
                        match current.write() {
                            Ok(mut current) => *current = acceptors,
                            Err(poisoned) => *poisoned.into_inner() = acceptors,
                        }
                    }
                    Err(error) => tracing::warn!(
                        "TLS files changed but do not load, the previous ones stay in force: \
                         {error}"
                    ),
                }
            })
            .map_err(|error| {
                Error::internal(format!("cannot start the TLS reload thread: {error}"))
            })?;
        Ok(tls)
    }

    /// The acceptors new connections use.
    pub fn acceptors(&self) -> Acceptors {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// The bytes of each of `files` (empty for one that cannot be read).
fn contents(files: &[PathBuf]) -> Vec<Vec<u8>> {
    files
        .iter()
        .map(|file| std::fs::read(file).unwrap_or_default())
        .collect()
}

/// The TLS settings of both listeners.
#[derive(Clone)]
pub struct Acceptors {
    /// For gRPC listeners: ALPN `h2`.
    pub grpc: TlsAcceptor,
    /// For the HTTP listener: ALPN `http/1.1`.
    pub http: TlsAcceptor,
}

impl Acceptors {
    /// Reads the PEM certificate chain `cert`, its key `key` and, for mutual TLS, the
    /// PEM CA certificates `client_ca` that client certificates must chain to.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Acceptors> {
        let unreadable = |what: &str, path: &Path, error: &dyn std::fmt::Display| {
            Error::invalid_argument(format!(
                "cannot read the {what} {}: {error}",
                path.display()
            ))
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|error| unreadable("TLS certificate", cert, &error))?;
        if chain.is_empty() {
            return Err(Error::invalid_argument(format!(
                "the TLS certificate file {} holds no PEM certificate",
                cert.display()
            )));
        }
        let private_key = PrivateKeyDer::from_pem_file(key)
            .map_err(|error| unreadable("TLS key", key, &error))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|error| Error::internal(format!("TLS setup: {error}")))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for ca in CertificateDer::pem_file_iter(path)
                    .map_err(|error| unreadable("client CA", path, &error))?
                {
                    let ca = ca.map_err(|error| unreadable("client CA", path, &error))?;
                    roots.add(ca).map_err(|error| {
                        Error::invalid_argument(format!(
                            "the client CA {} is not usable: {error}",
                            path.display()
                        ))
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|error| {
                            Error::invalid_argument(format!(
                                "the client CA {} is not usable: {error}",
                                path.display()
                            ))
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(chain, private_key)
            .map_err(|error| {
                Error::invalid_argument(format!(
                    "the TLS key {} does not fit the certificate {}: {error}",
                    key.display(),
                    cert.display()
                ))
            })?;
        let with_alpn = |protocol: &[u8]| {
            let mut config = config.clone();
            config.alpn_protocols = vec![protocol.to_vec()];
            TlsAcceptor::from(Arc::new(config))
        };
        Ok(Acceptors {
            grpc: with_alpn(b"h2"),
            http: with_alpn(b"http/1.1"),
        })
    }
}

/// The names of a verified client certificate, as the auth file's `cert` principals
/// match them.
pub fn peer_names(certificate: &CertificateDer<'_>) -> PeerNames {
    PeerNames(certificate_names(certificate).into())
}

/// The names a certificate is known by: its subject's common names, then its DNS and
/// URI subject alternative names. Empty for a certificate that does not parse.
fn certificate_names(certificate: &CertificateDer<'_>) -> Vec<String> {
    let Ok(parsed) = webpki::EndEntityCert::try_from(certificate) else {
        return Vec::new();
    };
    let mut names = common_names(parsed.subject());
    names.extend(parsed.valid_dns_names().map(str::to_string));
    names.extend(parsed.valid_uri_names().map(str::to_string));
    names
}

/// The common names (OID 2.5.4.3) in the contents of a DER `Name`: a sequence of
/// relative distinguished names, each a SET of SEQUENCEs of an OID and a string.
fn common_names(mut name: &[u8]) -> Vec<String> {
    const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
    let mut names = Vec::new();
    while let Some((0x31, mut set, rest)) = der_element(name) {
        name = rest;
        while let Some((0x30, attribute, next)) = der_element(set) {
            set = next;
            let Some((0x06, oid, value)) = der_element(attribute) else {
                continue;
            };
            // UTF8String, PrintableString, IA5String.
            if let Some((0x0c | 0x13 | 0x16, text, _)) = der_element(value) {
                if let (COMMON_NAME, Ok(text)) = (oid, std::str::from_utf8(text)) {
                    names.push(text.to_string());
                }
            }
        }
    }
    names
}

/// The DER element at the start of `input`: its tag, its contents and what follows.
/// `None` when the input is cut short or uses a length form DER forbids.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, rest) = rest.split_at(count);
        let length = bytes
            .iter()
            .fold(0usize, |length, &byte| (length << 8) | usize::from(byte));
        (length, rest)
    };
    if rest.len() < length {
        return None;
    }
    let (contents, rest) = rest.split_at(length);
    Some((tag, contents, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_names_of_a_der_name() {
        // SET { SEQUENCE { OID 2.5.4.6 (C), PrintableString "NZ" } },
        // SET { SEQUENCE { OID 2.5.4.3 (CN), UTF8String "ci-client" } }
        let mut name = vec![0x31, 0x0b, 0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x06];
        name.extend([0x13, 0x02, b'N', b'Z']);
        name.extend([
            0x31, 0x12, 0x30, 0x10, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x09,
        ]);
        name.extend(b"ci-client");
        assert_eq!(common_names(&name), vec!["ci-client".to_string()]);
        // Cut anywhere, it yields what it could read and never panics.
        for cut in 0..name.len() {
            assert!(common_names(&name[..cut]).len() <= 1);
        }
        assert!(der_element(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_none());
        assert!(der_element(&[0x30, 0x80]).is_none());
    }

    #[test]
    fn unusable_files_are_refused_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let text = dir.path().join("text.pem");
        std::fs::write(&text, "not a certificate\n").unwrap();
        let error = Acceptors::load(&missing, &missing, None)
            .err()
            .expect("refused");
        assert!(error.message().contains("missing.pem"), "{error}");
        let error = Acceptors::load(&text, &missing, None)
            .err()
            .expect("refused");
        assert!(
            error.message().contains("holds no PEM certificate"),
            "{error}"
        );
    }
}
