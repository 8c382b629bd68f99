//! The `tcp_proxy` network filter: picks the cluster (`cluster`, or `weighted_clusters` by
//! weight), connects to one of its hosts (up to `max_connect_attempts`), then copies bytes both
//! ways until both sides are done or the connection is idle for `idle_timeout`.

use crate::server::Server;
use crate::stats::Stat;
use pilotfish_api::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use pilotfish_api::pb::envoy::r#type::v3::hash_policy::PolicySpecifier as HashPolicy;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

fn cluster_name(tcp: &TcpProxy, conn: u64) -> String {
    match &tcp.cluster_specifier {
        Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => c.clone(),
        Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
            let total: u64 = w.clusters.iter().map(|c| c.weight as u64).sum();
            if total == 0 {
                return String::new();
            }
            let mut pick = crate::random(conn) % total;
            for c in &w.clusters {
                if pick < c.weight as u64 {
                    return c.name.clone();
                }
                pick -= c.weight as u64;
            }
            String::new()
        }
        None => String::new(),
    }
}

/// A tcp_proxy filter as configured on one filter chain: built once at start-up, with its
/// counters and access logs, and shared by the chain's connections.
pub struct TcpProxyFilter {
    pub config: TcpProxy,
    stats: TcpStats,
    logs: Arc<Vec<crate::access_log::AccessLog>>,
    /// Istio's stats filter on the same chain.
    pub istio_stats: Option<crate::istio_stats::IstioStats>,
    /// Istio's TCP metadata exchange on the same chain: its protocol (ALPN).
    pub peer_exchange: Option<String>,
}

impl TcpProxyFilter {
    pub fn new(
        config: TcpProxy,
        stats: &crate::stats::Store,
        logs: Arc<Vec<crate::access_log::AccessLog>>,
    ) -> TcpProxyFilter {
        let s = |n: &str| format!("tcp.{}.{n}", config.stat_prefix);
        let stats = TcpStats {
            downstream_cx_total: stats.counter(&s("downstream_cx_total")),
            downstream_cx_no_route: stats.counter(&s("downstream_cx_no_route")),
            downstream_cx_rx_bytes_total: stats.counter(&s("downstream_cx_rx_bytes_total")),
            downstream_cx_tx_bytes_total: stats.counter(&s("downstream_cx_tx_bytes_total")),
            idle_timeout: stats.counter(&s("idle_timeout")),
        };
        TcpProxyFilter {
            config,
            stats,
            logs,
            istio_stats: None,
            peer_exchange: None,
        }
    }
}

struct TcpStats {
    downstream_cx_total: Arc<Stat>,
    downstream_cx_no_route: Arc<Stat>,
    downstream_cx_rx_bytes_total: Arc<Stat>,
    downstream_cx_tx_bytes_total: Arc<Stat>,
    idle_timeout: Arc<Stat>,
}

/// Runs tcp_proxy for a new connection. As in Envoy, the upstream connection starts at once,
/// while the downstream transport socket (a TLS handshake) is still getting ready: `downstream`
/// resolves to the ready stream, or None when its handshake failed.
/// The downstream connection, as access logs describe it.
pub struct Downstream {
    pub remote: SocketAddr,
    /// The destination (restored by original_dst).
    pub local: SocketAddr,
    pub server_name: Option<String>,
    /// The listener's `per_connection_buffer_limit_bytes`.
    pub buffer_limit: usize,
    /// The listener's drain (an update removed or replaced it) and how long a connection lasts
    /// once it has begun (`--drain-time-s`): then the connection is closed, as Envoy closes a
    /// drained listener's connections.
    pub drain: Option<crate::server::Drain>,
}

