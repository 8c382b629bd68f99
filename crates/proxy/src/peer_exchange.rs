//! Istio's TCP metadata exchange (`istio.metadata_exchange`,
//! `envoy.tcp.metadataexchange.config.MetadataExchange`): on a TLS connection whose ALPN is the
//! configured protocol (`istio-peer-exchange`), each sidecar sends its node metadata ahead of
//! the first bytes it writes, and takes the peer's off the front of what it reads. The frame is
//! Istio's: the magic 0x23071961 and the payload's length (both 32-bit, network order), then a
//! `google.protobuf.Any` holding a `Struct` with `x-envoy-peer-metadata` (the node's metadata,
//! as the HTTP exchange sends it) and `x-envoy-peer-metadata-id`. A peer that sends no such
//! frame is passed through untouched. The server side is a network filter ahead of tcp_proxy;
//! the client side is the cluster's upstream filter (`Cluster.filters`).

use base64::Engine;
use pilotfish_api::pb::google::protobuf::{value::Kind, Any, Struct, Value};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub const MAGIC: u32 = 0x2307_1961;
const STRUCT_TYPE: &str = "type.googleapis.com/google.protobuf.Struct";
/// A peer's frame larger than this is not Istio's: the bytes pass through.
const MAX_PAYLOAD: usize = 1 << 20;

/// The exchange's protocol (ALPN) when `any` configures it (directly or in a TypedStruct).
pub fn configured(any: &Any) -> Option<String> {
    pilotfish_config::model::unpack::<pilotfish_api::istio::metadata_exchange::MetadataExchange>(
        any,
    )
    .map(|c| c.protocol)
}

/// This node's frame.
pub fn frame(node_id: &str, metadata: Option<&Struct>) -> Vec<u8> {
    let flat = metadata
        .map(crate::http::istio::encode_node)
        .and_then(|b| <Struct as prost::Message>::decode(b.as_slice()).ok())
        .unwrap_or_default();
    let mut s = Struct::default();
    s.fields.insert(
        crate::http::istio::PEER_METADATA.into(),
        Value {
            kind: Some(Kind::StructValue(flat)),
        },
    );
    s.fields.insert(
        crate::http::istio::PEER_METADATA_ID.into(),
        Value {
            kind: Some(Kind::StringValue(node_id.into())),
        },
    );
    let any = Any {
        type_url: STRUCT_TYPE.into(),
        value: prost::Message::encode_to_vec(&s),
    };
    let payload = prost::Message::encode_to_vec(&any);
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// What the peer said of itself, as the HTTP exchange's headers carry it (its metadata base64
/// of a Struct).
pub use crate::http::istio::Peer;

fn parse(payload: &[u8]) -> Option<Peer> {
    let any = <Any as prost::Message>::decode(payload).ok()?;
    let s = <Struct as prost::Message>::decode(any.value.as_slice()).ok()?;
    // Each key is read on its own, as Istio does: one may come without the other.
    let id = match s
        .fields
        .get(crate::http::istio::PEER_METADATA_ID)
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StringValue(id)) => Some(id.clone()),
        _ => None,
    };
    let metadata = match s
        .fields
        .get(crate::http::istio::PEER_METADATA)
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StructValue(m)) => {
            Some(base64::engine::general_purpose::STANDARD.encode(prost::Message::encode_to_vec(m)))
        }
        _ => None,
    };
    Some(Peer { id, metadata })
}

/// Which end of the exchange a stream is: the client sidecar's upstream connection sends its
/// frame ahead of its first bytes; the server sidecar's downstream connection sends its own as
/// soon as the client's has been read (as Istio's filters do), so the client learns its peer
/// even when the server's app says nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// A stream with the exchange on it: `ours` goes out as `Role` says; the peer's frame is taken
/// off the front of what is read, and `on_peer` told what it said (None when the peer sent no
/// frame).
pub struct Exchange<'a, S> {
    inner: S,
    role: Role,
    ours: Vec<u8>,
    sent: usize,
    /// Bytes read while the peer's frame is not yet known; None once it is.
    reading: Option<Vec<u8>>,
    /// Bytes read past the frame (or not a frame), handed out before reading more.
    ready: Vec<u8>,
    on_peer: Option<Box<dyn FnOnce(Option<Peer>) + Send + 'a>>,
}

