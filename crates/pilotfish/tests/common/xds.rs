#![allow(dead_code)]
//! A small xDS management server for tests (ADS, state of the world, tonic): it serves a snapshot
//! of resources by type, pushes each new snapshot to the open streams, and records every request
//! a proxy sends (type, version, names, nonce, NACK message), so real Envoy and pilotfish can be
//! driven through the same sequence and their conversations compared.

use pilotfish_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use pilotfish_api::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use pilotfish_api::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use pilotfish_api::pb::envoy::service::{
    cluster::v3::cluster_discovery_service_server::{
        ClusterDiscoveryService, ClusterDiscoveryServiceServer,
    },
    endpoint::v3::endpoint_discovery_service_server::{
        EndpointDiscoveryService, EndpointDiscoveryServiceServer,
    },
    listener::v3::listener_discovery_service_server::{
        ListenerDiscoveryService, ListenerDiscoveryServiceServer,
    },
    route::v3::route_discovery_service_server::{
        RouteDiscoveryService, RouteDiscoveryServiceServer,
    },
};
use pilotfish_api::pb::google::protobuf::Any;
use prost::{Message, Name};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub type_url: String,
    pub version_info: String,
    pub resource_names: Vec<String>,
    pub response_nonce: String,
    /// A NACK's message.
    pub error: Option<String>,
    pub has_node: bool,
    /// Delta xDS: the names subscribed and unsubscribed, and the versions the proxy says it
    /// holds (on a new stream).
    pub delta: Option<DeltaSeen>,
    /// Which stream it came on (numbered from 1 as they opened).
    pub stream: u64,
}

/// What a delta request says beyond the nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaSeen {
    pub subscribe: Vec<String>,
    pub unsubscribe: Vec<String>,
    pub initial: Vec<(String, String)>,
}

impl Seen {
    /// `CDS v1 nonce=2 [names]`, or with `NACK`: the shape compared between proxies. The
    /// nonce shown is the response's number on its stream (streams open in a proxy's own
    /// order).
    pub fn summary(&self) -> String {
        let nonce = self.response_nonce.split_once('.').map_or("", |(_, n)| n);
        let kind = match self.type_url.as_str() {
            CLUSTER => "CDS",
            ENDPOINT => "EDS",
            LISTENER => "LDS",
            ROUTE => "RDS",
            SECRET => "SDS",
            other => other,
        };
        // Names are a set: Envoy sends them in its hash set's order.
        let mut names = self.resource_names.clone();
        names.sort();
        if let Some(DeltaSeen {
            subscribe: sub,
            unsubscribe: unsub,
            initial,
        }) = &self.delta
        {
            let sorted = |v: &Vec<String>| {
                let mut v = v.clone();
                v.sort();
                v
            };
            let mut initial = initial.clone();
            initial.sort();
            return format!(
                "{kind} delta nonce='{nonce}' subscribe={:?} unsubscribe={:?} initial={initial:?}{}{}",
                sorted(sub),
                sorted(unsub),
                if self.error.is_some() { " NACK" } else { "" },
                if self.has_node { " node" } else { "" }
            );
        }
        format!(
            "{kind} version='{}' nonce='{nonce}' names={names:?}{}{}",
            self.version_info,
            if self.error.is_some() { " NACK" } else { "" },
            if self.has_node { " node" } else { "" }
        )
    }
}

/// A resource set by type: version and resources (name -> Any).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub version: String,
    pub resources: BTreeMap<String, BTreeMap<String, Any>>,
    /// Delta xDS: each resource's version, the snapshot version that last changed it (filled
    /// in when the snapshot is served).
    versions: BTreeMap<(String, String), String>,
}

impl Snapshot {
    pub fn new(version: &str) -> Snapshot {
        Snapshot {
            version: version.to_string(),
            resources: BTreeMap::new(),
            versions: BTreeMap::new(),
        }
    }

    /// Versions for delta xDS: a resource unchanged since `previous` keeps its version.
    fn versioned(mut self, previous: Option<&Snapshot>) -> Snapshot {
        for (type_url, all) in &self.resources {
            for (name, any) in all {
                let key = (type_url.clone(), name.clone());
                let kept = previous.and_then(|p| {
                    let same = p.resources.get(type_url)?.get(name)? == any;
                    same.then(|| p.versions.get(&key).cloned()).flatten()
                });
                self.versions
                    .insert(key, kept.unwrap_or_else(|| self.version.clone()));
            }
        }
        self
    }