pub async fn run<S, F>(
    server: &Server,
    filter: &TcpProxyFilter,
    downstream: F,
    info: &Downstream,
    conn: u64,
    started: impl FnOnce(),
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    F: Future<Output = Option<(S, Option<Arc<crate::transport_socket::TlsInfo>>)>>,
{
    let (tcp, stats) = (&filter.config, &filter.stats);
    stats.downstream_cx_total.inc();
    let start = std::time::SystemTime::now();
    let began = std::time::Instant::now();
    let original_destination = info.local;
    let name = cluster_name(tcp, conn);
    let mut entry = crate::access_log::Entry::new(
        start,
        (info.remote, info.local),
        info.server_name.clone(),
        conn,
        pilotfish_api::pb::envoy::data::accesslog::v3::AccessLogType::TcpConnectionEnd,
    );
    entry.upstream_cluster = name.clone();
    let logs = &filter.logs;
    let log = |mut e: crate::access_log::Entry| {
        e.duration = began.elapsed();
        for l in logs.iter() {
            l.write(&e);
        }
    };
    // A connection that reaches no upstream counts in Istio's metrics too, opened and closed
    // with its flags.
    let unreached = |flags: &[&'static str]| {
        if let Some(s) = &filter.istio_stats {
            let r = crate::istio_stats::Report {
                cluster: &name,
                flags,
                ..Default::default()
            };
            s.tcp_opened(&r);
            s.tcp_closed(&r, 0, 0);
        }
    };
    let Some(cluster) = server.cluster(&name) else {
        tracing::debug!(target: "filter", connection = conn, "Cluster not found {name} and no on demand cluster set.");
        stats.downstream_cx_no_route.inc();
        started();
        entry.flags.push("NR");
        unreached(&entry.flags);
        log(entry);
        return;
    };
    tracing::debug!(target: "filter", connection = conn, "Creating connection to cluster {name}");
    let attempts = tcp
        .max_connect_attempts
        .as_ref()
        .map_or(1, |v| v.value.max(1));
    // Only `source_ip` gives a hash: pilotfish keeps no filter state objects, and Envoy picks
    // at random when the named object is absent.
    let hash = tcp
        .hash_policy
        .first()
        .and_then(|p| match p.policy_specifier {
            Some(HashPolicy::SourceIp(_)) => Some(crate::lb::source_ip_hash(info.remote.ip())),
            _ => None,
        });
    let mut connecting = std::pin::pin!(connect(
        server,
        &cluster,
        &name,
        attempts,
        original_destination,
        hash,
        conn
    ));
    // One poll runs the connection's start (host picked or created, "connecting"): Envoy logs
    // those before it logs the new downstream connection.
    let first = std::future::poll_fn(|cx| Poll::Ready(connecting.as_mut().poll(cx))).await;
    started();
    let upstream = async {
        match first {
            Poll::Ready(v) => v,
            Poll::Pending => connecting.await,
        }
    };
    let (upstream, downstream) = tokio::join!(upstream, downstream);
    let (mut up, up_id) = match upstream {
        Ok(u) => u,
        Err((e, connect_failed)) => {
            entry.upstream_host = e.as_ref().and_then(|e| e.host()).map(str::to_string);
            match e {
                Some(crate::cluster::ConnectError::Overflow) => entry.flags.push("UO"),
                Some(crate::cluster::ConnectError::NoHealthyHost) => entry.flags.push("UH"),
                // Connect attempts used up: Envoy flags a failed connection (a pool refusing
                // the attempt is not one) and the exhausted retries.
                _ => {
                    if connect_failed {
                        entry.flags.push("UF");
                    }
                    entry.flags.push("URX");
                    cluster.stats.upstream_cx_connect_attempts_exceeded.inc();
                }
            }
            unreached(&entry.flags);
            log(entry);
            return;
        }
    };
    entry.upstream_host = Some(up.host.address.clone());
    entry.upstream_local = up.local;
    let Some((downstream, tls)) = downstream else {
        log(entry);
        return;
    };
    let tls = tls.as_deref();
    let identity = up.identity.clone();
    // Istio's metadata exchange runs where the connection's ALPN is its protocol: toward the
    // client by the chain's filter, toward the upstream by the cluster's.
    let agreed = |filter: Option<&String>, alpn: Option<&[u8]>| {
        filter.is_some_and(|p| alpn == Some(p.as_bytes()))
    };
    let exchange_down = agreed(
        filter.peer_exchange.as_ref(),
        tls.and_then(|t| t.alpn.as_deref()),
    );
    let exchange_up = agreed(up.cluster.peer_exchange.as_ref(), up.alpn.as_deref());
    // What Istio's stats say of the connection; the peers' metadata as the exchange brings it
    // (downstream, upstream).
    let base = crate::istio_stats::Report::of_connection(tls, identity.as_deref(), &name);
    let peers: std::sync::Mutex<[Option<crate::peer_exchange::Peer>; 2]> = Default::default();
    let metadata = |peers: &[Option<crate::peer_exchange::Peer>; 2], i: usize| {
        peers[i].as_ref().and_then(|p| p.metadata.clone())
    };
    let opened = std::sync::atomic::AtomicBool::new(false);
    let open = |peers: &[Option<crate::peer_exchange::Peer>; 2]| {
        let Some(s) = &filter.istio_stats else {
            return;
        };
        if opened.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let (down, upstream_peer) = (metadata(peers, 0), metadata(peers, 1));
        s.tcp_opened(&crate::istio_stats::Report {
            downstream_peer: down.as_deref(),
            upstream_peer: upstream_peer.as_deref(),
            ..base.clone()
        });
    };
    // Opened is reported once the peer the stats report on is known (at once without an
    // exchange on that side).
    let inbound = filter
        .istio_stats
        .as_ref()
        .is_some_and(|s| s.reports_inbound());
    let waits = if inbound { exchange_down } else { exchange_up };
    if !waits {
        open(&peers.lock().unwrap());
    }
    let heard = |side: usize| {
        let (peers, open) = (&peers, &open);
        move |p: Option<crate::peer_exchange::Peer>| {
            let mut all = peers.lock().unwrap();
            all[side] = p;
            if (side == 0) == inbound {
                open(&all);
            }
        }
    };
    let frame = &server.peer_exchange_frame;
    let mut downstream: Box<dyn Stream + '_> = if exchange_down {
        Box::new(crate::peer_exchange::Exchange::new(
            downstream,
            crate::peer_exchange::Role::Server,
            frame.clone(),
            heard(0),
        ))
    } else {
        Box::new(downstream)
    };
    let mut upstream: Box<dyn Stream + '_> = if exchange_up {
        Box::new(crate::peer_exchange::Exchange::new(
            &mut up.stream,
            crate::peer_exchange::Role::Client,
            frame.clone(),
            heard(1),
        ))
    } else {
        Box::new(&mut up.stream)
    };
    // Envoy's default tcp_proxy idle timeout is an hour; zero turns it off.
    let idle = Some(crate::duration(
        tcp.idle_timeout.as_ref(),
        Duration::from_secs(3600),
    ))
    .filter(|d| !d.is_zero());
    let limits = (
        info.buffer_limit,
        crate::server::buffer_limit(up.cluster.config.per_connection_buffer_limit_bytes.as_ref()),
    );
    let drained = async {
        match info.drain.clone() {
            Some(mut drain) => {
                tokio::time::sleep_until(drain.began().await).await;
                tracing::debug!(target: "connection", connection = conn, "listener drained: closing");
            }
            None => std::future::pending().await,
        }
    };
    let (rx, tx, idled) = relay(&mut downstream, &mut upstream, idle, limits, drained).await;
    drop((downstream, upstream));
    stats.downstream_cx_rx_bytes_total.add(rx);
    stats.downstream_cx_tx_bytes_total.add(tx);
    up.cluster.stats.upstream_cx_tx_bytes_total.add(rx);
    up.cluster.stats.upstream_cx_rx_bytes_total.add(tx);
    if idled {
        stats.idle_timeout.inc();
        tracing::debug!(target: "filter", connection = conn, "Session timed out");
    }
    if let Some(s) = &filter.istio_stats {
        let peers = peers.lock().unwrap();
        open(&peers);
        let (down, upstream_peer) = (metadata(&peers, 0), metadata(&peers, 1));
        s.tcp_closed(
            &crate::istio_stats::Report {
                downstream_peer: down.as_deref(),
                upstream_peer: upstream_peer.as_deref(),
                ..base.clone()
            },
            tx,
            rx,
        );
    }
    entry.bytes_received = rx;
    entry.bytes_sent = tx;
    log(entry);
    tracing::debug!(target: "connection", connection = up_id, "closing socket: 0");
}

