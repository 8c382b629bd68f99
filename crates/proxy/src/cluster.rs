//! The cluster manager: every cluster of the configuration with its hosts (from the shared
//! decision `pilotfish_decide::cluster::hosts`: inline, EDS, STRICT_DNS names; ORIGINAL_DST hosts
//! created on first use), its load balancer (`lb`), its circuit breakers and their gauges, and
//! upstream connections (connect timeout, `upstream_bind_config` source address, TLS) with
//! Envoy's counters per cluster and host.

use crate::stats::{Stat, Store};
use crate::transport_socket::{self, UpstreamTls};
use pilotfish_api::pb::envoy::config::cluster::v3::Cluster as ClusterConfig;
use pilotfish_api::pb::envoy::config::core::v3::{transport_socket::ConfigType, TransportSocket};
use pilotfish_api::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
use pilotfish_config::resources::ResourceSet;
use pilotfish_decide::cluster::{hosts, UpstreamTransport};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    pub rq_total: AtomicU64,
    pub rq_active: AtomicU64,
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
    /// The locality's weight (locality weighted load balancing).
    pub locality_weight: Option<u32>,
    /// `envoy.lb` metadata `hash_key`, placing the host on hash rings instead of its address.
    pub hash_key: Option<String>,
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
            locality_weight: self.locality_weight,
            hash_key: self.hash_key.clone(),
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
    pub upstream_cx_connect_attempts_exceeded: Arc<Stat>,
    pub upstream_rq_total: Arc<Stat>,
    pub upstream_rq_active: Arc<Stat>,
    pub upstream_rq_pending_total: Arc<Stat>,
    pub upstream_rq_pending_active: Arc<Stat>,
    pub upstream_rq_pending_overflow: Arc<Stat>,
    pub upstream_rq_completed: Arc<Stat>,
    /// `upstream_rq_<code>` and `upstream_rq_<N>xx` by response code, made on first use.
    upstream_rq_codes: Mutex<HashMap<u16, [Arc<Stat>; 2]>>,
}

impl ClusterStats {
    /// The response a request ends with (the upstream's, or a local reply given in the
    /// cluster's name), counted under its code and its class.
    pub fn response_code(&self, stats: &Store, cluster: &str, status: u16) {
        let [code, class] = self
            .upstream_rq_codes
            .lock()
            .unwrap()
            .entry(status)
            .or_insert_with(|| {
                [
                    stats.counter(&format!("cluster.{cluster}.upstream_rq_{status}")),
                    stats.counter(&format!("cluster.{cluster}.upstream_rq_{}xx", status / 100)),
                ]
            })
            .clone();
        code.inc();
        class.inc();
    }
}

/// One priority's circuit breaker thresholds, Envoy's defaults where unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub max_connections: u64,
    pub max_pending_requests: u64,
    pub max_requests: u64,
    pub max_retries: u64,
}

impl Thresholds {
    /// DEFAULT (0) and HIGH (1) priority thresholds of a cluster.
    fn of(c: &ClusterConfig) -> [Thresholds; 2] {
        [0, 1].map(|priority| {
            let t = c
                .circuit_breakers
                .as_ref()
                .and_then(|cb| cb.thresholds.iter().find(|t| t.priority == priority));
            let v = |f: fn(
                &pilotfish_api::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds,
            )
                -> Option<&pilotfish_api::pb::google::protobuf::UInt32Value>,
                     d: u64| { t.and_then(f).map_or(d, |v| v.value as u64) };
            Thresholds {
                max_connections: v(|t| t.max_connections.as_ref(), 1024),
                max_pending_requests: v(|t| t.max_pending_requests.as_ref(), 1024),
                max_requests: v(|t| t.max_requests.as_ref(), 1024),
                max_retries: v(|t| t.max_retries.as_ref(), 3),
            }
        })
    }
}

/// The circuit breakers' gauges (`circuit_breakers.default.cx_open`, and with
/// `track_remaining` the `remaining_*` ones), kept current as connections come and go.
pub struct BreakerStats {
    cx_open: Arc<Stat>,
    rq_pending_open: Arc<Stat>,
    rq_open: Arc<Stat>,
    remaining: Option<[Arc<Stat>; 3]>,
}

