//! What a cluster offers a connection: its hosts (inline, from EDS, or for ORIGINAL_DST the
//! original destination itself) with priority, locality and health, and for each host the
//! transport socket `transport_socket_matches` pick from the host's metadata (Istio's
//! `tlsMode: istio` gets mTLS, other hosts plain TCP).

use crate::{Reason, Verdict};
use pilotfish_api::pb::envoy::config::cluster::v3::Cluster;
use pilotfish_api::pb::envoy::config::core::v3::{transport_socket, HealthStatus, TransportSocket};
use pilotfish_api::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, LbEndpoint,
};
use pilotfish_api::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
use pilotfish_api::pb::google::protobuf::{value::Kind, Struct, Value};
use pilotfish_config::model::{discovery_name, eds_service_name, format_address, unpack};
use pilotfish_config::resources::ResourceSet;
use std::net::SocketAddr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTransport {
    /// `transport_socket_matches` entry name, or `default` for the cluster's own transport socket.
    pub matched: String,
    /// `envoy.transport_sockets.tls`, `envoy.transport_sockets.raw_buffer`, ...
    pub socket: String,
    pub sni: Option<String>,
    pub alpn: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Host {
    pub address: String,
    pub priority: u32,
    /// `region/zone/sub_zone`, empty parts left out.
    pub locality: String,
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
    pub health: String,
    pub weight: Option<u32>,
    /// The locality's `load_balancing_weight` (used under `locality_weighted_lb_config`).
    pub locality_weight: Option<u32>,
    /// The endpoint's `hostname`.
    pub hostname: String,
    /// `envoy.lb` metadata `hash_key`: where consistent hashing places the host instead of
    /// its address.
    pub hash_key: Option<String>,
    pub transport: UpstreamTransport,
}

#[derive(Debug, Clone)]
pub struct ClusterDecision {
    pub kind: String,
    pub hosts: Vec<Host>,
    /// ORIGINAL_DST clusters bind upstream connections here (Istio's 127.0.0.6).
    pub source_address: Option<String>,
    pub reasons: Vec<Reason>,
}

pub fn hosts(
    set: &ResourceSet,
    c: &Cluster,
    original_destination: Option<SocketAddr>,
) -> ClusterDecision {
    let kind = discovery_name(c);
    let mut reasons = vec![];
    let source_address = c
        .upstream_bind_config
        .as_ref()
        .and_then(|b| b.source_address.as_ref())
        .map(|s| s.address.clone());
    let mut out = vec![];
    let cla: Option<ClusterLoadAssignment> = match eds_service_name(c) {
        Some(svc) => match set.endpoints_for(&svc) {
            Some(e) => {
                reasons.push(Reason::new(
                    format!("EDS '{svc}'"),
                    Verdict::Note,
                    "endpoints from the configuration's endpoint assignment",
                ));
                Some(e.value.clone())
            }
            None => {
                reasons.push(Reason::new(
                    format!("EDS '{svc}'"),
                    Verdict::Rejected,
                    "no endpoint assignment of that name in the configuration: no hosts",
                ));
                None
            }
        },
        None => c.load_assignment.clone(),
    };
    if kind == "ORIGINAL_DST" {
        match original_destination {
            Some(dst) => {
                reasons.push(Reason::new(format!("host {dst}"), Verdict::Chosen, "ORIGINAL_DST: the host is the connection's original destination, created on first use"));
                out.push(Host {
                    address: dst.to_string(),
                    priority: 0,
                    locality: String::new(),
                    region: String::new(),
                    zone: String::new(),
                    sub_zone: String::new(),
                    health: "HEALTHY".into(),
                    weight: None,
                    locality_weight: None,
                    hostname: String::new(),
                    hash_key: None,
                    transport: transport_for(c, None, &mut reasons),
                });
            }
            None => reasons.push(Reason::new(
                "ORIGINAL_DST",
                Verdict::Note,
                "hosts come from each connection's original destination",
            )),
        }
    }
    if let Some(cla) = cla {
        for le in &cla.endpoints {
            let loc = le.locality.clone().unwrap_or_default();
            let locality = le
                .locality
                .as_ref()
                .map(|l| {
                    [l.region.as_str(), l.zone.as_str(), l.sub_zone.as_str()]
                        .iter()
                        .filter(|s| !s.is_empty())
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("/")
                })
                .unwrap_or_default();
            for lb in &le.lb_endpoints {
                let Some(HostIdentifier::Endpoint(e)) = &lb.host_identifier else {
                    continue;
                };
                let address = e
                    .address
                    .as_ref()
                    .and_then(format_address)
                    .unwrap_or_default();
                let transport = transport_for(c, Some(lb), &mut vec![]);
                out.push(Host {
                    address,
                    priority: le.priority,
                    locality: locality.clone(),
                    region: loc.region.clone(),
                    zone: loc.zone.clone(),
                    sub_zone: loc.sub_zone.clone(),
                    health: HealthStatus::try_from(lb.health_status)
                        .map_or("UNKNOWN".into(), |h| h.as_str_name().to_string()),
                    weight: lb.load_balancing_weight.as_ref().map(|w| w.value),
                    locality_weight: le.load_balancing_weight.as_ref().map(|w| w.value),
                    hostname: e.hostname.clone(),
                    hash_key: lb
                        .metadata
                        .as_ref()
                        .and_then(|m| m.filter_metadata.get("envoy.lb"))
                        .and_then(|s| s.fields.get("hash_key"))
                        .and_then(|v| match &v.kind {
                            Some(Kind::StringValue(k)) if !k.is_empty() => Some(k.clone()),
                            _ => None,
                        }),
                    transport,
                });
            }
        }
    }
    ClusterDecision {
        kind,
        hosts: out,
        source_address,
        reasons,
    }
}

/// The transport socket for one host: the first `transport_socket_matches` entry whose `match`
/// the host's `envoy.transport_socket_match` metadata satisfies, else the cluster's own.
pub fn transport_for(
    c: &Cluster,
    host: Option<&LbEndpoint>,
    reasons: &mut Vec<Reason>,
) -> UpstreamTransport {
    let meta = host
        .and_then(|h| h.metadata.as_ref())
        .and_then(|m| m.filter_metadata.get("envoy.transport_socket_match"));
    for m in &c.transport_socket_matches {
        if struct_subset(m.r#match.as_ref(), meta) {
            reasons.push(Reason::new(
                format!("transport_socket_matches '{}'", m.name),
                Verdict::Chosen,
                "the host's envoy.transport_socket_match metadata satisfies its match",
            ));
            return describe(&m.name, m.transport_socket.as_ref());
        }
    }
    describe("default", c.transport_socket.as_ref())
}

fn struct_subset(want: Option<&Struct>, have: Option<&Struct>) -> bool {
    let Some(want) = want else { return true };
    want.fields.iter().all(|(k, v)| {
        have.and_then(|h| h.fields.get(k))
            .is_some_and(|hv| value_eq(v, hv))
    })
}

fn value_eq(a: &Value, b: &Value) -> bool {
    match (&a.kind, &b.kind) {
        (Some(Kind::StringValue(x)), Some(Kind::StringValue(y))) => x == y,
        (Some(Kind::NumberValue(x)), Some(Kind::NumberValue(y))) => x == y,
        (Some(Kind::BoolValue(x)), Some(Kind::BoolValue(y))) => x == y,
        _ => a == b,
    }
}

fn describe(matched: &str, ts: Option<&TransportSocket>) -> UpstreamTransport {
    let Some(ts) = ts else {
        return UpstreamTransport {
            matched: matched.into(),
            socket: "envoy.transport_sockets.raw_buffer".into(),
            sni: None,
            alpn: vec![],
        };
    };
    let mut t = UpstreamTransport {
        matched: matched.into(),
        socket: ts.name.clone(),
        sni: None,
        alpn: vec![],
    };
    if let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type {
        if let Some(u) = unpack::<UpstreamTlsContext>(any) {
            t.sni = (!u.sni.is_empty()).then(|| u.sni.clone());
            t.alpn = u
                .common_tls_context
                .map(|c| c.alpn_protocols)
                .unwrap_or_default();
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(yaml: &str) -> ResourceSet {
        pilotfish_config::load_str("t.yaml", yaml, None)
            .unwrap_or_else(|e| panic!("{e}"))
            .resources
    }

    fn decide(s: &ResourceSet, name: &str, dst: Option<&str>) -> ClusterDecision {
        let c = &s.cluster(name).unwrap().value;
        hosts(s, c, dst.map(|d| d.parse().unwrap()))
    }

    const MTLS: &str = r#"
    transport_socket_matches:
    - name: tlsMode-istio
      match: { tlsMode: istio }
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: outbound_.8080_._.reviews.default.svc.cluster.local
          common_tls_context: { alpn_protocols: [istio-peer-exchange, istio] }
    - name: tlsMode-disabled
      match: {}
      transport_socket: { name: envoy.transport_sockets.raw_buffer, typed_config: { "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer } }
"#;

    fn clusters() -> ResourceSet {
        set(&format!(
            r#"
static_resources:
  clusters:
  - name: static
    type: STATIC
    load_assignment:
      cluster_name: static
      endpoints:
      - locality: {{ region: us-east-1, zone: a }}
        lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 10.0.0.1, port_value: 80 }} }} }}
          load_balancing_weight: 3
        - endpoint: {{ address: {{ socket_address: {{ address: 10.0.0.2, port_value: 80 }} }} }}
          health_status: DRAINING
      - priority: 1
        locality: {{ region: us-west-2 }}
        lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 10.1.0.1, port_value: 80 }} }} }}
  - name: dns
    type: STRICT_DNS
    load_assignment:
      cluster_name: dns
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: zipkin.istio-system, port_value: 9411 }} }} }} }}] }}]
  - name: passthrough
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    upstream_bind_config: {{ source_address: {{ address: 127.0.0.6, port_value: 0 }} }}
  - name: mesh
    type: STATIC
{MTLS}
    load_assignment:
      cluster_name: mesh
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 10.2.0.1, port_value: 8080 }} }} }}
          metadata: {{ filter_metadata: {{ envoy.transport_socket_match: {{ tlsMode: istio }} }} }}
        - endpoint: {{ address: {{ socket_address: {{ address: 10.2.0.2, port_value: 8080 }} }} }}
          metadata: {{ filter_metadata: {{ envoy.transport_socket_match: {{ tlsMode: disabled }} }} }}
        - endpoint: {{ address: {{ socket_address: {{ address: 10.2.0.3, port_value: 8080 }} }} }}
  - name: strict
    type: STATIC
    transport_socket_matches:
    - name: both
      match: {{ tlsMode: istio, version: 2 }}
      transport_socket: {{ name: envoy.transport_sockets.tls, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, sni: both }} }}
    load_assignment:
      cluster_name: strict
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 10.3.0.1, port_value: 1 }} }} }}
          metadata: {{ filter_metadata: {{ envoy.transport_socket_match: {{ tlsMode: istio }} }} }}
        - endpoint: {{ address: {{ socket_address: {{ address: 10.3.0.2, port_value: 1 }} }} }}
          metadata: {{ filter_metadata: {{ envoy.transport_socket_match: {{ tlsMode: istio, version: 2 }} }} }}
        - endpoint: {{ address: {{ socket_address: {{ address: 10.3.0.3, port_value: 1 }} }} }}
          metadata: {{ filter_metadata: {{ envoy.transport_socket_match: {{ tlsMode: istio, version: "2" }} }} }}
