//! The running proxy: the loaded configuration, the cluster manager and stats, one accept loop
//! per bound listener, and each connection's way through listener filters, the `use_original_dst`
//! hand-off, filter chain selection and the network filters — every decision the shared one from
//! `pilotfish_decide`.

use crate::cluster::{ClusterManager, Io};
use crate::stats::{Stat, Store};
use crate::transport_socket::{check_sans, DownstreamTls, TlsInfo};
use crate::{listener_filter, tcp_proxy};
use pilotfish_api::pb::envoy::config::listener::v3::{filter, Listener};
use pilotfish_api::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use pilotfish_config::model::{format_address, unpack};
use pilotfish_config::resources::ResourceSet;
use pilotfish_decide::filter_chain::{self, ChainInput, Selected};
use pilotfish_decide::listener::{Connection, Entry};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

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
}

pub struct Server {
    pub set: ResourceSet,
    pub clusters: ClusterManager,
    pub stats: Store,
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
    /// What each filter chain's network filters end in, per (listener, chain key), built at
    /// start-up so a connection only looks it up.
    terminals: std::collections::HashMap<(String, String), Terminal>,
    /// tcp_proxy access logs, built once per distinct configuration (files opened once).
    access_logs: std::sync::Mutex<
        std::collections::HashMap<Vec<u8>, Arc<Vec<crate::access_log::AccessLog>>>,
    >,
    /// Upstream HTTP connections kept for reuse.
    pub http_pools: crate::http::upstream::Pools,
    /// This node's frame for Istio's TCP metadata exchange.
    pub peer_exchange_frame: Vec<u8>,
    /// Each listener's counters, by listener name.
    listener_stats: std::collections::HashMap<String, ListenerStats>,
    /// Downstream TLS per (listener, filter chain index or `default`), built at start-up.
    pub downstream_tls:
        std::collections::HashMap<(String, String), Result<Arc<DownstreamTls>, String>>,
}

