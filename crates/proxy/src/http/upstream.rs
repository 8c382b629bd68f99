//! The router's upstream side: a host from the cluster's load balancer, a connection from that
//! host's pool (HTTP/1.1 connections reused once their response is done, one multiplexed
//! HTTP/2 connection), the request as the upstream sees it (path and host rewritten,
//! `x-envoy-expected-rq-timeout-ms`), the route timeout, and Envoy's local replies when the
//! upstream cannot answer.

use super::{Body, BoxError, Downstream, Outcome};
use crate::cluster::{Cluster, ConnectError, Host, LbContext};
use crate::server::Server;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pilotfish_api::pb::envoy::config::route::v3::{RetryPolicy, RouteAction};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A stream on one of a host's connections.
struct Sender {
    open: OpenStream,
    send: Sending,
}

enum Sending {
    Http1(hyper::client::conn::http1::SendRequest<Body>),
    Http2(hyper::client::conn::http2::SendRequest<Body>),
}

type Http1 = (
    Arc<PooledConn>,
    hyper::client::conn::http1::SendRequest<Body>,
);
type Http2 = (
    Arc<PooledConn>,
    hyper::client::conn::http2::SendRequest<Body>,
);

/// One upstream connection as its pool sees it: its id (`[C<n>]` in the log), its age, the
/// requests it has been given, the streams under way on it and since when it has had none.
struct PooledConn {
    id: u64,
    /// Over TLS: the identities the handshake showed (Istio's stats report them).
    identity: Option<Arc<crate::transport_socket::UpstreamIdentity>>,
    born: tokio::time::Instant,
    requests: AtomicU64,
    streams: AtomicUsize,
    /// Nanoseconds from `born` to when its last stream ended.
    idle_since: AtomicU64,
    /// Given no more streams: 0 not, else why (RETIRED_*).
    retired: AtomicU8,
    /// Its closing has been counted.
    counted: AtomicBool,
    /// Told when its last stream under way ends.
    idle: tokio::sync::Notify,
}

const RETIRED_MAX_REQUESTS: u8 = 1;
const RETIRED_MAX_DURATION: u8 = 2;

impl PooledConn {
    fn new(
        id: u64,
        identity: Option<Arc<crate::transport_socket::UpstreamIdentity>>,
    ) -> Arc<PooledConn> {
        Arc::new(PooledConn {
            id,
            identity,
            born: tokio::time::Instant::now(),
            requests: AtomicU64::new(0),
            streams: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            retired: AtomicU8::new(0),
            counted: AtomicBool::new(false),
            idle: tokio::sync::Notify::new(),
        })
    }

    /// Whether it may take another stream.
    fn usable(&self, u: &UpstreamHttp) -> bool {
        self.retired.load(Ordering::Relaxed) == 0
            && u.max_duration.is_none_or(|d| self.born.elapsed() < d)
    }

    /// A stream on it; the last one max_requests_per_connection allows retires it.
    fn open(self: &Arc<Self>, u: &UpstreamHttp) -> OpenStream {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if u.max_requests.is_some_and(|m| n >= m) {
            self.retired.store(RETIRED_MAX_REQUESTS, Ordering::Relaxed);
        }
        self.streams.fetch_add(1, Ordering::Relaxed);
        OpenStream(self.clone())
    }
}

/// A stream counted open on its connection until dropped.
struct OpenStream(Arc<PooledConn>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let c = &self.0;
        c.idle_since
            .store(c.born.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if c.streams.fetch_sub(1, Ordering::Relaxed) == 1 {
            c.idle.notify_one();
        }
    }
}

/// Why the pool closed one of its connections.
enum Closed {
    Idle,
    MaxRequests,
    MaxDuration,
}

/// Waits until the connection is to be closed: idle for the cluster's idle_timeout, or done
/// with its last stream after max_requests_per_connection or max_connection_duration. Then it
/// is taken out of the pool, unless a stream has just taken it.
async fn retire(
    server: Arc<Server>,
    conn: Arc<PooledConn>,
    cluster: Arc<Cluster>,
    key: HostKey,
    http2: bool,
) -> Closed {
    let u = UpstreamHttp::of(&cluster);
    loop {
        let now = tokio::time::Instant::now();
        let idle_at = conn.born + Duration::from_nanos(conn.idle_since.load(Ordering::Relaxed));
        let why = if conn.retired.load(Ordering::Relaxed) == RETIRED_MAX_REQUESTS {
            Some(Closed::MaxRequests)
        } else if u.max_duration.is_some_and(|d| now >= conn.born + d) {
            conn.retired.store(RETIRED_MAX_DURATION, Ordering::Relaxed);
            Some(Closed::MaxDuration)
        } else if u.idle_timeout.is_some_and(|t| now >= idle_at + t) {
            Some(Closed::Idle)
        } else {
            None
        };
        if let Some(why) = why {
            if server.http_pools.remove_if_idle(&key, &conn, http2) {
                return why;
            }
        }
        // Looked at again when the idle period would end, when its age limit comes, and when
        // its last stream ends.
        let mut wake = now + u.idle_timeout.unwrap_or(Duration::from_secs(3600));
        if let Some(t) = u.idle_timeout {
            if conn.streams.load(Ordering::Relaxed) == 0 {
                wake = wake.min(idle_at + t);
            }
        }
        if let Some(end) = u.max_duration.map(|d| conn.born + d).filter(|e| *e > now) {
            wake = wake.min(end);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(wake.max(now + Duration::from_millis(1))) => {}
            _ = conn.idle.notified() => {}
        }
    }
}

/// (cluster, host address)
type HostKey = (String, String);

/// Each host's connections of one protocol.
type PoolMap<S> = Mutex<HashMap<HostKey, Vec<(Arc<PooledConn>, S)>>>;