"#
        ))
    }

    #[test]
    fn static_hosts_keep_priority_locality_health_and_weight() {
        let s = clusters();
        let d = decide(&s, "static", None);
        assert_eq!(d.kind, "STATIC");
        let hosts: Vec<(&str, u32, &str, &str, Option<u32>)> = d
            .hosts
            .iter()
            .map(|h| {
                (
                    h.address.as_str(),
                    h.priority,
                    h.locality.as_str(),
                    h.health.as_str(),
                    h.weight,
                )
            })
            .collect();
        assert_eq!(
            hosts,
            [
                ("10.0.0.1:80", 0, "us-east-1/a", "UNKNOWN", Some(3)),
                ("10.0.0.2:80", 0, "us-east-1/a", "DRAINING", None),
                ("10.1.0.1:80", 1, "us-west-2", "UNKNOWN", None),
            ]
        );
        // No transport socket configured: plaintext.
        assert!(d.hosts.iter().all(|h| h.transport.matched == "default"
            && h.transport.socket == "envoy.transport_sockets.raw_buffer"));
        let dns = decide(&s, "dns", None);
        assert_eq!(dns.kind, "STRICT_DNS");
        assert_eq!(dns.hosts[0].address, "zipkin.istio-system:9411");
    }

    #[test]
    fn original_dst_hosts_are_the_connections_destination() {
        let s = clusters();
        let d = decide(&s, "passthrough", Some("172.21.0.9:9080"));
        assert_eq!(d.kind, "ORIGINAL_DST");
        assert_eq!(d.hosts.len(), 1);
        assert_eq!(d.hosts[0].address, "172.21.0.9:9080");
        assert_eq!(d.source_address.as_deref(), Some("127.0.0.6"));
        assert_eq!(d.reasons[0].verdict, Verdict::Chosen);
        // Without a connection (explain), there is no host to name.
        let d = decide(&s, "passthrough", None);
        assert!(d.hosts.is_empty());
        assert_eq!(d.reasons[0].verdict, Verdict::Note);
    }

    #[test]
    fn transport_socket_matches_follow_the_hosts_metadata_in_order() {
        let s = clusters();
        let d = decide(&s, "mesh", None);
        let t: Vec<(&str, &str, Option<&str>)> = d
            .hosts
            .iter()
            .map(|h| {
                (
                    h.transport.matched.as_str(),
                    h.transport.socket.as_str(),
                    h.transport.sni.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            t,
            [
                (
                    "tlsMode-istio",
                    "envoy.transport_sockets.tls",
                    Some("outbound_.8080_._.reviews.default.svc.cluster.local")
                ),
                // An empty match takes every host the earlier entries did not, with or without
                // metadata.
                (
                    "tlsMode-disabled",
                    "envoy.transport_sockets.raw_buffer",
                    None
                ),
                (
                    "tlsMode-disabled",
                    "envoy.transport_sockets.raw_buffer",
                    None
                ),
            ]
        );
        assert_eq!(d.hosts[0].transport.alpn, ["istio-peer-exchange", "istio"]);
        // Every key of the match must be in the metadata with the same value and type.
        let d = decide(&s, "strict", None);
        let matched: Vec<&str> = d
            .hosts
            .iter()
            .map(|h| h.transport.matched.as_str())
            .collect();
        assert_eq!(matched, ["default", "both", "default"]);
        assert_eq!(d.hosts[1].transport.sni.as_deref(), Some("both"));
    }

    #[test]
    fn eds_hosts_come_from_the_assignment_named_by_service_name() {
        let s = set(r#"
static_resources:
  clusters:
  - name: outbound|9080||reviews
    type: EDS
    eds_cluster_config: { service_name: reviews-svc, eds_config: { ads: {} } }
  - name: outbound|9080||ratings
    type: EDS
    eds_cluster_config: { eds_config: { ads: {} } }
"#);
        let d = decide(&s, "outbound|9080||reviews", None);
        assert_eq!(d.kind, "EDS");
        assert!(d.hosts.is_empty());
        assert_eq!(d.reasons[0].verdict, Verdict::Rejected);
        assert!(
            d.reasons[0].subject.contains("reviews-svc"),
            "{:?}",
            d.reasons
        );
        let d = decide(&s, "outbound|9080||ratings", None);
        assert!(
            d.reasons[0].subject.contains("outbound|9080||ratings"),
            "{:?}",
            d.reasons
        );
    }
}