    pub fn with<T: Message + Name>(mut self, name: &str, value: &T) -> Snapshot {
        self.resources
            .entry(T::type_url())
            .or_default()
            .insert(name.to_string(), any(value));
        self
    }
}

pub fn any<T: Message + Name>(value: &T) -> Any {
    Any {
        type_url: T::type_url(),
        value: value.encode_to_vec(),
    }
}

/// One TLS handshake a proxy made with the server: what it offered and presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    pub sni: Option<String>,
    /// The ALPN protocols offered, in the client's order.
    pub alpn: Vec<String>,
    /// The client certificate (DER), when one was presented.
    pub client_cert: Option<Vec<u8>>,
    /// Why the handshake failed; None when it completed.
    pub error: Option<String>,
}

struct State {
    snapshot: watch::Sender<Snapshot>,
    seen: Mutex<Vec<Seen>>,
    handshakes: Mutex<Vec<Handshake>>,
    /// The nonce of the last response sent, by open stream and type.
    last_sent: Mutex<BTreeMap<(u64, String), String>>,
    /// The snapshot version each open stream has pushed (or found nothing to push for).
    processed: Mutex<BTreeMap<u64, String>>,
    streams: std::sync::atomic::AtomicU64,
}

impl State {
    fn new(initial: Snapshot) -> Arc<State> {
        Arc::new(State {
            snapshot: watch::channel(initial.versioned(None)).0,
            seen: Mutex::new(vec![]),
            handshakes: Mutex::new(vec![]),
            last_sent: Mutex::new(BTreeMap::new()),
            processed: Mutex::new(BTreeMap::new()),
            streams: Default::default(),
        })
    }
}

