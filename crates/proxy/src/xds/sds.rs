//! SDS: the certificates and trust bundles TLS contexts name (`tls_certificate_sds_secret_configs`,
//! `validation_context_sds_secret_config`) from an SDS server over gRPC — istio-agent's
//! `sds-grpc` cluster on a Unix socket — one stream per secret, as Envoy subscribes each. The
//! proxy starts once every named secret has come (or its `initial_fetch_timeout` ends; Istio's
//! 0 waits for ever); a later version (a rotated certificate) is put in service in place: new
//! connections get it, those under way keep their session.

use super::{connect, Backoff};
use pilotfish_api::pb::envoy::config::core::v3::{config_source::ConfigSourceSpecifier, Node};
use pilotfish_api::pb::envoy::extensions::transport_sockets::tls::v3::{SdsSecretConfig, Secret};
use pilotfish_api::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use pilotfish_config::dynamic;
use pilotfish_config::resources::{Resource, ResourceSet};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Where a secret comes from.
#[derive(Debug, Clone)]
struct Source {
    grpc: super::Source,
    initial_fetch_timeout: Duration,
}

/// The secrets the configuration names with a gRPC config source, by name; an error for the
/// SDS shapes pilotfish does not speak yet.
fn wanted(set: &ResourceSet) -> Result<BTreeMap<String, Source>, String> {
    // Those of listeners and clusters warming too: they wait for them.
    let sockets = set
        .listeners
        .iter()
        .chain(&set.warming_listeners)
        .flat_map(|l| pilotfish_config::model::listener_transport_sockets(&l.value))
        .chain(
            set.clusters
                .iter()
                .chain(&set.warming_clusters)
                .flat_map(|c| pilotfish_config::model::cluster_transport_sockets(&c.value)),
        );
    let mut out = BTreeMap::new();
    for c in sockets.flat_map(pilotfish_config::model::sds_secret_configs) {
        if out.contains_key(&c.name) {
            continue;
        }
        if let Some(source) = source(set, &c)? {
            out.insert(c.name.clone(), source);
        }
    }
    Ok(out)
}

fn source(set: &ResourceSet, c: &SdsSecretConfig) -> Result<Option<Source>, String> {
    let Some(cs) = &c.sds_config else {
        // A static secret.
        return Ok(None);
    };
    let at = format!("SDS secret '{}': sds_config", c.name);
    let api = match &cs.config_source_specifier {
        Some(ConfigSourceSpecifier::ApiConfigSource(api)) => api,
        Some(ConfigSourceSpecifier::Ads(_)) => {
            return Err(format!("{at}: SDS over ADS is not implemented yet; a gRPC api_config_source (istio-agent's sds-grpc) is"))
        }
        _ => {
            return Err(format!(
                "{at}: only a gRPC api_config_source is implemented (files and others are not yet)"
            ))
        }
    };
    Ok(Some(Source {
        grpc: super::source(set, api, &format!("{at}.api_config_source"))?,
        initial_fetch_timeout: super::initial_fetch_timeout(cs).unwrap_or(Duration::from_secs(15)),
    }))
}

/// The secrets being followed; each stream sends what it accepts here.
pub struct Sds {
    node: Node,
    streams: BTreeMap<String, tokio::task::AbortHandle>,
    /// Each secret's stats (`sds.<name>.*`), by name.
    stats: BTreeMap<String, Arc<super::stats::Subscription>>,
    store: Arc<crate::stats::Store>,
    updates: mpsc::UnboundedReceiver<Resource<Secret>>,
    tx: mpsc::UnboundedSender<Resource<Secret>>,
    /// The secrets not come yet, each until its `initial_fetch_timeout` ends (none for `0s`).
    waiting: BTreeMap<String, tokio::time::Instant>,
    /// Those whose initial fetch timed out at start-up, for the server to know.
    given_up: Vec<String>,
}

impl Drop for Sds {
    fn drop(&mut self) {
        for s in self.streams.values() {
            s.abort();
        }
    }
}