pub struct Cluster {
    pub name: String,
    /// STATIC, STRICT_DNS, LOGICAL_DNS, EDS, ORIGINAL_DST.
    pub kind: String,
    pub connect_timeout: Duration,
    pub source_address: Option<IpAddr>,
    /// Circuit breaker thresholds, DEFAULT and HIGH priority; connections use DEFAULT.
    pub thresholds: [Thresholds; 2],
    breakers: BreakerStats,
    /// Retries under way (the `max_retries` circuit breaker).
    retries: AtomicU64,
    pub lb: crate::lb::LoadBalancer,
    pub hosts: Mutex<Vec<Arc<Host>>>,
    pub stats: ClusterStats,
    pub config: ClusterConfig,
    pub outlier: Option<crate::outlier::Detector>,
    /// For STRICT_DNS and LOGICAL_DNS: the configured endpoints, resolved into `hosts`.
    pub dns_templates: Vec<Arc<Host>>,
    /// The protocol (ALPN) of Istio's TCP metadata exchange among its upstream filters
    /// (`filters`), read once.
    pub peer_exchange: Option<String>,
    /// Upstream TLS per transport socket (`default` or a transport_socket_matches name), built
    /// once; an error is said at start-up and closes the connections that need it.
    tls: HashMap<String, Result<Arc<UpstreamTls>, String>>,
    /// The cluster's HTTP protocol options, read once, when it first carries a request.
    pub(crate) http: std::sync::OnceLock<crate::http::upstream::UpstreamHttp>,
    /// Removed or replaced by an update: its health checks, DNS refresh and cleanup stop, and
    /// its upstream connections are not pooled again; requests under way finish on it.
    retired: AtomicBool,
}

