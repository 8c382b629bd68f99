//! The cluster manager: every cluster of the configuration with its hosts (from the shared
//! decision `pilotfish_decide::cluster::hosts`: inline, EDS, STRICT_DNS names; ORIGINAL_DST hosts
//! created on first use), the round-robin load balancer over the highest-priority level with
//! healthy hosts, the `max_connections` circuit breaker, and upstream connections (connect
//! timeout, `upstream_bind_config` source address) with Envoy's counters per cluster and host.

use crate::stats::{Stat, Store};
use crate::transport_socket::{self, UpstreamTls};
use pilotfish_api::pb::envoy::config::cluster::v3::Cluster as ClusterConfig;
use pilotfish_api::pb::envoy::config::core::v3::{transport_socket::ConfigType, TransportSocket};
use pilotfish_api::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
use pilotfish_config::resources::ResourceSet;
use pilotfish_decide::cluster::{hosts, UpstreamTransport};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpSocket;

/// A connection's byte stream, plaintext or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Counters Envoy keeps per host and shows in `/clusters`.
#[derive(Debug, Default)]
pub struct HostStats {
    pub cx_active: AtomicU64,
    pub cx_total: AtomicU64,
    pub cx_connect_fail: AtomicU64,
}

#[derive(Debug)]
pub struct Host {
    /// `ip:port` (for a DNS cluster's template, `name:port` as configured).
    pub address: String,
    /// The name a DNS cluster's host was resolved from (`/clusters` hostname).
    pub hostname: String,
    pub priority: u32,
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
    /// EDS health status: UNKNOWN, HEALTHY, UNHEALTHY, DRAINING, TIMEOUT, DEGRADED.
    pub health: String,
    pub weight: u32,
    pub transport: UpstreamTransport,
    pub stats: HostStats,
    /// Active health checking: failed (FAILED_ACTIVE_HC), and not checked yet
    /// (PENDING_ACTIVE_HC). A host of a health-checked cluster starts with both.
    pub active_hc_failed: AtomicBool,
    pub active_hc_pending: AtomicBool,
    /// Ejected by outlier detection (FAILED_OUTLIER_CHECK), and the detector's counts.
    pub ejected: AtomicBool,
    pub outlier: crate::outlier::Standing,
    /// ORIGINAL_DST: picked since the last cleanup.
    pub used: AtomicBool,
}

impl Host {
    /// A copy of this (DNS template) host at a resolved address.
    pub fn resolved_as(&self, address: String, hostname: &str) -> Host {
        Host {
            address,
            hostname: hostname.to_string(),
            priority: self.priority,
            region: self.region.clone(),
            zone: self.zone.clone(),
            sub_zone: self.sub_zone.clone(),
            health: self.health.clone(),
            weight: self.weight,
            transport: self.transport.clone(),
            stats: HostStats::default(),
            active_hc_failed: AtomicBool::new(self.active_hc_failed.load(Ordering::Relaxed)),
            active_hc_pending: AtomicBool::new(self.active_hc_pending.load(Ordering::Relaxed)),
            ejected: AtomicBool::new(false),
            outlier: Default::default(),
            used: AtomicBool::new(false),
        }
    }

    /// Healthy for load balancing: EDS status unknown or healthy, and not failed by active
    /// health checking.
    pub fn healthy(&self) -> bool {
        matches!(self.health.as_str(), "UNKNOWN" | "HEALTHY")
            && !self.active_hc_failed.load(Ordering::Relaxed)
            && !self.ejected()
    }

    pub fn ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }

    /// The `health_flags` of `/clusters`, in Envoy's order.
    pub fn health_flags(&self) -> String {
        let mut flags = String::new();
        if self.active_hc_failed.load(Ordering::Relaxed) {
            flags.push_str("/failed_active_hc");
        }
        if self.ejected() {
            flags.push_str("/failed_outlier_check");
        }
        match self.health.as_str() {
            "UNHEALTHY" | "TIMEOUT" => flags.push_str("/failed_eds_health"),
            "DEGRADED" => flags.push_str("/degraded_eds_health"),
            _ => {}
        }
        if self.active_hc_pending.load(Ordering::Relaxed) {
            flags.push_str("/pending_active_hc");
        }
        if self.health == "DRAINING" {
            flags.push_str("/eds_status_draining");
        }
        if flags.is_empty() {
            "healthy".into()
        } else {
            flags
        }
    }
}

