//! The HTTP/1.1 listener: Bazel's HTTP cache protocol, `/metrics` and `/healthz`.
//!
//! `--remote_cache=http://host:port` makes Bazel `GET`, `PUT` and `HEAD`
//! `/ac/{sha256}` (an encoded ActionResult) and `/cas/{sha256}` (the blob). It is the
//! same store as gRPC: action results are checked for completeness before they are
//! served, blobs stream to and from the engine without being held whole, and a blob
//! whose bytes do not hash to the name it was put under is refused with 400.
//!
//! The protocol names blobs by hash alone, while REAPI names them by hash and size.
//! The engine's index finds a CAS blob by hash alone (its key prefix leaves the size
//! out, storage-engine/src/key.rs) and the record header tells the size, so `GET` and
//! `HEAD /cas/{sha256}` answer from the same record gRPC reads: a blob stored over
//! either protocol is served by both, and disappears from both when it is evicted.
//! Nothing else is written for HTTP. Size records that older builds wrote on every
//! HTTP `PUT` (action-cache entries under a derived key) are never read again and are
//! evicted like any other entry. A blob only in the S3 slow tier is found through the
//! bucket index, which is keyed by hash too (src/slow_tier/index.rs).
//!
//! With `--auth`, requests present `Authorization: Basic` (what Bazel sends for
//! `--remote_cache=https://user:pass@host`) or `Bearer`; a request without
//! credentials nobody has gets 401 with `WWW-Authenticate: Basic`, so that browsers
//! and curl ask for them, and a principal lacking the permission gets 403. `/healthz`
//! stays open for load balancers; `/metrics` needs the `metrics` permission, and so
//! does the status page (`/` and `/status`, see [`crate::http_status`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use cairn_proto::reapi::ActionResult;
use cairn_storage::DigestFunction;
use futures::StreamExt;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use prost::Message;

use crate::action_results::{self, Inline};
use crate::auth::{Access, Credentials, Need, PeerNames, Permission};
use crate::engine_errors::engine_error;
use crate::error::{Error, ErrorKind, Result};
use crate::http_path::{self, HttpPath};
use crate::http_status::StatusBoard;
use crate::store::Store;

/// A response body: a whole small buffer or a blob's stream.
pub type Body = UnsyncBoxBody<Bytes, Error>;

/// The HTTP front of the node. Cheap to clone: one per connection.
#[derive(Clone)]
pub struct HttpFront {
    store: Store,
    access: Access,
    /// The names of the connection's client certificate, under mutual TLS.
    peer: Option<PeerNames>,
    /// What the status page shows; without it, `/` and `/status` are not found.
    status: Option<Arc<StatusBoard>>,
}

impl HttpFront {
    /// Serves `store` to whom `access` allows.
    pub fn new(store: Store, access: Access) -> Self {
        Self {
            store,
            access,
            peer: None,
            status: None,
        }
    }

    /// This front serving the status page of `board`.
    pub fn with_status(mut self, board: Arc<StatusBoard>) -> Self {
        self.status = Some(board);
        self
    }

    /// This front for a connection whose client certificate has `peer` names.
    pub fn with_peer(mut self, peer: Option<PeerNames>) -> Self {
        self.peer = peer;
        self
    }

    /// Refuses `request` unless its credentials allow `need` on `instance`.
    fn allow(&self, request: &Request<Incoming>, need: Need, instance: Option<&str>) -> Result<()> {
        let mut credentials = Credentials::from_headers(request.headers());
        if let Some(PeerNames(names)) = &self.peer {
            credentials = credentials.with_cert_names(names.to_vec());
        }
        self.access.check(&credentials, need, instance)
    }

