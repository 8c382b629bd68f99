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

/// Every Istio series of the proxy, by metric and labels.
#[derive(Debug, Default)]
pub struct Registry {
    series: Mutex<BTreeMap<String, BTreeMap<String, Arc<Series>>>>,
}

impl Registry {
    fn series(&self, metric: &str, labels: &str, histogram: bool) -> Arc<Series> {
        let mut m = self.series.lock().unwrap();
        let family = m.entry(metric.to_string()).or_default();
        if let Some(s) = family.get(labels) {
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
        family.insert(labels.to_string(), s.clone());
        s
    }

    fn add(&self, metric: &str, labels: &str, n: u64) {
        if let Series::Counter(c) = &*self.series(metric, labels, false) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn record(&self, metric: &str, labels: &str, value: u64) {
        if let Series::Histogram {
            buckets,
            count,
            sum,
        } = &*self.series(metric, labels, true)
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
            for s in family.values() {
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
                .is_some_and(|s| matches!(**s, Series::Histogram { .. }));
            let ty = if histogram { "histogram" } else { "counter" };
            out.push_str(&format!("# TYPE {metric} {ty}\n"));
            for (labels, s) in family {
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
            for (labels, s) in family {
                if let Series::Counter(c) = &**s {
                    let mut name = String::new();
                    for pair in split_labels(labels) {
                        name.push_str(&format!("{}=.={};.;", pair.0, pair.1));
                    }
                    name.push_str(metric);
                    out.push((name, c.load(Ordering::Relaxed)));
                }
            }
        }
        out
    }
}

/// `a="x",b="y"` back into pairs (values as rendered, escapes kept).
fn split_labels(labels: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    let mut rest = labels;
    while let Some((name, after)) = rest.split_once("=\"") {
        let mut end = 0;
        let bytes = after.as_bytes();
        while end < bytes.len() && !(bytes[end] == b'"' && (end == 0 || bytes[end - 1] != b'\\')) {
            end += 1;
        }
        out.push((
            name.trim_start_matches(',').to_string(),
            after[..end].to_string(),
        ));
        rest = after.get(end + 1..).unwrap_or("");
    }
    out
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

    /// From node metadata (Istio's FlatNode fields), with Istio's fallbacks.
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
            app: label("app")
                .or_else(|| label("app.kubernetes.io/name"))
                .unwrap_or_else(|| UNKNOWN.into()),
            version: label("version")
                .or_else(|| label("app.kubernetes.io/version"))
                .unwrap_or_else(|| UNKNOWN.into()),
            cluster: s("CLUSTER_ID").unwrap_or_else(|| UNKNOWN.into()),
            canonical_service: label("service.istio.io/canonical-name")
                .or_else(|| label("app.kubernetes.io/name"))
                .or_else(|| label("app"))
                .or_else(|| name.clone())
                .unwrap_or_else(|| UNKNOWN.into()),
            canonical_revision: label("service.istio.io/canonical-revision")
                .or_else(|| label("app.kubernetes.io/version"))
                .or_else(|| label("version"))
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
    pub authority: &'a str,
    pub response_code: u32,
    pub flags: &'a [&'static str],
    /// A gRPC request: its status.
    pub grpc: Option<Option<u32>>,
}

/// `istio.stats` on one filter chain (an HTTP connection manager, or a TCP chain).
pub struct IstioStats {
    inbound: bool,
    node: Workload,
    node_metadata: Value,
    services: HashMap<String, Service>,
    config: StatsConfig,
    registry: Arc<Registry>,
}

impl IstioStats {
    /// For a listener of `direction` (Istio's plugin reports as the destination on inbound
    /// listeners, as the source otherwise); None when `json` is not a configuration it reads
    /// (start-up names it).
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
        Ok(IstioStats {
            inbound: direction == TrafficDirection::Inbound as i32,
            node: Workload::of(&node_metadata),
            node_metadata,
            services,
            config,
            registry,
        })
    }

    /// The labels of one request (`tcp`: a TCP connection, without response code and gRPC
    /// status), rendered, for `metric`.
    fn labels(&self, r: &Report, tcp: bool, metric: &str) -> String {
        let decode = |h: Option<&str>| h.and_then(crate::http::istio::decode);
        let downstream = decode(r.downstream_peer);
        let upstream = decode(r.upstream_peer);
        let peer_side =
            |md: &Option<Value>| md.as_ref().map_or_else(Workload::unknown, Workload::of);
        let or_unknown = |v: Option<&str>| v.unwrap_or(UNKNOWN).to_string();
        let (source, destination, source_principal, destination_principal) = if self.inbound {
            (
                peer_side(&downstream),
                self.node.clone(),
                or_unknown(r.downstream_peer_uri),
                or_unknown(r.downstream_local_uri),
            )
        } else {
            (
                self.node.clone(),
                peer_side(&upstream),
                or_unknown(r.upstream_local_uri),
                or_unknown(r.upstream_peer_uri),
            )
        };
        let service = match self.services.get(r.cluster) {
            Some(s) => s.clone(),
            None if !self.config.disable_host_header_fallback && !r.authority.is_empty() => {
                let host = r.authority.rsplit_once(':').map_or(r.authority, |(h, _)| h);
                Service {
                    host: host.to_string(),
                    name: host.to_string(),
                    namespace: destination.namespace.clone(),
                }
            }
            None => Service {
                host: UNKNOWN.into(),
                name: UNKNOWN.into(),
                namespace: UNKNOWN.into(),
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
        let mut labels: Vec<(String, String)> = LABELS
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
                    "grpc_response_status" => {
                        r.grpc.flatten().map(|s| s.to_string()).unwrap_or_default()
                    }
                    "connection_security_policy" => policy.into(),
                    "source_canonical_service" => source.canonical_service.clone(),
                    "destination_canonical_service" => destination.canonical_service.clone(),
                    "source_canonical_revision" => source.canonical_revision.clone(),
                    _ => destination.canonical_revision.clone(),
                };
                (l.to_string(), v)
            })
            .collect();
        // The configuration's own dimensions (istiod's overrides), then the tags it removes.
        let applies = |m: &Option<String>| m.as_deref().is_none_or(|m| m == metric);
        for (m, dim, expr) in &self.config.dimensions {
            if !applies(m) {
                continue;
            }
            let v = self.eval(expr, &downstream, &upstream, r);
            match labels.iter_mut().find(|(n, _)| n == dim) {
                Some(l) => l.1 = v,
                None => labels.push((dim.clone(), v)),
            }
        }
        for (m, tag) in &self.config.tags_to_remove {
            if applies(m) {
                labels.retain(|(n, _)| n != tag);
            }
        }
        labels
            .iter()
            .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn eval(
        &self,
        e: &Expr,
        downstream: &Option<Value>,
        upstream: &Option<Value>,
        r: &Report,
    ) -> String {
        let text = |v: Option<&Value>| match v {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => UNKNOWN.to_string(),
            Some(other) => other.to_string(),
        };
        match e {
            Expr::NodeMetadata(k) => text(self.node_metadata.get(k)),
            Expr::Peer {
                downstream: d,
                field,
            } => {
                let md = if *d { downstream } else { upstream };
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

    /// Reports as the destination (an inbound listener's): the downstream peer is the other
    /// side.
    pub fn reports_inbound(&self) -> bool {
        self.inbound
    }

    fn name(&self, metric: &str) -> String {
        format!("{}_{metric}", self.config.stat_prefix)
    }

    /// A request has ended: its count, duration and sizes.
    pub fn http(&self, r: &Report, duration_ms: u64, request_bytes: u64, response_bytes: u64) {
        for (metric, value) in [
            ("requests_total", None),
            ("request_duration_milliseconds", Some(duration_ms)),
            ("request_bytes", Some(request_bytes)),
            ("response_bytes", Some(response_bytes)),
        ] {
            let labels = self.labels(r, false, metric);
            match value {
                None => self.registry.add(&self.name(metric), &labels, 1),
                Some(v) => self.registry.record(&self.name(metric), &labels, v),
            }
        }
    }

    /// A TCP connection reached its upstream.
    pub fn tcp_opened(&self, r: &Report) {
        let metric = "tcp_connections_opened_total";
        self.registry
            .add(&self.name(metric), &self.labels(r, true, metric), 1);
    }

    /// A TCP connection ended: its bytes each way (`sent`: to the downstream) and its close.
    pub fn tcp_closed(&self, r: &Report, sent: u64, received: u64) {
        for (metric, n) in [
            ("tcp_sent_bytes_total", sent),
            ("tcp_received_bytes_total", received),
            ("tcp_connections_closed_total", 1),
        ] {
            self.registry
                .add(&self.name(metric), &self.labels(r, true, metric), n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattened_names_come_back_from_rendered_labels() {
        let pairs = split_labels(r#"reporter="destination",source_app="a\"b",x="""#);
        assert_eq!(
            pairs,
            vec![
                ("reporter".into(), "destination".into()),
                ("source_app".into(), r#"a\"b"#.into()),
                ("x".into(), "".into()),
            ]
        );
    }

    #[test]
    fn histograms_are_cumulative_by_envoys_buckets() {
        let r = Registry::default();
        r.record("istio_request_bytes", "a=\"1\"", 7);
        r.record("istio_request_bytes", "a=\"1\"", 700);
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