impl Server {
    pub fn new(set: ResourceSet, options: Options) -> Arc<Server> {
        let stats = Store::default();
        let clusters = ClusterManager::new(&set, &stats);
        // Envoy creates a listener's counters with the listener, so they read 0 before use.
        let listener_stats = set
            .listeners
            .iter()
            .map(|l| (listener_key(&l.value), ListenerStats::new(&l.value, &stats)))
            .collect();
        let mut downstream_tls = std::collections::HashMap::new();
        for l in &set.listeners {
            for (key, fc) in chains(&l.value) {
                let Some(ctx) = fc
                    .transport_socket
                    .as_ref()
                    .and_then(downstream_tls_context)
                else {
                    continue;
                };
                let built = crate::transport_socket::downstream(&set, &ctx).map(Arc::new);
                if let Err(e) = &built {
                    tracing::warn!(target: "config", "listener '{}' filter chain {key}: TLS: {e}: connections to this chain are closed", l.name);
                }
                downstream_tls.insert((listener_key(&l.value), key), built);
            }
        }
        let server = Arc::new(Server {
            terminals: Default::default(),
            access_logs: Default::default(),
            downstream_tls,
            listener_stats,
            http_pools: Default::default(),
            peer_exchange_frame: {
                let node = set.bootstrap.node.as_ref();
                crate::peer_exchange::frame(
                    node.map_or("", |n| n.id.as_str()),
                    node.and_then(|n| n.metadata.as_ref()),
                )
            },
            set,
            clusters,
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
        });
        // Each chain's terminal filter, its counters and access logs, made now (their problems
        // are said at start-up).
        let mut terminals = std::collections::HashMap::new();
        for l in &server.set.listeners {
            for (key, fc) in chains(&l.value) {
                let mut terminal = Terminal::None;
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
                            &server.set,
                            &json,
                            l.value.traffic_direction,
                            server.stats.istio.clone(),
                        )
                        .map_err(|e| tracing::warn!(target: "config", "listener '{}': {e}: its Istio TCP metrics are not kept", l.name))
                        .ok();
                        continue;
                    }
                    if let Some(tcp) = unpack::<TcpProxy>(any) {
                        let logs = server.access_logs(&tcp);
                        let mut filter = tcp_proxy::TcpProxyFilter::new(tcp, &server.stats, logs);
                        filter.istio_stats = istio_stats.take();
                        filter.peer_exchange = peer_exchange.take();
                        terminal = Terminal::TcpProxy(Arc::new(filter));
                        break;
                    }
                    if let Some(hcm) = unpack::<
                        pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager,
                    >(any)
                    {
                        terminal = Terminal::Http(Arc::new(
                            crate::http::HttpConnectionManagerFilter::new(
                                &server.set,
                                hcm,
                                &server.stats,
                                l.value.traffic_direction,
                            ),
                        ));
                        break;
                    }
                }
                terminals.insert((listener_key(&l.value), key), terminal);
            }
        }
        let mut server = server;
        Arc::get_mut(&mut server).expect("not shared yet").terminals = terminals;
        server
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
pub enum Terminal {
    TcpProxy(Arc<tcp_proxy::TcpProxyFilter>),
    Http(Arc<crate::http::HttpConnectionManagerFilter>),
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

/// Binds every listener that binds a port; a listener whose address cannot be bound here is
/// reported and left out, the others come up. Each comes with its `listener_key`.
pub fn bind_listeners(server: &Arc<Server>) -> Vec<(String, TcpListener)> {
    let mut out = vec![];
    for r in &server.set.listeners {
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
        match bind(addr, l) {
            Ok(listener) => {
                let local = listener.local_addr().unwrap_or(addr);
                tracing::info!(target: "config", "listener '{}' listening on {local}", r.name);
                server.bound.lock().unwrap().push((r.name.clone(), local));
                out.push((listener_key(l), listener));
            }
            Err(e) => {
                tracing::error!(target: "config", "listener '{}' failed to bind or apply socket options: cannot bind '{addr}': {e}", r.name);
            }
        }
    }
    out
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

impl Server {
    /// A listener's counters (a named listener's found without building its key).
    fn listener_stats_of(&self, l: &Listener) -> Option<&ListenerStats> {
        if l.name.is_empty() {
            self.listener_stats.get(&listener_key(l))
        } else {
            self.listener_stats.get(l.name.as_str())
        }
    }
}

fn listener_filter_failed(server: &Server, l: &Listener, e: &listener_filter::FilterError) {
    let Some(stats) = server.listener_stats_of(l) else {
        return;
    };
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

/// One downstream connection, from accept to close.
async fn handle(server: &Arc<Server>, accepted_by: &str, stream: TcpStream, peer: SocketAddr) {
    let conn = server.next_connection_id();
    let _ = stream.set_nodelay(true);
    // By name without building keys (this runs for every connection); by address for the
    // unnamed.
    let Some(accepted) = server.set.listeners.iter().find(|r| {
        r.value.name == accepted_by
            || (r.value.name.is_empty() && listener_key(&r.value) == accepted_by)
    }) else {
        return;
    };
    let Ok(socket_local) = stream.local_addr() else {
        return;
    };
    let mut l = &accepted.value;
    let found = match listener_filter::run(l, &stream, socket_local, conn).await {
        Ok(f) => f,
        Err(e) => {
            listener_filter_failed(server, l, &e);
            tracing::debug!(target: "conn_handler", connection = conn, "listener filter: {e:?}: closing connection from {peer}");
            return;
        }
    };
    let mut local = found.local.unwrap_or(socket_local);
    let mut found = found;
    // use_original_dst: the listener owning the restored destination takes the connection and
    // runs its own listener filters.
    if l.use_original_dst.as_ref().is_some_and(|v| v.value) && found.local.is_some() {
        let c = Connection {
            destination: local,
            source: peer,
            tls: found.tls,
            sni: found.server_name.clone(),
            alpn: found.application_protocols.clone(),
            http: None,
        };
        if let Ok(d) = pilotfish_decide::listener::select(
            &server.set,
            &c,
            &Entry::Listener(accepted_by.to_string()),
        ) {
            if d.serves.name != accepted.name {
                tracing::debug!(target: "conn_handler", connection = conn, "use_original_dst: handing the connection to listener '{}' ({local})", d.serves.name);
                l = &d.serves.value;
                match listener_filter::run(l, &stream, local, conn).await {
                    Ok(f) => {
                        local = f.local.unwrap_or(local);
                        found = f;
                    }
                    Err(e) => {
                        listener_filter_failed(server, l, &e);
                        tracing::debug!(target: "conn_handler", connection = conn, "listener filter: {e:?}: closing connection from {peer}");
                        return;
                    }
                }
            }
        }
    }
    let Some(stats) = server.listener_stats_of(l) else {
        return;
    };
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
    let key = (listener_key(l), chain_key);
    let tls = server.downstream_tls.get(&key);
    if let Some(Err(e)) = tls {
        tracing::debug!(target: "connection", connection = conn, "filter chain {chain_name}: TLS context unusable ({e}): closing");
        finish(stats, conn);
        return;
    }
    // The transport socket gets ready (a TLS handshake) while the network filters start, as in
    // Envoy: tcp_proxy connects upstream meanwhile.
    let ready = async {
        match tls {
            Some(Ok(tls)) => handshake(stats.ssl.as_ref(), tls, stream, conn)
                .await
                .map(|(io, info)| (io, Some(info))),
            _ => Some((Box::new(stream) as Box<dyn Io>, None)),
        }
    };
    match server.terminals.get(&key) {
        Some(Terminal::TcpProxy(tcp)) => {
            let info = tcp_proxy::Downstream {
                remote: found.source.unwrap_or(peer),
                local,
                server_name: found.server_name.clone(),
                buffer_limit: buffer_limit(l.per_connection_buffer_limit_bytes.as_ref()),
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