/// Idle HTTP/1.1 connections and the HTTP/2 connections of each (cluster, host): a new HTTP/2
/// connection only when the others carry max_concurrent_streams each.
#[derive(Default)]
pub struct Pools {
    http1: Mutex<HashMap<HostKey, Vec<Http1>>>,
    http2: Mutex<HashMap<HostKey, Vec<Http2>>>,
    /// Woken when one of the host's HTTP/1.1 connections is idle again, for the requests
    /// waiting on it (the cluster at max_connections).
    freed: Mutex<HashMap<HostKey, Arc<Waiters>>>,
    /// Whose turn it is to make a host's next HTTP/2 connection.
    h2_connecting: Mutex<HashMap<HostKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// The requests waiting for a host's HTTP/1.1 connection, and their wake-up.
#[derive(Default)]
struct Waiters {
    freed: tokio::sync::Notify,
    count: AtomicUsize,
}

/// A request counted among the waiters until it stops waiting (or is given up).
struct Waiting(Arc<Waiters>);

impl Waiting {
    fn new(w: Arc<Waiters>) -> Waiting {
        w.count.fetch_add(1, Ordering::Relaxed);
        Waiting(w)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pools {
    /// A retired cluster's connections leave the pools: idle ones close, busy ones finish
    /// their streams and close.
    pub fn retire_cluster(&self, cluster: &str) {
        self.http1.lock().unwrap().retain(|k, _| k.0 != cluster);
        self.http2.lock().unwrap().retain(|k, _| k.0 != cluster);
    }

    /// Takes the connection out of its pool if no stream is under way on it (else it stays).
    fn remove_if_idle(&self, key: &HostKey, conn: &Arc<PooledConn>, http2: bool) -> bool {
        let idle = |c: &Arc<PooledConn>| {
            !(Arc::ptr_eq(c, conn) && conn.streams.load(Ordering::Relaxed) == 0)
        };
        if http2 {
            let mut pools = self.http2.lock().unwrap();
            if conn.streams.load(Ordering::Relaxed) > 0 {
                return false;
            }
            if let Some(list) = pools.get_mut(key) {
                list.retain(|(c, _)| idle(c));
            }
        } else {
            let mut pools = self.http1.lock().unwrap();
            if conn.streams.load(Ordering::Relaxed) > 0 {
                return false;
            }
            if let Some(list) = pools.get_mut(key) {
                list.retain(|(c, _)| idle(c));
            }
        }
        true
    }

    /// A stream on one of the host's HTTP/2 connections with room for it, if there is one.
    fn free_http2(&self, key: &HostKey, u: &UpstreamHttp) -> Option<Sender> {
        let mut pools = self.http2.lock().unwrap();
        let list = pools.get_mut(key)?;
        list.retain(|(_, s)| !s.is_closed());
        let (c, s) = list
            .iter()
            .find(|(c, _)| c.usable(u) && c.streams.load(Ordering::Relaxed) < u.max_streams)?;
        tracing::debug!(target: "pool", connection = c.id, "using existing fully connected connection");
        tracing::debug!(target: "pool", connection = c.id, "creating stream");
        Some(Sender {
            open: c.open(u),
            send: Sending::Http2(s.clone()),
        })
    }

    /// Held by the request making the host's next HTTP/2 connection.
    fn connect_turn(&self, key: &HostKey) -> Arc<tokio::sync::Mutex<()>> {
        self.h2_connecting
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// A closed connection leaves its pool (and an empty pool its map).
    fn forget(&self, key: &HostKey, conn: &Arc<PooledConn>, http2: bool) {
        fn drop_from<T>(map: &PoolMap<T>, key: &HostKey, conn: &Arc<PooledConn>) {
            let mut m = map.lock().unwrap();
            if let Some(list) = m.get_mut(key) {
                list.retain(|(c, _)| !Arc::ptr_eq(c, conn));
                if list.is_empty() {
                    m.remove(key);
                }
            }
        }
        if http2 {
            drop_from(&self.http2, key, conn);
            if !self.http2.lock().unwrap().contains_key(key) {
                self.h2_connecting.lock().unwrap().remove(key);
            }
        } else {
            drop_from(&self.http1, key, conn);
        }
    }

    /// An HTTP/1.1 connection is idle again: the next request to its host may take it.
    fn release(&self, key: HostKey, sender: Http1) {
        let waiting = self.freed.lock().unwrap().get(&key).cloned();
        self.http1
            .lock()
            .unwrap()
            .entry(key)
            .or_default()
            .push(sender);
        if let Some(w) = waiting {
            w.freed.notify_one();
        }
    }

    /// A stream on an idle HTTP/1.1 connection to the host, if one is ready (taken under the
    /// pool's lock, so the pool cannot close it meanwhile).
    fn idle_http1(&self, key: &HostKey, u: &UpstreamHttp) -> Option<Sender> {
        let mut idle = self.http1.lock().unwrap();
        let list = idle.get_mut(key)?;
        while let Some((c, s)) = list.pop() {
            if s.is_ready() && c.usable(u) {
                tracing::debug!(target: "pool", connection = c.id, "using existing fully connected connection");
                tracing::debug!(target: "pool", connection = c.id, "creating stream");
                return Some(Sender {
                    open: c.open(u),
                    send: Sending::Http1(s),
                });
            }
        }
        None
    }

    fn waiters(&self, key: &HostKey) -> Arc<Waiters> {
        self.freed
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone()
    }
}

/// What a cluster's HttpProtocolOptions say of its upstream connections.
pub(crate) struct UpstreamHttp {
    protocol: Protocol,
    http2: Option<pilotfish_api::pb::envoy::config::core::v3::Http2ProtocolOptions>,
    /// Streams one HTTP/2 connection carries (Envoy's default: 2^31 - 1).
    max_streams: usize,
    /// common_http_protocol_options: an idle connection is closed after idle_timeout (an hour
    /// by default); one is given max_requests_per_connection streams at most, and none after
    /// max_connection_duration.
    idle_timeout: Option<Duration>,
    max_requests: Option<u64>,
    max_duration: Option<Duration>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
    AsDownstream,
    /// auto_config: HTTP/2 where the host picks h2 by ALPN, else HTTP/1.1.
    Auto,
}

/// What a request asks of its host's pool.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    Http1,
    Http2,
    Auto,
}

impl UpstreamHttp {
    pub(crate) fn of(cluster: &Cluster) -> &UpstreamHttp {
        cluster.http.get_or_init(|| {
            use pilotfish_api::pb::envoy::extensions::upstreams::http::v3::{
                http_protocol_options::{
                    explicit_http_config::ProtocolConfig, UpstreamProtocolOptions,
                },
                HttpProtocolOptions,
            };
            let o = cluster
                .config
                .typed_extension_protocol_options
                .get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
                .and_then(pilotfish_config::model::unpack::<HttpProtocolOptions>);
            let common = o
                .as_ref()
                .and_then(|o| o.common_http_protocol_options)
                .unwrap_or_default();
            let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
            let idle_timeout = nonzero(crate::duration(
                common.idle_timeout.as_ref(),
                Duration::from_secs(3600),
            ));
            let max_duration = nonzero(crate::duration(
                common.max_connection_duration.as_ref(),
                Duration::ZERO,
            ));
            // The cluster's own (deprecated) max_requests_per_connection, as Envoy still reads it.
            #[allow(deprecated)]
            let max_requests = common
                .max_requests_per_connection
                .or(cluster.config.max_requests_per_connection)
                .map(|v| v.value as u64)
                .filter(|n| *n > 0);
            let (protocol, http2) = match o.and_then(|o| o.upstream_protocol_options) {
                Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match e.protocol_config {
                    Some(ProtocolConfig::Http2ProtocolOptions(h2)) => (Protocol::Http2, Some(h2)),
                    _ => (Protocol::Http1, None),
                },
                Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(u)) => {
                    (Protocol::AsDownstream, u.http2_protocol_options)
                }
                Some(UpstreamProtocolOptions::AutoConfig(a)) => {
                    (Protocol::Auto, a.http2_protocol_options)
                }
                _ => (Protocol::Http1, None),
            };
            let max_streams = http2
                .as_ref()
                .and_then(|o| o.max_concurrent_streams)
                .map_or(i32::MAX as usize, |v| v.value.max(1) as usize);
            UpstreamHttp {
                protocol,
                http2,
                max_streams,
                idle_timeout,
                max_requests,
                max_duration,
            }
        })
    }

    /// auto_config: the protocol is the one the host picks by ALPN.
    pub(crate) fn auto(&self) -> bool {
        self.protocol == Protocol::Auto
    }

    /// The protocol a request goes upstream in.
    fn want(&self, downstream_http2: bool) -> Want {
        match self.protocol {
            Protocol::Http2 => Want::Http2,
            Protocol::AsDownstream if downstream_http2 => Want::Http2,
            Protocol::AsDownstream | Protocol::Http1 => Want::Http1,
            Protocol::Auto => Want::Auto,
        }
    }
}

/// Why an upstream request got no response, and Envoy's local reply for it.
fn failure_reply(e: &ConnectError) -> (u16, String, &'static str, String) {
    match e {
        ConnectError::NoHealthyHost => (503, "no healthy upstream".into(), "UH", "no_healthy_upstream".into()),
        ConnectError::Overflow | ConnectError::PendingOverflow => (
            503,
            "upstream connect error or disconnect/reset before headers. reset reason: overflow".into(),
            "UO",
            "upstream_reset_before_response_started{overflow}".into(),
        ),
        ConnectError::Timeout(_) => (
            503,
            "upstream connect error or disconnect/reset before headers. reset reason: connection timeout".into(),
            "UF",
            "upstream_reset_before_response_started{connection_timeout}".into(),
        ),
        ConnectError::Failed(_, err) => (
            503,
            "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure".into(),
            "UF",
            // The socket's own reason, as Envoy 1.40 adds it (spaces made underscores).
            match err.raw_os_error() {
                Some(code) => {
                    let text = std::io::Error::from_raw_os_error(code).to_string();
                    let text = text.split(" (os error").next().unwrap_or("").replace(' ', "_");
                    format!("upstream_reset_before_response_started{{remote_connection_failure|delayed_connect_error:_{text}}}")
                }
                None => "upstream_reset_before_response_started{remote_connection_failure}".into(),
            },
        ),
        ConnectError::Tls(_, err) => (
            503,
            format!("upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, transport failure reason: TLS_error:|{err}"),
            "UF",
            "upstream_reset_before_response_started{remote_connection_failure}".into(),
        ),
    }
}

/// A connection for one request within `max_requests` (checked, as Envoy does, once the
/// connection is there: refused, it stays in the pool).
async fn connection(
    server: &Arc<Server>,
    cluster: &Arc<Cluster>,
    host: &Arc<Host>,
    want: Want,
    alpn: Option<&[Vec<u8>]>,
    conn: u64,
) -> Result<Sender, ConnectError> {
    let sender = pooled(server, cluster, host, want, alpn, conn).await?;
    if cluster.stats.upstream_rq_active.get() >= cluster.thresholds[0].max_requests {
        if let Sender {
            open,
            send: Sending::Http1(s),
        } = sender
        {
            let key = (cluster.name.clone(), host.address.clone());
            let c = open.0.clone();
            drop(open);
            server.http_pools.release(key, (c, s));
        }
        server
            .stats
            .counter(&format!(
                "cluster.{}.upstream_rq_active_overflow",
                cluster.name
            ))
            .inc();
        return Err(ConnectError::Overflow);
    }
    Ok(sender)
}

/// An idle connection of the host's pool, else a new one (a pending request meanwhile).
async fn pooled(
    server: &Arc<Server>,
    cluster: &Arc<Cluster>,
    host: &Arc<Host>,
    want: Want,
    alpn: Option<&[Vec<u8>]>,
    conn: u64,
) -> Result<Sender, ConnectError> {
    let key = (cluster.name.clone(), host.address.clone());
    let limits = cluster.thresholds[0];
    let overflow = || {
        server
            .stats
            .counter(&format!(
                "cluster.{}.upstream_rq_pending_overflow",
                cluster.name
            ))
            .inc();
        ConnectError::PendingOverflow
    };
    let options = UpstreamHttp::of(cluster);
    // Under auto_config a host already found to speak HTTP/2 is asked in HTTP/2.
    let known_h2 = want == Want::Auto
        && server
            .http_pools
            .http2
            .lock()
            .unwrap()
            .get(&key)
            .is_some_and(|l| !l.is_empty());
    let http2 = want == Want::Http2 || known_h2;
    // One HTTP/2 connection is made to a host at a time: requests that find none free wait for
    // it (pending, as in Envoy's pool) rather than each making its own.
    let mut _connecting = None;
    if http2 {
        if let Some(sender) = server.http_pools.free_http2(&key, options) {
            return Ok(sender);
        }
        let _pending = Active::pending(cluster);
        let turn = server.http_pools.connect_turn(&key).lock_owned().await;
        if let Some(sender) = server.http_pools.free_http2(&key, options) {
            // It waited for the connection another request was making.
            cluster.stats.upstream_rq_pending_total.inc();
            return Ok(sender);
        }
        _connecting = Some(turn);
    } else if let Some(sender) = server.http_pools.idle_http1(&key, options) {
        return Ok(sender);
    }
    // A request waiting for its connection is pending: max_pending_requests bounds those.
    if cluster.stats.upstream_rq_pending_active.get() >= limits.max_pending_requests {
        return Err(overflow());
    }
    // At max_connections a request waits for one of the host's connections to be free, as in
    // Envoy's pool; a host with none gets one all the same.
    let at_limit = || cluster.stats.upstream_cx_active.get() >= limits.max_connections;
    if !http2 && at_limit() && host.stats.cx_active.load(Ordering::Relaxed) > 0 {
        cluster.stats.upstream_cx_overflow.inc();
        cluster.stats.upstream_rq_pending_total.inc();
        let _pending = Active::pending(cluster);
        tracing::debug!(target: "pool", "queueing stream due to no available connections (at max_connections)");
        let waiting = Waiting::new(server.http_pools.waiters(&key));
        let waiters = &waiting.0;
        let got = loop {
            let woken = waiters.freed.notified();
            if let Some(c) = server.http_pools.idle_http1(&key, options) {
                break Some(c);
            }
            if !at_limit() || host.stats.cx_active.load(Ordering::Relaxed) == 0 {
                break None;
            }
            // A connection that closes frees a place without a wake-up: look again soon.
            let _ = tokio::time::timeout(Duration::from_millis(50), woken).await;
        };
        // Envoy's pool counts an overflow each time a freed connection leaves requests waiting.
        if got.is_some() && waiters.count.load(Ordering::Relaxed) > 1 {
            cluster.stats.upstream_cx_overflow.inc();
        }
        drop(waiting);
        if let Some(sender) = got {
            return Ok(sender);
        }
    }
    tracing::debug!(target: "pool", "queueing stream due to no available connections (ready=0 busy=0 connecting=0)");
    tracing::debug!(target: "pool", "trying to create new connection");
    tracing::debug!(target: "pool", "creating a new connection (connecting=0)");
    let id = server.next_connection_id();
    cluster.stats.upstream_rq_pending_total.inc();
    let pending = Active::pending(cluster);
    let up = cluster
        .connect_host_anyway(host.clone(), conn, id, alpn)
        .await;
    drop(pending);
    let up = up?;
    // auto_config: the protocol the host picked. Envoy's mixed pool counts the connection a
    // second time when it hands it to that protocol's client.
    let http2 = match want {
        Want::Auto => {
            cluster.stats.upstream_cx_total.inc();
            up.alpn.as_deref() == Some(b"h2")
        }
        _ => http2,
    };
    let pooled = PooledConn::new(id, up.identity.clone());
    let io = TokioIo::new(up);
    let fail = |e: hyper::Error| {
        ConnectError::Failed(host.address.clone(), std::io::Error::other(e.to_string()))
    };
    let sender = if http2 {
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        if let Some(o) = &options.http2 {
            if let Some(v) = o.initial_stream_window_size {
                builder.initial_stream_window_size(v.value);
            }
            if let Some(v) = o.initial_connection_window_size {
                builder.initial_connection_window_size(v.value);
            }
        }
        let (sender, c) = builder.handshake(io).await.map_err(fail)?;
        tokio::spawn(watched(
            c,
            pooled.clone(),
            server.clone(),
            cluster.clone(),
            key.clone(),
            true,
        ));
        server
            .stats
            .counter(&format!("cluster.{}.upstream_cx_http2_total", cluster.name))
            .inc();
        let open = pooled.open(options);
        server
            .http_pools
            .http2
            .lock()
            .unwrap()
            .entry(key)
            .or_default()
            .push((pooled, sender.clone()));
        Sender {
            open,
            send: Sending::Http2(sender),
        }
    } else {
        let (sender, c) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await
            .map_err(fail)?;
        let open = pooled.open(options);
        tokio::spawn(watched(
            c.with_upgrades(),
            pooled,
            server.clone(),
            cluster.clone(),
            key,
            false,
        ));
        server
            .stats
            .counter(&format!("cluster.{}.upstream_cx_http1_total", cluster.name))
            .inc();
        Sender {
            open,
            send: Sending::Http1(sender),
        }
    };
    tracing::debug!(target: "pool", connection = id, "attaching to next stream");
    tracing::debug!(target: "pool", connection = id, "creating stream");
    Ok(sender)
}

/// A CONNECT the route terminates (connect_config): a TCP connection to a host of `cluster`,
/// and the 200 that tells the client its tunnel is open.
pub(super) async fn open_tunnel(
    server: &Arc<Server>,
    cluster: &Arc<Cluster>,
    info: &Downstream,
    hash: Option<u64>,
    conn: u64,
    seed: u64,
) -> Outcome {
    let ctx = LbContext {
        original_destination: info.local,
        hash,
        conn: seed,
        attempt: 1,
    };
    let failed = |e: ConnectError, host: Option<&Arc<Host>>| {
        let (status, body, flag, details) = failure_reply(&e);
        let mut o = Outcome::local(status, &body, Some(flag), &details);
        o.cluster = cluster.name.clone();
        o.upstream_host = host.map(|h| h.address.clone());
        o
    };
    let Some(host) = cluster.pick(&ctx) else {
        cluster.stats.upstream_cx_none_healthy.inc();
        return failed(ConnectError::NoHealthyHost, None);
    };
    tracing::debug!(target: "router", connection = conn, stream = seed, "cluster '{}' match for CONNECT: opening a tunnel to {}", cluster.name, host.address);
    let id = server.next_connection_id();
    match cluster
        .connect_host_anyway(host.clone(), conn, id, None)
        .await
    {
        Err(e) => failed(e, Some(&host)),
        Ok(tcp) => Outcome {
            response: Response::new(super::full(Bytes::new())),
            flags: vec![],
            details: "via_upstream".into(),
            cluster: cluster.name.clone(),
            upstream_host: Some(host.address.clone()),
            upstream_local: None,
            upstream_identity: tcp.identity.clone(),
            transport_failure: None,
            local_text: None,
            tunnel: Some(tcp),
        },
    }
}

/// Drives an upstream connection until it ends or its pool closes it (counted as Envoy does).
async fn watched<F: std::future::Future>(
    connection: F,
    conn: Arc<PooledConn>,
    server: Arc<Server>,
    cluster: Arc<Cluster>,
    key: HostKey,
    http2: bool,
) {
    let id = conn.id;
    let name = cluster.name.clone();
    let why = tokio::select! {
        _ = connection => {
            // An HTTP/1.1 connection let go after its last request ends by itself.
            match conn.retired.load(Ordering::Relaxed) {
                RETIRED_MAX_REQUESTS => Some(Closed::MaxRequests),
                RETIRED_MAX_DURATION => Some(Closed::MaxDuration),
                _ => None,
            }
        }
        why = retire(server.clone(), conn.clone(), cluster, key.clone(), http2) => Some(why),
    };
    server.http_pools.forget(&key, &conn, http2);
    if let Some(why) = why.filter(|_| !conn.counted.swap(true, Ordering::Relaxed)) {
        let (stat, what) = match why {
            Closed::Idle => ("upstream_cx_idle_timeout", "idle timeout"),
            Closed::MaxRequests => ("upstream_cx_max_requests", "max requests per connection"),
            Closed::MaxDuration => (
                "upstream_cx_max_duration_reached",
                "max connection duration",
            ),
        };
        server
            .stats
            .counter(&format!("cluster.{name}.{stat}"))
            .inc();
        tracing::debug!(target: "pool", connection = id, "closing: {what}");
    }
    tracing::debug!(target: "connection", connection = id, "closing socket: 0");
}

/// The route's timeout: `timeout` (15 s by default, 0 for none), or what an
/// `x-envoy-upstream-rq-timeout-ms` header asks.
fn route_timeout(action: &RouteAction, h: &hyper::HeaderMap) -> Option<Duration> {
    let from_header = h
        .get("x-envoy-upstream-rq-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    let t = from_header
        .or_else(|| grpc_timeout(action, h))
        .unwrap_or_else(|| crate::duration(action.timeout.as_ref(), Duration::from_secs(15)));
    (!t.is_zero()).then_some(t)
}

/// A gRPC request's timeout when the route takes it from `grpc-timeout`
/// (`max_stream_duration.grpc_timeout_header_max`, or the older `max_grpc_timeout`): the
/// header's value less the offset, capped by the maximum (0 is no cap); no header is no limit.
fn grpc_timeout(action: &RouteAction, h: &hyper::HeaderMap) -> Option<Duration> {
    let grpc = h
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if !grpc {
        return None;
    }
    #[allow(deprecated)]
    let (max, offset) = match &action.max_stream_duration {
        Some(m) if m.grpc_timeout_header_max.is_some() => (
            m.grpc_timeout_header_max.as_ref(),
            m.grpc_timeout_header_offset.as_ref(),
        ),
        Some(_) => return None,
        None if action.max_grpc_timeout.is_some() => (
            action.max_grpc_timeout.as_ref(),
            action.grpc_timeout_offset.as_ref(),
        ),
        None => return None,
    };
    let max = crate::duration(max, Duration::ZERO);
    let mut t = h
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .unwrap_or(Duration::ZERO);
    if let Some(o) = offset {
        t = t.saturating_sub(crate::duration(Some(o), Duration::ZERO));
    }
    if !max.is_zero() && (t.is_zero() || t > max) {
        t = max;
    }
    Some(t)
}

/// gRPC's `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// What the route asks of the router besides its target.
pub struct RouteInfo<'a> {
    pub action: &'a RouteAction,
    /// The route's retry policy, else its virtual host's.
    pub retry_policy: Option<&'a RetryPolicy>,
    pub include_attempt_count: bool,
    pub include_attempt_count_in_response: bool,
    /// The route's hash_policy hash, for RING_HASH and MAGLEV.
    pub hash: Option<u64>,
    /// Istio's ALPN filter, when the chain has it: what to offer the upstream by protocol.
    pub alpn: Option<&'a super::istio::AlpnOverride>,
}

/// A retry policy as the router applies it to one request (the `x-envoy-retry-on`,
/// `x-envoy-max-retries` and `x-envoy-retriable-status-codes` of an internal request
/// included).
struct Retries {
    on: Vec<String>,
    max: u32,
    status_codes: Vec<u32>,
    per_try_timeout: Option<Duration>,
    base: Duration,
    max_interval: Duration,
    previous_hosts: bool,
    host_selection_attempts: u32,
}

impl Retries {
    fn of(policy: Option<&RetryPolicy>, h: &hyper::HeaderMap) -> Retries {
        let header = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        let mut on: Vec<String> = policy
            .map(|p| {
                p.retry_on
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .collect()
            })
            .unwrap_or_default();
        if let Some(extra) = header("x-envoy-retry-on") {
            on.extend(extra.split(',').map(|s| s.trim().to_string()));
        }
        on.retain(|s| !s.is_empty());
        let mut status_codes: Vec<u32> = policy
            .map(|p| p.retriable_status_codes.clone())
            .unwrap_or_default();
        if let Some(extra) = header("x-envoy-retriable-status-codes") {
            status_codes.extend(
                extra
                    .split(',')
                    .filter_map(|s| s.trim().parse::<u32>().ok()),
            );
        }
        let max = header("x-envoy-max-retries")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                policy
                    .and_then(|p| p.num_retries.as_ref())
                    .map_or(1, |v| v.value)
            });
        let backoff = policy.and_then(|p| p.retry_back_off.as_ref());
        let base = crate::duration(
            backoff.and_then(|b| b.base_interval.as_ref()),
            Duration::from_millis(25),
        );
        Retries {
            max: if on.is_empty() { 0 } else { max },
            on,
            status_codes,
            per_try_timeout: policy
                .and_then(|p| p.per_try_timeout.as_ref())
                .map(|d| crate::duration(Some(d), Duration::ZERO))
                .filter(|d| !d.is_zero()),
            base,
            max_interval: crate::duration(backoff.and_then(|b| b.max_interval.as_ref()), base * 10),
            previous_hosts: policy.is_some_and(|p| {
                p.retry_host_predicate
                    .iter()
                    .any(|r| r.name.ends_with("previous_hosts"))
            }),
            host_selection_attempts: policy
                .map_or(1, |p| p.host_selection_retry_max_attempts.max(1) as u32),
        }
    }