    async fn handle(self, request: Request<Incoming>) -> Response<Body> {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let outcome = match http_path::parse(&path) {
            Ok(target) => self.route(&method, target, request).await,
            Err(error) => Err(error),
        };
        outcome.unwrap_or_else(|error| {
            tracing::debug!("{method} {path}: {error}");
            let body = if method == Method::HEAD {
                Bytes::new()
            } else {
                Bytes::from(format!("{error}\n"))
            };
            let mut response = respond(error.kind().http_status(), body);
            if error.kind() == ErrorKind::Unauthenticated {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Basic realm=\"cairn\""),
                );
            }
            response
        })
    }

    async fn route(
        &self,
        method: &Method,
        target: HttpPath<'_>,
        request: Request<Incoming>,
    ) -> Result<Response<Body>> {
        let metrics = self.store.metrics();
        match (target, method) {
            (HttpPath::Health, &Method::GET) => {
                let stats = self.store.engine().stats().await.map_err(engine_error)?;
                let (status, body) = health(&self.store, &stats);
                Ok(respond(status, Bytes::from(body)))
            }
            (page @ (HttpPath::StatusPage | HttpPath::Status), &Method::GET) => {
                self.allow(&request, Need::One(Permission::Metrics), None)?;
                let board = self
                    .status
                    .as_ref()
                    .ok_or_else(|| Error::not_found("this listener serves no status page"))?;
                let stats = self.store.engine().stats().await.map_err(engine_error)?;
                let (health, body) = health(&self.store, &stats);
                let status = board.status(&stats, health.as_u16(), &body);
                let (content_type, body) = if page == HttpPath::Status {
                    ("application/json", status.to_string())
                } else {
                    ("text/html; charset=utf-8", board.page(&status))
                };
                let mut response = respond(StatusCode::OK, Bytes::from(body));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(content_type),
                );
                Ok(response)
            }
            (HttpPath::Metrics, &Method::GET) => {
                self.allow(&request, Need::One(Permission::Metrics), None)?;
                let stats = self.store.engine().stats().await.map_err(engine_error)?;
                let mut text = metrics.render(&stats)?;
                if let Some(slow_tier) = self.store.slow_tier() {
                    text.push_str(&slow_tier.render_metrics(&stats)?);
                }
                Ok(respond(StatusCode::OK, Bytes::from(text)))
            }
            (HttpPath::ActionCache { instance, hash }, &Method::GET | &Method::HEAD) => {
                metrics.request("http", "ac_get");
                self.allow(&request, Need::One(Permission::Read), Some(instance))?;
                let action = crate::digests::parse_hash(DigestFunction::Sha256, hash, 0)?;
                let budget = self.store.limits().max_batch_total_size;
                let result =
                    action_results::load(&self.store, instance, action, &Inline::default(), budget)
                        .await?;
                let encoded = Bytes::from(result.encode_to_vec());
                Ok(sized(method, encoded.len() as u64, full(encoded)))
            }
            (HttpPath::ActionCache { instance, hash }, &Method::PUT) => {
                metrics.request("http", "ac_put");
                self.allow(&request, Need::One(Permission::WriteAc), Some(instance))?;
                let action = crate::digests::parse_hash(DigestFunction::Sha256, hash, 0)?;
                let limit = self.store.limits().max_batch_total_size as usize;
                let body = Limited::new(request.into_body(), limit)
                    .collect()
                    .await
                    .map_err(|error| {
                        Error::invalid_argument(format!("cannot read the action result: {error}"))
                    })?
                    .to_bytes();
                let result = ActionResult::decode(body).map_err(|error| {
                    Error::invalid_argument(format!("the body is not an ActionResult: {error}"))
                })?;
                action_results::store_result(&self.store, instance, action, &result).await?;
                Ok(respond(StatusCode::OK, Bytes::new()))
            }
            (HttpPath::Cas { instance, hash }, &Method::GET | &Method::HEAD) => {
                metrics.request("http", "cas_get");
                self.allow(&request, Need::One(Permission::Read), Some(instance))?;
                if method == Method::HEAD {
                    let digest = self
                        .store
                        .digest_by_hash(DigestFunction::Sha256, hash)
                        .await?;
                    return Ok(sized(method, digest.size, full(Bytes::new())));
                }
                let (digest, blob) = self.store.get_by_hash(DigestFunction::Sha256, hash).await?;
                let frames = blob.map(|chunk| chunk.map(Frame::data));
                Ok(sized(
                    method,
                    digest.size,
                    StreamBody::new(frames).boxed_unsync(),
                ))
            }
            (HttpPath::Cas { instance, hash }, &Method::PUT) => {
                metrics.request("http", "cas_put");
                self.allow(&request, Need::One(Permission::Write), Some(instance))?;
                self.put_blob(hash, request).await?;
                Ok(respond(StatusCode::OK, Bytes::new()))
            }
            _ => Ok(respond(
                StatusCode::METHOD_NOT_ALLOWED,
                Bytes::from(format!("{method} is not allowed here\n")),
            )),
        }
    }

    /// Streams a PUT body into the store under the digest its hash and length name.
    ///
    /// The body is always read to its end, also when the blob is already stored or the
    /// upload fails: answering before the client has finished sending makes hyper close
    /// the connection, and Bazel reports the reset as a failed cache write ("Broken
    /// pipe") even though nothing was wrong. Only a body larger than any blob the node
    /// accepts is left unread.
    async fn put_blob(&self, hash: &str, request: Request<Incoming>) -> Result<()> {
        let size = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|length| length.to_str().ok())
            .and_then(|length| length.parse::<u64>().ok())
            .ok_or_else(|| Error::invalid_argument("a blob PUT needs a Content-Length"))?;
        let mut body = request.into_body();
        let stored = self.receive_blob(hash, size, &mut body).await;
        if stored.is_err() && size <= self.store.limits().max_cas_blob_size {
            while let Some(Ok(_)) = body.frame().await {}
        }
        stored
    }

    async fn receive_blob(&self, hash: &str, size: u64, body: &mut Incoming) -> Result<()> {
        let digest = crate::digests::parse_hash(DigestFunction::Sha256, hash, size)?;
        let mut upload = if self.store.contains(digest).await? {
            None
        } else {
            Some(self.store.begin_put(digest).await?)
        };
        let mut received = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|error| {
                Error::invalid_argument(format!("the upload broke off: {error}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            received += data.len() as u64;
            if received > size {
                return Err(Error::invalid_argument("more data than Content-Length"));
            }
            self.store.metrics().bytes_received(data.len() as u64);
            if let Some(upload) = upload.as_mut() {
                upload.write(data).await.map_err(engine_error)?;
            }
        }
        if let Some(upload) = upload {
            upload.finish().await.map_err(engine_error)?;
        }
        Ok(())
    }
}

impl hyper::service::Service<Request<Incoming>> for HttpFront {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let front = self.clone();
        Box::pin(async move { Ok(front.handle(request).await) })
    }
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn respond(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
}

/// A 200 response of `length` bytes; HEAD gets the length and no body.
fn sized(method: &Method, length: u64, body: Body) -> Response<Body> {
    let body = if method == Method::HEAD {
        full(Bytes::new())
    } else {
        body
    };
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, header::HeaderValue::from(length));
    response
}