/// How a host is picked among the eligible ones. RING_HASH and MAGLEV (consistent hashing) are
/// not implemented yet: named at start-up, and round robin used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest,
    Random,
}

impl LbPolicy {
    fn of(c: &ClusterConfig) -> LbPolicy {
        use pilotfish_api::pb::envoy::config::cluster::v3::cluster::LbPolicy as P;
        match P::try_from(c.lb_policy).unwrap_or(P::RoundRobin) {
            P::LeastRequest => LbPolicy::LeastRequest,
            P::Random => LbPolicy::Random,
            _ => LbPolicy::RoundRobin,
        }
    }
}

/// Envoy's default overprovisioning factor (1.4) and healthy panic threshold (50%).
const OVERPROVISIONING: u64 = 140;
const PANIC_THRESHOLD: u64 = 50;

/// The hosts Envoy's load balancer picks from: the priority level chosen by the priority load
/// (each level's health, overprovisioned by 1.4, spilling what it lacks to the next), and within
/// it the healthy hosts, or all of them when under the panic threshold.
pub fn eligible(hosts: &[Arc<Host>], random: u64) -> Vec<Arc<Host>> {
    let mut levels: std::collections::BTreeMap<u32, Vec<&Arc<Host>>> = Default::default();
    for h in hosts {
        levels.entry(h.priority).or_default().push(h);
    }
    let Some((&first, _)) = levels.iter().next() else {
        return vec![];
    };
    let health: Vec<(u32, u64)> = levels
        .iter()
        .map(|(p, hs)| {
            let healthy = hs.iter().filter(|h| h.healthy()).count() as u64;
            (*p, (OVERPROVISIONING * healthy / hs.len() as u64).min(100))
        })
        .collect();
    let total: u64 = health.iter().map(|(_, h)| h).sum::<u64>().min(100);
    // No healthy host anywhere: everything goes to the first level, in panic.
    let level = if let Some(total) = std::num::NonZeroU64::new(total) {
        let mut remaining = 100u64;
        let mut loads = vec![];
        for (p, h) in &health {
            let load = (h * 100 / total).min(remaining);
            remaining -= load;
            loads.push((*p, load));
        }
        // Rounding leftovers go to the first level with load.
        if remaining > 0 {
            if let Some(l) = loads.iter_mut().find(|(_, l)| *l > 0) {
                l.1 += remaining;
            }
        }
        let mut pick = random % 100;
        loads
            .iter()
            .find(|(_, l)| {
                if pick < *l {
                    true
                } else {
                    pick -= l;
                    false
                }
            })
            .map_or(first, |(p, _)| *p)
    } else {
        first
    };
    let hs = &levels[&level];
    let healthy: Vec<Arc<Host>> = hs
        .iter()
        .filter(|h| h.healthy())
        .map(|h| (*h).clone())
        .collect();
    let panic = total == 0 || (healthy.len() as u64 * 100) < PANIC_THRESHOLD * hs.len() as u64;
    if panic {
        hs.iter().map(|h| (*h).clone()).collect()
    } else {
        healthy
    }
}

pub struct ClusterStats {
    pub upstream_cx_total: Arc<Stat>,
    pub upstream_cx_active: Arc<Stat>,
    pub upstream_cx_connect_fail: Arc<Stat>,
    pub upstream_cx_connect_timeout: Arc<Stat>,
    pub upstream_cx_none_healthy: Arc<Stat>,
    pub upstream_cx_overflow: Arc<Stat>,
    pub upstream_cx_rx_bytes_total: Arc<Stat>,
    pub upstream_cx_tx_bytes_total: Arc<Stat>,
    pub upstream_cx_destroy: Arc<Stat>,
}