impl<'a, S> Exchange<'a, S> {
    pub fn new(
        inner: S,
        role: Role,
        ours: Vec<u8>,
        on_peer: impl FnOnce(Option<Peer>) + Send + 'a,
    ) -> Exchange<'a, S> {
        Exchange {
            inner,
            role,
            ours,
            sent: 0,
            reading: Some(vec![]),
            ready: vec![],
            on_peer: Some(Box::new(on_peer)),
        }
    }

    fn resolve(&mut self, peer: Option<Peer>, rest: Vec<u8>) {
        self.reading = None;
        self.ready = rest;
        if let Some(f) = self.on_peer.take() {
            f(peer);
        }
    }

    /// Looks at what has been read: the peer's frame complete, not a frame, or not yet known.
    fn examine(&mut self, eof: bool) {
        let Some(buf) = self.reading.as_ref() else {
            return;
        };
        if buf.len() >= 8 {
            let magic = u32::from_be_bytes(buf[0..4].try_into().expect("4 bytes"));
            let size = u32::from_be_bytes(buf[4..8].try_into().expect("4 bytes")) as usize;
            if magic != MAGIC || size > MAX_PAYLOAD {
                let all = self.reading.take().unwrap_or_default();
                return self.resolve(None, all);
            }
            if buf.len() >= 8 + size {
                let peer = parse(&buf[8..8 + size]);
                let rest = buf[8 + size..].to_vec();
                return self.resolve(peer, rest);
            }
        }
        if eof {
            let all = self.reading.take().unwrap_or_default();
            self.resolve(None, all);
        }
    }
}

impl<S: AsyncWrite + Unpin> Exchange<'_, S> {
    /// Writes what is left of this side's frame.
    fn poll_send_ours(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.sent < self.ours.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.ours[self.sent..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => self.sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Exchange<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            // The server answers the client's frame with its own at once.
            if this.role == Role::Server && this.reading.is_none() {
                match this.poll_send_ours(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    // Woken when the socket takes more; the read is tried again then.
                    Poll::Pending => return Poll::Pending,
                }
            }
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if this.reading.is_none() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 4096];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    let eof = got.is_empty();
                    if let Some(r) = this.reading.as_mut() {
                        r.extend_from_slice(got);
                    }
                    this.examine(eof);
                    if eof && this.ready.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Exchange<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match this.poll_send_ours(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn node(name: &str) -> Struct {
        let mut s = Struct::default();
        s.fields.insert(
            "NAME".into(),
            Value {
                kind: Some(Kind::StringValue(name.into())),
            },
        );
        s
    }

    #[tokio::test]
    async fn both_sides_send_their_frame_and_take_the_others_off() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let peer_a = std::sync::Arc::new(std::sync::Mutex::new(None));
        let mut peer_b = None;
        {
            let mut a = Exchange::new(
                a,
                Role::Client,
                frame("client-id", Some(&node("client"))),
                {
                    let peer_a = peer_a.clone();
                    move |p| *peer_a.lock().unwrap() = p
                },
            );
            let mut b = Exchange::new(
                b,
                Role::Server,
                frame("server-id", Some(&node("server"))),
                |p| peer_b = p,
            );
            a.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            b.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ping");
            // The server's frame went out as soon as it read the client's: the client takes it
            // off while the server's app has said nothing yet.
            let quiet =
                tokio::time::timeout(std::time::Duration::from_millis(50), a.read(&mut got)).await;
            assert!(quiet.is_err(), "no app bytes yet: {quiet:?}");
            assert!(
                peer_a.lock().unwrap().is_some(),
                "the client knows its peer"
            );
            b.write_all(b"pong").await.unwrap();
            a.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"pong");
        }
        let a = peer_a.lock().unwrap().clone().unwrap();
        let b = peer_b.unwrap();
        assert_eq!(a.id.as_deref(), Some("server-id"));
        assert_eq!(b.id.as_deref(), Some("client-id"));
        let md = crate::http::istio::decode(b.metadata.as_deref().unwrap()).unwrap();
        assert_eq!(md["NAME"], "client");
    }

    #[tokio::test]
    async fn a_peer_without_the_exchange_passes_through() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut seen = Some(Peer::default());
        {
            let mut a = Exchange::new(a, Role::Server, vec![], |p| seen = p);
            b.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            drop(b);
            let mut got = vec![];
            a.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"GET / HTTP/1.1\r\n");
        }
        assert_eq!(seen, None);
    }
}