/// The `/healthz` status and body: the verdict on the first line, then the disk's and
/// the slow tier's lines.
fn health(store: &Store, stats: &cairn_storage::Stats) -> (StatusCode, String) {
    let (status, disk) = disk_health(stats, store.metrics().budget_clamped());
    let rest = match store.slow_tier() {
        Some(slow_tier) => slow_tier.health(stats),
        None => "ok\n".to_string(),
    };
    let body = if disk.is_empty() {
        rest
    } else {
        // The first line is the verdict; "ok" under a disk verdict would contradict it.
        disk + rest.strip_prefix("ok\n").unwrap_or(&rest)
    };
    (status, body)
}

/// `/healthz` on the disk: 503 while a partition cannot create a segment even after
/// evicting (another process holds the space, so no write needing room can succeed:
/// a balancer should send writes elsewhere), otherwise 200, with a `degraded:` line
/// when the disk is what bounds the store (it keeps serving everything, evicting
/// earlier than the budget says, which is no reason to take it out of service).
fn disk_health(stats: &cairn_storage::Stats, clamped: u64) -> (StatusCode, String) {
    let mut status = StatusCode::OK;
    let mut lines = String::new();
    let refusing = stats.disk_full_refusing();
    if refusing > 0 {
        status = StatusCode::SERVICE_UNAVAILABLE;
        lines += &format!(
            "degraded: disk full, writes refused: {refusing} partitions find no space even \
             after evicting (something else holds the disk)\n"
        );
    } else if stats.disk_full_reclaims() > 0 {
        lines += &format!(
            "degraded: disk full, evicting ({} segments reclaimed below the budget)\n",
            stats.disk_full_reclaims()
        );
    }
    if clamped > 0 {
        lines += &format!(
            "degraded: budget clamped: max_size lowered by {clamped} bytes to what the disk \
             can hold\n"
        );
    }
    (status, lines)
}