    fn has(&self, what: &str) -> bool {
        self.on.iter().any(|o| o == what)
    }

    /// A response worth another attempt.
    fn retriable_status(&self, status: u16) -> bool {
        (self.has("5xx") && status >= 500)
            || (self.has("gateway-error") && matches!(status, 502..=504))
            || (self.has("retriable-4xx") && status == 409)
            || (self.has("retriable-status-codes") && self.status_codes.contains(&(status as u32)))
    }

    /// No response at all: the connection failed (`connect`) or was reset or timed out.
    fn retriable_failure(&self, connect: bool) -> bool {
        self.has("5xx")
            || self.has("gateway-error")
            || self.has("reset")
            || (connect && self.has("connect-failure"))
    }

    /// Envoy's jittered exponential backoff before retry `n` (1 for the first).
    fn backoff(&self, n: u32, seed: u64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << n.min(16))
            .min(self.max_interval)
            .as_millis() as u64;
        Duration::from_millis(crate::random(seed ^ n as u64) % ceiling.max(1))
    }
}

/// One attempt's end.
enum Attempt {
    Response(
        Response<OnEnd>,
        Arc<Host>,
        Instant,
        Option<Arc<crate::transport_socket::UpstreamIdentity>>,
    ),
    ConnectFailed(ConnectError, Option<Arc<Host>>),
    Reset(Arc<Host>),
    PerTryTimeout(Arc<Host>),
}