/// Subscribes to every secret `set` names through SDS and waits for them (each at most its
/// `initial_fetch_timeout`); `None` when it names none and no control plane can name one
/// later.
pub async fn fetch(
    set: &ResourceSet,
    store: Arc<crate::stats::Store>,
) -> Result<Option<(Vec<Resource<Secret>>, Sds)>, String> {
    let wanted = wanted(set)?;
    if wanted.is_empty() && set.bootstrap.dynamic_resources.is_none() {
        return Ok(None);
    }
    let (tx, updates) = mpsc::unbounded_channel();
    let mut sds = Sds {
        node: set.bootstrap.node.clone().unwrap_or_default(),
        streams: BTreeMap::new(),
        stats: BTreeMap::new(),
        store,
        updates,
        tx,
        waiting: BTreeMap::new(),
        given_up: vec![],
    };
    let wait = wanted
        .values()
        .map(|s| s.initial_fetch_timeout)
        .max()
        .unwrap_or_default();
    let mut missing: Vec<String> = wanted.keys().cloned().collect();
    for (name, source) in wanted {
        sds.subscribe(name, source);
    }
    let deadline = tokio::time::Instant::now().checked_add(wait);
    let mut got: Vec<Resource<Secret>> = vec![];
    while !missing.is_empty() {
        let next = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, sds.updates.recv()).await.ok(),
                None => Some(sds.updates.recv().await),
            }
        };
        match next.await {
            Some(Some(secret)) => {
                missing.retain(|n| *n != secret.name);
                sds.waiting.remove(&secret.name);
                got.retain(|s| s.name != secret.name);
                got.push(secret);
            }
            Some(None) => break,
            None => {
                tracing::warn!(target: "config", "SDS: initial fetch timed out after {wait:?}; going on without {}", missing.join(", "));
                for name in &missing {
                    if let Some(s) = sds.stats.get(name) {
                        s.timed_out();
                    }
                    sds.waiting.remove(name);
                }
                sds.given_up = missing;
                break;
            }
        }
    }
    Ok(Some((got, sds)))
}

impl Sds {
    fn subscribe(&mut self, name: String, source: Source) {
        if let Some(at) = tokio::time::Instant::now().checked_add(source.initial_fetch_timeout) {
            self.waiting.insert(name.clone(), at);
        }
        let stats = Arc::new(super::stats::Subscription::sds(&self.store, &name));
        self.stats.insert(name.clone(), stats.clone());
        let task = tokio::spawn(stream_secret(
            name.clone(),
            source.grpc,
            self.node.clone(),
            self.tx.clone(),
            (self.store.clone(), stats),
        ));
        self.streams.insert(name, task.abort_handle());
    }

    /// Puts each new secret version in service; follows the secrets each new configuration
    /// names (a listener from xDS may name one not asked for yet).
    pub async fn serve(mut self, server: Arc<crate::server::Server>) {
        let mut applied = server.applied.subscribe();
        for name in std::mem::take(&mut self.given_up) {
            server.give_up_secret(&name);
        }
        loop {
            let next = self.waiting.values().min().copied();
            tokio::select! {
                // A secret subscribed after start-up that has not come: listeners and clusters
                // warming for it go on without it, as Envoy's.
                _ = super::sleep_until(next) => {
                    let now = tokio::time::Instant::now();
                    let due: Vec<String> = self
                        .waiting
                        .iter()
                        .filter(|(_, at)| **at <= now)
                        .map(|(name, _)| name.clone())
                        .collect();
                    for name in due {
                        self.waiting.remove(&name);
                        tracing::warn!(target: "config", "SDS: secret '{name}' did not come within its initial_fetch_timeout; what waits for it goes on without it");
                        if let Some(s) = self.stats.get(&name) {
                            s.timed_out();
                        }
                        server.give_up_secret(&name);
                    }
                }
                secret = self.updates.recv() => {
                    let Some(secret) = secret else { return };
                    let name = secret.name.clone();
                    self.waiting.remove(&name);
                    let done = server.apply_secret(secret).await;
                    tracing::info!(target: "config", "SDS: secret '{name}' in service: {done}");
                }
                changed = applied.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    match wanted(&server.active().set) {
                        Ok(wanted) => {
                            for (name, source) in wanted {
                                if !self.streams.contains_key(&name) {
                                    self.subscribe(name, source);
                                }
                            }
                        }
                        Err(e) => tracing::warn!(target: "config", "SDS: {e}"),
                    }
                }
            }
        }
    }
}

