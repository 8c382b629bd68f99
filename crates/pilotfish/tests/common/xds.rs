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
}

impl Seen {
    /// `CDS v1 nonce=2 [names]`, or with `NACK`: the shape compared between proxies.
    pub fn summary(&self) -> String {
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
        format!(
            "{kind} version='{}' nonce='{}' names={names:?}{}{}",
            self.version_info,
            self.response_nonce,
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
}

impl Snapshot {
    pub fn new(version: &str) -> Snapshot {
        Snapshot {
            version: version.to_string(),
            resources: BTreeMap::new(),
        }
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

struct State {
    snapshot: watch::Sender<Snapshot>,
    seen: Mutex<Vec<Seen>>,
    /// The nonce of the last response sent, by type.
    last_sent: Mutex<BTreeMap<String, String>>,
    /// Nonces go on across restarts, so a request answering a response before the restart
    /// cannot be taken for one answering a response after it.
    nonce: std::sync::atomic::AtomicU64,
}

impl State {
    fn new(initial: Snapshot) -> Arc<State> {
        Arc::new(State {
            snapshot: watch::channel(initial).0,
            seen: Mutex::new(vec![]),
            last_sent: Mutex::new(BTreeMap::new()),
            nonce: Default::default(),
        })
    }
}

pub struct XdsServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Serves SDS instead of ADS.
    sds: bool,
}

impl Drop for XdsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

impl XdsServer {
    /// Serves `initial` on a free loopback port, on a runtime of its own thread.
    pub fn start(initial: Snapshot) -> XdsServer {
        let mut server = XdsServer {
            addr: "127.0.0.1:0".parse().unwrap(),
            state: State::new(initial),
            stop: None,
            thread: None,
            sds: false,
        };
        server.listen_tcp();
        server
    }

    fn listen_tcp(&mut self) {
        let l = std::net::TcpListener::bind(self.addr).unwrap();
        self.addr = l.local_addr().unwrap();
        l.set_nonblocking(true).unwrap();
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

    /// The same on a Unix socket, as istio-agent serves its sidecar (`addr` is then unused).
    pub fn start_unix(initial: Snapshot, path: &std::path::Path) -> XdsServer {
        XdsServer::unix(initial, path, false)
    }

    /// An SDS server on a Unix socket (istio-agent's `sds-grpc`), holding secrets by name.
    pub fn start_sds_unix(initial: Snapshot, path: &std::path::Path) -> XdsServer {
        XdsServer::unix(initial, path, true)
    }

    fn unix(initial: Snapshot, path: &std::path::Path, sds: bool) -> XdsServer {
        let _ = std::fs::remove_file(path);
        let l = std::os::unix::net::UnixListener::bind(path).unwrap();
        l.set_nonblocking(true).unwrap();
        let mut server = XdsServer {
            addr: "0.0.0.0:0".parse().unwrap(),
            state: State::new(initial),
            stop: None,
            thread: None,
            sds,
        };
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
        let sds = self.sds;
        self.thread = Some(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // One service: no router needed. Stopped abruptly: leaving block_on drops the
                // runtime, and with it every connection's task.
                let builder = tonic::transport::Server::builder();
                let serve: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> = if sds {
                    Box::pin(builder.serve_with_incoming(
                        SecretDiscoveryServiceServer::new(Sds(state)),
                        incoming(),
                    ))
                } else {
                    Box::pin(builder.serve_with_incoming(
                        AggregatedDiscoveryServiceServer::new(Ads(state)),
                        incoming(),
                    ))
                };
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
        self.state.snapshot.send_replace(snapshot);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Every response sent has been answered (ACK or NACK) and the snapshot of `version` was
    /// sent: the proxy has caught up with it.
    pub fn settled(&self, version: &str) -> bool {
        let last = self.state.last_sent.lock().unwrap().clone();
        let pushed = self.state.snapshot.borrow().version == version;
        let seen = self.seen();
        pushed
            && !last.is_empty()
            && last.iter().all(|(t, nonce)| {
                seen.iter()
                    .any(|s| &s.type_url == t && &s.response_nonce == nonce)
            })
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

struct Ads(Arc<State>);

/// Per stream and type: what was last sent.
#[derive(Default)]
struct Sent {
    version: String,
    nonce: String,
    names: Vec<String>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, tonic::Status>>;
    type DeltaAggregatedResourcesStream =
        ReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        Ok(tonic::Response::new(converse(
            self.0.clone(),
            request.into_inner(),
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        _: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "this test server speaks state of the world only",
        ))
    }
}

/// The same conversation for SDS, as istio-agent serves secrets on its own socket.
struct Sds(Arc<State>);

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, tonic::Status>>;
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

    async fn stream_secrets(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamSecretsStream>, tonic::Status> {
        Ok(tonic::Response::new(converse(
            self.0.clone(),
            request.into_inner(),
        )))
    }

    async fn delta_secrets(
        &self,
        _: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaSecretsStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "this test server speaks state of the world only",
        ))
    }

    async fn fetch_secrets(
        &self,
        _: tonic::Request<DiscoveryRequest>,
    ) -> Result<tonic::Response<DiscoveryResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("streams only"))
    }
}

/// One stream: answers each request from the snapshot, pushes each new snapshot, and records
/// what the proxy sent.
fn converse(
    state: Arc<State>,
    mut inbound: tonic::Streaming<DiscoveryRequest>,
) -> ReceiverStream<Result<DiscoveryResponse, tonic::Status>> {
    let (tx, rx) = mpsc::channel(16);
    {
        tokio::spawn(async move {
            let mut snapshots = state.snapshot.subscribe();
            let mut sent: BTreeMap<String, Sent> = BTreeMap::new();
            let next_nonce = || {
                state
                    .nonce
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1
            };
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
                        let r = respond(&snapshot, &req.type_url, s, next_nonce());
                        state.last_sent.lock().unwrap().insert(req.type_url.clone(), r.nonce.clone());
                        if tx.send(Ok(r)).await.is_err() {
                            return;
                        }
                    }
                    changed = snapshots.changed() => {
                        if changed.is_err() { return; }
                        let snapshot = snapshots.borrow_and_update().clone();
                        for (type_url, s) in sent.iter_mut() {
                            if s.version == snapshot.version {
                                continue;
                            }
                            let r = respond(&snapshot, type_url, s, next_nonce());
                            state.last_sent.lock().unwrap().insert(type_url.clone(), r.nonce.clone());
                            if tx.send(Ok(r)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
    }
    ReceiverStream::new(rx)
}

/// The snapshot's resources of a type: all of them for a wildcard request, else those named.
fn respond(snapshot: &Snapshot, type_url: &str, s: &mut Sent, nonce: u64) -> DiscoveryResponse {
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
    s.nonce = nonce.to_string();
    DiscoveryResponse {
        version_info: snapshot.version.clone(),
        resources,
        type_url: type_url.to_string(),
        nonce: s.nonce.clone(),
        ..Default::default()
    }
}
