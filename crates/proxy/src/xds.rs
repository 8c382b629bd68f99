//! xDS: the configuration a control plane streams over ADS, or type by type over config sources
//! of their own, one stream per subscription as Envoy opens them (state of the world or delta;
//! TCP, TLS or a Unix socket to the management server), asked for in Envoy's order at start-up:
//! clusters, then the endpoints of the EDS clusters, then listeners, then the route
//! configurations their connection managers name. Each response is
//! checked as Envoy checks an update and ACKed, or NACKed with the reason; the accepted whole,
//! laid over the bootstrap's static resources, is what the proxy starts with.
//!
//! After start-up the streams stay open and each update is taken the same way, then put in
//! service (`Server::apply`) without what still warms (a listener whose new route
//! configuration or secret has not arrived does not replace the old one yet, a cluster waits
//! for its endpoints, as Envoy warms them). A refused update leaves the configuration in
//! service as it is.

use pilotfish_api::pb::envoy::config::cluster::v3::{cluster, Cluster};
use pilotfish_api::pb::envoy::config::core::v3::{
    address, api_config_source::ApiType, config_source::ConfigSourceSpecifier,
    grpc_service::TargetSpecifier, ApiConfigSource, ConfigSource, Node,
};
use pilotfish_api::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use pilotfish_api::pb::envoy::config::listener::v3::{filter, Listener};
use pilotfish_api::pb::envoy::config::route::v3::RouteConfiguration;
use pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager, Rds,
};
use pilotfish_api::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use pilotfish_api::pb::google::protobuf::Any;
use pilotfish_api::pb::google::rpc::Status;
use pilotfish_config::dynamic::{self, DynamicResources};
use pilotfish_config::error::ConfigErrors;
use pilotfish_config::resources::ResourceSet;
use pilotfish_config::Config;
use prost::{Message, Name};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

pub mod sds;
mod stats;

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// How the bootstrap's `dynamic_resources` take clusters and listeners: over the ADS stream
/// (`ads_config`) or each from a gRPC config source of its own.
#[derive(Debug, Clone)]
pub struct Dynamic {
    /// `ads_config`: the one stream every subscription naming `ads {}` shares.
    ads: Option<Source>,
    cds: Option<Via>,
    lds: Option<Via>,
    /// How long the CDS and LDS subscriptions wait for their first response before start-up
    /// goes on without them: each config source's `initial_fetch_timeout` (Envoy's default:
    /// 15 s). (EDS and RDS subscriptions wait as their own config sources say.)
    pub cds_timeout: Duration,
    pub lds_timeout: Duration,
}

/// A gRPC config source (`api_config_source`, or the bootstrap's `ads_config`): the management
/// server its stream goes to, and how it asks.
#[derive(Debug, Clone)]
pub struct Source {
    /// The static cluster that reaches the management server (Istio's `xds-grpc`).
    pub cluster: String,
    pub target: Target,
    pub node_first_only: bool,
    /// Delta (incremental) xDS rather than state of the world.
    pub delta: bool,
}

/// Which stream a subscription rides, as its config source says: the ADS stream, or one of its
/// own (Envoy opens one per subscription: CDS, LDS, each EDS cluster, each route configuration).
#[derive(Debug, Clone)]
enum Via {
    Ads,
    Own(Source),
}

/// A config source as a subscription takes it; an error for the kinds not implemented.
fn via(set: &ResourceSet, cs: &ConfigSource, at: &str) -> Result<Via, String> {
    match &cs.config_source_specifier {
        Some(ConfigSourceSpecifier::Ads(_)) => Ok(Via::Ads),
        Some(ConfigSourceSpecifier::ApiConfigSource(api)) => Ok(Via::Own(source(
            set,
            api,
            &format!("{at}.api_config_source"),
        )?)),
        _ => Err(format!(
            "{at}: only ads {{}} and a gRPC api_config_source are implemented (files, REST and the rest are not yet)"
        )),
    }
}

/// A gRPC `api_config_source`.
fn source(set: &ResourceSet, api: &ApiConfigSource, at: &str) -> Result<Source, String> {
    let delta = is_delta(api, at)?;
    let (cluster, target) = grpc_target(set, api, at)?;
    Ok(Source {
        cluster,
        target,
        node_first_only: api.set_node_on_first_message_only,
        delta,
    })
}

/// How the management server is reached: the one endpoint of the static cluster a gRPC config
/// source names, with TLS where that cluster has a TLS transport socket.
#[derive(Clone)]
pub struct Target {
    pub address: TargetAddress,
    tls: Option<Arc<crate::transport_socket::UpstreamTls>>,
    connect_timeout: Duration,
    /// Reconnection backoff: base and maximum interval.
    retry_back_off: (Duration, Duration),
    /// The `:authority` of the gRPC requests: the cluster's name unless `envoy_grpc.authority`
    /// says otherwise, as Envoy sends it.
    authority: String,
}

#[derive(Debug, Clone)]
pub enum TargetAddress {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// `127.0.0.1:15012 over TLS`, `/etc/istio/proxy/XDS`: where, for the log.
impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.address {
            TargetAddress::Tcp(a) => write!(f, "{a}")?,
            TargetAddress::Unix(p) => write!(f, "{}", p.display())?,
        }
        if self.tls.is_some() {
            write!(f, " over TLS")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("address", &self.address)
            .field("tls", &self.tls.is_some())
            .field("authority", &self.authority)
            .finish()
    }
}

/// The bootstrap's xDS configuration, if it has one; an error for the xDS shapes pilotfish does
/// not speak yet (Envoy would run them, so the proxy must not start without them).
pub fn dynamic_resources(set: &ResourceSet) -> Result<Option<Dynamic>, String> {
    let Some(d) = &set.bootstrap.dynamic_resources else {
        return Ok(None);
    };
    if d.lds_config.is_none() && d.cds_config.is_none() {
        return Ok(None);
    }
    let ads = match &d.ads_config {
        Some(api) => Some(source(set, api, "dynamic_resources.ads_config")?),
        None => None,
    };
    let mut timeouts = [Duration::from_secs(15); 2];
    let mut vias = [None, None];
    for (i, (what, config)) in [("cds_config", &d.cds_config), ("lds_config", &d.lds_config)]
        .into_iter()
        .enumerate()
    {
        let Some(config) = config else { continue };
        let v = via(set, config, &format!("dynamic_resources.{what}"))?;
        if matches!(v, Via::Ads) && ads.is_none() {
            return Err(format!(
                "dynamic_resources.{what} names ads, and ads_config is not set"
            ));
        }
        vias[i] = Some(v);
        timeouts[i] = initial_fetch_timeout(config).unwrap_or(timeouts[i]);
    }
    let [cds, lds] = vias;
    Ok(Some(Dynamic {
        ads,
        cds,
        lds,
        cds_timeout: timeouts[0],
        lds_timeout: timeouts[1],
    }))
}

fn initial_fetch_timeout(source: &ConfigSource) -> Option<Duration> {
    let t = source.initial_fetch_timeout.as_ref()?;
    // 0 means no timeout: wait for the control plane as long as it takes.
    let d = Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32);
    Some(if d.is_zero() { Duration::MAX } else { d })
}

/// Whether a gRPC config source speaks delta xDS (DELTA_GRPC) rather than state of the world
/// (GRPC); an error for the other api types.
fn is_delta(api: &ApiConfigSource, at: &str) -> Result<bool, String> {
    match ApiType::try_from(api.api_type) {
        Ok(ApiType::Grpc) => Ok(false),
        Ok(ApiType::DeltaGrpc) => Ok(true),
        _ => Err(format!(
            "{at}: api_type {} is not implemented; GRPC and DELTA_GRPC are",
            api.api_type
        )),
    }
}

