//! The running proxy: the loaded configuration, the cluster manager and stats, one accept loop
//! per bound listener, and each connection's way through listener filters, the `use_original_dst`
//! hand-off, filter chain selection and the network filters — every decision the shared one from
//! `pilotfish_decide`.

use crate::cluster::{Cluster, ClusterChanges, ClusterManager, Io};
use crate::stats::{Stat, Store};
use crate::transport_socket::{check_sans, DownstreamTls, TlsInfo};
use crate::{listener_filter, tcp_proxy};
use arc_swap::ArcSwap;
use pilotfish_api::pb::envoy::config::listener::v3::{filter, Listener};
use pilotfish_api::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use pilotfish_api::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use pilotfish_config::model::{format_address, unpack};
use pilotfish_config::resources::ResourceSet;
use pilotfish_decide::filter_chain::{self, ChainInput, Selected};
use pilotfish_decide::listener::{Connection, Entry};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// Command-line settings the server reports in `/server_info` and obeys.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub config_path: String,
    pub concurrency: usize,
    pub log_level: String,
    pub component_log_level: String,
    pub log_path: String,
    pub service_node: String,
    pub service_cluster: String,
    pub drain_time_s: u64,
    /// `--drain-strategy immediate`: a draining listener's connections are told to close at
    /// once; otherwise (Envoy's default, gradual) ever more of them over the drain time.
    pub drain_immediate: bool,
}

/// A filter chain's drain as its connections see it: when it began (an update removed or
/// replaced the chain), how long it lasts (`--drain-time-s`), and Envoy's drain strategy.
#[derive(Clone)]
pub struct Drain {
    began: watch::Receiver<Option<Instant>>,
    pub time: Duration,
    immediate: bool,
}

impl Drain {
    /// Waits for the drain to begin; returns when it ends (then what is left is closed).
    pub async fn began(&mut self) -> tokio::time::Instant {
        let began = self
            .began
            .wait_for(|b| b.is_some())
            .await
            .ok()
            .and_then(|b| *b);
        match began {
            Some(b) => tokio::time::Instant::from_std(b) + self.time,
            // Its chain is gone (and so are its connections): no drain will begin.
            None => std::future::pending().await,
        }
    }

    /// Whether a response now tells its connection to close (HTTP/1 `connection: close`,
    /// HTTP/2 GOAWAY), as Envoy's drain manager decides: always once draining with the
    /// immediate strategy; with the gradual one, with a chance that grows from 0 to 1 over the
    /// drain time (in whole seconds, as Envoy counts it), so clients reconnect spread out
    /// rather than all at once.
    pub fn close_now(&self) -> bool {
        let Some(began) = *self.began.borrow() else {
            return false;
        };
        let elapsed = began.elapsed();
        if self.immediate || elapsed >= self.time || self.time.as_secs() == 0 {
            return true;
        }
        elapsed.as_secs() > crate::random(elapsed.as_nanos() as u64) % self.time.as_secs()
    }
}

type DownstreamTlsByChain = std::collections::HashMap<String, Result<Arc<DownstreamTls>, String>>;