/// Why no upstream connection was made.
#[derive(Debug)]
pub enum ConnectError {
    NoHealthyHost,
    /// `max_connections` reached.
    Overflow,
    /// `max_pending_requests` reached: the pool refuses the attempt.
    PendingOverflow,
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
            ConnectError::PendingOverflow => {
                write!(f, "max_pending_requests reached (circuit breaker)")
            }
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

/// What an update did to the clusters: the ones made new (their health checks, DNS and cleanup
/// to be started) and the ones it retired (removed, or replaced by a changed configuration).
#[derive(Default)]
pub struct ClusterChanges {
    pub added: Vec<Arc<Cluster>>,
    pub retired: Vec<Arc<Cluster>>,
    /// Same configuration, endpoints changed in place.
    pub endpoints_changed: Vec<String>,
}

/// The endpoints as the cluster has them, in the same order.
fn same_hosts(current: &[Arc<Host>], hosts: &[pilotfish_decide::cluster::Host]) -> bool {
    current.len() == hosts.len() && current.iter().zip(hosts).all(|(o, n)| same_host(o, n))
}

/// An endpoint as the cluster had it: same address and the same attributes.
fn same_host(old: &Host, new: &pilotfish_decide::cluster::Host) -> bool {
    old.address == new.address
        && old.hostname == new.hostname
        && old.priority == new.priority
        && (&old.region, &old.zone, &old.sub_zone) == (&new.region, &new.zone, &new.sub_zone)
        && old.health == new.health
        && old.weight == new.weight.unwrap_or(1)
        && old.locality_weight == new.locality_weight
        && old.hash_key == new.hash_key
        && old.transport == new.transport
}

pub(crate) fn upstream_tls_context(ts: &TransportSocket) -> Option<UpstreamTlsContext> {
    match &ts.config_type {
        Some(ConfigType::TypedConfig(any)) => pilotfish_config::model::unpack(any),
        _ => None,
    }
}

fn make_host(h: &pilotfish_decide::cluster::Host, checked: bool) -> Arc<Host> {
    Arc::new(Host {
        address: h.address.clone(),
        hostname: h.hostname.clone(),
        priority: h.priority,
        region: h.region.clone(),
        zone: h.zone.clone(),
        sub_zone: h.sub_zone.clone(),
        health: h.health.clone(),
        weight: h.weight.unwrap_or(1),
        locality_weight: h.locality_weight,
        hash_key: h.hash_key.clone(),
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
        Self::update(set, stats, None, &[]).0
    }

    /// The clusters of `set`. With the manager it replaces, a cluster whose configuration is
    /// unchanged is kept (its hosts' health, stats and connections with it; EDS changes are
    /// applied to its hosts in place, as Envoy updates a cluster's host set); a changed one is
    /// made anew, as Envoy warms a new cluster and retires the old.
    pub fn update(
        set: &ResourceSet,
        stats: &Store,
        previous: Option<&ClusterManager>,
        rotated_secrets: &[&str],
    ) -> (ClusterManager, ClusterChanges) {
        let mut clusters = vec![];
        let mut by_name = HashMap::new();
        let mut changes = ClusterChanges::default();
        // Across clusters: Istio's clusters differ mostly by SNI.
        let mut tls_cache = transport_socket::UpstreamTlsCache::default();
        for r in &set.clusters {
            let c = &r.value;
            let d = hosts(set, c, None);
            let kept = previous
                .and_then(|p| p.get(&r.name))
                .filter(|old| old.config == *c)
                .filter(|old| old.keep_with(d.hosts.as_slice()))
                // A rotated secret remakes the cluster: its pooled connections finish on the
                // old certificate, new ones use the new.
                .filter(|_| {
                    !crate::server::uses_secret(
                        pilotfish_config::model::cluster_transport_sockets(c),
                        rotated_secrets,
                    )
                });
            if let Some(old) = kept {
                if old.replace_hosts(&d.hosts) {
                    changes.endpoints_changed.push(r.name.clone());
                }
                by_name.insert(r.name.clone(), clusters.len());
                clusters.push(old.clone());
                continue;
            }
            let s = |n: &str| format!("cluster.{}.{n}", r.name);
            let thresholds = Thresholds::of(c);
            let track_remaining = c
                .circuit_breakers
                .as_ref()
                .and_then(|cb| cb.thresholds.iter().find(|t| t.priority == 0))
                .is_some_and(|t| t.track_remaining);
            let b = |n: &str| stats.gauge(&s(&format!("circuit_breakers.default.{n}")));
            // HIGH priority carries no connection here: its gauges stay at rest.
            for n in [
                "cx_open",
                "cx_pool_open",
                "rq_pending_open",
                "rq_open",
                "rq_retry_open",
            ] {
                stats.gauge(&s(&format!("circuit_breakers.high.{n}")));
            }
            // Envoy's cluster counters exist from the start, at 0.
            for n in [
                "upstream_rq_timeout",
                "upstream_rq_per_try_timeout",
                "upstream_rq_retry",
                "upstream_rq_retry_success",
                "upstream_rq_retry_overflow",
                "upstream_rq_retry_limit_exceeded",
                "upstream_rq_cancelled",
                "upstream_rq_rx_reset",
                "upstream_rq_tx_reset",
                "upstream_cx_http1_total",
                "upstream_cx_http2_total",
                "upstream_cx_protocol_error",
            ] {
                stats.counter(&s(n));
            }
            let breakers = BreakerStats {
                cx_open: b("cx_open"),
                rq_pending_open: b("rq_pending_open"),
                rq_open: b("rq_open"),
                remaining: track_remaining
                    .then(|| [b("remaining_cx"), b("remaining_pending"), b("remaining_rq")]),
            };
            b("cx_pool_open");
            b("rq_retry_open");
            if track_remaining {
                b("remaining_retries").set(thresholds[0].max_retries);
            }
            let mut cluster = Cluster {
                name: r.name.clone(),
                kind: d.kind.clone(),
                connect_timeout: crate::duration(
                    c.connect_timeout.as_ref(),
                    Duration::from_secs(5),
                ),
                source_address: d.source_address.as_deref().and_then(|a| a.parse().ok()),
                thresholds,
                breakers,
                retries: AtomicU64::new(0),
                http: std::sync::OnceLock::new(),
                retired: AtomicBool::new(false),
                lb: crate::lb::LoadBalancer::of(c),
                hosts: Mutex::new(
                    d.hosts
                        .iter()
                        .map(|h| make_host(h, !c.health_checks.is_empty()))
                        .collect(),
                ),
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
                    upstream_cx_connect_attempts_exceeded: stats
                        .counter(&s("upstream_cx_connect_attempts_exceeded")),
                    upstream_rq_total: stats.counter(&s("upstream_rq_total")),
                    upstream_rq_active: stats.gauge(&s("upstream_rq_active")),
                    upstream_rq_pending_total: stats.counter(&s("upstream_rq_pending_total")),
                    upstream_rq_pending_active: stats.gauge(&s("upstream_rq_pending_active")),
                    upstream_rq_pending_overflow: stats.counter(&s("upstream_rq_pending_overflow")),
                    upstream_rq_completed: stats.counter(&s("upstream_rq_completed")),
                    upstream_rq_codes: Mutex::default(),
                },
                config: c.clone(),
                outlier: c
                    .outlier_detection
                    .as_ref()
                    .map(|o| crate::outlier::Detector::new(&r.name, o, stats)),
                tls: HashMap::new(),
                dns_templates: vec![],
                peer_exchange: c
                    .filters
                    .iter()
                    .find_map(|f| crate::peer_exchange::configured(f.typed_config.as_ref()?)),
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
            // An HTTP cluster on auto_config offers h2 and http/1.1 where its TLS names none,
            // and speaks what the host picks.
            let auto = crate::http::upstream::UpstreamHttp::of(&cluster).auto();
            for (name, socket) in sockets {
                if let Some(ctx) = socket.and_then(upstream_tls_context) {
                    let built = tls_cache.get(set, &ctx, auto).map(Arc::new);
                    if let Err(e) = &built {
                        tracing::warn!(target: "config", "cluster '{}': upstream TLS ({name}): {e}: connections that need it are closed", r.name);
                    }
                    tls.insert(name, built);
                }
            }
            cluster.tls = tls;
            // As in Envoy, the open gauges move with the counts (they start closed even at a
            // zero limit) and the remaining ones start at the limits.
            if let Some(r) = &cluster.breakers.remaining {
                let t = cluster.thresholds[0];
                for (g, v) in
                    r.iter()
                        .zip([t.max_connections, t.max_pending_requests, t.max_requests])
                {
                    g.set(v);
                }
            }
            by_name.insert(r.name.clone(), clusters.len());
            let cluster = Arc::new(cluster);
            changes.added.push(cluster.clone());
            clusters.push(cluster);
        }
        if let Some(p) = previous {
            for old in &p.clusters {
                let same = by_name
                    .get(&old.name)
                    .is_some_and(|&i| Arc::ptr_eq(&clusters[i], old));
                if !same {
                    old.retired.store(true, Ordering::Relaxed);
                    changes.retired.push(old.clone());
                }
            }
        }
        (ClusterManager { clusters, by_name }, changes)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.by_name.get(name).map(|&i| &self.clusters[i])
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

/// A retry under way, counted against `max_retries` while it lives.
pub struct RetryGuard<'a>(&'a Cluster);

impl Drop for RetryGuard<'_> {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the load balancer knows about the connection it picks a host for.
pub struct LbContext {
    /// The downstream connection's destination (ORIGINAL_DST's host).
    pub original_destination: SocketAddr,
    /// The hash policy's hash, for RING_HASH and MAGLEV.
    pub hash: Option<u64>,
    pub conn: u64,
    /// Which connect attempt this is (1 for the first).
    pub attempt: u32,
}

/// An upstream connection; dropping it gives its slot back to the circuit breaker and the
/// host's and cluster's active counts.
pub struct Upstream {
    pub stream: Box<dyn Io>,
    /// The protocol the host picked by ALPN, over TLS.
    pub alpn: Option<Vec<u8>>,
    /// Over TLS: whose certificates the two sides showed.
    pub identity: Option<Arc<crate::transport_socket::UpstreamIdentity>>,
    /// The upstream connection's own address (UPSTREAM_LOCAL_ADDRESS).
    pub local: Option<SocketAddr>,
    pub host: Arc<Host>,
    pub cluster: Arc<Cluster>,
    /// A TCP pool's connection carries one request (tcp_proxy's stream) for its whole life;
    /// HTTP counts its requests itself.
    carries_request: bool,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.host.stats.cx_active.fetch_sub(1, Ordering::Relaxed);
        self.cluster.stats.upstream_cx_active.dec();
        if self.carries_request {
            self.host.stats.rq_active.fetch_sub(1, Ordering::Relaxed);
            self.cluster.stats.upstream_rq_active.dec();
        }
        self.cluster.stats.upstream_cx_destroy.inc();
        self.cluster.update_breakers();
    }
}

// An upstream is its stream: HTTP codecs own it, and dropping them closes and counts it.
impl AsyncRead for Upstream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Cluster {
    /// The host for the next connection: ORIGINAL_DST's own host for the destination (created on
    /// first use), otherwise the load balancer's pick.
    pub fn pick(&self, ctx: &LbContext) -> Option<Arc<Host>> {
        let mut hosts = self.hosts.lock().unwrap();
        if self.kind == "ORIGINAL_DST" {
            let addr = ctx.original_destination.to_string();
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
                locality_weight: None,
                hash_key: None,
                transport,
                stats: HostStats::default(),
                active_hc_failed: AtomicBool::new(false),
                active_hc_pending: AtomicBool::new(false),
                ejected: AtomicBool::new(false),
                outlier: Default::default(),
                used: AtomicBool::new(true),
            });
            // Envoy's line names no connection: the host belongs to the cluster.
            tracing::debug!(target: "upstream", "Created host {}{addr} {addr}.", self.name);
            hosts.push(h.clone());
            return Some(h);
        }
        let random = crate::random(ctx.conn ^ ((ctx.attempt as u64) << 40));
        self.lb.choose(&hosts, ctx.hash, random)
    }