/// The static cluster a gRPC config source names, and where it reaches.
fn grpc_target(
    set: &ResourceSet,
    api: &ApiConfigSource,
    at: &str,
) -> Result<(String, Target), String> {
    let (cluster, authority, retry_back_off) = match api
        .grpc_services
        .first()
        .and_then(|g| g.target_specifier.as_ref())
    {
        Some(TargetSpecifier::EnvoyGrpc(e)) => {
            let back_off = e
                .retry_policy
                .as_ref()
                .and_then(|r| r.retry_back_off.as_ref());
            let base = back_off
                .and_then(|b| b.base_interval.as_ref())
                .map(|d| crate::duration(Some(d), Duration::ZERO));
            let max = back_off
                .and_then(|b| b.max_interval.as_ref())
                .map(|d| crate::duration(Some(d), Duration::ZERO));
            let retry_back_off = match (base, max) {
                (Some(base), max) => (base, max.unwrap_or(base * 10)),
                (None, _) => (Duration::from_millis(500), Duration::from_secs(30)),
            };
            (e.cluster_name.clone(), e.authority.clone(), retry_back_off)
        }
        Some(TargetSpecifier::GoogleGrpc(_)) => {
            return Err(format!(
                "{at}.grpc_services[0]: google_grpc is not implemented; envoy_grpc is"
            ))
        }
        None => return Err(format!("{at}: no grpc_services")),
    };
    let c = set
        .cluster(&cluster)
        .ok_or_else(|| format!("{at}: cluster '{cluster}' is not a static cluster"))?;
    if !c.value.transport_socket_matches.is_empty() {
        return Err(format!(
            "cluster '{cluster}': transport_socket_matches on the xDS server's cluster is not implemented; one transport_socket is"
        ));
    }
    let raw_buffer = |ts: &pilotfish_api::pb::envoy::config::core::v3::TransportSocket| {
        use pilotfish_api::pb::envoy::config::core::v3::transport_socket::ConfigType;
        match &ts.config_type {
            Some(ConfigType::TypedConfig(any)) => any.type_url.ends_with(".RawBuffer"),
            None => ts.name == "envoy.transport_sockets.raw_buffer",
        }
    };
    let tls = match &c.value.transport_socket {
        None => None,
        Some(ts) if raw_buffer(ts) => None,
        Some(ts) => {
            let ctx = crate::cluster::upstream_tls_context(ts).ok_or_else(|| {
                format!("cluster '{cluster}'.transport_socket: only TLS (UpstreamTlsContext) is implemented for the xDS server's cluster")
            })?;
            let mut tls = crate::transport_socket::upstream(set, &ctx)
                .map_err(|e| format!("cluster '{cluster}'.transport_socket: {e}"))?;
            // gRPC is HTTP/2: where the context names no protocol, h2 is offered, as Envoy's
            // HTTP/2 connection pools fall back to it.
            if tls.config.alpn_protocols.is_empty() {
                let mut config = (*tls.config).clone();
                config.alpn_protocols = vec![b"h2".to_vec()];
                tls.config = Arc::new(config);
            }
            Some(Arc::new(tls))
        }
    };
    use pilotfish_api::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    let address = c
        .value
        .load_assignment
        .as_ref()
        .and_then(|la| la.endpoints.first())
        .and_then(|e| e.lb_endpoints.first())
        .and_then(|e| match &e.host_identifier {
            Some(HostIdentifier::Endpoint(ep)) => ep.address.as_ref(),
            _ => None,
        })
        .ok_or_else(|| format!("cluster '{cluster}': no endpoint address"))?;
    let address = match &address.address {
        Some(address::Address::Pipe(p)) => TargetAddress::Unix(PathBuf::from(&p.path)),
        Some(address::Address::SocketAddress(_)) => {
            TargetAddress::Tcp(pilotfish_decide::listener::socket_addr(address).ok_or_else(
                || format!("cluster '{cluster}': the xDS server's address must be an IP address"),
            )?)
        }
        _ => return Err(format!("cluster '{cluster}': unsupported address kind")),
    };
    let connect_timeout = crate::duration(c.value.connect_timeout.as_ref(), Duration::from_secs(5));
    let target = Target {
        address,
        tls,
        connect_timeout,
        retry_back_off,
        authority: if authority.is_empty() {
            cluster.clone()
        } else {
            authority
        },
    };
    Ok((cluster, target))
}

/// One type's subscriptions: the names followed.
#[derive(Debug, Default)]
struct Watch {
    /// Empty: every resource of the type (CDS, LDS).
    names: Vec<String>,
    requested: bool,
}

/// A subscription waiting for its first resource, as Envoy's init targets wait: CDS and LDS
/// (name empty), each EDS cluster (by cluster name), each route configuration.
type Wait = (&'static str, String);

/// A stream to a management server: the ADS stream, or a subscription's own (its type, and
/// for EDS and RDS the cluster or route configuration it follows).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Channel {
    Ads,
    Own(&'static str, String),
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Channel::Ads => write!(f, "the ADS stream"),
            Channel::Own(ENDPOINT, cluster) => write!(f, "the EDS stream of cluster '{cluster}'"),
            Channel::Own(ROUTE, name) => {
                write!(f, "the RDS stream of route configuration '{name}'")
            }
            Channel::Own(type_url, _) => write!(f, "the {} stream", short(type_url)),
        }
    }
}

/// A type on a stream: what is asked for on it and the protocol's state.
#[derive(Debug, Default)]
struct Carried {
    /// Empty: every resource of the type.
    names: Vec<String>,
    /// The version last accepted, and the nonce of the last response.
    version: String,
    nonce: String,
    /// Delta: the names subscribed on this stream so far.
    sent: Vec<String>,
}

/// A stream as the fetch holds it: a task keeps it connected (`hold`) and hands over what it
/// receives; requests go through `tx` while it is open.
struct Wire {
    source: Source,
    /// Tells this stream's events from those of an earlier one on the same channel.
    generation: u64,
    task: tokio::task::AbortHandle,
    tx: Option<Sender>,
    node_sent: bool,
    /// By type.
    carried: std::collections::BTreeMap<&'static str, Carried>,
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a stream's task reports.
struct Event {
    channel: Channel,
    generation: u64,
    what: Happened,
}

enum Happened {
    /// A stream is being opened: its requests go here (asked before any response comes).
    Opening(Sender),
    Open,
    Response(Update),
    /// It could not be opened, or ended; the task tries again after its backoff.
    Failed,
}

enum Sender {
    Sotw(UnboundedSender<DiscoveryRequest>),
    Delta(UnboundedSender<DeltaDiscoveryRequest>),
}

/// A response of either variant, as the fetch takes it.
struct Update {
    type_url: String,
    /// State of the world's `version_info`; delta's `system_version_info`.
    version_info: String,
    nonce: String,
    /// Each resource with its version (state of the world: the response's).
    resources: Vec<(Any, String)>,
    /// Delta: names removed.
    removed: Vec<String>,
    delta: bool,
}

impl From<DiscoveryResponse> for Update {
    fn from(r: DiscoveryResponse) -> Update {
        Update {
            resources: r
                .resources
                .into_iter()
                .map(|a| (a, r.version_info.clone()))
                .collect(),
            type_url: r.type_url,
            version_info: r.version_info,
            nonce: r.nonce,
            removed: vec![],
            delta: false,
        }
    }
}

impl From<DeltaDiscoveryResponse> for Update {
    fn from(r: DeltaDiscoveryResponse) -> Update {
        Update {
            resources: r
                .resources
                .into_iter()
                .filter_map(|res| Some((res.resource?, res.version)))
                .collect(),
            type_url: r.type_url,
            version_info: r.system_version_info,
            nonce: r.nonce,
            removed: r.removed_resources,
            delta: true,
        }
    }
}

/// A stream's responses, of either variant.
enum Inbound {
    Sotw(tonic::Streaming<DiscoveryResponse>),
    Delta(tonic::Streaming<DeltaDiscoveryResponse>),
}

impl Inbound {
    async fn message(&mut self) -> Result<Option<Update>, tonic::Status> {
        match self {
            Inbound::Sotw(s) => Ok(s.message().await?.map(Update::from)),
            Inbound::Delta(s) => Ok(s.message().await?.map(Update::from)),
        }
    }
}

fn nack(error: Option<String>) -> Option<Status> {
    error.map(|message| Status {
        // INTERNAL, as Envoy reports a rejected update.
        code: 13,
        message,
        details: vec![],
    })
}

impl Wire {
    fn node(&mut self, node: &Node) -> Option<Node> {
        let node = (!self.source.node_first_only || !self.node_sent).then(|| node.clone());
        self.node_sent = true;
        node
    }

    /// Asks for what the stream carries of `type_url`. Delta: the names not asked for yet on
    /// this stream and those no longer wanted (with, first on a new stream, the versions held),
    /// without a nonce.
    fn subscribe(&mut self, node: &Node, type_url: &'static str, initial: Vec<(String, String)>) {
        let tx = match &self.tx {
            None => return,
            Some(Sender::Sotw(_)) => return self.send(node, type_url, None),
            Some(Sender::Delta(tx)) => tx.clone(),
        };
        let node = self.node(node);
        let c = self.carried.entry(type_url).or_default();
        let subscribe: Vec<String> = c
            .names
            .iter()
            .filter(|n| !c.sent.contains(n))
            .cloned()
            .collect();
        let unsubscribe: Vec<String> = c
            .sent
            .iter()
            .filter(|n| !c.names.contains(n))
            .cloned()
            .collect();
        c.sent.clone_from(&c.names);
        let _ = tx.send(DeltaDiscoveryRequest {
            node,
            type_url: type_url.to_string(),
            resource_names_subscribe: subscribe,
            resource_names_unsubscribe: unsubscribe,
            initial_resource_versions: initial.into_iter().collect(),
            ..Default::default()
        });
    }