pub struct Server {
    /// The configuration in service: swapped whole by each accepted update. A connection takes
    /// the one in service when it is accepted and keeps its listener's part to the end.
    active: ArcSwap<Active>,
    pub stats: Arc<Store>,
    pub options: Options,
    pub started: Instant,
    next_id: AtomicU64,
    /// Listeners actually bound: (name, address).
    pub bound: std::sync::Mutex<Vec<(String, SocketAddr)>>,
    pub healthcheck_failed: AtomicBool,
    /// Listeners are up: `/ready` answers LIVE from then on.
    pub live: AtomicBool,
    pub shutdown: watch::Sender<bool>,
    pub draining: watch::Sender<bool>,
    pub active_connections: AtomicU64,
    /// tcp_proxy access logs, built once per distinct configuration (files opened once).
    access_logs: std::sync::Mutex<
        std::collections::HashMap<Vec<u8>, Arc<Vec<crate::access_log::AccessLog>>>,
    >,
    /// Upstream HTTP connections kept for reuse.
    pub http_pools: crate::http::upstream::Pools,
    /// This node's frame for Istio's TCP metadata exchange.
    pub peer_exchange_frame: Vec<u8>,
    /// The accept loop of each bound listener (by `listener_key`): its address and its task.
    accepting: std::sync::Mutex<std::collections::HashMap<String, (SocketAddr, AbortHandle)>>,
    /// Secrets from SDS, laid over every configuration put in service.
    sds_secrets: std::sync::Mutex<Vec<pilotfish_config::resources::Resource<Secret>>>,
    /// One update at a time (xDS and SDS apply from their own tasks).
    applying: tokio::sync::Mutex<()>,
    /// Counts the updates put in service, for those that follow the configuration (SDS
    /// subscribes to the secrets it names).
    pub applied: watch::Sender<u64>,
    /// Counts the SDS secrets put in service (or given up): listeners and clusters warming
    /// for a secret go on when it comes.
    pub secrets_arrived: watch::Sender<u64>,
    /// The SDS secrets whose initial fetch timed out: what warmed for them goes on without.
    pub secrets_given_up: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// One version of the configuration as the proxy runs it: the resources, the clusters and
/// every listener's filter chains made ready.
pub struct Active {
    pub set: ResourceSet,
    pub clusters: ClusterManager,
    /// By `listener_key`.
    listeners: std::collections::HashMap<String, Arc<ActiveListener>>,
}

/// A listener as its connections use it: counters, what each filter chain ends in, downstream
/// TLS, and its drain.
pub struct ActiveListener {
    pub config: Listener,
    stats: ListenerStats,
    /// What each filter chain's network filters end in, by chain key.
    terminals: std::collections::HashMap<String, Terminal>,
    /// Downstream TLS per filter chain key (index or `default`).
    /// Swapped in place when a secret it uses rotates: connections under way keep their
    /// session, new ones get the new certificate, nothing drains.
    downstream_tls: ArcSwap<DownstreamTlsByChain>,
    /// Per filter chain key: set when an update removes or replaces the listener, or (in place)
    /// the chain: its connections drain. A chain an in-place update keeps shares its sender
    /// with the version before, so its connections never drain.
    chain_drains: std::collections::HashMap<String, Arc<watch::Sender<Option<Instant>>>>,
}

/// What an update changed, as the log and the tests see it.
#[derive(Debug, Default)]
pub struct Applied {
    pub listeners_added: Vec<String>,
    pub listeners_replaced: Vec<String>,
    pub listeners_removed: Vec<String>,
    /// Listeners whose filter chains alone changed: updated in place, the connections of the
    /// chains kept go on, those of the chains changed or removed drain.
    pub listeners_updated_in_place: Vec<String>,
    /// Listeners kept whose connection managers got new route configurations.
    pub routes_changed: Vec<String>,
    pub clusters_added: Vec<String>,
    pub clusters_removed: Vec<String>,
    pub endpoints_changed: Vec<String>,
    /// Listeners kept whose TLS got a rotated secret.
    pub secrets_rotated: Vec<String>,
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [
            ("listeners added", &self.listeners_added),
            (
                "listeners replaced (the old draining)",
                &self.listeners_replaced,
            ),
            ("listeners removed (draining)", &self.listeners_removed),
            (
                "listeners updated in place (changed filter chains draining)",
                &self.listeners_updated_in_place,
            ),
            ("routes changed on listeners", &self.routes_changed),
            ("clusters added or changed", &self.clusters_added),
            ("clusters removed", &self.clusters_removed),
            ("endpoints changed", &self.endpoints_changed),
            ("secrets rotated on listeners", &self.secrets_rotated),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(what, v)| format!("{what}: {}", v.join(", ")))
        .collect();
        if parts.is_empty() {
            write!(f, "no change")
        } else {
            write!(f, "{}", parts.join("; "))
        }
    }
}

impl Active {
    /// The listener by its key (its name, or for a nameless one its address).
    pub fn listener(&self, key: &str) -> Option<&Arc<ActiveListener>> {
        self.listeners.get(key)
    }

    /// The same for a listener of the configuration: a named one found without building its
    /// key (this runs for every connection handed on by `use_original_dst`).
    fn listener_of(&self, l: &Listener) -> Option<&Arc<ActiveListener>> {
        if l.name.is_empty() {
            self.listeners.get(&listener_key(l))
        } else {
            self.listeners.get(l.name.as_str())
        }
    }
}

impl Server {
    pub fn new(set: ResourceSet, options: Options) -> Arc<Server> {
        Server::with_stats(set, options, Default::default(), vec![])
    }

    /// The server the admin API answers for while start-up waits for the control plane (and
    /// the SDS server): the bootstrap as loaded, nothing made or bound, the xDS client's
    /// `stats`; its state PRE_INITIALIZING, as Envoy's is then.
    pub fn initializing(set: ResourceSet, options: Options, stats: Arc<Store>) -> Arc<Server> {
        let server = Server::with_stats(ResourceSet::default(), options, stats, vec![]);
        server.active.store(Arc::new(Active {
            set,
            clusters: ClusterManager::new(&ResourceSet::default(), &Store::default()),
            listeners: Default::default(),
        }));
        server
    }

    /// The same with stats already kept (the xDS client's, from before the proxy started).
    pub fn with_stats(
        set: ResourceSet,
        options: Options,
        stats: Arc<Store>,
        sds_secrets: Vec<pilotfish_config::resources::Resource<Secret>>,
    ) -> Arc<Server> {
        let server = Server {
            active: ArcSwap::from_pointee(Active {
                set: ResourceSet::default(),
                clusters: ClusterManager::new(&ResourceSet::default(), &Store::default()),
                listeners: Default::default(),
            }),
            access_logs: Default::default(),
            http_pools: Default::default(),
            peer_exchange_frame: {
                let node = set.bootstrap.node.as_ref();
                crate::peer_exchange::frame(
                    node.map_or("", |n| n.id.as_str()),
                    node.and_then(|n| n.metadata.as_ref()),
                )
            },
            stats,
            options,
            started: Instant::now(),
            next_id: AtomicU64::new(0),
            bound: Default::default(),
            healthcheck_failed: AtomicBool::new(false),
            live: AtomicBool::new(false),
            shutdown: watch::channel(false).0,
            draining: watch::channel(false).0,
            active_connections: AtomicU64::new(0),
            accepting: Default::default(),
            sds_secrets: Default::default(),
            applying: Default::default(),
            applied: watch::channel(0).0,
            secrets_arrived: watch::channel(0).0,
            secrets_given_up: Default::default(),
        };
        *server.sds_secrets.lock().unwrap() = sds_secrets;
        let mut set = set;
        server.lay_sds_secrets(&mut set);
        let (active, ..) = server.make_active(set, None);
        server.active.store(Arc::new(active));
        Arc::new(server)
    }

