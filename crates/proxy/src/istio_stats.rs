//! Istio's standard metrics, natively: the `istio.stats` filter (HTTP and network; Istio runs it
//! as the null-VM Wasm plugin `envoy.wasm.stats`) counts each request or TCP connection into
//! `istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes`,
//! `istio_response_bytes`, `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`,
//! `istio_tcp_connections_opened_total` and `istio_tcp_connections_closed_total`, labelled with
//! Istio's standard labels: the reporter, source and destination workloads (this node's
//! metadata on one side, the peer's, as the metadata exchange brought it, on the other), the
//! principals from the TLS certificates, the destination service from the cluster's `istio`
//! metadata, protocol, response code and flags, and the connection's security policy. The
//! `Registry` holds the series; `/stats/prometheus` shows them as Istio's Prometheus scrape
//! does, `/stats` by their flattened names.

use pilotfish_config::istio::{Expr, PeerField, StatsConfig};
use pilotfish_config::resources::ResourceSet;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Envoy's default histogram buckets (what Istio's histograms are scraped with).
const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's labels, in the order its Prometheus scrape shows them (the order of the bootstrap's
/// `stats_tags` that extract them).
const LABELS: [&str; 25] = [
    "response_code",
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "grpc_response_status",
    "connection_security_policy",
    "source_canonical_service",
    "destination_canonical_service",
    "source_canonical_revision",
    "destination_canonical_revision",
];

#[derive(Debug)]
enum Series {
    Counter(AtomicU64),
    Histogram {
        buckets: [AtomicU64; BUCKETS.len()],
        count: AtomicU64,
        sum: AtomicU64,
    },
}

/// A series' labels, in order.
type Labels = Vec<(String, String)>;

/// One metric's series, by their labels as Prometheus text.
type Family = BTreeMap<String, (Labels, Arc<Series>)>;

/// Every Istio series of the proxy, by metric and labels, and the services of the
/// configuration's clusters (their `istio` metadata), read once for every stats filter.
#[derive(Debug, Default)]
pub struct Registry {
    series: Mutex<BTreeMap<String, Family>>,
    services: std::sync::OnceLock<Arc<HashMap<String, Service>>>,
}

impl Registry {
    /// `rendered`: the labels as Prometheus text (`render`).
    fn series(
        &self,
        metric: &str,
        labels: &Labels,
        rendered: &str,
        histogram: bool,
    ) -> Arc<Series> {
        let mut m = self.series.lock().unwrap();
        let family = m.entry(metric.to_string()).or_default();
        if let Some((_, s)) = family.get(rendered) {
            return s.clone();
        }
        let s = Arc::new(if histogram {
            Series::Histogram {
                buckets: Default::default(),
                count: AtomicU64::new(0),
                sum: AtomicU64::new(0),
            }
        } else {
            Series::Counter(AtomicU64::new(0))
        });
        family.insert(rendered.to_string(), (labels.clone(), s.clone()));
        s
    }