    /// An ACK, or with `error` a NACK, of the last response of the type.
    fn send(&mut self, node: &Node, type_url: &'static str, error: Option<String>) {
        let node = self.node(node);
        let Some(c) = self.carried.get(type_url) else {
            return;
        };
        match &self.tx {
            None => {}
            Some(Sender::Delta(tx)) => {
                let _ = tx.send(DeltaDiscoveryRequest {
                    node,
                    type_url: type_url.to_string(),
                    response_nonce: c.nonce.clone(),
                    error_detail: nack(error),
                    ..Default::default()
                });
            }
            Some(Sender::Sotw(tx)) => {
                let _ = tx.send(DiscoveryRequest {
                    version_info: c.version.clone(),
                    node,
                    resource_names: c.names.clone(),
                    type_url: type_url.to_string(),
                    response_nonce: c.nonce.clone(),
                    error_detail: nack(error),
                    ..Default::default()
                });
            }
        }
    }
}

/// The gRPC method a stream opens: ADS's, or the discovery service of its type.
fn method(channel: &Channel, delta: bool) -> &'static str {
    let ty = match channel {
        Channel::Ads => "",
        Channel::Own(type_url, _) => type_url,
    };
    match (ty, delta) {
        ("", false) => {
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
        }
        ("", true) => {
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
        }
        (CLUSTER, false) => "/envoy.service.cluster.v3.ClusterDiscoveryService/StreamClusters",
        (CLUSTER, true) => "/envoy.service.cluster.v3.ClusterDiscoveryService/DeltaClusters",
        (ENDPOINT, false) => "/envoy.service.endpoint.v3.EndpointDiscoveryService/StreamEndpoints",
        (ENDPOINT, true) => "/envoy.service.endpoint.v3.EndpointDiscoveryService/DeltaEndpoints",
        (LISTENER, false) => "/envoy.service.listener.v3.ListenerDiscoveryService/StreamListeners",
        (LISTENER, true) => "/envoy.service.listener.v3.ListenerDiscoveryService/DeltaListeners",
        (_, false) => "/envoy.service.route.v3.RouteDiscoveryService/StreamRoutes",
        (_, true) => "/envoy.service.route.v3.RouteDiscoveryService/DeltaRoutes",
    }
}

/// Opens a bidirectional xDS stream (the gRPC method `path`) on a connection, its requests
/// taken from `requests` (queue the first before: Envoy's goes with the call).
async fn open_stream<Req, Resp>(
    connection: tonic::transport::Channel,
    path: &'static str,
    requests: tokio::sync::mpsc::UnboundedReceiver<Req>,
) -> Result<tonic::Streaming<Resp>, tonic::Status>
where
    Req: Message + Send + 'static,
    Resp: Message + Default + Send + 'static,
{
    let mut grpc = tonic::client::Grpc::new(connection);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let requests = tokio_stream::wrappers::UnboundedReceiverStream::new(requests);
    grpc.streaming(
        tonic::Request::new(requests),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Keeps one stream open: connects, opens the method, hands over each response, and after a
/// failure tries again after Envoy's backoff. Ends when the fetch lets the stream go.
async fn hold(channel: Channel, generation: u64, source: Source, events: UnboundedSender<Event>) {
    let mut backoff = Backoff::new(&source.target);
    let report = |what| {
        events
            .send(Event {
                channel: channel.clone(),
                generation,
                what,
            })
            .is_ok()
    };
    loop {
        let why = match connect(&source.target).await {
            Err(e) => format!(
                "cannot reach cluster '{}' at {}: {e}",
                source.cluster, source.target
            ),
            Ok(connection) => {
                let path = method(&channel, source.delta);
                let opened = if source.delta {
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    report(Happened::Opening(Sender::Delta(tx)));
                    open_stream(connection, path, rx).await.map(Inbound::Delta)
                } else {
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    report(Happened::Opening(Sender::Sotw(tx)));
                    open_stream(connection, path, rx).await.map(Inbound::Sotw)
                };
                match opened {
                    Err(e) => format!("was refused: {e}"),
                    Ok(mut inbound) => {
                        tracing::info!(target: "config", "xDS: {channel} to cluster '{}' open", source.cluster);
                        if !report(Happened::Open) {
                            return;
                        }
                        loop {
                            match inbound.message().await {
                                Ok(Some(r)) => {
                                    backoff.reset();
                                    if !report(Happened::Response(r)) {
                                        return;
                                    }
                                }
                                Ok(None) => break "was closed by the management server".into(),
                                Err(e) => break format!("failed: {e}"),
                            }
                        }
                    }
                }
            }
        };
        tracing::warn!(target: "config", "xDS: {channel} {why}; what was accepted stays, trying again");
        if !report(Happened::Failed) {
            return;
        }
        backoff.wait().await;
    }
}

/// The start-up fetch: what has been accepted so far, by type.
struct Fetch {
    config: Dynamic,
    node: Node,
    /// The streams open or being opened, by channel.
    wires: std::collections::BTreeMap<Channel, Wire>,
    generation: u64,
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    events_tx: UnboundedSender<Event>,
    cds: Watch,
    eds: Watch,
    lds: Watch,
    rds: Watch,
    dynamic: DynamicResources,
    /// The route configurations (stat prefix, name) of listeners an update replaced or
    /// removed, kept asked for until their drain ends (as Envoy's draining listener keeps its
    /// RDS subscription).
    draining_routes: Vec<((String, String), tokio::time::Instant)>,
    /// `--drain-time-s` (set once the proxy serves; nothing drains at start-up).
    drain_time: Duration,
    /// The EDS clusters: (cluster name, the service name it asks EDS for).
    eds_clusters: Vec<(String, String)>,
    /// The stream each EDS cluster's and each route configuration's subscription rides, by
    /// cluster and route configuration name.
    /// With the subscription's `initial_fetch_timeout`.
    eds_via: std::collections::BTreeMap<String, (Via, Duration)>,
    rds_via: std::collections::BTreeMap<String, (Via, Duration)>,
    /// The subscriptions waiting for their first resource, each until when (None: for ever).
    /// Start-up goes on, and a warming cluster or listener goes in service, once its
    /// subscriptions are no longer waiting: their resource came, a response was refused, or
    /// the wait ended (`init_fetch_timeout`).
    waiting: std::collections::BTreeMap<Wait, Option<tokio::time::Instant>>,
    /// The clusters' initialization is over (each came with its endpoints, or timed out):
    /// from then on a cluster added by an update warms while the rest serve.
    clusters_initialized: bool,
    /// The reply to a CDS response held while clusters it added warm (Some(NACK message or
    /// None for an ACK)): Envoy pauses CDS requests while any cluster is warming, so its ACK
    /// tells the server the clusters are ready for routes that use them.
    cds_held: Option<Option<String>>,
    /// Delta: the assignments and route configurations the server removed while they are still
    /// followed (kept, as Envoy keeps them), by type and name.
    removed_by_server: std::collections::BTreeSet<(&'static str, String)>,
    /// Listeners updated in place dump the version they had; the one received, by name.
    received_versions: std::collections::HashMap<String, String>,
    stats: stats::XdsStats,
}

/// Connects, asks for the configuration in Envoy's order and returns it once every type the
/// configuration needs has arrived (or timed out), with the streams to keep serving.
pub async fn fetch(
    base: &Config,
    config: &Dynamic,
    stats: std::sync::Arc<crate::stats::Store>,
) -> Result<(Config, Running), String> {
    let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
    let mut f = Fetch {
        node: base.resources.bootstrap.node.clone().unwrap_or_default(),
        wires: Default::default(),
        generation: 0,
        events,
        events_tx,
        cds: Watch::default(),
        eds: Watch::default(),
        lds: Watch::default(),
        rds: Watch::default(),
        dynamic: DynamicResources::default(),
        draining_routes: vec![],
        drain_time: Duration::ZERO,
        eds_clusters: vec![],
        eds_via: Default::default(),
        rds_via: Default::default(),
        waiting: Default::default(),
        clusters_initialized: false,
        cds_held: None,
        received_versions: Default::default(),
        removed_by_server: Default::default(),
        stats: stats::XdsStats::new(stats, config.ads.is_some()),
        config: config.clone(),
    };
    // The initial fetch timeouts run from the subscriptions, connected or not: a proxy that
    // cannot reach its management server starts without it, as Envoy does, and keeps trying.
    if config.cds.is_some() {
        f.cds.requested = true;
        f.stats.start_cds(matches!(config.cds, Some(Via::Own(_))));
        f.start_wait((CLUSTER, String::new()), config.cds_timeout);
        f.carry(CLUSTER);
    } else {
        f.request_listeners();
    }
    while !f.complete() {
        let deadline = f.next_deadline().unwrap_or_else(far_future);
        match tokio::time::timeout_at(deadline, f.events.recv()).await {
            Ok(Some(e)) => {
                f.on_event(base, e);
            }
            Ok(None) => unreachable!("the fetch holds a sender"),
            Err(_) => f.give_up_due(),
        }
    }
    let config = dynamic::assemble(base, &f.dynamic).map_err(|e| e.to_string())?;
    Ok((
        config,
        Running {
            fetch: f,
            base: base.clone(),
        },
    ))
}

/// Later than any deadline (tokio's own far future is private).
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86400 * 365 * 30)
}

/// Whether a transport socket names an SDS secret (one with a config source) that has not come
/// and is still waited for.
fn lacks_secret<'a>(
    active: &ResourceSet,
    given_up: &std::collections::BTreeSet<String>,
    mut sockets: impl Iterator<Item = &'a pilotfish_api::pb::envoy::config::core::v3::TransportSocket>,
) -> bool {
    sockets.any(|ts| {
        pilotfish_config::model::sds_secret_configs(ts)
            .iter()
            .any(|c| {
                c.sds_config.is_some()
                    && active.secret(&c.name).is_none()
                    && !given_up.contains(&c.name)
            })
    })
}