    /// A cluster of the configuration in service, by name (a request routes by the clusters
    /// of now, also on a connection accepted before an update).
    pub fn cluster(&self, name: &str) -> Option<Arc<Cluster>> {
        self.active.load().clusters.get(name).cloned()
    }

    /// The configuration in service now.
    pub fn active(&self) -> Arc<Active> {
        self.active.load_full()
    }

    /// Makes the listeners and clusters of `set`; with the configuration it replaces, what is
    /// unchanged is kept (a listener with the same configuration keeps its connections and
    /// gets new routes in place; a cluster with the same configuration keeps its hosts).
    fn make_active(
        &self,
        set: ResourceSet,
        previous: Option<&Active>,
    ) -> (Active, Applied, ClusterChanges) {
        let mut applied = Applied::default();
        // Secrets whose value changed (rotated): what uses them gets new TLS contexts.
        let rotated: Vec<&str> = previous
            .map(|p| {
                set.secrets
                    .iter()
                    .filter(|s| p.set.secret(&s.name).is_none_or(|old| old.value != s.value))
                    .map(|s| s.name.as_str())
                    .collect()
            })
            .unwrap_or_default();
        let (clusters, mut changes) =
            ClusterManager::update(&set, &self.stats, previous.map(|p| &p.clusters), &rotated);
        if previous.is_some() {
            applied.clusters_added = changes.added.iter().map(|c| c.name.clone()).collect();
        }
        applied.clusters_removed = changes
            .retired
            .iter()
            .filter(|c| clusters.get(&c.name).is_none())
            .map(|c| c.name.clone())
            .collect();
        applied.endpoints_changed = std::mem::take(&mut changes.endpoints_changed);
        let mut listeners = std::collections::HashMap::new();
        for l in &set.listeners {
            let key = listener_key(&l.value);
            let old = previous.and_then(|p| p.listeners.get(&key));
            match old {
                Some(old) if old.config == l.value => {
                    if self.refresh_routes(&set, old) {
                        applied.routes_changed.push(key.clone());
                    }
                    if uses_secret(
                        pilotfish_config::model::listener_transport_sockets(&l.value),
                        &rotated,
                    ) {
                        old.downstream_tls
                            .store(Arc::new(downstream_tls_of(&set, &l.value, &l.name)));
                        applied.secrets_rotated.push(key.clone());
                    }
                    listeners.insert(key, old.clone());
                }
                Some(old) if filter_chains_only_change(&old.config, &l.value) => {
                    applied.listeners_updated_in_place.push(key.clone());
                    let made = self.make_listener(&set, &l.value, &l.name, Some(old));
                    // A kept chain's connection manager follows the routes as they are now.
                    self.refresh_routes(&set, &made);
                    listeners.insert(key, Arc::new(made));
                }
                _ => {
                    if old.is_some() {
                        applied.listeners_replaced.push(key.clone());
                    } else if previous.is_some() {
                        applied.listeners_added.push(key.clone());
                    }
                    let made = self.make_listener(&set, &l.value, &l.name, None);
                    listeners.insert(key, Arc::new(made));
                }
            }
        }
        if let Some(p) = previous {
            applied.listeners_removed = p
                .listeners
                .keys()
                .filter(|k| !listeners.contains_key(*k))
                .cloned()
                .collect();
        }
        (
            Active {
                set,
                clusters,
                listeners,
            },
            applied,
            changes,
        )
    }

    /// A kept listener's connection managers whose route configuration changed get new ones;
    /// returns whether any did.
    fn refresh_routes(&self, set: &ResourceSet, l: &ActiveListener) -> bool {
        let mut changed = false;
        for t in l.terminals.values() {
            let Terminal::Http(slot) = t else { continue };
            let hcm = slot.load();
            let now = crate::http::route_configuration(set, &hcm.config).ok();
            if hcm.route_config() != now.as_ref() {
                slot.store(Arc::new(crate::http::HttpConnectionManagerFilter::new(
                    set,
                    hcm.config.clone(),
                    &self.stats,
                    l.config.traffic_direction,
                )));
                changed = true;
            }
        }
        changed
    }

    /// Makes a listener; updating `in_place_of` (its filter chains alone changed), a filter
    /// chain equal to one of the version before is that chain: same terminal (counters,
    /// connection manager) and same drain, so its connections go on untouched, as in Envoy's
    /// in-place filter chain update.
    fn make_listener(
        &self,
        set: &ResourceSet,
        l: &Listener,
        name: &str,
        in_place_of: Option<&ActiveListener>,
    ) -> ActiveListener {
        let mut terminals = std::collections::HashMap::new();
        let mut chain_drains = std::collections::HashMap::new();
        for (key, fc) in chains(l) {
            let kept = in_place_of.and_then(|old| {
                let (old_key, _) = chains(&old.config).find(|(_, ofc)| *ofc == fc)?;
                Some((
                    old.terminals.get(&old_key)?.clone(),
                    old.chain_drains.get(&old_key)?.clone(),
                ))
            });
            let (terminal, drain) = kept.unwrap_or_else(|| {
                (
                    self.make_terminal(set, l, name, fc),
                    Arc::new(watch::channel(None).0),
                )
            });
            terminals.insert(key.clone(), terminal);
            chain_drains.insert(key, drain);
        }
        let downstream_tls = ArcSwap::from_pointee(downstream_tls_of(set, l, name));
        ActiveListener {
            // Envoy creates a listener's counters with the listener, so they read 0 before use.
            stats: ListenerStats::new(l, &self.stats),
            config: l.clone(),
            terminals,
            downstream_tls,
            chain_drains,
        }
    }