/// Sends the request to a host of `cluster`, retrying as the route's policy says, and turns the
/// answer (or its absence) into the stream's outcome.
#[allow(clippy::too_many_arguments)]
pub(super) async fn forward(
    server: &Arc<Server>,
    cluster: &Arc<Cluster>,
    req: Request<Body>,
    route: &RouteInfo<'_>,
    path: &str,
    host_header: &str,
    info: &Downstream,
    downstream_http2: bool,
    conn: u64,
    seed: u64,
    picked: &std::sync::Mutex<Option<String>>,
) -> Outcome {
    let name = cluster.name.clone();
    let count = |n: &str| server.stats.counter(&format!("cluster.{name}.{n}")).inc();
    tracing::debug!(target: "router", connection = conn, stream = seed, "cluster '{name}' match for URL '{path}'");
    let timeout = route_timeout(route.action, req.headers());
    let retries = Retries::of(route.retry_policy, req.headers());
    let want = UpstreamHttp::of(cluster).want(downstream_http2);
    // istio.alpn: the protocols offered by the one the request goes upstream in.
    let alpn = route.alpn.and_then(|a| match want {
        Want::Http2 => a.for_protocol(true, false),
        Want::Http1 => a.for_protocol(false, req.version() == hyper::Version::HTTP_10),
        Want::Auto => None,
    });
    let (mut parts, body) = req.into_parts();
    for n in [
        "x-envoy-upstream-rq-timeout-ms",
        "x-envoy-retry-on",
        "x-envoy-max-retries",
        "x-envoy-retriable-status-codes",
    ] {
        parts.headers.remove(n);
    }
    // Envoy's HTTP/1.1 codec says `content-length: 0` for a request without a body, unless
    // its method expects none.
    let bodiless = matches!(
        parts.method,
        hyper::Method::GET
            | hyper::Method::HEAD
            | hyper::Method::DELETE
            | hyper::Method::TRACE
            | hyper::Method::CONNECT
    );
    let connect = parts.method == hyper::Method::CONNECT;
    let shape = Shape {
        host_header,
        path,
        zero_length: !bodiless
            && hyper::body::Body::is_end_stream(&body)
            && !parts.headers.contains_key("content-length")
            && !parts.headers.contains_key("transfer-encoding"),
    };
    // A request that may be retried is buffered, so each attempt can send it again.
    let mut body = Some(body);
    let buffered = if retries.max > 0 {
        match body.take().unwrap().collect().await {
            Ok(b) => Some(b.to_bytes()),
            Err(_) => {
                return Outcome::local(400, "", None, "downstream_remote_disconnect");
            }
        }
    } else {
        None
    };
    let started = tokio::time::Instant::now();
    let deadline = timeout.map(|t| started + t);
    let mut tried: Vec<Arc<Host>> = vec![];
    let mut attempt = 1u32;
    let mut flags: Vec<&'static str> = vec![];
    // A retry counts against max_retries from its backoff to its end.
    let mut retry_guard = None;
    let result = loop {
        // The host: the load balancer's pick, avoiding hosts already tried when asked to.
        let mut host = None;
        for k in 0..retries.host_selection_attempts.max(1) {
            let ctx = LbContext {
                original_destination: info.local,
                hash: route.hash,
                conn: seed ^ ((attempt as u64) << 48) ^ k as u64,
                attempt,
            };
            host = cluster.pick(&ctx);
            if !retries.previous_hosts
                || !host
                    .as_ref()
                    .is_some_and(|h| tried.iter().any(|t| Arc::ptr_eq(t, h)))
            {
                break;
            }
        }
        let Some(host) = host else {
            cluster.stats.upstream_cx_none_healthy.inc();
            break Attempt::ConnectFailed(ConnectError::NoHealthyHost, None);
        };
        tried.push(host.clone());
        *picked.lock().unwrap() = Some(host.address.clone());
        let mut p = parts.clone();
        if route.include_attempt_count {
            p.headers
                .insert("x-envoy-attempt-count", HeaderValue::from(attempt));
        }
        // What the upstream is told it has: the per-try timeout, else what is left of the
        // route's.
        let expected = match (retries.per_try_timeout, timeout) {
            (Some(t), _) => Some(t.as_millis() as u64),
            (None, Some(t)) if attempt == 1 => Some(t.as_millis() as u64),
            (None, Some(t)) => {
                Some((t.as_millis() as u64).saturating_sub(started.elapsed().as_millis() as u64))
            }
            (None, None) => None,
        };
        // Under max_stream_duration (Envoy's newer timeouts) a gRPC request is told its time
        // in grpc-timeout instead.
        match expected {
            Some(ms) if route.action.max_stream_duration.is_none() => {
                p.headers
                    .insert("x-envoy-expected-rq-timeout-ms", HeaderValue::from(ms));
            }
            Some(ms) if ms > 0 && p.headers.contains_key("grpc-timeout") => {
                if let Ok(v) = HeaderValue::from_str(&format!("{ms}m")) {
                    p.headers.insert("grpc-timeout", v);
                }
            }
            _ => {}
        }
        let b = match &buffered {
            Some(bytes) => super::full(bytes.clone()),
            None => body.take().unwrap_or_else(|| super::full(Bytes::new())),
        };
        let per_try = retries
            .per_try_timeout
            .map(|t| tokio::time::Instant::now() + t);
        let limit = match (deadline, per_try) {
            (Some(d), Some(p)) => Some(d.min(p)),
            (d, p) => d.or(p),
        };
        tracing::debug!(target: "router", connection = conn, stream = seed,
            "router decoding headers:\n{}",
            super::dump(
                &[
                    (":authority", host_header),
                    (":path", path),
                    (":method", p.method.as_str()),
                    (":scheme", "http"),
                ],
                &p.headers
            )
        );
        let result = attempt_once(
            server,
            cluster,
            &host,
            want,
            alpn.map(Vec::as_slice),
            &shape,
            Request::from_parts(p, b),
            limit,
            conn,
            seed,
        )
        .await;
        let global_expired = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        let retriable = match &result {
            Attempt::Response(r, ..) => retries.retriable_status(r.status().as_u16()),
            Attempt::ConnectFailed(ConnectError::Overflow | ConnectError::PendingOverflow, _) => {
                false
            }
            Attempt::ConnectFailed(ConnectError::NoHealthyHost, _) => false,
            Attempt::ConnectFailed(..) => retries.retriable_failure(true),
            Attempt::Reset(_) => retries.retriable_failure(false),
            Attempt::PerTryTimeout(_) => !global_expired && retries.retriable_failure(false),
        };
        if matches!(result, Attempt::PerTryTimeout(_)) && !global_expired {
            count("upstream_rq_per_try_timeout");
        }
        if !retriable || global_expired {
            break result;
        }
        if attempt > retries.max {
            count("upstream_rq_retry_limit_exceeded");
            flags.push("URX");
            break result;
        }
        if cluster.retries_active() >= cluster.thresholds[0].max_retries {
            count("upstream_rq_retry_overflow");
            flags.push("UO");
            break result;
        }
        if let Attempt::ConnectFailed(e, _) = &result {
            tracing::debug!(target: "router", connection = conn, "upstream attempt {attempt} failed: {e}: retrying");
        } else {
            tracing::debug!(target: "router", connection = conn, "performing retry");
        }
        drop(result);
        count("upstream_rq_retry");
        count("upstream_rq_retry_backoff_exponential");
        retry_guard = Some(cluster.start_retry());
        let wait = retries.backoff(attempt, seed);
        match deadline {
            Some(d) if tokio::time::Instant::now() + wait >= d => {
                tokio::time::sleep_until(d).await;
                break Attempt::PerTryTimeout(host);
            }
            _ => tokio::time::sleep(wait).await,
        }
        attempt += 1;
    };
    drop(retry_guard);
    let timed_out = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
    let failure = |status: u16,
                   body: &str,
                   flag: &'static str,
                   details: &str,
                   host: Option<&Arc<Host>>,
                   flags: &mut Vec<&'static str>| {
        // A retried request's reply says so.
        let body = if attempt > 1 {
            body.replace(
                "before headers. reset reason:",
                "before headers. retried and the latest reset reason:",
            )
        } else {
            body.to_string()
        };
        // The cluster counts the reply given in its name as it counts its upstream's.
        cluster.stats.response_code(&server.stats, &name, status);
        cluster.stats.upstream_rq_completed.inc();
        let mut o = Outcome::local(status, &body, None, details);
        // Flags in the order they were raised: URX before the last attempt's failure.
        flags.push(flag);
        o.flags = std::mem::take(flags);
        o.cluster = name.clone();
        o.upstream_host = host.map(|h| h.address.clone());
        o
    };
    match result {
        Attempt::Response(response, host, began, identity) => {
            if attempt > 1 && !retries.retriable_status(response.status().as_u16()) {
                count("upstream_rq_retry_success");
            }
            let status = response.status().as_u16();
            tracing::debug!(target: "router", connection = conn, stream = seed, "upstream headers complete: end_stream={}", hyper::body::Body::is_end_stream(response.body()));
            cluster.stats.response_code(&server.stats, &name, status);
            let (mut parts, body) = response.into_parts();
            // An upgrade's 101, or a CONNECT's 2xx, carries no service time (the stream goes
            // on as a tunnel).
            if status != 101 && !(connect && (200..300).contains(&status)) {
                if let Ok(v) = HeaderValue::from_str(&began.elapsed().as_millis().to_string()) {
                    parts.headers.insert("x-envoy-upstream-service-time", v);
                }
            }
            if route.include_attempt_count_in_response {
                parts.headers.insert("x-envoy-attempt-count", HeaderValue::from(attempt));
            }
            Outcome {
                response: Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed()),
                flags,
                details: "via_upstream".into(),
                cluster: name,
                upstream_host: Some(host.address.clone()),
                upstream_local: None,
                upstream_identity: identity,
                transport_failure: None,
                local_text: None,
                tunnel: None,
            }
        }
        Attempt::PerTryTimeout(host) if timed_out => {
            count("upstream_rq_timeout");
            tracing::debug!(target: "router", connection = conn, "upstream timeout");
            failure(504, "upstream request timeout", "UT", "upstream_response_timeout", Some(&host), &mut flags)
        }
        Attempt::PerTryTimeout(host) => {
            failure(504, "upstream request timeout", "UT", "upstream_per_try_timeout", Some(&host), &mut flags)
        }
        Attempt::Reset(host) => failure(
            503,
            "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
            "UC",
            "upstream_reset_before_response_started{connection_termination}",
            Some(&host),
            &mut flags,
        ),
        Attempt::ConnectFailed(e, host) => {
            let (status, body, flag, details) = failure_reply(&e);
            let mut o = failure(status, &body, flag, &details, host.as_ref(), &mut flags);
            // A circuit breaker's refusal says the cluster is overloaded.
            if matches!(e, ConnectError::Overflow | ConnectError::PendingOverflow) {
                o.response
                    .headers_mut()
                    .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
            }
            o
        }
    }
}