/// Clusters and listeners accepted but not in service yet.
#[derive(Default)]
struct Warming {
    clusters: Vec<pilotfish_config::resources::Resource<Cluster>>,
    listeners: Vec<pilotfish_config::resources::Resource<Listener>>,
    /// Some of them wait for an SDS secret.
    on_secrets: bool,
}

/// Envoy's reconnection backoff for xDS streams: a random wait below an interval that starts at
/// the base (500 ms unless `envoy_grpc.retry_policy.retry_back_off` says) and doubles up to the
/// maximum (30 s; ten times a configured base), back to the start once a response arrives.
struct Backoff {
    interval: Duration,
    attempt: u64,
    base: Duration,
    max: Duration,
}

impl Backoff {
    fn new(target: &Target) -> Backoff {
        let (base, max) = target.retry_back_off;
        Backoff {
            interval: base,
            attempt: 0,
            base,
            max,
        }
    }

    fn reset(&mut self) {
        self.interval = self.base;
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.next()).await;
    }

    fn next(&mut self) -> Duration {
        self.attempt += 1;
        let ms = self.interval.as_millis().max(1) as u64;
        let wait = Duration::from_millis(crate::random(self.attempt) % ms);
        self.interval = (self.interval * 2).min(self.max);
        wait
    }
}

/// The stream after start-up.
pub struct Running {
    fetch: Fetch,
    /// The bootstrap the dynamic resources are laid over.
    base: Config,
}

impl Running {
    /// Takes what the control plane sends from now on and puts each accepted update in
    /// service; runs for as long as the proxy does (the streams reconnect).
    pub async fn serve(mut self, server: std::sync::Arc<crate::server::Server>) {
        self.fetch.drain_time = Duration::from_secs(server.options.drain_time_s);
        // Something warms on an SDS secret: a secret's coming (or being given up) may let it go.
        let mut waiting = false;
        let mut secrets = server.secrets_arrived.subscribe();
        loop {
            let drain_ends = self.fetch.draining_routes.iter().map(|(_, end)| *end).min();
            let wait_ends = self.fetch.next_deadline();
            let event = tokio::select! {
                e = self.fetch.events.recv() => e.expect("the fetch holds a sender"),
                _ = sleep_until(drain_ends) => {
                    self.fetch.drain_ended();
                    continue;
                }
                _ = sleep_until(wait_ends) => {
                    self.fetch.give_up_due();
                    waiting = self.apply(&server, "what waited for its initial fetch timeout").await;
                    continue;
                }
                // A secret came (or was given up): what waited for it may go in service.
                _ = secrets.changed(), if waiting => {
                    waiting = self.apply(&server, "a secret").await;
                    continue;
                }
            };
            let what = match &event.what {
                Happened::Response(r) => {
                    format!("{} version {}", short(&r.type_url), r.version_info)
                }
                _ => String::new(),
            };
            if !self.fetch.on_event(&self.base, event) {
                continue;
            }
            // A refused update is applied too: the configuration stays as it was, and
            // /config_dump shows what was refused.
            waiting = self.apply(&server, &what).await;
        }
    }

    /// Puts what has been accepted in service, except the clusters and listeners still
    /// warming; returns whether any waits for a secret.
    async fn apply(&self, server: &std::sync::Arc<crate::server::Server>, what: &str) -> bool {
        let given_up = server.secrets_given_up.lock().unwrap().clone();
        let (view, warming) = self.fetch.in_service(&server.active().set, &given_up);
        let mut config = match dynamic::assemble(&self.base, &view) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(target: "config", "xDS: {what}: not applied: {e}");
                return false;
            }
        };
        if !(warming.listeners.is_empty() && warming.clusters.is_empty()) {
            let names: Vec<String> = warming
                .clusters
                .iter()
                .map(|c| format!("cluster '{}'", c.name))
                .chain(
                    warming
                        .listeners
                        .iter()
                        .map(|l| format!("listener '{}'", l.name)),
                )
                .collect();
            tracing::debug!(target: "config", "xDS: warming (waiting for their endpoints, route configurations or secrets): {}", names.join(", "));
        }
        config.resources.warming_listeners = warming.listeners;
        config.resources.warming_clusters = warming.clusters;
        let applied = server.apply(config.resources).await;
        tracing::info!(target: "config", "xDS: {what} in service: {applied}");
        warming.on_secrets
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `CDS`, `EDS`, `LDS`, `RDS` for the type URLs.
fn short(type_url: &str) -> &str {
    match type_url {
        CLUSTER => "CDS",
        ENDPOINT => "EDS",
        LISTENER => "LDS",
        ROUTE => "RDS",
        other => other,
    }
}

impl Fetch {
    /// Takes what a stream's task reports; returns whether it was a response (an update to put
    /// in service).
    fn on_event(&mut self, base: &Config, e: Event) -> bool {
        let Some(wire) = self
            .wires
            .get_mut(&e.channel)
            .filter(|w| w.generation == e.generation)
        else {
            // A stream let go since.
            return false;
        };
        match e.what {
            Happened::Opening(tx) => {
                wire.tx = Some(tx);
                self.opened(&e.channel);
            }
            Happened::Open => self.stats.connected(&e.channel, true),
            Happened::Failed => {
                wire.tx = None;
                self.stats.stream_failed(&e.channel);
            }
            Happened::Response(r) => {
                self.on_response(base, &e.channel, r);
                return true;
            }
        }
        false
    }

    /// A new stream asks for everything it carries with the versions last accepted, as Envoy
    /// does (node again, no nonce: the new server has sent nothing yet); delta says the
    /// versions it holds, state of the world says it by version_info.
    fn opened(&mut self, channel: &Channel) {
        let Some(wire) = self.wires.get_mut(channel) else {
            return;
        };
        wire.node_sent = false;
        let types: Vec<&'static str> = wire.carried.keys().copied().collect();
        for type_url in types {
            let c = wire.carried.get_mut(type_url).expect("carried");
            c.nonce.clear();
            c.sent.clear();
            let initial = if wire.source.delta {
                let d = &self.dynamic;
                let held = match type_url {
                    CLUSTER => versions_of(&d.clusters),
                    ENDPOINT => versions_of(&d.endpoints),
                    LISTENER => versions_of(&d.listeners)
                        .into_iter()
                        .map(|(name, v)| {
                            let v = self.received_versions.get(&name).cloned().unwrap_or(v);
                            (name, v)
                        })
                        .collect(),
                    _ => versions_of(&d.route_configs),
                };
                // What the server said it removed (and is kept, still followed) is said
                // without a version: Envoy waits for the server to say it again.
                held.into_iter()
                    .filter(|(name, _)| c.names.is_empty() || c.names.contains(name))
                    .filter(|(name, _)| !self.removed_by_server.contains(&(type_url, name.clone())))
                    .collect()
            } else {
                vec![]
            };
            if type_url == CLUSTER {
                // The new stream asks afresh for the clusters.
                self.cds_held = None;
            }
            wire.subscribe(&self.node, type_url, initial);
        }
    }

    /// Puts a type's subscriptions on their streams: those naming `ads {}` on the ADS stream,
    /// each other on one of its own (opened when it is new, closed when it is no longer
    /// followed); each stream whose names changed asks again.
    fn carry(&mut self, type_url: &'static str) {
        let mut want: std::collections::BTreeMap<Channel, (Via, Vec<String>)> = Default::default();
        let mut add = |own: Channel, via: &Via, name: Option<&String>| {
            let channel = match via {
                Via::Ads => Channel::Ads,
                Via::Own(_) => own,
            };
            let entry = want.entry(channel).or_insert_with(|| (via.clone(), vec![]));
            entry.1.extend(name.cloned());
        };
        match type_url {
            CLUSTER | LISTENER => {
                let via = if type_url == CLUSTER {
                    &self.config.cds
                } else {
                    &self.config.lds
                };
                if let Some(via) = via {
                    add(Channel::Own(type_url, String::new()), via, None);
                }
            }
            ENDPOINT => {
                for (cluster, service) in &self.eds_clusters {
                    if self.eds.names.contains(service) {
                        let via = self.eds_via.get(cluster).map_or(&Via::Ads, |(v, _)| v);
                        add(Channel::Own(ENDPOINT, cluster.clone()), via, Some(service));
                    }
                }
            }
            _ => {
                for name in &self.rds.names {
                    let via = self.rds_via.get(name).map_or(&Via::Ads, |(v, _)| v);
                    add(Channel::Own(ROUTE, name.clone()), via, Some(name));
                }
            }
        }
        // Streams of their own no longer followed close. (The ADS stream goes on; with none
        // of a type left to follow, Envoy sends nothing for it.)
        self.wires.retain(|channel, w| {
            *channel == Channel::Ads
                || !w.carried.contains_key(type_url)
                || want.contains_key(channel)
        });
        for (channel, (via, mut names)) in want {
            names.sort();
            names.dedup();
            if !self.wires.contains_key(&channel) {
                let source = match (via, &self.config.ads) {
                    (Via::Own(source), _) => source,
                    (Via::Ads, Some(ads)) => ads.clone(),
                    (Via::Ads, None) => {
                        tracing::warn!(target: "config", "xDS: {} names ads, and the bootstrap has no ads_config", short(type_url));
                        continue;
                    }
                };
                self.generation += 1;
                let task = tokio::spawn(hold(
                    channel.clone(),
                    self.generation,
                    source.clone(),
                    self.events_tx.clone(),
                ));
                self.wires.insert(
                    channel.clone(),
                    Wire {
                        source,
                        generation: self.generation,
                        task: task.abort_handle(),
                        tx: None,
                        node_sent: false,
                        carried: Default::default(),
                    },
                );
            }
            let wire = self.wires.get_mut(&channel).expect("inserted above");
            let new = !wire.carried.contains_key(type_url);
            let c = wire.carried.entry(type_url).or_default();
            if new || c.names != names {
                c.names = names;
                wire.subscribe(&self.node, type_url, vec![]);
            }
        }
    }