    /// A filter chain's terminal filter with its counters and access logs, made with the
    /// listener (their problems are said then).
    fn make_terminal(
        &self,
        set: &ResourceSet,
        l: &Listener,
        name: &str,
        fc: &pilotfish_api::pb::envoy::config::listener::v3::FilterChain,
    ) -> Terminal {
        // Istio's stats filter ahead of tcp_proxy counts its connections.
        let mut istio_stats = None;
        // Istio's TCP metadata exchange ahead of it, by its protocol (ALPN).
        let mut peer_exchange = None;
        for f in &fc.filters {
            let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                continue;
            };
            if let Some(protocol) = crate::peer_exchange::configured(any) {
                peer_exchange = Some(protocol);
                continue;
            }
            if let Some(json) = pilotfish_config::istio::stats_configuration(any) {
                istio_stats = crate::istio_stats::IstioStats::new(
                    set,
                    &json,
                    l.traffic_direction,
                    self.stats.istio.clone(),
                )
                .map_err(|e| tracing::warn!(target: "config", "listener '{name}': {e}: its Istio TCP metrics are not kept"))
                .ok();
                continue;
            }
            if let Some(tcp) = unpack::<TcpProxy>(any) {
                let logs = self.access_logs(&tcp);
                let mut filter = tcp_proxy::TcpProxyFilter::new(tcp, &self.stats, logs);
                filter.istio_stats = istio_stats.take();
                filter.peer_exchange = peer_exchange.take();
                return Terminal::TcpProxy(Arc::new(filter));
            }
            if let Some(hcm) = unpack::<
                pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager,
            >(any)
            {
                return Terminal::Http(Arc::new(ArcSwap::from_pointee(
                    crate::http::HttpConnectionManagerFilter::new(
                        set,
                        hcm,
                        &self.stats,
                        l.traffic_direction,
                    ),
                )));
            }
        }
        Terminal::None
    }

    /// Puts an accepted configuration in service: new connections use it at once; connections
    /// of a replaced or removed listener drain (`--drain-time-s`) on the configuration they
    /// started with; listeners are bound and unbound to match; clusters no longer in it stop
    /// their checks and leave the pools.
    pub async fn apply(self: &Arc<Self>, mut set: ResourceSet) -> Applied {
        let _one = self.applying.lock().await;
        self.lay_sds_secrets(&mut set);
        let old = self.active();
        let (next, applied, changes) = self.make_active(set, Some(&old));
        self.start_clusters(&changes.added).await;
        let next = Arc::new(next);
        self.active.store(next.clone());
        for c in &changes.retired {
            self.http_pools.retire_cluster(&c.name);
        }
        // A removed cluster's stats go with it, as Envoy's scope does.
        for name in &applied.clusters_removed {
            let prefix = format!("cluster.{name}.");
            let keep: Vec<String> = next
                .clusters
                .names()
                .filter(|n| n.starts_with(&format!("{name}.")))
                .map(|n| format!("cluster.{n}."))
                .collect();
            self.stats.remove_prefix(&prefix, &keep);
        }
        for (key, l) in &old.listeners {
            let now = next.listeners.get(key);
            if now.is_some_and(|n| Arc::ptr_eq(n, l)) {
                continue;
            }
            // Replaced or removed: every chain drains; updated in place: the chains not kept.
            for drain in l.chain_drains.values() {
                let kept =
                    now.is_some_and(|n| n.chain_drains.values().any(|d| Arc::ptr_eq(d, drain)));
                if !kept {
                    drain.send_if_modified(|began| {
                        let first = began.is_none();
                        began.get_or_insert_with(Instant::now);
                        first
                    });
                }
            }
        }
        start_listeners(self);
        // A removed listener's stats go once its drain is over, as Envoy's go with the
        // listener; those another listener still uses (the same address or stat prefix) stay.
        for key in &applied.listeners_removed {
            let Some(gone) = old.listeners.get(key) else {
                continue;
            };
            let scopes = stat_scopes(gone);
            let server = Arc::downgrade(self);
            let drain = Duration::from_secs(self.options.drain_time_s);
            tokio::spawn(async move {
                tokio::time::sleep(drain).await;
                let Some(server) = server.upgrade() else {
                    return;
                };
                let active = server.active();
                let in_use: Vec<String> = active.listeners.values().flat_map(stat_scopes).collect();
                for scope in scopes.iter().filter(|s| !in_use.contains(s)) {
                    // The RDS subscription's stats under a connection manager's prefix are
                    // the xDS client's: it drops them when it stops following the routes.
                    server
                        .stats
                        .remove_prefix(&format!("{scope}."), &[format!("{scope}.rds.")]);
                }
            });
        }
        self.applied.send_modify(|n| *n += 1);
        applied
    }

    /// A secret from SDS (new or rotated) is put in service with the configuration as it is.
    pub async fn apply_secret(
        self: &Arc<Self>,
        secret: pilotfish_config::resources::Resource<Secret>,
    ) -> Applied {
        {
            let mut sds = self.sds_secrets.lock().unwrap();
            sds.retain(|s| s.name != secret.name);
            sds.push(secret);
        }
        let set = self.active().set.clone();
        let applied = self.apply(set).await;
        self.secrets_arrived.send_modify(|n| *n += 1);
        applied
    }

    /// An SDS secret did not come within its `initial_fetch_timeout`: listeners and clusters
    /// warming for it go in service without it, as Envoy's.
    pub fn give_up_secret(&self, name: &str) {
        self.secrets_given_up
            .lock()
            .unwrap()
            .insert(name.to_string());
        self.secrets_arrived.send_modify(|n| *n += 1);
    }

    /// The secrets SDS delivered, over those the configuration carries under the same name.
    fn lay_sds_secrets(&self, set: &mut ResourceSet) {
        for s in self.sds_secrets.lock().unwrap().iter() {
            set.secrets
                .retain(|have| have.name != s.name || have.origin.is_static());
            set.secrets.push(s.clone());
        }
    }

    /// Starts what new clusters run on their own: DNS clusters resolve first (all at once), as
    /// Envoy's cluster initialization does before a cluster is used; then health checks,
    /// outlier detection and ORIGINAL_DST cleanup.
    pub async fn start_clusters(&self, clusters: &[Arc<Cluster>]) {
        let resolving: Vec<_> = clusters
            .iter()
            .map(|c| {
                let c = c.clone();
                tokio::spawn(async move { crate::dns::start(&c).await })
            })
            .collect();
        for r in resolving {
            let _ = r.await;
        }
        for c in clusters {
            crate::health_check::start(c, &self.stats);
            crate::outlier::start(c);
            c.start_cleanup();
        }
    }

    /// The access logs of a tcp_proxy configuration, built on first use.
    pub fn access_logs(&self, tcp: &TcpProxy) -> Arc<Vec<crate::access_log::AccessLog>> {
        use prost::Message;
        let key: Vec<u8> = tcp
            .access_log
            .iter()
            .flat_map(|a| a.encode_to_vec())
            .collect();
        let mut cache = self.access_logs.lock().unwrap();
        cache
            .entry(key)
            .or_insert_with(|| {
                let (logs, warnings) = crate::access_log::build(&tcp.access_log);
                for w in warnings {
                    tracing::warn!(target: "config", "tcp_proxy '{}': {w}", tcp.stat_prefix);
                }
                Arc::new(logs)
            })
            .clone()
    }

    /// Connection ids, shared by downstream and upstream connections as Envoy's are.
    pub fn next_connection_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Each filter chain's TLS context, made from the secrets `set` holds now.
