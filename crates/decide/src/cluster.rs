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
    pub locality: String,
    pub health: String,
    pub weight: Option<u32>,
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
                    health: "HEALTHY".into(),
                    weight: None,
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
                    health: HealthStatus::try_from(lb.health_status)
                        .map_or("UNKNOWN".into(), |h| h.as_str_name().to_string()),
                    weight: lb.load_balancing_weight.as_ref().map(|w| w.value),
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