    fn watch(&mut self, type_url: &str) -> Option<&mut Watch> {
        match type_url {
            CLUSTER if self.cds.requested => Some(&mut self.cds),
            ENDPOINT if self.eds.requested => Some(&mut self.eds),
            LISTENER if self.lds.requested => Some(&mut self.lds),
            ROUTE if self.rds.requested => Some(&mut self.rds),
            _ => None,
        }
    }

    /// Tells the server on `channel` where this type stands: an ACK, or with `error` a NACK.
    fn reply(&mut self, channel: &Channel, type_url: &str, error: Option<String>) {
        let type_url = match type_url {
            CLUSTER => CLUSTER,
            ENDPOINT => ENDPOINT,
            LISTENER => LISTENER,
            _ => ROUTE,
        };
        if let Some(w) = self.wires.get_mut(channel) {
            w.send(&self.node, type_url, error);
        }
    }

    /// Start-up is over: listeners asked for (if the bootstrap has them) and nothing waits.
    fn complete(&self) -> bool {
        (self.lds.requested || self.config.lds.is_none()) && self.waiting.is_empty()
    }

    /// No subscription of the type waits.
    fn ready(&self, type_url: &str) -> bool {
        !self.waiting.keys().any(|(t, _)| *t == type_url)
    }

    fn start_wait(&mut self, wait: Wait, timeout: Duration) {
        self.waiting
            .entry(wait)
            .or_insert_with(|| tokio::time::Instant::now().checked_add(timeout));
    }

    fn next_deadline(&self) -> Option<tokio::time::Instant> {
        self.waiting.values().flatten().min().copied()
    }

    /// The subscriptions whose initial fetch timeout has come are taken as they stand (each
    /// counts `init_fetch_timeout`), and what waited for them goes on.
    fn give_up_due(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<Wait> = self
            .waiting
            .iter()
            .filter(|(_, at)| at.is_some_and(|at| at <= now))
            .map(|(w, _)| w.clone())
            .collect();
        for (type_url, name) in &due {
            self.waiting.remove(&(*type_url, name.clone()));
            let st = &self.stats;
            let subscription = match *type_url {
                CLUSTER => st.cds.as_ref(),
                LISTENER => st.lds.as_ref(),
                ENDPOINT => st.eds.get(name),
                _ => st.rds.get(name),
            };
            subscription
                .into_iter()
                .for_each(stats::Subscription::timed_out);
            tracing::warn!(target: "config", "xDS: {} {name} did not come within its initial_fetch_timeout; going on without it", short(type_url));
        }
        self.advance();
        if self.ready(ENDPOINT) {
            self.release_cds();
        }
    }

    /// The waits that end with a response of `type_url` on `channel`: an accepted one ends
    /// those whose resource came, a refused one all those it answers (Envoy lets start-up go
    /// on past a bad configuration).
    fn end_waits(&mut self, channel: &Channel, type_url: &'static str, accepted: bool) {
        let d = &self.dynamic;
        let eds_clusters = &self.eds_clusters;
        let (eds_via, rds_via) = (&self.eds_via, &self.rds_via);
        let on_channel = |via: Option<&(Via, Duration)>, own: Channel| match via {
            Some((Via::Own(_), _)) => *channel == own,
            _ => *channel == Channel::Ads,
        };
        self.waiting.retain(|(t, name), _| {
            if *t != type_url {
                return true;
            }
            let came = match type_url {
                CLUSTER | LISTENER => true,
                ENDPOINT => eds_clusters.iter().any(|(c, service)| {
                    c == name && d.endpoints.iter().any(|e| &e.name == service)
                }),
                _ => d.route_configs.iter().any(|r| &r.name == name),
            };
            let answered = match type_url {
                CLUSTER | LISTENER => true,
                ENDPOINT => on_channel(eds_via.get(name), Channel::Own(ENDPOINT, name.clone())),
                _ => on_channel(rds_via.get(name), Channel::Own(ROUTE, name.clone())),
            };
            !(answered && (came || !accepted))
        });
    }