/// A stream either side of the relay may be: plain, TLS, or with Istio's exchange on it.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Up to `attempts` upstream connections, each to the host the load balancer picks.
async fn connect(
    server: &Server,
    cluster: &Arc<crate::cluster::Cluster>,
    name: &str,
    attempts: u32,
    original_destination: SocketAddr,
    hash: Option<u64>,
    conn: u64,
) -> Result<(crate::cluster::Upstream, u64), (Option<crate::cluster::ConnectError>, bool)> {
    use crate::cluster::ConnectError;
    let mut last = None;
    let mut connect_failed = false;
    for attempt in 1..=attempts {
        let id = server.next_connection_id();
        let ctx = crate::cluster::LbContext {
            original_destination,
            hash,
            conn,
            attempt,
        };
        match cluster.connect(&ctx, id).await {
            Ok(u) => {
                tracing::debug!(target: "filter", connection = conn, "TCP:onUpstreamEvent(), requestedServerName: ");
                return Ok((u, id));
            }
            Err(e) => {
                tracing::debug!(target: "filter", connection = conn, "upstream connection attempt {attempt} of {attempts} to cluster {name}: {e}");
                let stop = matches!(e, ConnectError::Overflow | ConnectError::NoHealthyHost);
                connect_failed |= matches!(
                    e,
                    ConnectError::Timeout(_) | ConnectError::Failed(..) | ConnectError::Tls(..)
                );
                last = Some(e);
                if stop {
                    break;
                }
            }
        }
    }
    Err((last, connect_failed))
}

