//! Downloads for the Remote Asset API: one URL to a verified file on local disk.
//!
//! FetchBlob ([`crate::grpc_asset`]) hands this module a URL and gets back a spooled
//! file with its digest, or a [`FetchFailure`] whose status code says why, in the
//! vocabulary the API defines for errors outside the server's control (`NOT_FOUND`,
//! `PERMISSION_DENIED`, `UNAVAILABLE`, `ABORTED` for a failed checksum,
//! `RESOURCE_EXHAUSTED` for a body larger than the largest blob).
//!
//! The body is streamed to a file under the data directory while it is hashed, never
//! held in memory: an asset may be a toolchain of hundreds of MiB, and the CAS wants
//! its digest before the first byte is stored, which is only known at the end. The
//! file is then streamed into the CAS by the caller and removed when the
//! [`Spooled`] handle is dropped, whatever happened in between.
//!
//! Every download runs on a small tokio runtime owned here ([`DownloaderRuntime`]),
//! never on a shard's executor: a slow origin must not stall the requests sharing the
//! shard, and hyper's client wants tokio. HTTPS trusts the system's certificate store
//! (`rustls-native-certs`: `SSL_CERT_FILE`/`SSL_CERT_DIR` or the distribution's
//! bundle); redirects are followed, at most [`MAX_REDIRECTS`] of them.
//!
//! The body is checked against a `checksum.sri` value parsed by [`crate::sri`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_storage::{Digest, DigestFunction};
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::Digest as _;
use tokio::io::AsyncWriteExt;
use tokio::runtime::Runtime;

use crate::error::{Error, Result};
use crate::exec_common::random_name;
use crate::metrics::Metrics;
use crate::sri::{Sri, SriAlgorithm};

/// Redirects followed for one URL before it counts as failed (browsers allow 20,
/// curl 50; real mirrors use one or two).
pub const MAX_REDIRECTS: usize = 10;

/// Threads of the download runtime: downloads wait on the network, not the CPU.
const THREADS: usize = 2;

/// How long the runtime is given to finish its tasks when the node stops.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// Why a download did not produce a verified file, with the status code the Remote
/// Asset API gives that reason.
#[derive(Debug, Clone)]
pub struct FetchFailure {
    /// The status code.
    pub code: tonic::Code,
    /// What happened, naming the URL.
    pub message: String,
    /// Whether the body arrived but did not match `checksum.sri`.
    pub mismatch: bool,
}

impl FetchFailure {
    fn new(code: tonic::Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            mismatch: false,
        }
    }
}

/// The SRI hash being computed over a body.
enum SriHasher {
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl SriHasher {
    fn new(algorithm: SriAlgorithm) -> Self {
        match algorithm {
            SriAlgorithm::Sha256 => SriHasher::Sha256(sha2::Sha256::new()),
            SriAlgorithm::Sha384 => SriHasher::Sha384(sha2::Sha384::new()),
            SriAlgorithm::Sha512 => SriHasher::Sha512(sha2::Sha512::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            SriHasher::Sha256(hasher) => hasher.update(data),
            SriHasher::Sha384(hasher) => hasher.update(data),
            SriHasher::Sha512(hasher) => hasher.update(data),
        }
    }

    fn finalize(self) -> Vec<u8> {
        match self {
            SriHasher::Sha256(hasher) => hasher.finalize().to_vec(),
            SriHasher::Sha384(hasher) => hasher.finalize().to_vec(),
            SriHasher::Sha512(hasher) => hasher.finalize().to_vec(),
        }
    }
}

/// A downloaded body on local disk, verified, with its digest; the file is removed
/// when this is dropped.
pub struct Spooled {
    path: PathBuf,
    /// The digest of the body, with the function asked for.
    pub digest: Digest,
}

impl Spooled {
    /// The file holding the body.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A file being written, removed on drop unless handed on as [`Spooled`].
struct Partial(Option<PathBuf>);

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Downloads URLs into spool files. Cheap to clone; usable from any executor.
#[derive(Clone)]
pub struct Downloader {
    inner: Arc<Inner>,
    runtime: tokio::runtime::Handle,
}

struct Inner {
    client: HttpClient,
    spool: PathBuf,
    max_size: u64,
    metrics: Arc<Metrics>,
}

/// Owns the download runtime; dropping it stops the downloads in flight.
pub struct DownloaderRuntime {
    runtime: Option<Runtime>,
}

impl Drop for DownloaderRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(SHUTDOWN_WAIT);
        }
    }
}