pub struct XdsServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Serves over TLS with this configuration (client certificates optional or required as
    /// it says).
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Drop for XdsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

impl XdsServer {
    /// Serves `initial` on a free loopback port, on a runtime of its own thread.
    pub fn start(initial: Snapshot) -> XdsServer {
        XdsServer::start_at(initial, "127.0.0.1:0".parse().unwrap())
    }

    /// Not serving yet.
    fn new(initial: Snapshot, addr: SocketAddr) -> XdsServer {
        XdsServer {
            addr,
            state: State::new(initial),
            stop: None,
            thread: None,
            tls: None,
        }
    }

    /// Serves `initial` on `addr` (a port a proxy was told of before the server came up).
    pub fn start_at(initial: Snapshot, addr: SocketAddr) -> XdsServer {
        let mut server = XdsServer::new(initial, addr);
        server.listen_tcp();
        server
    }

    /// Serves `initial` over TLS on a free loopback port, as istiod serves xDS on 15012: the
    /// certificate `leaf`, and a client certificate from `client_ca` required. Each handshake
    /// is recorded (`handshakes`).
    pub fn start_tls(
        initial: Snapshot,
        leaf: &crate::common::tls::Leaf,
        client_ca: &str,
    ) -> XdsServer {
        let (chain, key) = crate::common::tls::chain(leaf);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            crate::common::tls::roots(client_ca),
            crate::common::tls::provider(),
        )
        .build()
        .unwrap();
        let mut config =
            rustls::ServerConfig::builder_with_provider(crate::common::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
                .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let mut server = XdsServer::new(initial, "127.0.0.1:0".parse().unwrap());
        server.tls = Some(Arc::new(config));
        server.listen_tcp();
        server
    }

    /// The TLS handshakes proxies made with the server, in order.
    pub fn handshakes(&self) -> Vec<Handshake> {
        self.state.handshakes.lock().unwrap().clone()
    }

    fn listen_tcp(&mut self) {
        let l = std::net::TcpListener::bind(self.addr).unwrap();
        self.addr = l.local_addr().unwrap();
        l.set_nonblocking(true).unwrap();
        if let Some(config) = self.tls.clone() {
            let state = self.state.clone();
            self.serve(move || tls_incoming(l, config, state));
            return;
        }
        self.serve(move || {
            tokio_stream::wrappers::TcpListenerStream::new(
                tokio::net::TcpListener::from_std(l).unwrap(),
            )
        });
    }

    /// The server goes away as a killed process does (its streams and connections closed, the
    /// port refusing connections) and comes back on the same port after `while_down`, serving the
    /// `snapshot` (set while it was away), with fresh streams; what it saw before stays
    /// recorded.
    pub fn restart(&mut self, snapshot: Snapshot, while_down: impl FnOnce()) {
        self.kill();
        self.set(snapshot);
        while_down();
        self.listen_tcp();
    }

    fn kill(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// The same on a Unix socket, as istio-agent serves its sidecar xDS and SDS (`addr` is
    /// then unused).
    pub fn start_unix(initial: Snapshot, path: &std::path::Path) -> XdsServer {
        let _ = std::fs::remove_file(path);
        let l = std::os::unix::net::UnixListener::bind(path).unwrap();
        l.set_nonblocking(true).unwrap();
        let mut server = XdsServer::new(initial, "0.0.0.0:0".parse().unwrap());
        server.serve(move || {
            tokio_stream::wrappers::UnixListenerStream::new(
                tokio::net::UnixListener::from_std(l).unwrap(),
            )
        });
        server
    }

    fn serve<I, IO, IE>(&mut self, incoming: impl FnOnce() -> I + Send + 'static)
    where
        I: tokio_stream::Stream<Item = Result<IO, IE>> + Send + 'static,
        IO: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + tonic::transport::server::Connected
            + Unpin
            + Send
            + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = self.state.clone();
        self.thread = Some(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // Stopped abruptly: leaving block_on drops the runtime, and with it every
                // connection's task.
                let serve = tonic::transport::Server::builder()
                    .serve_with_incoming(Services(Xds(state)), incoming());
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
        }));
        self.stop = Some(stop);
    }

    /// Pushes a new snapshot to every open stream.
    pub fn set(&self, snapshot: Snapshot) {
        let snapshot = snapshot.versioned(Some(&self.state.snapshot.borrow()));
        self.state.snapshot.send_replace(snapshot);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Every response sent has been answered (ACK or NACK) and the snapshot of `version` was
    /// sent: the proxy has caught up with it.
    pub fn settled(&self, version: &str) -> bool {
        let last = self.state.last_sent.lock().unwrap().clone();
        // Every stream has taken the snapshot (with a stream per subscription, the pushes go
        // out one stream at a time).
        let pushed = self.state.snapshot.borrow().version == version
            && self
                .state
                .processed
                .lock()
                .unwrap()
                .values()
                .all(|v| v == version);
        let seen = self.seen();
        pushed
            && !last.is_empty()
            && last
                .values()
                .all(|nonce| seen.iter().any(|s| &s.response_nonce == nonce))
    }

    /// Waits until `done` holds for what was seen (at most 20 s), and returns it.
    pub fn wait_for(&self, what: &str, done: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let seen = self.seen();
            if done(&seen) {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "xDS server: {what} did not happen; seen:\n{}",
                seen.iter()
                    .map(Seen::summary)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Every discovery service on one server, each stream held as `converse` holds it.
#[derive(Clone)]
struct Xds(Arc<State>);

/// Per stream and type: what was last sent.
#[derive(Default)]
struct Sent {
    version: String,
    nonce: String,
    names: Vec<String>,
}

/// The discovery services by gRPC path (tonic's own router would bring axum for it).
#[derive(Clone)]
struct Services(Xds);

type GrpcResponse = tonic::codegen::http::Response<tonic::body::Body>;

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for Services {
    type Response = GrpcResponse;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<GrpcResponse, std::convert::Infallible>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        use tonic::server::NamedService;
        let xds = self.0.clone();
        let service = req.uri().path().trim_start_matches('/');
        let service = service.split('/').next().unwrap_or_default();
        macro_rules! route {
            ($($server:ident),*) => {
                $(
                    if service == <$server<Xds> as NamedService>::NAME {
                        return $server::new(xds).call(req);
                    }
                )*
            };
        }
        route!(
            AggregatedDiscoveryServiceServer,
            SecretDiscoveryServiceServer,
            ClusterDiscoveryServiceServer,
            EndpointDiscoveryServiceServer,
            ListenerDiscoveryServiceServer,
            RouteDiscoveryServiceServer
        );
        Box::pin(async { Ok(tonic::Status::unimplemented("no such service").into_http()) })
    }
}

type SotwStream = ReceiverStream<Result<DiscoveryResponse, tonic::Status>>;
type DeltaStream = ReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

/// Implements a discovery service (`StreamX`, `DeltaX` and, where it has one, `FetchX`) on
/// `Xds` with `converse` and `converse_delta`.
macro_rules! discovery_service {
    ($service:path, $sotw_ty:ident, $sotw:ident, $delta_ty:ident, $delta:ident $(, $fetch:ident)?) => {
        #[tonic::async_trait]
        impl $service for Xds {
            type $sotw_ty = SotwStream;
            type $delta_ty = DeltaStream;

            async fn $sotw(
                &self,
                request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
            ) -> Result<tonic::Response<SotwStream>, tonic::Status> {
                Ok(tonic::Response::new(converse(self.0.clone(), request.into_inner())))
            }

            async fn $delta(
                &self,
                request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
            ) -> Result<tonic::Response<DeltaStream>, tonic::Status> {
                Ok(tonic::Response::new(converse_delta(self.0.clone(), request.into_inner())))
            }

            $(
                async fn $fetch(
                    &self,
                    _: tonic::Request<DiscoveryRequest>,
                ) -> Result<tonic::Response<DiscoveryResponse>, tonic::Status> {
                    Err(tonic::Status::unimplemented("streams only"))
                }
            )?
        }
    };
}

discovery_service!(
    AggregatedDiscoveryService,
    StreamAggregatedResourcesStream,
    stream_aggregated_resources,
    DeltaAggregatedResourcesStream,
    delta_aggregated_resources
);
discovery_service!(
    SecretDiscoveryService,
    StreamSecretsStream,
    stream_secrets,
    DeltaSecretsStream,
    delta_secrets,
    fetch_secrets
);
discovery_service!(
    ClusterDiscoveryService,
    StreamClustersStream,
    stream_clusters,
    DeltaClustersStream,
    delta_clusters,
    fetch_clusters
);
discovery_service!(
    EndpointDiscoveryService,
    StreamEndpointsStream,
    stream_endpoints,
    DeltaEndpointsStream,
    delta_endpoints,
    fetch_endpoints
);
discovery_service!(
    ListenerDiscoveryService,
    StreamListenersStream,
    stream_listeners,
    DeltaListenersStream,
    delta_listeners,
    fetch_listeners
);
discovery_service!(
    RouteDiscoveryService,
    StreamRoutesStream,
    stream_routes,
    DeltaRoutesStream,
    delta_routes,
    fetch_routes
);

/// An open stream: its number, and its last responses in `last_sent` until it ends.
struct Open {
    state: Arc<State>,
    number: u64,
    responses: std::sync::atomic::AtomicU64,
}

impl Open {
    fn new(state: &Arc<State>) -> Open {
        let number = state
            .streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        Open {
            state: state.clone(),
            number,
            responses: Default::default(),
        }
    }

    /// The next response's nonce: `<stream>.<response on it>`, unique across streams and
    /// restarts, so a request answering a response before a restart cannot be taken for one
    /// answering a response after it.
    fn nonce(&self) -> String {
        let n = self
            .responses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        format!("{}.{n}", self.number)
    }

    /// The stream has pushed what `version` changes.
    fn processed(&self, version: &str) {
        self.state
            .processed
            .lock()
            .unwrap()
            .insert(self.number, version.to_string());
    }

    fn sent(&self, type_url: &str, nonce: &str) {
        self.state
            .last_sent
            .lock()
            .unwrap()
            .insert((self.number, type_url.to_string()), nonce.to_string());
    }
}

/// A closed stream's responses wait for no answer.
impl Drop for Open {
    fn drop(&mut self) {
        if let Ok(mut last) = self.state.last_sent.lock() {
            last.retain(|(stream, _), _| *stream != self.number);
        }
        if let Ok(mut processed) = self.state.processed.lock() {
            processed.remove(&self.number);
        }
    }
}

/// Per stream and type, in delta xDS: what the proxy follows and holds.
#[derive(Default)]
struct DeltaState {
    started: bool,
    wildcard: bool,
    names: std::collections::BTreeSet<String>,
    /// Name -> version the proxy holds.
    held: BTreeMap<String, String>,
}

/// What the proxy lacks of `snapshot` for a type: changed or new resources it follows, and
/// those it holds that are gone. `None` when nothing differs.
fn delta_response(
    snapshot: &Snapshot,
    type_url: &str,
    st: &mut DeltaState,
    nonce: impl FnOnce() -> String,
    always: bool,
) -> Option<DeltaDiscoveryResponse> {
    let empty = BTreeMap::new();
    let all = snapshot.resources.get(type_url).unwrap_or(&empty);
    let mut resources = vec![];
    for (name, any) in all {
        if !(st.wildcard || st.names.contains(name)) {
            continue;
        }
        let version = snapshot.versions[&(type_url.to_string(), name.clone())].clone();
        if st.held.get(name) != Some(&version) {
            st.held.insert(name.clone(), version.clone());
            resources.push(pilotfish_api::pb::envoy::service::discovery::v3::Resource {
                name: name.clone(),
                version,
                resource: Some(any.clone()),
                ..Default::default()
            });
        }
    }
    let removed: Vec<String> = st
        .held
        .keys()
        .filter(|n| !all.contains_key(*n))
        .cloned()
        .collect();
    for n in &removed {
        st.held.remove(n);
    }
    if resources.is_empty() && removed.is_empty() && !always {
        return None;
    }
    Some(DeltaDiscoveryResponse {
        system_version_info: snapshot.version.clone(),
        resources,
        removed_resources: removed,
        type_url: type_url.to_string(),
        nonce: nonce(),
        ..Default::default()
    })
}

/// One delta stream: answers subscriptions with what the proxy lacks, pushes what each new
/// snapshot changes (and removes), records what the proxy sent.
fn converse_delta(
    state: Arc<State>,
    mut inbound: tonic::Streaming<DeltaDiscoveryRequest>,
) -> ReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>> {
    let (tx, rx) = mpsc::channel(16);
    let stream = Open::new(&state);
    tokio::spawn(async move {
        let mut snapshots = state.snapshot.subscribe();
        stream.processed(&snapshots.borrow().version.clone());
        let mut types: BTreeMap<String, DeltaState> = BTreeMap::new();
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let Ok(Some(req)) = msg else { return };
                    state.seen.lock().unwrap().push(Seen {
                        type_url: req.type_url.clone(),
                        version_info: String::new(),
                        resource_names: vec![],
                        response_nonce: req.response_nonce.clone(),
                        error: req.error_detail.as_ref().map(|e| e.message.clone()),
                        has_node: req.node.is_some(),
                        delta: Some(DeltaSeen {
                            subscribe: req.resource_names_subscribe.clone(),
                            unsubscribe: req.resource_names_unsubscribe.clone(),
                            initial: req.initial_resource_versions.clone().into_iter().collect(),
                        }),
                        stream: stream.number,
                    });
                    let st = types.entry(req.type_url.clone()).or_default();
                    let first = !st.started;
                    if first {
                        st.started = true;
                        st.wildcard = req.resource_names_subscribe.is_empty();
                        st.held = req.initial_resource_versions.clone().into_iter().collect();
                    }
                    for n in &req.resource_names_subscribe {
                        if n == "*" {
                            st.wildcard = true;
                        } else {
                            st.names.insert(n.clone());
                        }
                    }
                    for n in &req.resource_names_unsubscribe {
                        if n == "*" {
                            st.wildcard = false;
                        }
                        st.names.remove(n);
                        st.held.remove(n);
                    }
                    if !first && req.resource_names_subscribe.is_empty() {
                        // An ACK or NACK, or only unsubscribing: nothing to send.
                        continue;
                    }
                    let snapshot = snapshots.borrow().clone();
                    if let Some(r) = delta_response(&snapshot, &req.type_url, st, || stream.nonce(), first) {
                        stream.sent(&req.type_url, &r.nonce);
                        if tx.send(Ok(r)).await.is_err() {
                            return;
                        }
                    }
                }
                changed = snapshots.changed() => {
                    if changed.is_err() { return; }
                    let snapshot = snapshots.borrow_and_update().clone();
                    for (type_url, st) in types.iter_mut() {
                        if !st.wildcard && all_gone(&snapshot, type_url, st.names.iter()) {
                            continue;
                        }
                        if let Some(r) = delta_response(&snapshot, type_url, st, || stream.nonce(), false) {
                            stream.sent(type_url, &r.nonce);
                            if tx.send(Ok(r)).await.is_err() {
                                return;
                            }
                        }
                    }
                    stream.processed(&snapshot.version);
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// One stream: answers each request from the snapshot, pushes each new snapshot, and records
/// what the proxy sent.
fn converse(
    state: Arc<State>,
    mut inbound: tonic::Streaming<DiscoveryRequest>,
) -> ReceiverStream<Result<DiscoveryResponse, tonic::Status>> {
    let (tx, rx) = mpsc::channel(16);
    let stream = Open::new(&state);
    tokio::spawn(async move {
        let mut snapshots = state.snapshot.subscribe();
        stream.processed(&snapshots.borrow().version.clone());
        let mut sent: BTreeMap<String, Sent> = BTreeMap::new();
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let Ok(Some(req)) = msg else { return };
                    state.seen.lock().unwrap().push(Seen {
                        type_url: req.type_url.clone(),
                        version_info: req.version_info.clone(),
                        resource_names: req.resource_names.clone(),
                        response_nonce: req.response_nonce.clone(),
                        error: req.error_detail.as_ref().map(|e| e.message.clone()),
                        has_node: req.node.is_some(),
                        delta: None,
                        stream: stream.number,
                    });
                    let s = sent.entry(req.type_url.clone()).or_default();
                    // A request answering an older response is stale (the proxy answers the
                    // newer one too, names included), as go-control-plane treats it; an
                    // ACK or NACK of the last one with the same names needs no answer.
                    if !req.response_nonce.is_empty()
                        && (req.response_nonce != s.nonce || req.resource_names == s.names)
                    {
                        continue;
                    }
                    s.names = req.resource_names.clone();
                    let snapshot = snapshots.borrow().clone();
                    let r = respond(&snapshot, &req.type_url, s, stream.nonce());
                    stream.sent(&req.type_url, &r.nonce);
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
                changed = snapshots.changed() => {
                    if changed.is_err() { return; }
                    let snapshot = snapshots.borrow_and_update().clone();
                    for (type_url, s) in sent.iter_mut() {
                        if s.version == snapshot.version || all_gone(&snapshot, type_url, s.names.iter()) {
                            continue;
                        }
                        let r = respond(&snapshot, type_url, s, stream.nonce());
                        stream.sent(type_url, &r.nonce);
                        if tx.send(Ok(r)).await.is_err() {
                            return;
                        }
                    }
                    stream.processed(&snapshot.version);
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// An EDS stream whose assignments are all gone from the snapshot: their cluster went with
/// them, and a proxy with a stream per cluster closes it in the same update; whether a push
/// would beat the close is chance, so none is sent.
fn all_gone<'a>(
    snapshot: &Snapshot,
    type_url: &str,
    mut names: impl ExactSizeIterator<Item = &'a String>,
) -> bool {
    let all = snapshot.resources.get(type_url);
    type_url == ENDPOINT
        && names.len() > 0
        && names.all(|n| all.is_none_or(|all| !all.contains_key(n)))
}

/// The snapshot's resources of a type: all of them for a wildcard request, else those named.
fn respond(snapshot: &Snapshot, type_url: &str, s: &mut Sent, nonce: String) -> DiscoveryResponse {
    let all = snapshot.resources.get(type_url);
    let resources = all
        .map(|m| {
            m.iter()
                .filter(|(name, _)| s.names.is_empty() || s.names.contains(name))
                .map(|(_, a)| a.clone())
                .collect()
        })
        .unwrap_or_default();
    s.version = snapshot.version.clone();
    s.nonce = nonce;
    DiscoveryResponse {
        version_info: snapshot.version.clone(),
        resources,
        type_url: type_url.to_string(),
        nonce: s.nonce.clone(),
        ..Default::default()
    }
}

/// Accepted connections after their TLS handshake, each handshake on a task of its own (a slow
/// or failing one holds up no other) and recorded with what the client offered.
fn tls_incoming(
    l: std::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    state: Arc<State>,
) -> ReceiverStream<std::io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(16);
    let l = tokio::net::TcpListener::from_std(l).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = l.accept().await else {
                continue;
            };
            let (tx, config, state) = (tx.clone(), config.clone(), state.clone());
            tokio::spawn(async move {
                let acceptor = tokio_rustls::LazyConfigAcceptor::new(
                    rustls::server::Acceptor::default(),
                    sock,
                );
                let Ok(start) = acceptor.await else { return };
                let hello = start.client_hello();
                let mut shake = Handshake {
                    sni: hello.server_name().map(str::to_string),
                    alpn: hello
                        .alpn()
                        .into_iter()
                        .flatten()
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                        .collect(),
                    client_cert: None,
                    error: None,
                };
                match start.into_stream(config).await {
                    Ok(tls) => {
                        shake.client_cert = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| c.to_vec());
                        state.handshakes.lock().unwrap().push(shake);
                        let _ = tx.send(Ok(TlsConn(tls))).await;
                    }
                    Err(e) => {
                        shake.error = Some(e.to_string());
                        state.handshakes.lock().unwrap().push(shake);
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A server-side TLS connection as tonic takes it.
struct TlsConn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for TlsConn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