/// The read size of a connection that is not moving a bulk transfer.
const SMALL_READ: usize = 64 * 1024;

/// Copies both ways, half-closing each side when the other finishes sending; returns the bytes
/// received from and sent to the downstream, and whether the idle timeout ended it. Each
/// direction runs on its own, so a peer that stops reading holds back only what flows to it;
/// what is read from a side and not yet written to the other never exceeds that side's
/// `per_connection_buffer_limit_bytes` (`limits`: downstream, upstream).
async fn relay<D: AsyncRead + AsyncWrite + Unpin, U: AsyncRead + AsyncWrite + Unpin>(
    down: &mut D,
    up: &mut U,
    idle: Option<Duration>,
    limits: (usize, usize),
    drained: impl Future<Output = ()>,
) -> (u64, u64, bool) {
    let (mut dr, mut dw) = tokio::io::split(down);
    let (mut ur, mut uw) = tokio::io::split(up);
    let start = tokio::time::Instant::now();
    let activity = AtomicU64::new(0);
    let (rx, tx) = (AtomicU64::new(0), AtomicU64::new(0));
    let both = async {
        let d2u = pump(&mut dr, &mut uw, limits.0, start, &activity, &rx);
        let u2d = pump(&mut ur, &mut dw, limits.1, start, &activity, &tx);
        tokio::pin!(d2u, u2d);
        let (mut d2u_done, mut u2d_done) = (false, false);
        // A failed write ends both directions; a side that finished sending waits for the other.
        while !(d2u_done && u2d_done) {
            tokio::select! {
                ok = &mut d2u, if !d2u_done => { if !ok { return; } d2u_done = true; }
                ok = &mut u2d, if !u2d_done => { if !ok { return; } u2d_done = true; }
            }
        }
    };
    let watchdog = async {
        let Some(idle) = idle else {
            return std::future::pending::<()>().await;
        };
        loop {
            let last = start + Duration::from_millis(activity.load(Ordering::Relaxed));
            if tokio::time::Instant::now() >= last + idle {
                return;
            }
            tokio::time::sleep_until(last + idle).await;
        }
    };
    let idled = tokio::select! {
        _ = both => false,
        _ = watchdog => true,
        _ = drained => false,
    };
    (rx.into_inner(), tx.into_inner(), idled)
}

/// One direction: reads at most `limit` bytes before writing them on.
async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    limit: usize,
    start: tokio::time::Instant,
    activity: &AtomicU64,
    bytes: &AtomicU64,
) -> bool {
    // Envoy reads what a socket holds, up to the buffer limit, before one write: on bulk
    // transfers the per-call cost of the system calls (and the peer's wakeups) is spread over
    // more bytes. The buffer grows while reads fill it and shrinks back when they stop doing
    // so, so a connection that once moved a burst does not keep a large buffer while quiet.
    let cap = limit.max(1);
    let small = cap.min(SMALL_READ);
    let mut buf = vec![0u8; small];
    let touch = || activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = w.shutdown().await;
                return true;
            }
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::Relaxed);
                touch();
                if w.write_all(&buf[..n]).await.is_err() {
                    return false;
                }
                touch();
                if n == buf.len() && buf.len() < cap {
                    buf.resize((buf.len() * 4).min(cap), 0);
                } else if n < small && buf.len() > small {
                    buf = vec![0u8; small];
                }
            }
        }
    }
}