fn downstream_tls_of(set: &ResourceSet, l: &Listener, name: &str) -> DownstreamTlsByChain {
    let mut out = std::collections::HashMap::new();
    for (key, fc) in chains(l) {
        if let Some(ctx) = fc
            .transport_socket
            .as_ref()
            .and_then(downstream_tls_context)
        {
            let built = crate::transport_socket::downstream(set, &ctx).map(Arc::new);
            if let Err(e) = &built {
                tracing::warn!(target: "config", "listener '{name}' filter chain {key}: TLS: {e}: connections to this chain are closed");
            }
            out.insert(key, built);
        }
    }
    out
}

/// Whether any of these transport sockets names one of `secrets` through SDS.
pub fn uses_secret<'a>(
    sockets: impl Iterator<Item = &'a pilotfish_api::pb::envoy::config::core::v3::TransportSocket>,
    secrets: &[&str],
) -> bool {
    !secrets.is_empty()
        && sockets
            .flat_map(pilotfish_config::model::sds_secret_configs)
            .any(|s| secrets.contains(&s.name.as_str()))
}

fn downstream_tls_context(
    ts: &pilotfish_api::pb::envoy::config::core::v3::TransportSocket,
) -> Option<pilotfish_api::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext>
{
    match &ts.config_type {
        Some(
            pilotfish_api::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
                any,
            ),
        ) => unpack(any),
        _ => None,
    }
}

/// Where a filter chain's network filters lead.
#[derive(Clone)]
pub enum Terminal {
    TcpProxy(Arc<tcp_proxy::TcpProxyFilter>),
    Http(Arc<crate::http::HcmSlot>),
    /// No terminal filter pilotfish knows.
    None,
}

/// What the proxy knows a listener by: its name, or, for a listener without one (Istio's
/// static 15090 and 15021 listeners; Envoy gives those a random name), its address.
pub fn listener_key(l: &Listener) -> String {
    if !l.name.is_empty() {
        return l.name.clone();
    }
    l.address
        .as_ref()
        .and_then(pilotfish_config::model::format_address)
        .unwrap_or_default()
}

/// Whether `new` differs from `old` in its filter chains alone (`filter_chains`,
/// `default_filter_chain`): Envoy then updates the listener in place rather than replacing it.
pub(crate) fn filter_chains_only_change(old: &Listener, new: &Listener) -> bool {
    let bare = |l: &Listener| Listener {
        filter_chains: vec![],
        default_filter_chain: None,
        ..l.clone()
    };
    bare(old) == bare(new)
}

