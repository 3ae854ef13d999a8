//! `BlobStream`: the `Send` stream of verified chunks a read returns.

use crate::error::Result;
use bytes::Bytes;
use futures::Stream;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The chunks of a blob (or of the requested range), each verified before it was sent.
pub struct BlobStream(Inner);

enum Inner {
    Once(Option<Bytes>),
    Channel(flume::r#async::RecvStream<'static, Result<Bytes>>),
}

impl BlobStream {
    pub(crate) fn once(bytes: Bytes) -> BlobStream {
        BlobStream(Inner::Once((!bytes.is_empty()).then_some(bytes)))
    }

    pub(crate) fn channel(rx: flume::Receiver<Result<Bytes>>) -> BlobStream {
        BlobStream(Inner::Channel(rx.into_stream()))
    }

    /// Reads the whole stream into one buffer.
    pub async fn collect_bytes(mut self) -> Result<Bytes> {
        use futures::StreamExt;
        let mut first: Option<Bytes> = None;
        let mut rest: Vec<u8> = Vec::new();
        while let Some(chunk) = self.next().await {
            let chunk = chunk?;
            match &first {
                None => first = Some(chunk),
                Some(f) => {
                    if rest.is_empty() {
                        rest.extend_from_slice(f);
                    }
                    rest.extend_from_slice(&chunk);
                }
            }
        }
        Ok(if rest.is_empty() {
            first.unwrap_or_default()
        } else {
            Bytes::from(rest)
        })
    }
}

impl Stream for BlobStream {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match &mut self.0 {
            Inner::Once(b) => Poll::Ready(b.take().map(Ok)),
            Inner::Channel(rx) => Pin::new(rx).poll_next(cx),
        }
    }
}