    fn on_response(&mut self, base: &Config, channel: &Channel, r: Update) {
        let carried = self
            .wires
            .get(channel)
            .is_some_and(|w| w.carried.contains_key(r.type_url.as_str()));
        if self.watch(&r.type_url).is_none() || !carried {
            tracing::warn!(target: "config", "xDS: ignoring a response for {} on {channel} (not subscribed there)", r.type_url);
            return;
        }
        // A response is taken whole or not at all: checked alone, then with the rest of the
        // configuration (a cluster may not replace a static one, and so on).
        let before = (
            self.dynamic.clone(),
            self.draining_routes.clone(),
            self.eds_clusters.clone(),
            self.eds_via.clone(),
            self.rds_via.clone(),
            self.waiting.clone(),
        );
        let accepted = match r.type_url.as_str() {
            CLUSTER => self.on_clusters(base, &r),
            ENDPOINT => self.on_endpoints(&r),
            LISTENER => self.on_listeners(base, &r),
            _ => self.on_routes(&r),
        }
        .and_then(|next| dynamic::assemble(base, &self.dynamic).map(|_| next));
        if accepted.is_err() {
            (
                self.dynamic,
                self.draining_routes,
                self.eds_clusters,
                self.eds_via,
                self.rds_via,
                self.waiting,
            ) = before;
            let anys: Vec<Any> = r.resources.iter().map(|(a, _)| a.clone()).collect();
            let refused = match r.type_url.as_str() {
                CLUSTER => dynamic::refused(&anys, |c: &Cluster| c.name.clone()),
                ENDPOINT => {
                    dynamic::refused(&anys, |c: &ClusterLoadAssignment| c.cluster_name.clone())
                }
                LISTENER => dynamic::refused(&anys, |l: &Listener| l.name.clone()),
                _ => dynamic::refused(&anys, |rc: &RouteConfiguration| rc.name.clone()),
            };
            self.dynamic.refuse(refused);
        }
        // What the accepted resources name is asked for (Envoy sends it ahead of the ACK).
        match &accepted {
            Ok(Accepted::Clusters(changed)) => {
                if let Some(s) = &self.stats.cds {
                    s.accepted(&self.stats.store, &r.version_info, *changed);
                }
                let own = |c: &str| matches!(self.eds_via.get(c), Some((Via::Own(_), _)));
                self.stats
                    .follow_eds(self.eds_clusters.iter().map(|(c, _)| (c.as_str(), own(c))));
                let mut names: Vec<String> =
                    self.eds_clusters.iter().map(|(_, s)| s.clone()).collect();
                names.sort();
                names.dedup();
                self.subscribe(ENDPOINT, names);
            }
            Ok(Accepted::Listeners(routes)) => {
                if let Some(s) = &self.stats.lds {
                    s.accepted(&self.stats.store, &r.version_info, true);
                }
                self.subscribe_routes(routes);
            }
            Ok(Accepted::Named(changed)) => {
                // A delta response naming a route configuration as removed is an update of
                // its subscription to Envoy (counted; the configuration is kept).
                let removed = r
                    .removed
                    .iter()
                    .filter(|_| r.type_url == ROUTE)
                    .map(|n| (n.clone(), false));
                let changed: Vec<(String, bool)> = changed.iter().cloned().chain(removed).collect();
                let type_url = if r.type_url == ENDPOINT {
                    ENDPOINT
                } else {
                    ROUTE
                };
                for (name, _) in changed.iter().filter(|(n, _)| !r.removed.contains(n)) {
                    self.removed_by_server.remove(&(type_url, name.clone()));
                }
                for name in &r.removed {
                    self.removed_by_server.insert((type_url, name.clone()));
                }
                for (name, changed) in &changed {
                    let subs: Vec<&stats::Subscription> = if r.type_url == ENDPOINT {
                        self.eds_clusters
                            .iter()
                            .filter(|(_, service)| service == name)
                            .filter_map(|(c, _)| self.stats.eds.get(c))
                            .collect()
                    } else {
                        self.stats.rds.get(name).into_iter().collect()
                    };
                    for s in subs {
                        s.accepted(&self.stats.store, &r.version_info, *changed);
                    }
                }
            }
            Err(_) => {
                let subs: Vec<&stats::Subscription> = match r.type_url.as_str() {
                    CLUSTER => self.stats.cds.iter().collect(),
                    LISTENER => self.stats.lds.iter().collect(),
                    ENDPOINT => self.stats.eds.values().collect(),
                    _ => self.stats.rds.values().collect(),
                };
                subs.into_iter().for_each(|s| s.rejected(r.delta));
            }
        }
        let accepted = accepted.map(|_| ());
        let type_url = r.type_url.as_str();
        let c = self
            .wires
            .get_mut(channel)
            .and_then(|w| w.carried.get_mut(type_url))
            .expect("carried, checked above");
        r.nonce.clone_into(&mut c.nonce);
        if accepted.is_ok() {
            r.version_info.clone_into(&mut c.version);
        }
        let type_url: &'static str = match type_url {
            CLUSTER => CLUSTER,
            ENDPOINT => ENDPOINT,
            LISTENER => LISTENER,
            _ => ROUTE,
        };
        self.end_waits(channel, type_url, accepted.is_ok());
        let error = match accepted {
            Ok(()) => {
                self.dynamic.accepted(type_url);
                tracing::info!(target: "config", "xDS: {type_url} version {} accepted ({} resources)", r.version_info, r.resources.len());
                None
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::warn!(target: "config", "xDS: {type_url} version {} rejected: {msg}", r.version_info);
                Some(msg)
            }
        };
        // Initialization moves on while the response is handled: the listeners are asked for
        // ahead of the reply that completed the clusters.
        self.advance();
        if type_url == ENDPOINT && self.ready(ENDPOINT) {
            self.release_cds();
        }
        self.reply_or_hold(channel, type_url, error);
    }

    /// Replies, except to CDS while clusters warm after initialization (Envoy's cluster manager
    /// keeps CDS paused until no cluster is warming).
    fn reply_or_hold(&mut self, channel: &Channel, type_url: &str, error: Option<String>) {
        if type_url == CLUSTER && self.clusters_initialized && !self.ready(ENDPOINT) {
            tracing::debug!(target: "config", "xDS: clusters warming; the CDS reply waits for their endpoints");
            self.cds_held = Some(error);
            return;
        }
        self.reply(channel, type_url, error);
    }

    /// What goes in service now, with `active` the configuration in service: every accepted
    /// resource, except a new or changed EDS cluster whose endpoints subscription still waits,
    /// a new or changed listener whose route configurations' still wait, and either whose SDS
    /// secrets have not come (and are not `given_up`): those warm, as in Envoy, while the
    /// version in service (if any) goes on serving.
    fn in_service(
        &self,
        active: &ResourceSet,
        given_up: &std::collections::BTreeSet<String>,
    ) -> (DynamicResources, Warming) {
        let d = &self.dynamic;
        let mut view = DynamicResources {
            listeners: vec![],
            clusters: vec![],
            ..d.clone()
        };
        let mut warming = Warming::default();
        for c in &d.clusters {
            let now = active.cluster(&c.name).filter(|a| !a.origin.is_static());
            let on_secret = lacks_secret(
                active,
                given_up,
                pilotfish_config::model::cluster_transport_sockets(&c.value),
            );
            let waits = self.waiting.contains_key(&(ENDPOINT, c.name.clone())) || on_secret;
            if waits && now.is_none_or(|a| a.value != c.value) {
                warming.on_secrets |= on_secret;
                warming.clusters.push(c.clone());
                view.clusters.extend(now.cloned());
            } else {
                view.clusters.push(c.clone());
            }
        }
        for l in &d.listeners {
            let now = active
                .listeners
                .iter()
                .find(|a| a.name == l.name && !a.origin.is_static());
            let on_secret = lacks_secret(
                active,
                given_up,
                pilotfish_config::model::listener_transport_sockets(&l.value),
            );
            let waits = route_config_names(&l.value)
                .into_iter()
                .any(|(_, name)| self.waiting.contains_key(&(ROUTE, name)))
                || on_secret;
            if waits && now.is_none_or(|a| a.value != l.value) {
                warming.on_secrets |= on_secret;
                warming.listeners.push(l.clone());
                view.listeners.extend(now.cloned());
            } else {
                view.listeners.push(l.clone());
            }
        }
        (view, warming)
    }

    /// The warming clusters are ready (or gave up waiting): the held CDS reply goes.
    fn release_cds(&mut self) {
        if let Some(error) = self.cds_held.take() {
            let channel = self
                .wires
                .iter()
                .find(|(_, w)| w.carried.contains_key(CLUSTER))
                .map(|(channel, _)| channel.clone());
            if let Some(channel) = channel {
                self.reply(&channel, CLUSTER, error);
            }
        }
    }

    /// Listeners once the clusters and their endpoints are in, as Envoy's initialization goes.
    fn advance(&mut self) {
        if self.ready(CLUSTER) && self.ready(ENDPOINT) {
            self.clusters_initialized = true;
            if !self.lds.requested {
                self.request_listeners();
            }
        }
    }

    fn request_listeners(&mut self) {
        if let Some(via) = &self.config.lds {
            self.lds.requested = true;
            self.stats.start_lds(matches!(via, Via::Own(_)));
            self.start_wait((LISTENER, String::new()), self.config.lds_timeout);
            self.carry(LISTENER);
        }
    }

    /// Takes the clusters and which of them ask EDS for what; says whether any was added or
    /// changed.
    fn on_clusters(&mut self, base: &Config, r: &Update) -> Result<Accepted, ConfigErrors> {
        let clusters: Vec<(Cluster, String)> = decode_all(r)?;
        let before: Vec<String> = self.eds_clusters.iter().map(|(c, _)| c.clone()).collect();
        let changed = changed(&self.dynamic.clusters, &clusters, |c| c.name.clone());
        resources(
            &mut self.dynamic.clusters,
            Keep::listed(r),
            clusters,
            "clusters",
            |c| c.name.clone(),
        );
        self.eds_clusters = self
            .dynamic
            .clusters
            .iter()
            .map(|r| &r.value)
            .filter(|c| {
                matches!(
                    c.cluster_discovery_type,
                    Some(cluster::ClusterDiscoveryType::Type(t)) if t == cluster::DiscoveryType::Eds as i32
                )
            })
            .map(|c| {
                let service = c
                    .eds_cluster_config
                    .as_ref()
                    .map(|e| e.service_name.clone())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| c.name.clone());
                (c.name.clone(), service)
            })
            .collect();
        let mut vias = std::collections::BTreeMap::new();
        for c in &self.dynamic.clusters {
            if !self.eds_clusters.iter().any(|(name, _)| name == &c.name) {
                continue;
            }
            let source = c
                .value
                .eds_cluster_config
                .as_ref()
                .and_then(|e| e.eds_config.as_ref());
            let at = format!("clusters[{}].eds_cluster_config.eds_config", c.name);
            vias.insert(c.name.clone(), self.via_of(base, source, &at)?);
        }
        self.eds_via = vias;
        // A new EDS cluster waits for its endpoints (its subscription's initial fetch), one
        // gone waits no more.
        for (c, service) in self.eds_clusters.clone() {
            let have = self.dynamic.endpoints.iter().any(|e| e.name == service);
            if !before.contains(&c) && !have {
                let timeout = self.eds_via[&c].1;
                self.start_wait((ENDPOINT, c), timeout);
            }
        }
        let eds_clusters = &self.eds_clusters;
        self.waiting
            .retain(|(t, n), _| *t != ENDPOINT || eds_clusters.iter().any(|(c, _)| c == n));
        Ok(Accepted::Clusters(changed.iter().any(|(_, c)| *c)))
    }

    /// The stream a cluster's or connection manager's config source puts its subscription on
    /// (`ads {}` where none is given), and its `initial_fetch_timeout`.
    fn via_of(
        &self,
        base: &Config,
        source: Option<&ConfigSource>,
        at: &str,
    ) -> Result<(Via, Duration), ConfigErrors> {
        let via = match source {
            None => Via::Ads,
            Some(cs) => via(&base.resources, cs, at).map_err(|e| {
                ConfigErrors(vec![pilotfish_config::error::ConfigError::new(
                    "ads", at, e,
                )])
            })?,
        };
        if matches!(via, Via::Ads) && self.config.ads.is_none() {
            return Err(ConfigErrors(vec![
                pilotfish_config::error::ConfigError::new(
                    "ads",
                    at,
                    "names ads, and the bootstrap has no ads_config",
                ),
            ]));
        }
        let timeout = source
            .and_then(initial_fetch_timeout)
            .unwrap_or(Duration::from_secs(15));
        Ok((via, timeout))
    }

    /// Drained listeners' route configurations are no longer asked for.
    fn drain_ended(&mut self) {
        let rds = self.routes_followed();
        self.subscribe_routes(&rds);
    }

    /// The route configurations RDS follows: those the listeners name, then those of listeners
    /// still draining.
    fn routes_followed(&mut self) -> Vec<(String, String)> {
        let now = tokio::time::Instant::now();
        self.draining_routes.retain(|(_, end)| *end > now);
        self.dynamic
            .listeners
            .iter()
            .flat_map(|l| route_config_names(&l.value))
            .chain(self.draining_routes.iter().map(|(n, _)| n.clone()))
            .collect()
    }

    /// RDS follows the route configurations the listeners name, (stat prefix, name) in
    /// listener order: a name's stats go under the first connection manager naming it.
    fn subscribe_routes(&mut self, routes: &[(String, String)]) {
        let mut first: Vec<(String, String)> = vec![];
        for r in routes {
            if !first.iter().any(|f| f.1 == r.1) {
                first.push(r.clone());
            }
        }
        let own = |name: &str| matches!(self.rds_via.get(name), Some((Via::Own(_), _)));
        self.stats.follow_rds(&first, own);
        let mut names: Vec<String> = first.into_iter().map(|(_, n)| n).collect();
        names.sort();
        self.subscribe(ROUTE, names);
    }

    /// Subscribes EDS or RDS to `names`; with none, that type has nothing to wait for.
    fn subscribe(&mut self, type_url: &'static str, names: Vec<String>) {
        let w = if type_url == ENDPOINT {
            &mut self.eds
        } else {
            &mut self.rds
        };
        if names.is_empty() {
            // Streams of their own close; the ADS stream says nothing of it, as Envoy's.
            self.wires
                .retain(|channel, _| !matches!(channel, Channel::Own(t, _) if *t == type_url));
            if type_url == ROUTE {
                self.waiting.retain(|(t, _), _| *t != ROUTE);
            }
            return;
        }
        if names != w.names || !w.requested {
            if type_url == ROUTE {
                // A route configuration newly followed waits for its first version; one no
                // longer followed waits no more. (EDS waits go by cluster: `on_clusters`.)
                for n in names
                    .iter()
                    .filter(|n| !w.names.contains(n) || !w.requested)
                {
                    if !self.dynamic.route_configs.iter().any(|r| &r.name == n) {
                        let timeout = self
                            .rds_via
                            .get(n)
                            .map_or(Duration::from_secs(15), |(_, t)| *t);
                        self.waiting
                            .entry((ROUTE, n.clone()))
                            .or_insert_with(|| tokio::time::Instant::now().checked_add(timeout));
                    }
                }
                self.waiting
                    .retain(|(t, n), _| *t != ROUTE || names.contains(n));
            }
            w.names = names;
            w.requested = true;
            // What is no longer asked for is gone (EDS and RDS responses name only what they
            // carry: an absent resource is not a removed one).
            let names = w.names.clone();
            self.removed_by_server
                .retain(|(t, n)| *t != type_url || names.contains(n));
            if type_url == ENDPOINT {
                self.dynamic.endpoints.retain(|r| names.contains(&r.name));
            } else {
                self.dynamic
                    .route_configs
                    .retain(|r| names.contains(&r.name));
            }
        }
        // Also with the same names: a subscription may have moved to another stream.
        self.carry(type_url);
    }

    fn on_endpoints(&mut self, r: &Update) -> Result<Accepted, ConfigErrors> {
        let cla: Vec<(ClusterLoadAssignment, String)> = decode_all(r)?;
        let changed = changed(&self.dynamic.endpoints, &cla, |c| c.cluster_name.clone());
        resources(
            &mut self.dynamic.endpoints,
            Keep::Absent(&[]),
            cla,
            "endpoints",
            |c| c.cluster_name.clone(),
        );
        Ok(Accepted::Named(changed))
    }

    /// Takes the listeners; returns the route configurations they ask RDS for.
    fn on_listeners(&mut self, base: &Config, r: &Update) -> Result<Accepted, ConfigErrors> {
        let listeners: Vec<(Listener, String)> = decode_all(r)?;
        let before = self.dynamic.listeners.clone();
        resources(
            &mut self.dynamic.listeners,
            Keep::listed(r),
            listeners,
            "listeners",
            |l| l.name.clone(),
        );
        let held = &self.dynamic.listeners;
        self.received_versions.retain(|name, _| {
            let was = before.iter().find(|b| &b.name == name);
            let now = held.iter().find(|l| &l.name == name);
            matches!((was, now), (Some(was), Some(now)) if was.value == now.value)
        });
        if !self.drain_time.is_zero() {
            // A listener in service whose filter chains alone changed is updated in place, and
            // Envoy's dump goes on showing the version it had (the new listener object takes
            // over its predecessor's version_info).
            for l in &mut self.dynamic.listeners {
                let Some(was) = before.iter().find(|b| b.name == l.name) else {
                    continue;
                };
                if was.value != l.value
                    && crate::server::filter_chains_only_change(&was.value, &l.value)
                {
                    if let (
                        pilotfish_config::resources::Origin::Dynamic { version_info, .. },
                        pilotfish_config::resources::Origin::Dynamic {
                            version_info: old, ..
                        },
                    ) = (&mut l.origin, &was.origin)
                    {
                        // The version received is still the one held, for delta's
                        // initial_resource_versions.
                        let received = std::mem::replace(version_info, old.clone());
                        self.received_versions.insert(l.name.clone(), received);
                    }
                }
            }
        }
        let now = tokio::time::Instant::now();
        if !self.drain_time.is_zero() {
            for old in &before {
                if !self.dynamic.listeners.iter().any(|l| l.value == old.value) {
                    for name in route_config_names(&old.value) {
                        self.draining_routes.push((name, now + self.drain_time));
                    }
                }
            }
        }
        let followed = self.routes_followed();
        // Draining listeners' route configurations keep the stream they had.
        let mut vias = std::mem::take(&mut self.rds_via);
        for l in &self.dynamic.listeners {
            for (_, rds) in rds_of(&l.value) {
                let at = format!("listeners[{}].rds.config_source", l.name);
                let via = self.via_of(base, rds.config_source.as_ref(), &at)?;
                vias.insert(rds.route_config_name, via);
            }
        }
        vias.retain(|name, _| followed.iter().any(|(_, f)| f == name));
        self.rds_via = vias;
        Ok(Accepted::Listeners(followed))
    }

    fn on_routes(&mut self, r: &Update) -> Result<Accepted, ConfigErrors> {
        let routes: Vec<(RouteConfiguration, String)> = decode_all(r)?;
        let changed = changed(&self.dynamic.route_configs, &routes, |rc| rc.name.clone());
        resources(
            &mut self.dynamic.route_configs,
            Keep::Absent(&[]),
            routes,
            "route_configs",
            |rc| rc.name.clone(),
        );
        Ok(Accepted::Named(changed))
    }
}

