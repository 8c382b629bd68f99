//! The `tcp_proxy` network filter: picks the cluster (`cluster`, or `weighted_clusters` by
//! weight), connects to one of its hosts (up to `max_connect_attempts`), then copies bytes both
//! ways until both sides are done or the connection is idle for `idle_timeout`.

use crate::server::Server;
use crate::stats::Stat;
use pilotfish_api::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use std::future::Future;
use std::net::SocketAddr;
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
}

pub async fn run<S, F>(
    server: &Server,
    filter: &TcpProxyFilter,
    downstream: F,
    info: &Downstream,
    conn: u64,
    started: impl FnOnce(),
) where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = Option<S>>,
{
    let (tcp, stats) = (&filter.config, &filter.stats);
    stats.downstream_cx_total.inc();
    let start = std::time::SystemTime::now();
    let began = std::time::Instant::now();
    let original_destination = info.local;
    let name = cluster_name(tcp, conn);
    let mut entry = crate::access_log::Entry {
        start,
        duration: Duration::ZERO,
        bytes_received: 0,
        bytes_sent: 0,
        downstream_remote: info.remote,
        downstream_local: info.local,
        upstream_host: None,
        upstream_local: None,
        upstream_cluster: name.clone(),
        flags: vec![],
        server_name: info.server_name.clone(),
        connection_id: conn,
    };
    let logs = &filter.logs;
    let log = |mut e: crate::access_log::Entry| {
        e.duration = began.elapsed();
        for l in logs.iter() {
            l.write(&e);
        }
    };
    let Some(cluster) = server.clusters.get(&name) else {
        tracing::debug!(target: "filter", connection = conn, "Cluster not found {name} and no on demand cluster set.");
        stats.downstream_cx_no_route.inc();
        started();
        entry.flags.push("NR");
        log(entry);
        return;
    };
    tracing::debug!(target: "filter", connection = conn, "Creating connection to cluster {name}");
    let attempts = tcp
        .max_connect_attempts
        .as_ref()
        .map_or(1, |v| v.value.max(1));
    let mut connecting = std::pin::pin!(connect(
        server,
        cluster,
        &name,
        attempts,
        original_destination,
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
        Err(e) => {
            entry.upstream_host = e.as_ref().and_then(|e| e.host()).map(str::to_string);
            match e {
                Some(crate::cluster::ConnectError::Overflow) => entry.flags.push("UO"),
                Some(crate::cluster::ConnectError::NoHealthyHost) => entry.flags.push("UH"),
                // Connect attempts used up: Envoy flags the failure and the exhausted retries.
                _ => entry.flags.extend(["UF", "URX"]),
            }
            log(entry);
            return;
        }
    };
    entry.upstream_host = Some(up.host.address.clone());
    entry.upstream_local = up.local;
    let Some(mut downstream) = downstream else {
        log(entry);
        return;
    };
    // Envoy's default tcp_proxy idle timeout is an hour; zero turns it off.
    let idle = Some(crate::duration(
        tcp.idle_timeout.as_ref(),
        Duration::from_secs(3600),
    ))
    .filter(|d| !d.is_zero());
    let (rx, tx, idled) = relay(&mut downstream, &mut up.stream, idle).await;
    stats.downstream_cx_rx_bytes_total.add(rx);
    stats.downstream_cx_tx_bytes_total.add(tx);
    up.cluster.stats.upstream_cx_tx_bytes_total.add(rx);
    up.cluster.stats.upstream_cx_rx_bytes_total.add(tx);
    if idled {
        stats.idle_timeout.inc();
        tracing::debug!(target: "filter", connection = conn, "Session timed out");
    }
    entry.bytes_received = rx;
    entry.bytes_sent = tx;
    log(entry);
    tracing::debug!(target: "connection", connection = up_id, "closing socket: 0");
}

/// Up to `attempts` upstream connections, each to the host the load balancer picks.
async fn connect(
    server: &Server,
    cluster: &Arc<crate::cluster::Cluster>,
    name: &str,
    attempts: u32,
    original_destination: SocketAddr,
    conn: u64,
) -> Result<(crate::cluster::Upstream, u64), Option<crate::cluster::ConnectError>> {
    let mut last = None;
    for attempt in 1..=attempts {
        let id = server.next_connection_id();
        match cluster.connect(original_destination, conn, id).await {
            Ok(u) => {
                tracing::debug!(target: "filter", connection = conn, "TCP:onUpstreamEvent(), requestedServerName: ");
                return Ok((u, id));
            }
            Err(e) => {
                tracing::debug!(target: "filter", connection = conn, "upstream connection attempt {attempt} of {attempts} to cluster {name}: {e}");
                let stop = matches!(
                    e,
                    crate::cluster::ConnectError::Overflow
                        | crate::cluster::ConnectError::NoHealthyHost
                );
                last = Some(e);
                if stop {
                    break;
                }
            }
        }
    }
    Err(last)
}

/// Copies both ways, half-closing each side when the other finishes sending; returns the bytes
/// received from and sent to the downstream, and whether the idle timeout ended it.
async fn relay<D: AsyncRead + AsyncWrite + Unpin, U: AsyncRead + AsyncWrite + Unpin>(
    down: &mut D,
    up: &mut U,
    idle: Option<Duration>,
) -> (u64, u64, bool) {
    let (mut dr, mut dw) = tokio::io::split(down);
    let (mut ur, mut uw) = tokio::io::split(up);
    let mut b1 = vec![0u8; 16 * 1024];
    let mut b2 = vec![0u8; 16 * 1024];
    let (mut rx, mut tx) = (0u64, 0u64);
    let (mut down_open, mut up_open) = (true, true);
    let far = Duration::from_secs(365 * 24 * 3600);
    let sleep = tokio::time::sleep(idle.unwrap_or(far));
    tokio::pin!(sleep);
    while down_open || up_open {
        tokio::select! {
            r = dr.read(&mut b1), if down_open => match r {
                Ok(0) | Err(_) => { down_open = false; let _ = uw.shutdown().await; }
                Ok(n) => {
                    rx += n as u64;
                    if uw.write_all(&b1[..n]).await.is_err() { break; }
                }
            },
            r = ur.read(&mut b2), if up_open => match r {
                Ok(0) | Err(_) => { up_open = false; let _ = dw.shutdown().await; }
                Ok(n) => {
                    tx += n as u64;
                    if dw.write_all(&b2[..n]).await.is_err() { break; }
                }
            },
            _ = &mut sleep => return (rx, tx, true),
        }
        sleep
            .as_mut()
            .reset(tokio::time::Instant::now() + idle.unwrap_or(far));
    }
    (rx, tx, false)
}