    /// Removed or replaced by an update.
    pub fn retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Whether an update with the same configuration keeps this cluster: DNS and ORIGINAL_DST
    /// clusters make their own hosts, and a health-checked cluster whose endpoints changed is
    /// made anew so each new host gets its checks.
    fn keep_with(&self, hosts: &[pilotfish_decide::cluster::Host]) -> bool {
        if crate::dns::is_dns(self)
            || self.kind == "ORIGINAL_DST"
            || self.config.health_checks.is_empty()
        {
            return true;
        }
        same_hosts(&self.hosts.lock().unwrap(), hosts)
    }

    /// The endpoints of an update, in place: hosts already known are kept (their stats,
    /// outlier standing and connections); returns whether anything changed.
    fn replace_hosts(&self, hosts: &[pilotfish_decide::cluster::Host]) -> bool {
        if crate::dns::is_dns(self) || self.kind == "ORIGINAL_DST" {
            return false;
        }
        let mut current = self.hosts.lock().unwrap();
        if same_hosts(&current, hosts) {
            return false;
        }
        let checked = !self.config.health_checks.is_empty();
        let next = hosts
            .iter()
            .map(|n| {
                current
                    .iter()
                    .find(|o| same_host(o, n))
                    .cloned()
                    .unwrap_or_else(|| make_host(n, checked))
            })
            .collect();
        *current = next;
        true
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
                if cluster.retired() {
                    return;
                }
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
        ctx: &LbContext,
        upstream_id: u64,
    ) -> Result<Upstream, ConnectError> {
        let conn = ctx.conn;
        let limits = self.thresholds[0];
        if self.stats.upstream_cx_active.get() >= limits.max_connections {
            self.stats.upstream_cx_overflow.inc();
            return Err(ConnectError::Overflow);
        }
        let Some(host) = self.pick(ctx) else {
            self.stats.upstream_cx_none_healthy.inc();
            return Err(ConnectError::NoHealthyHost);
        };
        // As in Envoy's connection pool, the attempt waits as a pending request until its
        // connection is up.
        if self.stats.upstream_rq_pending_active.get() >= limits.max_pending_requests {
            self.stats.upstream_rq_pending_overflow.inc();
            return Err(ConnectError::PendingOverflow);
        }
        self.stats.upstream_rq_pending_total.inc();
        self.stats.upstream_rq_pending_active.inc();
        self.update_breakers();
        let mut result = self.connect_to(host, conn, upstream_id, None).await;
        self.stats.upstream_rq_pending_active.dec();
        if let Ok(u) = &mut result {
            u.carries_request = true;
            self.stats.upstream_rq_total.inc();
            self.stats.upstream_rq_active.inc();
            u.host.stats.rq_total.fetch_add(1, Ordering::Relaxed);
            u.host.stats.rq_active.fetch_add(1, Ordering::Relaxed);
        }
        self.update_breakers();
        result
    }