impl Downloader {
    /// Starts the download runtime, spooling into `spool` (emptied now: what a previous
    /// run left there was never finished) and refusing bodies over `max_size` bytes.
    pub fn start(
        spool: PathBuf,
        max_size: u64,
        metrics: Arc<Metrics>,
    ) -> Result<(Downloader, DownloaderRuntime)> {
        if spool.exists() {
            std::fs::remove_dir_all(&spool).map_err(|error| {
                Error::internal(format!("cannot empty {}: {error}", spool.display()))
            })?;
        }
        std::fs::create_dir_all(&spool).map_err(|error| {
            Error::internal(format!("cannot create {}: {error}", spool.display()))
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(THREADS)
            .thread_name("cairn-fetch")
            .enable_all()
            .build()
            .map_err(|error| {
                Error::internal(format!("cannot start the download runtime: {error}"))
            })?;
        let client = {
            let _entered = runtime.enter();
            http_client()?
        };
        let downloader = Downloader {
            inner: Arc::new(Inner {
                client,
                spool,
                max_size,
                metrics,
            }),
            runtime: runtime.handle().clone(),
        };
        Ok((
            downloader,
            DownloaderRuntime {
                runtime: Some(runtime),
            },
        ))
    }

    /// The runtime downloads run on, for the tasks that drive them.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Downloads `url`, hashing it with `function` and checking it against `sri`.
    /// Runs on whatever runtime awaits it, which must be the download runtime
    /// ([`Downloader::runtime`]); bound it with a timeout there.
    pub async fn download(
        &self,
        url: &str,
        function: DigestFunction,
        sri: Option<&Sri>,
    ) -> std::result::Result<Spooled, FetchFailure> {
        let response = self.follow(url).await?;
        let inner = &self.inner;
        if let Some(length) = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok())
        {
            if length > inner.max_size {
                return Err(too_large(url, inner.max_size));
            }
        }
        let path = inner.spool.join(random_name());
        let mut partial = Partial(Some(path.clone()));
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|error| local_failure(&path, &error))?;
        let mut hasher = function.hasher();
        let mut sri_hasher = sri.map(|sri| SriHasher::new(sri.algorithm));
        let mut size = 0u64;
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|error| {
                FetchFailure::new(
                    tonic::Code::Unavailable,
                    format!("{url}: the download broke off: {error}"),
                )
            })?;
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            size += chunk.len() as u64;
            if size > inner.max_size {
                return Err(too_large(url, inner.max_size));
            }
            inner.metrics.asset_bytes_downloaded(chunk.len() as u64);
            hasher.update(&chunk);
            if let Some(sri_hasher) = &mut sri_hasher {
                sri_hasher.update(&chunk);
            }
            file.write_all(&chunk)
                .await
                .map_err(|error| local_failure(&path, &error))?;
        }
        file.flush()
            .await
            .map_err(|error| local_failure(&path, &error))?;
        drop(file);
        if let (Some(sri), Some(sri_hasher)) = (sri, sri_hasher) {
            let actual = sri_hasher.finalize();
            if !sri.matches(&actual) {
                return Err(FetchFailure {
                    code: tonic::Code::Aborted,
                    message: format!(
                        "{url}: checksum mismatch: checksum.sri asks for {}, the download \
                         has {}; nothing was stored",
                        sri.describe(&sri.hashes[0]),
                        sri.describe(&actual)
                    ),
                    mismatch: true,
                });
            }
        }
        // Verified: the file is now the Spooled handle's to remove.
        partial.0 = None;
        Ok(Spooled {
            path,
            digest: Digest {
                function,
                hash: hasher.finalize(),
                size,
            },
        })
    }

    /// The first non-redirect response of `url`, which must be a success.
    async fn follow(
        &self,
        url: &str,
    ) -> std::result::Result<hyper::Response<hyper::body::Incoming>, FetchFailure> {
        let mut current = parse_url(url)?;
        for _ in 0..=MAX_REDIRECTS {
            let request = http::Request::get(current.clone())
                .header(
                    http::header::USER_AGENT,
                    concat!("cairn/", env!("CARGO_PKG_VERSION")),
                )
                .body(Empty::new())
                .map_err(|error| {
                    FetchFailure::new(tonic::Code::InvalidArgument, format!("{url}: {error}"))
                })?;
            let response = self.inner.client.request(request).await.map_err(|error| {
                FetchFailure::new(
                    tonic::Code::Unavailable,
                    format!("{url}: cannot fetch {current}: {}", error_chain(&error)),
                )
            })?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            if status.is_redirection() {
                let location = response
                    .headers()
                    .get(http::header::LOCATION)
                    .and_then(|value| value.to_str().ok())
                    .ok_or_else(|| {
                        FetchFailure::new(
                            tonic::Code::Unavailable,
                            format!("{url}: {current} answered {status} without a Location"),
                        )
                    })?;
                current = redirect(&current, location).ok_or_else(|| {
                    FetchFailure::new(
                        tonic::Code::Unavailable,
                        format!("{url}: {current} redirects to an unusable `{location}`"),
                    )
                })?;
                continue;
            }
            return Err(FetchFailure::new(
                status_code(status),
                format!("{url}: {current} answered {status}"),
            ));
        }
        Err(FetchFailure::new(
            tonic::Code::Unavailable,
            format!("{url}: more than {MAX_REDIRECTS} redirects"),
        ))
    }
}