pub struct Cluster {
    pub name: String,
    /// STATIC, STRICT_DNS, LOGICAL_DNS, EDS, ORIGINAL_DST.
    pub kind: String,
    pub connect_timeout: Duration,
    pub source_address: Option<IpAddr>,
    pub max_connections: u64,
    pub lb_policy: LbPolicy,
    pub hosts: Mutex<Vec<Arc<Host>>>,
    rr: AtomicUsize,
    pub stats: ClusterStats,
    pub config: ClusterConfig,
    pub outlier: Option<crate::outlier::Detector>,
    /// For STRICT_DNS and LOGICAL_DNS: the configured endpoints, resolved into `hosts`.
    pub dns_templates: Vec<Arc<Host>>,
    /// Upstream TLS per transport socket (`default` or a transport_socket_matches name), built
    /// once; an error is said at start-up and closes the connections that need it.
    tls: HashMap<String, Result<Arc<UpstreamTls>, String>>,
}

/// Why no upstream connection was made.
#[derive(Debug)]
pub enum ConnectError {
    NoHealthyHost,
    Overflow,
    Timeout(String),
    Failed(String, std::io::Error),
    /// The host, and what went wrong in its TLS.
    Tls(String, String),
}

impl ConnectError {
    /// The host the failed attempt went to, when there was one (UPSTREAM_HOST).
    pub fn host(&self) -> Option<&str> {
        match self {
            ConnectError::Timeout(h) | ConnectError::Failed(h, _) | ConnectError::Tls(h, _) => {
                Some(h)
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::NoHealthyHost => write!(f, "no healthy host"),
            ConnectError::Overflow => write!(f, "max_connections reached (circuit breaker)"),
            ConnectError::Timeout(h) => write!(f, "connect to {h} timed out"),
            ConnectError::Failed(h, e) => write!(f, "connect to {h} failed: {e}"),
            ConnectError::Tls(h, e) => write!(f, "TLS to {h}: {e}"),
        }
    }
}

pub struct ClusterManager {
    pub clusters: Vec<Arc<Cluster>>,
    by_name: HashMap<String, usize>,
}

fn upstream_tls_context(ts: &TransportSocket) -> Option<UpstreamTlsContext> {
    match &ts.config_type {
        Some(ConfigType::TypedConfig(any)) => pilotfish_config::model::unpack(any),
        _ => None,
    }
}

fn make_host(h: &pilotfish_decide::cluster::Host, checked: bool) -> Arc<Host> {
    Arc::new(Host {
        address: h.address.clone(),
        hostname: String::new(),
        priority: h.priority,
        region: h.region.clone(),
        zone: h.zone.clone(),
        sub_zone: h.sub_zone.clone(),
        health: h.health.clone(),
        weight: h.weight.unwrap_or(1),
        transport: h.transport.clone(),
        stats: HostStats::default(),
        active_hc_failed: AtomicBool::new(checked),
        active_hc_pending: AtomicBool::new(checked),
        ejected: AtomicBool::new(false),
        outlier: Default::default(),
        used: AtomicBool::new(false),
    })
}

impl ClusterManager {
    pub fn new(set: &ResourceSet, stats: &Store) -> ClusterManager {
        let mut clusters = vec![];
        let mut by_name = HashMap::new();
        for r in &set.clusters {
            let c = &r.value;
            let d = hosts(set, c, None);
            let s = |n: &str| format!("cluster.{}.{n}", r.name);
            let max_connections = c
                .circuit_breakers
                .as_ref()
                .and_then(|cb| cb.thresholds.iter().find(|t| t.priority == 0))
                .and_then(|t| t.max_connections.as_ref())
                .map_or(1024, |v| v.value as u64);
            let mut cluster = Cluster {
                name: r.name.clone(),
                kind: d.kind.clone(),
                connect_timeout: crate::duration(
                    c.connect_timeout.as_ref(),
                    Duration::from_secs(5),
                ),
                source_address: d.source_address.as_deref().and_then(|a| a.parse().ok()),
                max_connections,
                lb_policy: LbPolicy::of(c),
                hosts: Mutex::new(
                    d.hosts
                        .iter()
                        .map(|h| make_host(h, !c.health_checks.is_empty()))
                        .collect(),
                ),
                rr: AtomicUsize::new(0),
                stats: ClusterStats {
                    upstream_cx_total: stats.counter(&s("upstream_cx_total")),
                    upstream_cx_active: stats.gauge(&s("upstream_cx_active")),
                    upstream_cx_connect_fail: stats.counter(&s("upstream_cx_connect_fail")),
                    upstream_cx_connect_timeout: stats.counter(&s("upstream_cx_connect_timeout")),
                    upstream_cx_none_healthy: stats.counter(&s("upstream_cx_none_healthy")),
                    upstream_cx_overflow: stats.counter(&s("upstream_cx_overflow")),
                    upstream_cx_rx_bytes_total: stats.counter(&s("upstream_cx_rx_bytes_total")),
                    upstream_cx_tx_bytes_total: stats.counter(&s("upstream_cx_tx_bytes_total")),
                    upstream_cx_destroy: stats.counter(&s("upstream_cx_destroy")),
                },
                config: c.clone(),
                outlier: c
                    .outlier_detection
                    .as_ref()
                    .map(|o| crate::outlier::Detector::new(&r.name, o, stats)),
                tls: HashMap::new(),
                dns_templates: vec![],
            };
            if crate::dns::is_dns(&cluster) {
                cluster.dns_templates = std::mem::take(&mut *cluster.hosts.lock().unwrap());
            }
            let mut tls = HashMap::new();
            let sockets = std::iter::once(("default".to_string(), c.transport_socket.as_ref()))
                .chain(
                    c.transport_socket_matches
                        .iter()
                        .map(|m| (m.name.clone(), m.transport_socket.as_ref())),
                );
            for (name, socket) in sockets {
                if let Some(ctx) = socket.and_then(upstream_tls_context) {
                    let built = transport_socket::upstream(set, &ctx).map(Arc::new);
                    if let Err(e) = &built {
                        tracing::warn!(target: "config", "cluster '{}': upstream TLS ({name}): {e}: connections that need it are closed", r.name);
                    }
                    tls.insert(name, built);
                }
            }
            cluster.tls = tls;
            by_name.insert(r.name.clone(), clusters.len());
            clusters.push(Arc::new(cluster));
        }
        ClusterManager { clusters, by_name }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.by_name.get(name).map(|&i| &self.clusters[i])
    }
}

/// An upstream connection; dropping it gives its slot back to the circuit breaker and the
/// host's and cluster's active counts.
pub struct Upstream {
    pub stream: Box<dyn Io>,
    /// The upstream connection's own address (UPSTREAM_LOCAL_ADDRESS).
    pub local: Option<SocketAddr>,
    pub host: Arc<Host>,
    pub cluster: Arc<Cluster>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.host.stats.cx_active.fetch_sub(1, Ordering::Relaxed);
        self.cluster.stats.upstream_cx_active.dec();
        self.cluster.stats.upstream_cx_destroy.inc();
    }
}