/// A listener's filter chains with their keys (index, or `default` for the default chain).
pub fn chains(
    l: &Listener,
) -> impl Iterator<
    Item = (
        String,
        &pilotfish_api::pb::envoy::config::listener::v3::FilterChain,
    ),
> {
    l.filter_chains
        .iter()
        .enumerate()
        .map(|(i, fc)| (i.to_string(), fc))
        .chain(
            l.default_filter_chain
                .iter()
                .map(|fc| ("default".to_string(), fc)),
        )
}

/// A listener's counters (`listener.<address>.*`), made with the listener so a connection only
/// counts.
struct ListenerStats {
    scope: String,
    downstream_cx_total: Arc<Stat>,
    downstream_cx_destroy: Arc<Stat>,
    downstream_cx_active: Arc<Stat>,
    no_filter_chain_match: Arc<Stat>,
    downstream_listener_filter_remote_close: Arc<Stat>,
    downstream_pre_cx_timeout: Arc<Stat>,
    /// Only listeners with TLS chains have them, as in Envoy.
    ssl: Option<SslStats>,
}

/// `listener.<address>.ssl.*`: what downstream TLS handshakes came to.
struct SslStats {
    handshake: Arc<Stat>,
    connection_error: Arc<Stat>,
    no_certificate: Arc<Stat>,
    fail_verify_san: Arc<Stat>,
}

impl ListenerStats {
    fn new(l: &Listener, stats: &Store) -> ListenerStats {
        let scope = listener_scope(l);
        let c = |n: &str| stats.counter(&format!("{scope}.{n}"));
        let has_tls = chains(l).any(|(_, fc)| {
            fc.transport_socket
                .as_ref()
                .and_then(downstream_tls_context)
                .is_some()
        });
        let ssl = has_tls.then(|| {
            c("ssl.fail_verify_error");
            SslStats {
                handshake: c("ssl.handshake"),
                connection_error: c("ssl.connection_error"),
                no_certificate: c("ssl.no_certificate"),
                fail_verify_san: c("ssl.fail_verify_san"),
            }
        });
        ListenerStats {
            downstream_cx_total: c("downstream_cx_total"),
            downstream_cx_destroy: c("downstream_cx_destroy"),
            downstream_cx_active: stats.gauge(&format!("{scope}.downstream_cx_active")),
            no_filter_chain_match: c("no_filter_chain_match"),
            downstream_listener_filter_remote_close: c("downstream_listener_filter_remote_close"),
            downstream_pre_cx_timeout: c("downstream_pre_cx_timeout"),
            ssl,
            scope,
        }
    }
}

/// The stat scope of a listener: its stat_prefix, or its address as Envoy writes it.
/// The stat scopes a listener's stats live under: `listener.<address or stat_prefix>` and its
/// connection managers' `http.<stat_prefix>`.
fn stat_scopes(l: &Arc<ActiveListener>) -> Vec<String> {
    std::iter::once(listener_scope(&l.config))
        .chain(l.terminals.values().filter_map(|t| match t {
            Terminal::Http(slot) => Some(format!("http.{}", slot.load().config.stat_prefix)),
            _ => None,
        }))
        .collect()
}

fn listener_scope(l: &Listener) -> String {
    if !l.stat_prefix.is_empty() {
        return format!("listener.{}", l.stat_prefix);
    }
    let addr = l
        .address
        .as_ref()
        .and_then(format_address)
        .unwrap_or_default();
    format!("listener.{}", addr.replace(':', "_"))
}

fn binds(l: &Listener) -> bool {
    l.bind_to_port.as_ref().is_none_or(|v| v.value)
}

/// Binds every listener of the configuration in service that binds a port and is not bound
/// yet, each with its accept loop, and stops the loops of listeners no longer in it (or now at
/// another address). A listener whose address cannot be bound here is reported and left out,
/// the others come up. A listener replaced at the same address keeps its socket: connections
/// accepted from then on go to the new version.
pub fn start_listeners(server: &Arc<Server>) {
    let active = server.active();
    let mut accepting = server.accepting.lock().unwrap();
    // In configuration order: listeners are bound, and listed by /listeners, as configured.
    let mut wanted = vec![];
    for r in &active.set.listeners {
        let l = &r.value;
        if !binds(l) {
            continue;
        }
        let Some(addr) = l
            .address
            .as_ref()
            .and_then(pilotfish_decide::listener::socket_addr)
        else {
            tracing::warn!(target: "config", "listener '{}': only socket addresses are implemented; not started", r.name);
            continue;
        };
        wanted.push((listener_key(l), addr, r.name.clone(), l));
    }
    accepting.retain(|key, (addr, task)| {
        let keep = wanted.iter().any(|w| w.0 == *key && w.1 == *addr);
        if !keep {
            task.abort();
            server.bound.lock().unwrap().retain(|(n, _)| n != key);
            tracing::info!(target: "config", "listener '{key}' ({addr}) stopped accepting");
        }
        keep
    });
    for (key, addr, name, l) in wanted {
        if accepting.contains_key(&key) {
            continue;
        }
        match bind(addr, l) {
            Ok(listener) => {
                let local = listener.local_addr().unwrap_or(addr);
                tracing::info!(target: "config", "listener '{name}' listening on {local}");
                server.bound.lock().unwrap().push((name, local));
                let task = tokio::spawn(accept_loop(server.clone(), key.clone(), listener));
                accepting.insert(key, (addr, task.abort_handle()));
            }
            Err(e) => {
                tracing::error!(target: "config", "listener '{name}' failed to bind or apply socket options: cannot bind '{addr}': {e}");
            }
        }
    }
}