    pub fn retries_active(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// A retry starts; it ends when the guard is dropped.
    pub fn start_retry(&self) -> RetryGuard<'_> {
        self.retries.fetch_add(1, Ordering::Relaxed);
        RetryGuard(self)
    }

    fn update_breakers(&self) {
        let l = self.thresholds[0];
        let b = &self.breakers;
        let cx = self.stats.upstream_cx_active.get();
        let pending = self.stats.upstream_rq_pending_active.get();
        let rq = self.stats.upstream_rq_active.get();
        b.cx_open.set((cx >= l.max_connections) as u64);
        b.rq_pending_open
            .set((pending >= l.max_pending_requests) as u64);
        b.rq_open.set((rq >= l.max_requests) as u64);
        if let Some([rcx, rpending, rrq]) = &b.remaining {
            rcx.set(l.max_connections.saturating_sub(cx));
            rpending.set(l.max_pending_requests.saturating_sub(pending));
            rrq.set(l.max_requests.saturating_sub(rq));
        }
    }

    /// A connection for a host's HTTP pool, which has waited its turn under max_connections
    /// already: over the limit (a host without connections) it counts the overflow and
    /// connects all the same.
    /// `alpn`: the protocols to offer over TLS instead of the cluster's (Istio's ALPN filter).
    pub async fn connect_host_anyway(
        self: &Arc<Self>,
        host: Arc<Host>,
        conn: u64,
        upstream_id: u64,
        alpn: Option<&[Vec<u8>]>,
    ) -> Result<Upstream, ConnectError> {
        if self.stats.upstream_cx_active.get() >= self.thresholds[0].max_connections {
            self.stats.upstream_cx_overflow.inc();
        }
        let result = self.connect_to(host, conn, upstream_id, alpn).await;
        self.update_breakers();
        result
    }