    fn add(&self, metric: &str, labels: &Labels, rendered: &str, n: u64) {
        if let Series::Counter(c) = &*self.series(metric, labels, rendered, false) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn record(&self, metric: &str, labels: &Labels, rendered: &str, value: u64) {
        if let Series::Histogram {
            buckets,
            count,
            sum,
        } = &*self.series(metric, labels, rendered, true)
        {
            for (b, le) in buckets.iter().zip(BUCKETS) {
                if value as f64 <= le {
                    b.fetch_add(1, Ordering::Relaxed);
                }
            }
            count.fetch_add(1, Ordering::Relaxed);
            sum.fetch_add(value, Ordering::Relaxed);
        }
    }

    /// `/reset_counters`: the counters to zero (histograms are not counters).
    pub fn reset_counters(&self) {
        for family in self.series.lock().unwrap().values() {
            for (_, s) in family.values() {
                if let Series::Counter(c) = &**s {
                    c.store(0, Ordering::Relaxed);
                }
            }
        }
    }

    /// The Prometheus families, as Envoy's `/stats/prometheus` shows Istio's metrics.
    pub fn prometheus(&self) -> String {
        let m = self.series.lock().unwrap();
        let mut out = String::new();
        for (metric, family) in m.iter() {
            let histogram = family
                .values()
                .next()
                .is_some_and(|(_, s)| matches!(**s, Series::Histogram { .. }));
            let ty = if histogram { "histogram" } else { "counter" };
            out.push_str(&format!("# TYPE {metric} {ty}\n"));
            for (labels, (_, s)) in family {
                match &**s {
                    Series::Counter(c) => {
                        out.push_str(&format!(
                            "{metric}{{{labels}}} {}\n",
                            c.load(Ordering::Relaxed)
                        ));
                    }
                    Series::Histogram {
                        buckets,
                        count,
                        sum,
                    } => {
                        for (b, le) in buckets.iter().zip(BUCKETS) {
                            out.push_str(&format!(
                                "{metric}_bucket{{{labels},le=\"{le}\"}} {}\n",
                                b.load(Ordering::Relaxed)
                            ));
                        }
                        let n = count.load(Ordering::Relaxed);
                        out.push_str(&format!("{metric}_bucket{{{labels},le=\"+Inf\"}} {n}\n"));
                        out.push_str(&format!(
                            "{metric}_sum{{{labels}}} {}\n",
                            sum.load(Ordering::Relaxed)
                        ));
                        out.push_str(&format!("{metric}_count{{{labels}}} {n}\n"));
                    }
                }
            }
        }
        out
    }

    /// The counters by the flattened names Istio's plugin gives Envoy
    /// (`reporter=.=destination;.;...;.;istio_requests_total`), for `/stats`.
    pub fn text(&self) -> Vec<(String, u64)> {
        let m = self.series.lock().unwrap();
        let mut out = vec![];
        for (metric, family) in m.iter() {
            for (labels, s) in family.values() {
                if let Series::Counter(c) = &**s {
                    let mut name = String::new();
                    for (n, v) in labels {
                        name.push_str(&format!("{n}=.={v};.;"));
                    }
                    name.push_str(metric);
                    out.push((name, c.load(Ordering::Relaxed)));
                }
            }
        }
        out
    }

    /// The configuration's clusters' services (`istio` metadata `services[0]`).
    fn services(&self, set: &ResourceSet) -> Arc<HashMap<String, Service>> {
        self.services
            .get_or_init(|| {
                let mut services = HashMap::new();
                for c in &set.clusters {
                    let svc = c
                        .value
                        .metadata
                        .as_ref()
                        .and_then(|m| m.filter_metadata.get("istio"))
                        .map(crate::http::istio::struct_json)
                        .and_then(|v| v.get("services")?.get(0).cloned());
                    if let Some(svc) = svc {
                        let s = |k: &str| {
                            svc.get(k)
                                .and_then(Value::as_str)
                                .unwrap_or(UNKNOWN)
                                .to_string()
                        };
                        services.insert(
                            c.name.clone(),
                            Service {
                                host: s("host"),
                                name: s("name"),
                                namespace: s("namespace"),
                            },
                        );
                    }
                }
                Arc::new(services)
            })
            .clone()
    }
}

/// Labels as Prometheus text: `a="x",b="y"`.
fn render(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect::<Vec<_>>()
        .join(",")
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One side of a request or connection: a workload, from node metadata (this proxy's, or the
/// peer's as the metadata exchange brought it).
#[derive(Debug, Clone)]
struct Workload {
    name: String,
    namespace: String,
    app: String,
    version: String,
    cluster: String,
    canonical_service: String,
    canonical_revision: String,
}

const UNKNOWN: &str = "unknown";

impl Workload {
    fn unknown() -> Workload {
        let u = || UNKNOWN.to_string();
        Workload {
            name: u(),
            namespace: u(),
            app: u(),
            version: u(),
            cluster: u(),
            canonical_service: u(),
            canonical_revision: u(),
        }
    }

    /// From node metadata (Istio's FlatNode fields), as Istio 1.14 maps a node: `app` and
    /// `version` from those labels only; the canonical service from its label, else the
    /// workload's name; the canonical revision from its label, else `latest`.
    fn of(md: &Value) -> Workload {
        let s = |k: &str| md.get(k).and_then(Value::as_str).map(str::to_string);
        let label = |k: &str| {
            md.get("LABELS")
                .and_then(|l| l.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let name = s("WORKLOAD_NAME");
        Workload {
            namespace: s("NAMESPACE").unwrap_or_else(|| UNKNOWN.into()),
            app: label("app").unwrap_or_else(|| UNKNOWN.into()),
            version: label("version").unwrap_or_else(|| UNKNOWN.into()),
            cluster: s("CLUSTER_ID").unwrap_or_else(|| UNKNOWN.into()),
            canonical_service: label("service.istio.io/canonical-name")
                .or_else(|| name.clone())
                .unwrap_or_else(|| UNKNOWN.into()),
            canonical_revision: label("service.istio.io/canonical-revision")
                .unwrap_or_else(|| "latest".into()),
            name: name.unwrap_or_else(|| UNKNOWN.into()),
        }
    }
}

/// A cluster's `istio` metadata: the service it stands for.
#[derive(Debug, Clone)]
struct Service {
    host: String,
    name: String,
    namespace: String,
}

/// Clusters and routes Istio names the destination service by, when they lead nowhere in the
/// mesh.
const PASSTHROUGH_NAMES: [&str; 6] = [
    "allow_any",
    "block_all",
    "BlackHoleCluster",
    "PassthroughCluster",
    "InboundPassthroughClusterIpv4",
    "InboundPassthroughClusterIpv6",
];

/// What one request or TCP connection tells the stats filter.
#[derive(Default, Clone)]
pub struct Report<'a> {
    /// The peers' metadata headers, base64 (decoded only here).
    pub downstream_peer: Option<&'a str>,
    pub upstream_peer: Option<&'a str>,
    /// Downstream TLS: this side's certificate URI SAN and the client's; `mtls` when the
    /// client showed a certificate.
    pub downstream_local_uri: Option<&'a str>,
    pub downstream_peer_uri: Option<&'a str>,
    pub mtls: bool,
    /// Upstream TLS: this side's and the server's certificate URI SANs.
    pub upstream_local_uri: Option<&'a str>,
    pub upstream_peer_uri: Option<&'a str>,
    pub cluster: &'a str,
    pub route: &'a str,
    pub authority: &'a str,
    pub response_code: u32,
    pub flags: &'a [&'static str],
    /// A gRPC request: its status.
    pub grpc: Option<Option<u32>>,
}

impl<'a> Report<'a> {
    /// The TLS facts of a connection: its downstream handshake and its upstream's.
    pub fn of_connection(
        downstream: Option<&'a crate::transport_socket::TlsInfo>,
        upstream: Option<&'a crate::transport_socket::UpstreamIdentity>,
        cluster: &'a str,
    ) -> Report<'a> {
        Report {
            downstream_local_uri: downstream.and_then(|t| t.local_uri.as_deref()),
            downstream_peer_uri: downstream.and_then(|t| t.peer_uri.as_deref()),
            mtls: downstream.is_some_and(|t| !t.peer_chain.is_empty()),
            upstream_local_uri: upstream.and_then(|i| i.local_uri.as_deref()),
            upstream_peer_uri: upstream.and_then(|i| i.peer_uri.as_deref()),
            cluster,
            ..Default::default()
        }
    }
}

/// The peers' metadata of one report, decoded once.
struct Peers {
    downstream: Option<Value>,
    upstream: Option<Value>,
}

/// `istio.stats` on one filter chain (an HTTP connection manager, or a TCP chain).
pub struct IstioStats {
    inbound: bool,
    node: Workload,
    node_metadata: Value,
    services: Arc<HashMap<String, Service>>,
    config: StatsConfig,
    registry: Arc<Registry>,
}

impl IstioStats {
    /// For a listener of `direction`: Istio's plugin reports as the source on outbound
    /// listeners and as the destination on every other.
    pub fn new(
        set: &ResourceSet,
        json: &str,
        direction: i32,
        registry: Arc<Registry>,
    ) -> Result<IstioStats, String> {
        use pilotfish_api::pb::envoy::config::core::v3::TrafficDirection;
        let (config, _) = pilotfish_config::istio::parse_stats(json)?;
        let node_metadata = set
            .bootstrap
            .node
            .as_ref()
            .and_then(|n| n.metadata.as_ref())
            .map(crate::http::istio::struct_json)
            .unwrap_or(Value::Null);
        Ok(IstioStats {
            inbound: direction != TrafficDirection::Outbound as i32,
            node: Workload::of(&node_metadata),
            node_metadata,
            services: registry.services(set),
            config,
            registry,
        })
    }

    /// Reports as the destination: the downstream peer is the other side.
    pub fn reports_inbound(&self) -> bool {
        self.inbound
    }

    /// Istio's standard labels of one request (`tcp`: a TCP connection, without response code
    /// and gRPC status).
    fn standard(&self, r: &Report, peers: &Peers, tcp: bool) -> Labels {
        let peer_side =
            |md: &Option<Value>| md.as_ref().map_or_else(Workload::unknown, Workload::of);
        let or_unknown = |v: Option<&str>| v.unwrap_or(UNKNOWN).to_string();
        let (source, destination, source_principal, destination_principal) = if self.inbound {
            (
                peer_side(&peers.downstream),
                self.node.clone(),
                or_unknown(r.downstream_peer_uri),
                or_unknown(r.downstream_local_uri),
            )
        } else {
            (
                self.node.clone(),
                peer_side(&peers.upstream),
                or_unknown(r.upstream_local_uri),
                or_unknown(r.upstream_peer_uri),
            )
        };
        // Istio's destination service: the cluster's service; for the passthrough and
        // blackhole routes and clusters their own name; the host header (unless turned off)
        // otherwise.
        let host = if self.config.disable_host_header_fallback || r.authority.is_empty() {
            UNKNOWN.to_string()
        } else {
            r.authority.to_string()
        };
        let special = PASSTHROUGH_NAMES
            .iter()
            .find(|n| **n == r.route || **n == r.cluster);
        let service = match (special, self.services.get(r.cluster)) {
            (Some(name), _) => Service {
                host,
                name: name.to_string(),
                namespace: destination.namespace.clone(),
            },
            (None, Some(s)) => s.clone(),
            (None, None) => Service {
                name: host.clone(),
                host,
                namespace: destination.namespace.clone(),
            },
        };
        let flags = if r.flags.is_empty() {
            "-".to_string()
        } else {
            r.flags.join(",")
        };
        let policy = match (self.inbound, r.mtls) {
            (false, _) => UNKNOWN,
            (true, true) => "mutual_tls",
            (true, false) => "none",
        };
        let protocol = match (tcp, r.grpc) {
            (true, _) => "tcp",
            (false, Some(_)) => "grpc",
            (false, None) => "http",
        };
        LABELS
            .iter()
            .filter(|l| !(tcp && matches!(**l, "response_code" | "grpc_response_status")))
            .map(|l| {
                let v = match *l {
                    "response_code" => r.response_code.to_string(),
                    "reporter" => (if self.inbound {
                        "destination"
                    } else {
                        "source"
                    })
                    .into(),
                    "source_workload" => source.name.clone(),
                    "source_workload_namespace" => source.namespace.clone(),
                    "source_principal" => source_principal.clone(),
                    "source_app" => source.app.clone(),
                    "source_version" => source.version.clone(),
                    "source_cluster" => source.cluster.clone(),
                    "destination_workload" => destination.name.clone(),
                    "destination_workload_namespace" => destination.namespace.clone(),
                    "destination_principal" => destination_principal.clone(),
                    "destination_app" => destination.app.clone(),
                    "destination_version" => destination.version.clone(),
                    "destination_service" => service.host.clone(),
                    "destination_service_name" => service.name.clone(),
                    "destination_service_namespace" => service.namespace.clone(),
                    "destination_cluster" => destination.cluster.clone(),
                    "request_protocol" => protocol.into(),
                    "response_flags" => flags.clone(),
                    // A gRPC stream that ended without a status is UNKNOWN (2), as in Istio.
                    "grpc_response_status" => r
                        .grpc
                        .map(|s| s.unwrap_or(2).to_string())
                        .unwrap_or_default(),
                    "connection_security_policy" => policy.into(),
                    "source_canonical_service" => source.canonical_service.clone(),
                    "destination_canonical_service" => destination.canonical_service.clone(),
                    "source_canonical_revision" => source.canonical_revision.clone(),
                    _ => destination.canonical_revision.clone(),
                };
                (l.to_string(), v)
            })
            .collect()
    }

    /// `metric`'s labels: the standard ones as each `metrics[]` entry for it changes them, in
    /// order (its tags removed, then its dimensions set).
    fn labels(&self, mut labels: Labels, metric: &str, peers: &Peers, r: &Report) -> Labels {
        for m in &self.config.metrics {
            if m.name.as_deref().is_some_and(|n| n != metric) {
                continue;
            }
            labels.retain(|(n, _)| !m.tags_to_remove.contains(n));
            for (dim, expr) in &m.dimensions {
                let v = self.eval(expr, peers, r);
                match labels.iter_mut().find(|(n, _)| n == dim) {
                    Some(l) => l.1 = v,
                    None => labels.push((dim.clone(), v)),
                }
            }
        }
        labels
    }

    fn eval(&self, e: &Expr, peers: &Peers, r: &Report) -> String {
        let text = |v: Option<&Value>| match v {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => UNKNOWN.to_string(),
            Some(other) => other.to_string(),
        };
        match e {
            Expr::NodeMetadata(k) => text(self.node_metadata.get(k)),
            Expr::Peer { downstream, field } => {
                let md = if *downstream {
                    &peers.downstream
                } else {
                    &peers.upstream
                };
                let md = md.as_ref();
                match field {
                    PeerField::Key(k) => text(md.and_then(|m| m.get(k))),
                    PeerField::Label(k) => text(md.and_then(|m| m.get("LABELS")?.get(k))),
                }
            }
            Expr::RequestHost => r.authority.to_string(),
            Expr::Literal(s) => s.clone(),
        }
    }

    fn name(&self, metric: &str) -> String {
        format!("{}_{metric}", self.config.stat_prefix)
    }

    /// Counts into each metric (`None`: a counter's one; `Some`: a histogram's value).
    fn report(&self, r: &Report, tcp: bool, metrics: &[(&str, Option<u64>, u64)]) {
        let decode = |h: Option<&str>| h.and_then(crate::http::istio::decode);
        let peers = Peers {
            downstream: decode(r.downstream_peer),
            upstream: decode(r.upstream_peer),
        };
        let standard = self.standard(r, &peers, tcp);
        // The metrics of one report mostly share their labels: rendered once for each set.
        let mut last: Option<(Labels, String)> = None;
        for (metric, value, n) in metrics {
            let labels = self.labels(standard.clone(), metric, &peers, r);
            let rendered = match &last {
                Some((l, text)) if *l == labels => text.clone(),
                _ => render(&labels),
            };
            match value {
                None => self
                    .registry
                    .add(&self.name(metric), &labels, &rendered, *n),
                Some(v) => self
                    .registry
                    .record(&self.name(metric), &labels, &rendered, *v),
            }
            last = Some((labels, rendered));
        }
    }

    /// A request has ended: its count, duration and sizes.
    pub fn http(&self, r: &Report, duration_ms: u64, request_bytes: u64, response_bytes: u64) {
        self.report(
            r,
            false,
            &[
                ("requests_total", None, 1),
                ("request_duration_milliseconds", Some(duration_ms), 0),
                ("request_bytes", Some(request_bytes), 0),
                ("response_bytes", Some(response_bytes), 0),
            ],
        );
    }

    /// A TCP connection reached its upstream (or failed to, with its flags).
    pub fn tcp_opened(&self, r: &Report) {
        self.report(r, true, &[("tcp_connections_opened_total", None, 1)]);
    }

    /// A TCP connection ended: its bytes each way (`sent`: to the downstream) and its close.
    pub fn tcp_closed(&self, r: &Report, sent: u64, received: u64) {
        self.report(
            r,
            true,
            &[
                ("tcp_sent_bytes_total", None, sent),
                ("tcp_received_bytes_total", None, received),
                ("tcp_connections_closed_total", None, 1),
            ],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_by_envoys_buckets() {
        let r = Registry::default();
        let labels = vec![("a".to_string(), "1".to_string())];
        let rendered = render(&labels);
        r.record("istio_request_bytes", &labels, &rendered, 7);
        r.record("istio_request_bytes", &labels, &rendered, 700);
        let p = r.prometheus();
        assert!(p.contains("# TYPE istio_request_bytes histogram\n"), "{p}");
        assert!(
            p.contains("istio_request_bytes_bucket{a=\"1\",le=\"5\"} 0\n"),
            "{p}"
        );
        assert!(
            p.contains("istio_request_bytes_bucket{a=\"1\",le=\"10\"} 1\n"),
            "{p}"
        );
        assert!(
            p.contains("istio_request_bytes_bucket{a=\"1\",le=\"1000\"} 2\n"),
            "{p}"
        );
        assert!(
            p.contains("istio_request_bytes_bucket{a=\"1\",le=\"+Inf\"} 2\n"),
            "{p}"
        );
        assert!(p.contains("istio_request_bytes_sum{a=\"1\"} 707\n"), "{p}");
        assert!(p.contains("istio_request_bytes_count{a=\"1\"} 2\n"), "{p}");
    }
}