/// One secret's stream: asks for it, checks each version as a loaded secret is checked, ACKs
/// or NACKs, and hands on what it accepts; reconnects with backoff when the stream ends.
async fn stream_secret(
    name: String,
    source: super::Source,
    node: Node,
    out: mpsc::UnboundedSender<Resource<Secret>>,
    stats: (Arc<crate::stats::Store>, Arc<super::stats::Subscription>),
) {
    let mut backoff = Backoff::new(&source.target);
    let mut held = Held {
        name,
        out,
        version: String::new(),
        current: None,
        stats,
    };
    loop {
        let channel = match connect(&source.target).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(target: "config", "SDS: cannot reach cluster '{}' at {} for secret '{}': {e}; trying again", source.cluster, source.target, held.name);
                held.stats.1.failed();
                backoff.wait().await;
                continue;
            }
        };
        held.stats.1.connected();
        let why = if source.delta {
            delta_stream(channel, &source, &node, &mut held, &mut backoff).await
        } else {
            sotw_stream(channel, &source, &node, &mut held, &mut backoff).await
        };
        tracing::warn!(target: "config", "SDS: the stream for secret '{}' {why}; keeping the secret in service and reconnecting", held.name);
        held.stats.1.failed();
        backoff.wait().await;
    }
}

/// A secret's stream state across reconnections.
struct Held {
    name: String,
    out: mpsc::UnboundedSender<Resource<Secret>>,
    /// The version last accepted.
    version: String,
    /// What is in service: a response that leaves it as it is only moves the version ACKed
    /// (the dump keeps the version that changed it, as Envoy's does).
    current: Option<Secret>,
    stats: (Arc<crate::stats::Store>, Arc<super::stats::Subscription>),
}

impl Held {
    /// Takes an accepted version, and puts it in service if it changes the secret.
    fn accept(&mut self, version: &str, secret: Secret) {
        version.clone_into(&mut self.version);
        tracing::info!(target: "config", "SDS: secret '{}' version {version} accepted", self.name);
        let changed = self.current.as_ref() != Some(&secret);
        self.stats.1.accepted(&self.stats.0, version, changed);
        if !changed {
            return;
        }
        self.current = Some(secret.clone());
        let _ = self.out.send(dynamic::resource(
            self.name.clone(),
            format!("secrets[{}]", self.name),
            version,
            secret,
        ));
    }
}

/// State of the world: each response carries the secret; the request names it and says the
/// version held. Returns why the stream ended.
async fn sotw_stream(
    connection: tonic::transport::Channel,
    source: &super::Source,
    node: &Node,
    held: &mut Held,
    backoff: &mut Backoff,
) -> String {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut node_sent = false;
    let name = held.name.clone();
    let mut send = |version: &str, nonce: &str, error: Option<String>| {
        let node = (!source.node_first_only || !node_sent).then(|| node.clone());
        node_sent = true;
        let _ = tx.send(DiscoveryRequest {
            version_info: version.to_string(),
            node,
            resource_names: vec![name.clone()],
            type_url: SECRET.to_string(),
            response_nonce: nonce.to_string(),
            error_detail: super::nack(error),
            ..Default::default()
        });
    };
    send(&held.version, "", None);
    let path = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
    each_response(connection, path, rx, backoff, |r: DiscoveryResponse| {
        match secret_of(&name, r.resources.iter()) {
            Ok(Some(secret)) => {
                send(&r.version_info, &r.nonce, None);
                held.accept(&r.version_info, secret);
            }
            // Without it (the server does not have it yet): ACKed, and still awaited, as in
            // Envoy.
            Ok(None) => {
                r.version_info.clone_into(&mut held.version);
                // Not an update of the secret: Envoy's stats do not count it.
                send(&r.version_info, &r.nonce, None);
            }
            Err(e) => {
                tracing::warn!(target: "config", "SDS: secret '{name}' version {} rejected: {e}", r.version_info);
                held.stats.1.rejected(false);
                send(&held.version, &r.nonce, Some(e));
            }
        }
    })
    .await
}