fn bind(addr: SocketAddr, l: &Listener) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    // Envoy's enable_reuse_port defaults to true: each listener socket can be shared.
    if l.enable_reuse_port.as_ref().is_none_or(|v| v.value) {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // Envoy binds `::` for IPv6 only unless ipv4_compat is set.
        let compat = l
            .address
            .as_ref()
            .and_then(|a| match &a.address {
                Some(
                    pilotfish_api::pb::envoy::config::core::v3::address::Address::SocketAddress(s),
                ) => Some(s.ipv4_compat),
                _ => None,
            })
            .unwrap_or(false);
        socket.set_only_v6(!compat)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let backlog = l.tcp_backlog_size.as_ref().map_or(1024, |v| v.value as i32);
    socket.listen(backlog)?;
    TcpListener::from_std(socket.into())
}

/// Accepts until shutdown or drain, each connection on its own task (spread over the runtime's
/// `--concurrency` workers).
pub async fn accept_loop(server: Arc<Server>, name: String, listener: TcpListener) {
    let mut draining = server.draining.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = draining.wait_for(|d| *d) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(target: "conn_handler", "listener '{name}': accept failed: {e}");
                continue;
            }
        };
        let server = server.clone();
        let name = name.clone();
        tokio::spawn(async move {
            server.active_connections.fetch_add(1, Ordering::Relaxed);
            handle(&server, &name, stream, peer).await;
            server.active_connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

fn listener_filter_failed(server: &Server, l: &ActiveListener, e: &listener_filter::FilterError) {
    let stats = &l.stats;
    match e {
        listener_filter::FilterError::Timeout => stats.downstream_pre_cx_timeout.inc(),
        listener_filter::FilterError::Closed => stats.downstream_listener_filter_remote_close.inc(),
        // The proxy_protocol filter's counter appears with its first error.
        listener_filter::FilterError::ProxyProtocol => server
            .stats
            .counter(&format!("{}.downstream_cx_proxy_proto_error", stats.scope))
            .inc(),
    }
}

/// A connection's `per_connection_buffer_limit_bytes` (Envoy's default 1 MiB).
pub fn buffer_limit(v: Option<&pilotfish_api::pb::google::protobuf::UInt32Value>) -> usize {
    v.map_or(1024 * 1024, |v| v.value as usize)
}

/// One downstream connection, from accept to close, on the configuration in service when it
/// was accepted.
async fn handle(server: &Arc<Server>, accepted_by: &str, stream: TcpStream, peer: SocketAddr) {
    let conn = server.next_connection_id();
    let _ = stream.set_nodelay(true);
    let active = server.active();
    let Some(accepted) = active.listener(accepted_by) else {
        return;
    };
    let Ok(socket_local) = stream.local_addr() else {
        return;
    };
    let mut al = accepted.clone();
    let found = match listener_filter::run(&al.config, &stream, socket_local, conn).await {
        Ok(f) => f,
        Err(e) => {
            listener_filter_failed(server, &al, &e);
            tracing::debug!(target: "conn_handler", connection = conn, "listener filter: {e:?}: closing connection from {peer}");
            return;
        }
    };
    let mut local = found.local.unwrap_or(socket_local);
    let mut found = found;
    // use_original_dst: the listener owning the restored destination takes the connection and
    // runs its own listener filters.
    if al.config.use_original_dst.as_ref().is_some_and(|v| v.value) && found.local.is_some() {
        let c = Connection {
            destination: local,
            source: peer,
            tls: found.tls,
            sni: found.server_name.clone(),
            alpn: found.application_protocols.clone(),
            http: None,
        };
        let handed = pilotfish_decide::listener::select(
            &active.set,
            &c,
            &Entry::Listener(accepted_by.to_string()),
        )
        .ok()
        .filter(|d| d.serves.name != al.config.name)
        .and_then(|d| {
            let to = active.listener_of(&d.serves.value)?;
            tracing::debug!(target: "conn_handler", connection = conn, "use_original_dst: handing the connection to listener '{}' ({local})", d.serves.name);
            Some(to.clone())
        });
        if let Some(to) = handed {
            al = to;
            match listener_filter::run(&al.config, &stream, local, conn).await {
                Ok(f) => {
                    local = f.local.unwrap_or(local);
                    found = f;
                }
                Err(e) => {
                    listener_filter_failed(server, &al, &e);
                    tracing::debug!(target: "conn_handler", connection = conn, "listener filter: {e:?}: closing connection from {peer}");
                    return;
                }
            }
        }
    }
    // The connection keeps its listener, not the whole configuration.
    drop(active);
    let l = &al.config;
    let stats = &al.stats;
    let input = ChainInput {
        local,
        source: found.source.unwrap_or(peer),
        direct_source: peer,
        server_name: found.server_name.clone(),
        transport_protocol: if found.tls { "tls" } else { "raw_buffer" }.to_string(),
        application_protocols: found.application_protocols.clone(),
    };
    let (selected, _) = filter_chain::select(l, &input);
    if filter_chain::chain(l, &selected).is_none() {
        stats.no_filter_chain_match.inc();
        tracing::debug!(target: "conn_handler", connection = conn, "closing connection from {peer}: no matching filter chain found");
        return;
    }
    stats.downstream_cx_total.inc();
    stats.downstream_cx_active.inc();
    let new_connection =
        || tracing::debug!(target: "conn_handler", connection = conn, "new connection from {peer}");
    let chain_name = match selected {
        Selected::Chain(i) => filter_chain::chain_label(l, i),
        _ => "default_filter_chain".into(),
    };
    tracing::trace!(target: "conn_handler", connection = conn, "filter chain {chain_name}");
    let chain_key = match selected {
        Selected::Chain(i) => i.to_string(),
        _ => "default".into(),
    };
    let tls_contexts = al.downstream_tls.load();
    let tls = tls_contexts.get(&chain_key).cloned();
    drop(tls_contexts);
    if let Some(Err(e)) = &tls {
        tracing::debug!(target: "connection", connection = conn, "filter chain {chain_name}: TLS context unusable ({e}): closing");
        finish(stats, conn);
        return;
    }
    // The transport socket gets ready (a TLS handshake) while the network filters start, as in
    // Envoy: tcp_proxy connects upstream meanwhile.
    let ready = async {
        match tls {
            Some(Ok(tls)) => handshake(stats.ssl.as_ref(), &tls, stream, conn)
                .await
                .map(|(io, info)| (io, Some(info))),
            _ => Some((Box::new(stream) as Box<dyn Io>, None)),
        }
    };
    let drain = al.chain_drains.get(&chain_key).map(|d| Drain {
        began: d.subscribe(),
        time: std::time::Duration::from_secs(server.options.drain_time_s),
        immediate: server.options.drain_immediate,
    });
    match al.terminals.get(&chain_key) {
        Some(Terminal::TcpProxy(tcp)) => {
            let info = tcp_proxy::Downstream {
                remote: found.source.unwrap_or(peer),
                local,
                server_name: found.server_name.clone(),
                buffer_limit: buffer_limit(l.per_connection_buffer_limit_bytes.as_ref()),
                drain,
            };
            tcp_proxy::run(server, tcp, ready, &info, conn, new_connection).await;
        }
        Some(Terminal::Http(hcm)) => {
            new_connection();
            if let Some((io, tls_info)) = ready.await {
                let info = Arc::new(crate::http::Downstream {
                    remote: found.source.unwrap_or(peer),
                    local,
                    tls: tls_info,
                    server_name: found.server_name.clone(),
                    drain,
                    goaway: tokio::sync::Notify::new(),
                });
                crate::http::serve(server.clone(), hcm.clone(), io, info, conn).await;
            }
        }
        _ => new_connection(),
    }
    finish(stats, conn);
}

fn finish(stats: &ListenerStats, conn: u64) {
    stats.downstream_cx_active.dec();
    stats.downstream_cx_destroy.inc();
    tracing::debug!(target: "connection", connection = conn, "closing socket: 0");
}

/// The downstream TLS handshake, then the peer certificate's SANs against the validation
/// context; None (the connection closes) when either fails, counted as Envoy counts it.
async fn handshake(
    ssl: Option<&SslStats>,
    tls: &DownstreamTls,
    stream: TcpStream,
    conn: u64,
) -> Option<(Box<dyn Io>, Arc<TlsInfo>)> {
    let count = |pick: fn(&SslStats) -> &Arc<Stat>| {
        if let Some(s) = ssl {
            pick(s).inc();
        }
    };
    let start =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await;
    let accepted = match start {
        Ok(start) => {
            let hello = start.client_hello();
            let shares = |offer: rustls::server::ClientHello| {
                offer.alpn().is_none_or(|mut offered| {
                    offered.any(|p| tls.config.alpn_protocols.iter().any(|a| a == p))
                })
            };
            let config = match &tls.without_alpn {
                Some(plain) if !shares(hello) => plain.clone(),
                _ => tls.config.clone(),
            };
            start.into_stream(config).await
        }
        Err(e) => Err(e),
    };
    let s = match accepted {
        Ok(s) => s,
        Err(e) => {
            count(|s| &s.connection_error);
            tracing::debug!(target: "connection", connection = conn, "TLS error: {e}");
            return None;
        }
    };
    let (_, session) = s.get_ref();
    let leaf = session.peer_certificates().and_then(|c| c.first());
    if leaf.is_none() {
        count(|s| &s.no_certificate);
    }
    if let Err(e) = check_sans(&tls.san_matchers, leaf) {
        count(|s| &s.fail_verify_san);
        tracing::debug!(target: "connection", connection = conn, "TLS error: {e}");
        return None;
    }
    count(|s| &s.handshake);
    tracing::debug!(target: "connection", connection = conn, "handshake complete");
    let info = TlsInfo {
        local_uri: tls.local_uri.clone(),
        peer_uri: leaf.and_then(|c| crate::transport_socket::first_uri(c.as_ref())),
        peer_chain: session
            .peer_certificates()
            .map(|c| c.iter().map(|d| d.as_ref().to_vec()).collect())
            .unwrap_or_default(),
        alpn: session.alpn_protocol().map(<[u8]>::to_vec),
        xfcc_element: Default::default(),
    };
    Some((Box::new(s), Arc::new(info)))
}