    async fn connect_to(
        self: &Arc<Self>,
        host: Arc<Host>,
        conn: u64,
        upstream_id: u64,
        offer: Option<&[Vec<u8>]>,
    ) -> Result<Upstream, ConnectError> {
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
        let mut alpn = None;
        let mut identity = None;
        let stream: Box<dyn Io> = match tls {
            Some(t) => {
                let config = match offer {
                    Some(list) => {
                        let mut c = (*t.config).clone();
                        c.alpn_protocols = list.to_vec();
                        Arc::new(c)
                    }
                    None => t.config.clone(),
                };
                let connector = tokio_rustls::TlsConnector::from(config);
                match tokio::time::timeout(
                    self.connect_timeout,
                    connector.connect(t.server_name.clone(), stream),
                )
                .await
                {
                    Ok(Ok(s)) => {
                        tracing::debug!(target: "connection", connection = upstream_id, "TLS handshake complete");
                        alpn = s.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                        let peer_uri = s
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| crate::transport_socket::first_uri(c.as_ref()));
                        identity = Some(Arc::new(crate::transport_socket::UpstreamIdentity {
                            local_uri: t.local_uri.clone(),
                            peer_uri,
                        }));
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
            alpn,
            identity,
            local,
            host,
            cluster: self.clone(),
            carries_request: false,
        })
    }
}