/// Delta xDS: the request subscribes the one name (saying, on a new stream, the version held);
/// a response carries the secret with its own version; ACK and NACK go by nonce. A response
/// removing the secret is taken and the secret kept, as Envoy's SDS does.
async fn delta_stream(
    connection: tonic::transport::Channel,
    source: &super::Source,
    node: &Node,
    held: &mut Held,
    backoff: &mut Backoff,
) -> String {
    let (tx, rx) = mpsc::unbounded_channel();
    let name = held.name.clone();
    let first = DeltaDiscoveryRequest {
        node: Some(node.clone()),
        type_url: SECRET.to_string(),
        resource_names_subscribe: vec![name.clone()],
        initial_resource_versions: (!held.version.is_empty())
            .then(|| (name.clone(), held.version.clone()))
            .into_iter()
            .collect(),
        ..Default::default()
    };
    let _ = tx.send(first);
    let reply = |nonce: String, error: Option<String>| {
        let _ = tx.send(DeltaDiscoveryRequest {
            node: (!source.node_first_only).then(|| node.clone()),
            type_url: SECRET.to_string(),
            response_nonce: nonce,
            error_detail: super::nack(error),
            ..Default::default()
        });
    };
    let path = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";
    each_response(connection, path, rx, backoff, |r: DeltaDiscoveryResponse| {
        if r.resources.is_empty() {
            if r.removed_resources.contains(&name) {
                tracing::debug!(target: "config", "SDS: the server removed secret '{name}'; keeping it, as Envoy does");
            }
            reply(r.nonce, None);
            return;
        }
        let version = r
            .resources
            .iter()
            .find(|res| res.name == name)
            .map(|res| res.version.clone())
            .unwrap_or_default();
        match secret_of(
            &name,
            r.resources.iter().filter_map(|res| res.resource.as_ref()),
        ) {
            Ok(Some(secret)) => {
                reply(r.nonce, None);
                held.accept(&version, secret);
            }
            Ok(None) => reply(r.nonce, None),
            Err(e) => {
                tracing::warn!(target: "config", "SDS: secret '{name}' version {version} rejected: {e}");
                held.stats.1.rejected(true);
                reply(r.nonce, Some(e));
            }
        }
    })
    .await
}

/// Opens a secret's stream (`path`, requests from `requests`) and hands each response to `on`
/// (the backoff starts over with each) until the stream ends; returns why it ended.
async fn each_response<Req, Resp>(
    connection: tonic::transport::Channel,
    path: &'static str,
    requests: mpsc::UnboundedReceiver<Req>,
    backoff: &mut Backoff,
    mut on: impl FnMut(Resp),
) -> String
where
    Req: prost::Message + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    let mut inbound = match super::open_stream(connection, path, requests).await {
        Ok(inbound) => inbound,
        Err(e) => return format!("was refused: {e}"),
    };
    loop {
        match inbound.message().await {
            Ok(Some(r)) => {
                backoff.reset();
                on(r);
            }
            Ok(None) => return "was closed by the server".into(),
            Err(e) => return format!("failed: {e}"),
        }
    }
}

/// The response's secret of that name (None when it does not carry it), checked as a secret in
/// a file is.
fn secret_of<'a>(
    name: &str,
    resources: impl Iterator<Item = &'a pilotfish_api::pb::google::protobuf::Any>,
) -> Result<Option<Secret>, String> {
    let mut found = None;
    for (i, any) in resources.enumerate() {
        let s = dynamic::decode_resource::<Secret>("sds", &format!("secret[{i}]"), any)
            .map_err(|e| e.to_string())?;
        if s.name == name {
            found = Some(s);
        }
    }
    let Some(s) = found else { return Ok(None) };
    crate::transport_socket::check_secret(&s)?;
    Ok(Some(s))
}