/// The client: HTTP/1.1 over TCP or rustls with the system's roots.
fn http_client() -> Result<HttpClient> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!(
            "no trusted certificates found in the system's store ({} errors): HTTPS \
             downloads will fail; set SSL_CERT_FILE",
            found.errors.len()
        );
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| Error::internal(format!("TLS client configuration: {error}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// `url` if it is an absolute `http` or `https` URL.
fn parse_url(url: &str) -> std::result::Result<Uri, FetchFailure> {
    let unusable = |why: &str| {
        FetchFailure::new(
            tonic::Code::InvalidArgument,
            format!("{url}: cannot be fetched: {why}"),
        )
    };
    let uri: Uri = url.parse().map_err(|_| unusable("not a valid URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.authority().is_some() => Ok(uri),
        _ => Err(unusable("only http and https URLs are fetched")),
    }
}

/// Where a redirect from `base` to `location` leads: an absolute URL, or a path on
/// the same origin (absolute, or relative to the base path's directory).
fn redirect(base: &Uri, location: &str) -> Option<Uri> {
    if let Ok(uri) = location.parse::<Uri>() {
        if uri.scheme().is_some() {
            return matches!(uri.scheme_str(), Some("http" | "https")).then_some(uri);
        }
    }
    let scheme = base.scheme_str()?;
    let authority = base.authority()?;
    if let Some(rest) = location.strip_prefix("//") {
        return format!("{scheme}://{rest}").parse().ok();
    }
    let path = if location.starts_with('/') {
        location.to_string()
    } else {
        let base_path = base.path();
        let directory = &base_path[..base_path.rfind('/').map_or(0, |at| at + 1)];
        format!("{directory}{location}")
    };
    format!("{scheme}://{authority}{path}").parse().ok()
}

/// The Remote Asset status for an origin's HTTP error status.
fn status_code(status: StatusCode) -> tonic::Code {
    match status {
        StatusCode::NOT_FOUND | StatusCode::GONE => tonic::Code::NotFound,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => tonic::Code::PermissionDenied,
        StatusCode::TOO_MANY_REQUESTS => tonic::Code::ResourceExhausted,
        _ => tonic::Code::Unavailable,
    }
}

fn too_large(url: &str, max_size: u64) -> FetchFailure {
    FetchFailure::new(
        tonic::Code::ResourceExhausted,
        format!("{url}: the body is larger than the largest blob ({max_size} bytes)"),
    )
}

fn local_failure(path: &Path, error: &std::io::Error) -> FetchFailure {
    FetchFailure::new(
        tonic::Code::Internal,
        format!("cannot write the download to {}: {error}", path.display()),
    )
}

/// `error` and its sources, one after another: hyper's own message is only "client
/// error (Connect)", the reason is in the sources.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_against_the_base() {
        let base: Uri = "https://example.org/a/b/file.tar.gz".parse().unwrap();
        let resolve = |location| redirect(&base, location).map(|uri| uri.to_string());
        assert_eq!(
            resolve("https://mirror.example/x").as_deref(),
            Some("https://mirror.example/x")
        );
        assert_eq!(
            resolve("/other").as_deref(),
            Some("https://example.org/other")
        );
        assert_eq!(
            resolve("c.tar.gz").as_deref(),
            Some("https://example.org/a/b/c.tar.gz")
        );
        assert_eq!(
            resolve("//cdn.example/y").as_deref(),
            Some("https://cdn.example/y")
        );
        assert_eq!(resolve("ftp://example.org/z"), None);
    }

    #[test]
    fn only_http_urls_are_fetched() {
        assert!(parse_url("https://example.org/x").is_ok());
        assert!(parse_url("http://127.0.0.1:8080/x").is_ok());
        for url in [
            "file:///etc/passwd",
            "ftp://example.org/x",
            "urn:uuid:1",
            "x",
        ] {
            assert_eq!(
                parse_url(url).unwrap_err().code,
                tonic::Code::InvalidArgument,
                "{url}"
            );
        }
    }
}