/// What an accepted response brings for the subscriptions that follow from it.
enum Accepted {
    /// Whether any cluster was added or changed.
    Clusters(bool),
    /// The route configurations the listeners name: (stat prefix, name).
    Listeners(Vec<(String, String)>),
    /// EDS and RDS: each resource carried, and whether it changed.
    Named(Vec<(String, bool)>),
}

/// Each item by name, and whether it differs from what `previous` holds under that name.
fn changed<T: PartialEq>(
    previous: &[pilotfish_config::resources::Resource<T>],
    items: &[(T, String)],
    name_of: impl Fn(&T) -> String,
) -> Vec<(String, bool)> {
    items
        .iter()
        .map(|(v, _)| {
            let name = name_of(v);
            let same = previous.iter().any(|p| p.name == name && &p.value == v);
            (name, !same)
        })
        .collect()
}

/// Resources as the set keeps them, each under `kind[name]`. One the update leaves as it was
/// keeps its version and time (Envoy skips an unchanged resource, so its dump shows the
/// version that last changed it).
fn resources<T: PartialEq>(
    previous: &mut Vec<pilotfish_config::resources::Resource<T>>,
    keep: Keep,
    items: Vec<(T, String)>,
    kind: &str,
    name_of: impl Fn(&T) -> String,
) {
    let mut old: std::collections::HashMap<String, pilotfish_config::resources::Resource<T>> =
        std::mem::take(previous)
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
    *previous = items
        .into_iter()
        .map(|(v, version)| {
            let name = name_of(&v);
            match old.remove(&name) {
                Some(r) if r.value == v => r,
                _ => dynamic::resource(name.clone(), format!("{kind}[{name}]"), &version, v),
            }
        })
        .collect();
    if let Keep::Absent(removed) = keep {
        let mut rest: Vec<_> = old
            .into_values()
            .filter(|r| !removed.contains(&r.name))
            .collect();
        rest.sort_by(|a, b| a.name.cmp(&b.name));
        previous.extend(rest);
    }
}