/// How a request is written for its upstream connection: the authority and path it goes to,
/// and whether HTTP/1.1 must say `content-length: 0`.
struct Shape<'a> {
    host_header: &'a str,
    path: &'a str,
    zero_length: bool,
}

impl Shape<'_> {
    fn apply(&self, req: Request<Body>, http2: bool, host: &Host) -> Request<Body> {
        let (mut parts, body) = req.into_parts();
        // A CONNECT names its authority, not a path.
        let connect = parts.method == hyper::Method::CONNECT;
        if http2 {
            parts.version = hyper::Version::HTTP_2;
            parts.headers.remove("host");
            let scheme = if host.transport.socket.ends_with("tls") {
                "https"
            } else {
                "http"
            };
            parts.uri = if connect {
                self.host_header.parse().unwrap_or_default()
            } else {
                format!("{scheme}://{}{}", self.host_header, self.path)
                    .parse()
                    .unwrap_or_default()
            };
        } else {
            parts.version = hyper::Version::HTTP_11;
            parts.uri = if connect {
                self.host_header.parse().unwrap_or_default()
            } else {
                self.path.parse().unwrap_or_default()
            };
            if let Ok(v) = HeaderValue::from_str(self.host_header) {
                parts.headers.insert("host", v);
            }
            if self.zero_length {
                parts
                    .headers
                    .insert("content-length", HeaderValue::from_static("0"));
            }
        }
        Request::from_parts(parts, body)
    }
}

