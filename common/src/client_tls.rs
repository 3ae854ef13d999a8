//! How `cairn-scheduler` and `cairn-worker` reach servers that speak TLS.
//!
//! A URL's scheme decides: `http://` is plaintext, `https://` is TLS. The servers are
//! trusted by the CA certificates of `--tls-ca` when given, otherwise by the system's
//! trust store (a fleet whose certificates come from a public CA needs no flag). A
//! program that has `--tls-cert`/`--tls-key` also presents that certificate when it
//! connects, so a cache node or scheduler that requires client certificates (mutual
//! TLS, `--tls-client-ca`) and names them in its auth file (`cert` principals) accepts
//! it. The files are read once, at start: unreadable ones stop the program with their
//! name, before it connects anywhere.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::error::{Error, Result};

/// The TLS settings of a client; the default trusts the system's store and presents
/// no certificate.
#[derive(Clone, Default)]
pub struct ClientTls {
    config: Option<ClientTlsConfig>,
}

impl ClientTls {
    /// Settings trusting the PEM CA certificates in `ca` (the system's store when
    /// `None`) and presenting the PEM certificate chain and key `identity`, if given.
    pub fn load(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Result<Self> {
        let mut config = ClientTlsConfig::new();
        config = match ca {
            Some(path) => config.ca_certificate(Certificate::from_pem(read(path, "TLS CA")?)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = identity {
            config = config.identity(Identity::from_pem(
                read(cert, "TLS certificate")?,
                read(key, "TLS key")?,
            ));
        }
        Ok(ClientTls {
            config: Some(config),
        })
    }

    /// The settings of a program's `tls_ca`, `tls_cert` and `tls_key`.
    pub fn from_files(
        ca: Option<&PathBuf>,
        cert: Option<&PathBuf>,
        key: Option<&PathBuf>,
    ) -> Result<Self> {
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => {
                return Err(Error::invalid_argument(
                    "--tls-cert and --tls-key go together",
                ))
            }
        };
        Self::load(ca.map(PathBuf::as_path), identity)
    }

    /// An endpoint for `url`, with TLS when it is `https://`.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|error| Error::invalid_argument(format!("bad URL `{url}`: {error}")))?;
        if !url.starts_with("https://") {
            return Ok(endpoint);
        }
        let config = self
            .config
            .clone()
            .unwrap_or_else(|| ClientTlsConfig::new().with_native_roots());
        endpoint
            .tls_config(config)
            .map_err(|error| Error::invalid_argument(format!("TLS for `{url}`: {error}")))
    }
}

/// The bytes of the PEM file `path`, which holds the `what`.
fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|error| {
        Error::invalid_argument(format!(
            "cannot read the {what} {}: {error}",
            path.display()
        ))
    })
}