/// Delta: what each held resource's version is, to say on a new stream.
fn versions_of<T>(held: &[pilotfish_config::resources::Resource<T>]) -> Vec<(String, String)> {
    held.iter()
        .map(|r| {
            let version = match &r.origin {
                pilotfish_config::resources::Origin::Dynamic { version_info, .. } => {
                    version_info.clone()
                }
                _ => String::new(),
            };
            (r.name.clone(), version)
        })
        .collect()
}

/// What a response means for the resources it leaves out.
#[derive(PartialEq, Eq, Clone, Copy)]
enum Keep<'a> {
    /// State of the world CDS and LDS: the response lists every resource; one left out is
    /// removed.
    Listed,
    /// EDS and RDS, and every delta response: the response carries what it updates; the rest
    /// stay as they are, but for those a delta CDS or LDS response names as removed. (Envoy
    /// keeps a route configuration or an assignment a delta response removes while it is
    /// asked for: a draining listener still routes by it.)
    Absent(&'a [String]),
}

impl Keep<'_> {
    fn listed(r: &Update) -> Keep<'_> {
        if r.delta {
            Keep::Absent(&r.removed)
        } else {
            Keep::Listed
        }
    }
}

/// Every resource of a response, each checked; the errors of all of them together.
fn decode_all<T: Message + Name + Default>(r: &Update) -> Result<Vec<(T, String)>, ConfigErrors> {
    let kind = T::NAME.to_ascii_lowercase();
    let mut out = vec![];
    let mut errors = vec![];
    for (i, (any, version)) in r.resources.iter().enumerate() {
        match dynamic::decode_resource::<T>("ads", &format!("{kind}[{i}]"), any) {
            Ok(v) => out.push((v, version.clone())),
            Err(ConfigErrors(e)) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The route configurations a listener's connection managers ask RDS for: (the connection
/// manager's stat prefix, route configuration name).
fn route_config_names(l: &Listener) -> Vec<(String, String)> {
    rds_of(l)
        .into_iter()
        .map(|(prefix, rds)| (prefix, rds.route_config_name))
        .collect()
}

/// A listener's connection managers' RDS subscriptions: (stat prefix, their `rds`).
fn rds_of(l: &Listener) -> Vec<(String, Rds)> {
    let mut out = vec![];
    for fc in l
        .filter_chains
        .iter()
        .chain(l.default_filter_chain.as_ref())
    {
        for f in &fc.filters {
            let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                continue;
            };
            if pilotfish_api::type_url_message_name(&any.type_url)
                != HttpConnectionManager::full_name()
            {
                continue;
            }
            let Ok(hcm) = HttpConnectionManager::decode(any.value.as_slice()) else {
                continue;
            };
            if let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier {
                out.push((hcm.stat_prefix, rds));
            }
        }
    }
    out
}

async fn connect(target: &Target) -> Result<tonic::transport::Channel, String> {
    // The connector below decides where the connection goes; the URI only gives the requests
    // their authority (a cluster name that is no valid one, `outbound|15012||istiod...`, gets a
    // plain placeholder).
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", target.authority))
        .unwrap_or_else(|_| tonic::transport::Endpoint::from_static("http://xds-grpc"));
    endpoint
        .connect_with_connector(Connector(target.clone()))
        .await
        .map_err(|e| {
            // tonic's own message ("transport error") hides the cause.
            let mut out = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                let s_text = s.to_string();
                if !out.contains(&s_text) {
                    out = format!("{out}: {s_text}");
                }
                source = s.source();
            }
            out
        })
}

/// Connects to the management server: TCP or a Unix socket (istio-agent serves its sidecar on
/// one), then TLS where the cluster has it.
#[derive(Clone)]
struct Connector(Target);

impl tonic::codegen::Service<tonic::codegen::http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<Box<dyn crate::cluster::Io>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let target = self.0.clone();
        Box::pin(async move {
            let connected = async {
                let stream: Box<dyn crate::cluster::Io> = match &target.address {
                    TargetAddress::Tcp(a) => {
                        let s = tokio::net::TcpStream::connect(a).await?;
                        s.set_nodelay(true)?;
                        Box::new(s)
                    }
                    TargetAddress::Unix(path) => {
                        Box::new(tokio::net::UnixStream::connect(path).await?)
                    }
                };
                std::io::Result::Ok(stream)
            };
            let stream = tokio::time::timeout(target.connect_timeout, connected)
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout")
                })??;
            let Some(tls) = &target.tls else {
                return Ok(hyper_util::rt::TokioIo::new(stream));
            };
            let tls_stream = tokio_rustls::TlsConnector::from(tls.config.clone())
                .connect(tls.server_name.clone(), stream)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
            Ok(hyper_util::rt::TokioIo::new(
                Box::new(tls_stream) as Box<dyn crate::cluster::Io>
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xds_bootstrap(envoy_grpc: &str) -> ResourceSet {
        bootstrap(&format!(
            "{{ ads_config: {{ api_type: GRPC, transport_api_version: V3, grpc_services: [{{ envoy_grpc: {envoy_grpc} }}] }}, cds_config: {{ ads: {{}}, resource_api_version: V3 }} }}"
        ))
    }

    fn ads_target(set: &ResourceSet) -> Target {
        let d = dynamic_resources(set).unwrap().unwrap();
        d.ads.unwrap().target
    }

    fn bootstrap(dynamic: &str) -> ResourceSet {
        let b = pilotfish_config::load_message::<pilotfish_api::pb::envoy::config::bootstrap::v3::Bootstrap>(
            "test.yaml",
            &format!(
                r#"dynamic_resources: {dynamic}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    load_assignment: {{ cluster_name: xds-grpc, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15010 }} }} }} }}] }}] }}
"#
            ),
        )
        .unwrap();
        ResourceSet::from_bootstrap(b)
    }

    #[test]
    fn config_sources_of_their_own_and_what_is_refused() {
        let grpc = "{ api_config_source: { api_type: GRPC, transport_api_version: V3, grpc_services: [{ envoy_grpc: { cluster_name: xds-grpc } }] } }";
        // No ads_config needed when nothing names ADS.
        let d = dynamic_resources(&bootstrap(&format!(
            "{{ cds_config: {grpc}, lds_config: {grpc} }}"
        )))
        .unwrap()
        .unwrap();
        assert!(d.ads.is_none());
        assert!(matches!(&d.cds, Some(Via::Own(s)) if s.cluster == "xds-grpc" && !s.delta));
        assert!(matches!(&d.lds, Some(Via::Own(_))));
        let refused = |dynamic: &str| dynamic_resources(&bootstrap(dynamic)).unwrap_err();
        assert_eq!(
            refused(&format!(
                "{{ cds_config: {grpc}, lds_config: {{ ads: {{}} }} }}"
            )),
            "dynamic_resources.lds_config names ads, and ads_config is not set"
        );
        let e = refused("{ cds_config: { path_config_source: { path: /etc/envoy/cds.yaml } } }");
        assert!(
            e.starts_with("dynamic_resources.cds_config: only ads {} and a gRPC api_config_source"),
            "{e}"
        );
        let e = refused(&format!(
            "{{ lds_config: {} }}",
            grpc.replace("cluster_name: xds-grpc", "cluster_name: elsewhere")
        ));
        assert_eq!(
            e,
            "dynamic_resources.lds_config.api_config_source: cluster 'elsewhere' is not a static cluster"
        );
        let e = refused(&format!(
            "{{ lds_config: {} }}",
            grpc.replace("GRPC", "REST")
        ));
        assert!(
            e.starts_with("dynamic_resources.lds_config.api_config_source: api_type"),
            "{e}"
        );
    }

    /// Each wait is below the interval, which doubles from the base up to the maximum.
    fn intervals(b: &mut Backoff, n: usize) -> Vec<Duration> {
        (0..n)
            .map(|_| {
                let interval = b.interval;
                assert!(b.next() < interval.max(Duration::from_millis(1)));
                interval
            })
            .collect()
    }

    #[test]
    fn reconnection_backoff_follows_the_retry_policy() {
        let ms = Duration::from_millis;
        let set = xds_bootstrap(
            "{ cluster_name: xds-grpc, retry_policy: { retry_back_off: { base_interval: 0.1s, max_interval: 0.3s } } }",
        );
        let mut b = Backoff::new(&ads_target(&set));
        assert_eq!(intervals(&mut b, 4), [ms(100), ms(200), ms(300), ms(300)]);
        b.reset();
        assert_eq!(intervals(&mut b, 1), [ms(100)]);
        // Without a maximum: ten times the base.
        let set = xds_bootstrap(
            "{ cluster_name: xds-grpc, retry_policy: { retry_back_off: { base_interval: 0.1s } } }",
        );
        let mut b = Backoff::new(&ads_target(&set));
        assert_eq!(intervals(&mut b, 6)[5], ms(1000));
        // Envoy's default: 500 ms up to 30 s.
        let set = xds_bootstrap("{ cluster_name: xds-grpc }");
        let mut b = Backoff::new(&ads_target(&set));
        assert_eq!(intervals(&mut b, 8)[7], Duration::from_secs(30));
        assert_eq!(intervals(&mut b, 1), [Duration::from_secs(30)]);
    }
}