/// One attempt: a connection from the host's pool, the request, its response headers (within
/// `limit`).
#[allow(clippy::too_many_arguments)]
async fn attempt_once(
    server: &Arc<Server>,
    cluster: &Arc<Cluster>,
    host: &Arc<Host>,
    want: Want,
    alpn: Option<&[Vec<u8>]>,
    shape: &Shape<'_>,
    req: Request<Body>,
    limit: Option<tokio::time::Instant>,
    conn: u64,
    stream: u64,
) -> Attempt {
    let began = Instant::now();
    // The route's (or try's) time runs from the start: waiting for a connection included.
    let connecting = connection(server, cluster, host, want, alpn, conn);
    let connected = match limit {
        Some(t) => match tokio::time::timeout_at(t, connecting).await {
            Ok(c) => c,
            Err(_) => return Attempt::PerTryTimeout(host.clone()),
        },
        None => connecting.await,
    };
    let sender = match connected {
        Ok(s) => s,
        Err(e) => return Attempt::ConnectFailed(e, Some(host.clone())),
    };
    let req = shape.apply(req, matches!(sender.send, Sending::Http2(_)), host);
    cluster.stats.upstream_rq_total.inc();
    host.stats.rq_total.fetch_add(1, Ordering::Relaxed);
    let active = Active::request(cluster, host);
    let upstream_id = sender.open.0.id;
    tracing::debug!(target: "router", connection = conn, stream = stream, "pool ready");
    tracing::debug!(target: "router", "Attached upstream connection [C{upstream_id}] to downstream connection [C{conn}]");
    let Sender { open, send } = sender;
    let send = async {
        match send {
            Sending::Http1(mut s) => {
                let r = s.send_request(req).await;
                (r, Some((open.0.clone(), s)), open)
            }
            Sending::Http2(mut s) => (s.send_request(req).await, None, open),
        }
    };
    let result = match limit {
        Some(t) => tokio::time::timeout_at(t, send).await.ok(),
        None => Some(send.await),
    };
    let key = (cluster.name.clone(), host.address.clone());
    match result {
        None => {
            drop(active);
            Attempt::PerTryTimeout(host.clone())
        }
        Some((Err(e), ..)) => {
            drop(active);
            tracing::debug!(target: "router", connection = conn, "upstream reset: {e}");
            Attempt::Reset(host.clone())
        }
        Some((Ok(r), sender, open)) => {
            cluster.stats.upstream_rq_completed.inc();
            // An HTTP/1.1 connection goes back to the pool once this response is done, unless
            // it has carried all it may (its pool closes it then).
            if let Some((c, mut s)) = sender {
                let pools = server.clone();
                let cluster = cluster.clone();
                tokio::spawn(async move {
                    if s.ready().await.is_ok()
                        && c.retired.load(Ordering::Relaxed) == 0
                        && !cluster.retired()
                    {
                        pools.http_pools.release(key, (c, s));
                    }
                });
            }
            let (parts, body) = r.into_parts();
            let identity = open.0.identity.clone();
            let body = OnEnd {
                inner: body,
                done: Some(Box::new(move || {
                    tracing::debug!(target: "client", connection = upstream_id, "response complete");
                    drop((active, open));
                })),
            };
            Attempt::Response(
                Response::from_parts(parts, body),
                host.clone(),
                began,
                identity,
            )
        }
    }
}

/// A request counted active (or pending) until it is dropped, also when the stream is given up
/// half way (a downstream timeout or reset).
enum Active {
    Request(Arc<Cluster>, Arc<Host>),
    Pending(Arc<Cluster>),
}

impl Active {
    fn request(cluster: &Arc<Cluster>, host: &Arc<Host>) -> Active {
        cluster.stats.upstream_rq_active.inc();
        host.stats.rq_active.fetch_add(1, Ordering::Relaxed);
        Active::Request(cluster.clone(), host.clone())
    }

    fn pending(cluster: &Arc<Cluster>) -> Active {
        cluster.stats.upstream_rq_pending_active.inc();
        Active::Pending(cluster.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        match self {
            Active::Request(c, h) => {
                c.stats.upstream_rq_active.dec();
                h.stats.rq_active.fetch_sub(1, Ordering::Relaxed);
            }
            Active::Pending(c) => c.stats.upstream_rq_pending_active.dec(),
        }
    }
}

/// A body that runs `done` once, when it ends or is dropped.
pub struct OnEnd {
    inner: Incoming,
    done: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Drop for OnEnd {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            d();
        }
    }
}

impl hyper::body::Body for OnEnd {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