impl Cluster {
    /// The host for the next connection: ORIGINAL_DST's own host for the destination (created on
    /// first use), otherwise round robin over the first priority level that has healthy hosts.
    pub fn pick(&self, original_destination: SocketAddr, conn: u64) -> Option<Arc<Host>> {
        let mut hosts = self.hosts.lock().unwrap();
        if self.kind == "ORIGINAL_DST" {
            let addr = original_destination.to_string();
            if let Some(h) = hosts.iter().find(|h| h.address == addr) {
                h.used.store(true, Ordering::Relaxed);
                return Some(h.clone());
            }
            let transport =
                pilotfish_decide::cluster::transport_for(&self.config, None, &mut vec![]);
            let h = Arc::new(Host {
                address: addr.clone(),
                // Envoy names an original destination host by its cluster and address.
                hostname: format!("{}{addr}", self.name),
                priority: 0,
                region: String::new(),
                zone: String::new(),
                sub_zone: String::new(),
                health: "HEALTHY".into(),
                weight: 1,
                transport,
                stats: HostStats::default(),
                active_hc_failed: AtomicBool::new(false),
                active_hc_pending: AtomicBool::new(false),
                ejected: AtomicBool::new(false),
                outlier: Default::default(),
                used: AtomicBool::new(true),
            });
            tracing::debug!(target: "upstream", connection = conn, "Created host {}{addr} {addr}.", self.name);
            hosts.push(h.clone());
            return Some(h);
        }
        let candidates = eligible(&hosts, crate::random(conn));
        if candidates.is_empty() {
            return None;
        }
        let n = candidates.len();
        let i = match self.lb_policy {
            LbPolicy::RoundRobin => self.rr.fetch_add(1, Ordering::Relaxed) % n,
            LbPolicy::Random => (crate::random(conn ^ 0x5bd1) % n as u64) as usize,
            // Power of two choices: the less loaded of two random hosts.
            LbPolicy::LeastRequest => {
                let a = (crate::random(conn) % n as u64) as usize;
                let b = (crate::random(conn.rotate_left(17) ^ 0xa5a5) % n as u64) as usize;
                let load = |i: usize| candidates[i].stats.cx_active.load(Ordering::Relaxed);
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
        };
        Some(candidates[i].clone())
    }

    /// ORIGINAL_DST's cleanup: every `cleanup_interval` (5 s by default), hosts neither picked
    /// since the last round nor carrying a connection are removed.
    pub fn start_cleanup(self: &Arc<Self>) {
        if self.kind != "ORIGINAL_DST" {
            return;
        }
        let interval = crate::duration(
            self.config.cleanup_interval.as_ref(),
            Duration::from_secs(5),
        );
        let cluster = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let mut hosts = cluster.hosts.lock().unwrap();
                tracing::trace!(target: "upstream", "Cleaning up stale original dst hosts.");
                hosts.retain(|h| {
                    let keep = h.used.swap(false, Ordering::Relaxed)
                        || h.stats.cx_active.load(Ordering::Relaxed) > 0;
                    if !keep {
                        tracing::debug!(target: "upstream", "Removing stale host {}{}.", cluster.name, h.address);
                    }
                    keep
                });
            }
        });
    }

    /// Connects to a host of this cluster, as Envoy's TCP connection pool does.
    pub async fn connect(
        self: &Arc<Self>,
        original_destination: SocketAddr,
        conn: u64,
        upstream_id: u64,
    ) -> Result<Upstream, ConnectError> {
        if self.stats.upstream_cx_active.get() >= self.max_connections {
            self.stats.upstream_cx_overflow.inc();
            return Err(ConnectError::Overflow);
        }
        let Some(host) = self.pick(original_destination, conn) else {
            self.stats.upstream_cx_none_healthy.inc();
            return Err(ConnectError::NoHealthyHost);
        };
        let tls = match self.tls.get(&host.transport.matched) {
            Some(Ok(t)) => Some(t.clone()),
            Some(Err(e)) => return Err(ConnectError::Tls(host.address.clone(), e.clone())),
            None => None,
        };
        let addr = match host.address.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => match tokio::net::lookup_host(host.address.as_str()).await {
                Ok(mut addrs) => match addrs.next() {
                    Some(a) => a,
                    None => {
                        return Err(ConnectError::Failed(
                            host.address.clone(),
                            std::io::Error::other("name resolves to no address"),
                        ))
                    }
                },
                Err(e) => return Err(ConnectError::Failed(host.address.clone(), e)),
            },
        };
        tracing::debug!(target: "pool", connection = upstream_id, "connecting to {addr}");
        self.stats.upstream_cx_total.inc();
        host.stats.cx_total.fetch_add(1, Ordering::Relaxed);
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| ConnectError::Failed(host.address.clone(), e))?;
        if let Some(src) = self
            .source_address
            .filter(|s| s.is_ipv4() == addr.is_ipv4())
        {
            socket
                .bind(SocketAddr::new(src, 0))
                .map_err(|e| ConnectError::Failed(format!("{} (from {src})", host.address), e))?;
        }
        let fail = |e: ConnectError| {
            self.stats.upstream_cx_connect_fail.inc();
            host.stats.cx_connect_fail.fetch_add(1, Ordering::Relaxed);
            if let Some(d) = &self.outlier {
                let hosts = self.hosts.lock().unwrap().clone();
                d.connect_failure(&host, &hosts, conn);
            }
            e
        };
        let stream = match tokio::time::timeout(self.connect_timeout, socket.connect(addr)).await {
            Err(_) => {
                self.stats.upstream_cx_connect_timeout.inc();
                return Err(fail(ConnectError::Timeout(addr.to_string())));
            }
            Ok(Err(e)) => return Err(fail(ConnectError::Failed(addr.to_string(), e))),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        tracing::debug!(target: "connection", connection = upstream_id, "connected");
        if let Some(d) = &self.outlier {
            d.success(&host);
        }
        let stream: Box<dyn Io> = match tls {
            Some(t) => {
                let connector = tokio_rustls::TlsConnector::from(t.config.clone());
                match tokio::time::timeout(
                    self.connect_timeout,
                    connector.connect(t.server_name.clone(), stream),
                )
                .await
                {
                    Ok(Ok(s)) => {
                        tracing::debug!(target: "connection", connection = upstream_id, "TLS handshake complete");
                        Box::new(s)
                    }
                    Ok(Err(e)) => {
                        return Err(fail(ConnectError::Tls(addr.to_string(), e.to_string())))
                    }
                    Err(_) => {
                        return Err(fail(ConnectError::Tls(
                            addr.to_string(),
                            "handshake timed out".into(),
                        )))
                    }
                }
            }
            None => Box::new(stream),
        };
        self.stats.upstream_cx_active.inc();
        host.stats.cx_active.fetch_add(1, Ordering::Relaxed);
        Ok(Upstream {
            stream,
            local,
            host,
            cluster: self.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(port: u16, priority: u32, health: &str) -> Arc<Host> {
        Arc::new(Host {
            address: format!("127.0.0.1:{port}"),
            hostname: String::new(),
            priority,
            region: String::new(),
            zone: String::new(),
            sub_zone: String::new(),
            health: health.into(),
            weight: 1,
            transport: UpstreamTransport {
                matched: "default".into(),
                socket: "envoy.transport_sockets.raw_buffer".into(),
                sni: None,
                alpn: vec![],
            },
            stats: HostStats::default(),
            active_hc_failed: AtomicBool::new(false),
            active_hc_pending: AtomicBool::new(false),
            ejected: AtomicBool::new(false),
            outlier: Default::default(),
            used: AtomicBool::new(false),
        })
    }

    fn ports(hs: &[Arc<Host>]) -> Vec<String> {
        hs.iter().map(|h| h.address.clone()).collect()
    }

    #[test]
    fn priority_load_spills_over_and_panics_like_envoy() {
        // P0 fully healthy takes everything.
        let hs = vec![host(1, 0, "HEALTHY"), host(2, 1, "HEALTHY")];
        for r in 0..100 {
            assert_eq!(ports(&eligible(&hs, r)), ["127.0.0.1:1"]);
        }
        // P0 half healthy: 70% (0.5 x 1.4) stays in P0, 30% spills to P1; no panic at 50%.
        let hs = vec![
            host(1, 0, "HEALTHY"),
            host(2, 0, "UNHEALTHY"),
            host(3, 1, "HEALTHY"),
        ];
        let to_p0 = (0..100)
            .filter(|r| eligible(&hs, *r)[0].priority == 0)
            .count();
        assert_eq!(to_p0, 70);
        assert_eq!(ports(&eligible(&hs, 0)), ["127.0.0.1:1"]);
        // One of three healthy: under the 50% panic threshold, all three are used.
        let hs = vec![
            host(1, 0, "HEALTHY"),
            host(2, 0, "UNHEALTHY"),
            host(3, 0, "DRAINING"),
        ];
        assert_eq!(eligible(&hs, 0).len(), 3);
        // Nothing healthy anywhere: P0 in panic.
        let hs = vec![host(1, 0, "UNHEALTHY"), host(2, 1, "UNHEALTHY")];
        assert_eq!(ports(&eligible(&hs, 0)), ["127.0.0.1:1"]);
        assert!(eligible(&[], 0).is_empty());
    }
}
