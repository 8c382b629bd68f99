//! Istio's own HTTP filters, natively (Istio runs them in Envoy's null Wasm VM or as native
//! extensions; pilotfish has no Wasm runtime): `istio.metadata_exchange` (the
//! `x-envoy-peer-metadata` and `x-envoy-peer-metadata-id` headers: this sidecar's node metadata
//! sent to its peer, the peer's taken off and kept) and `istio.alpn` (the ALPN offered upstream,
//! by the protocol the request goes upstream in).

use base64::Engine;
use hyper::header::{HeaderMap, HeaderValue};
use pilotfish_api::pb::google::protobuf::{value::Kind, Struct, Value};

pub const PEER_METADATA: &str = "x-envoy-peer-metadata";
pub const PEER_METADATA_ID: &str = "x-envoy-peer-metadata-id";

/// The code name a metadata exchange Wasm filter is configured with (Istio's null-VM plugin).
pub const METADATA_EXCHANGE_CODE: &str = "envoy.wasm.metadata_exchange";

/// What a peer said of itself, as the metadata exchange headers carried it (decoded only when
/// asked: `decode`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Peer {
    pub id: Option<String>,
    /// Its node metadata, base64 of a `google.protobuf.Struct`.
    pub metadata: Option<String>,
}

/// `istio.metadata_exchange` on one connection manager: this node's headers, made once.
pub struct MetadataExchange {
    id: Option<HeaderValue>,
    value: Option<HeaderValue>,
    /// Where this node's metadata goes: an inbound listener's on responses, an outbound one's
    /// on requests, a listener of no direction's on both, as Istio's plugin does.
    on_requests: bool,
    on_responses: bool,
}

impl MetadataExchange {
    /// `direction`: the listener's traffic_direction.
    pub fn new(node_id: &str, metadata: Option<&Struct>, direction: i32) -> MetadataExchange {
        use pilotfish_api::pb::envoy::config::core::v3::TrafficDirection;
        let value =
            metadata.map(|m| base64::engine::general_purpose::STANDARD.encode(encode_node(m)));
        MetadataExchange {
            id: (!node_id.is_empty())
                .then(|| HeaderValue::from_str(node_id).ok())
                .flatten(),
            value: value.and_then(|v| HeaderValue::from_str(&v).ok()),
            on_requests: direction != TrafficDirection::Inbound as i32,
            on_responses: direction != TrafficDirection::Outbound as i32,
        }
    }

    /// The downstream peer's headers taken off the request; an outbound sidecar's own added
    /// for its upstream.
    pub fn on_request(&self, h: &mut HeaderMap) -> Peer {
        let peer = take_peer(h);
        if self.on_requests {
            self.add(h);
        }
        peer
    }

    /// The upstream peer's headers taken off the response; an inbound sidecar's own added for
    /// its downstream.
    pub fn on_response(&self, h: &mut HeaderMap) -> Peer {
        let peer = take_peer(h);
        if self.on_responses {
            self.add(h);
        }
        peer
    }

    fn add(&self, h: &mut HeaderMap) {
        if let Some(v) = &self.value {
            h.insert(PEER_METADATA, v.clone());
        }
        if let Some(v) = &self.id {
            h.insert(PEER_METADATA_ID, v.clone());
        }
    }
}

fn take_peer(h: &mut HeaderMap) -> Peer {
    let text = |v: Option<HeaderValue>| v.and_then(|v| v.to_str().ok().map(str::to_string));
    let id = text(h.remove(PEER_METADATA_ID)).filter(|s| !s.is_empty());
    let metadata = text(h.remove(PEER_METADATA)).filter(|s| !s.is_empty());
    Peer { id, metadata }
}

/// The node metadata Istio 1.14 exchanges (its FlatNode): these string fields when set, the
/// labels and platform metadata always, serialized as a `google.protobuf.Struct` with its keys
/// in order, as Istio's deterministic serialization writes it.
pub fn encode_node(m: &Struct) -> Vec<u8> {
    let string = |k: &str| match m.fields.get(k).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    };
    let strings_of = |k: &str| -> Struct {
        let mut out = Struct::default();
        if let Some(Some(Kind::StructValue(s))) = m.fields.get(k).map(|v| v.kind.as_ref()) {
            for (name, v) in &s.fields {
                if let Some(Kind::StringValue(t)) = &v.kind {
                    out.fields.insert(name.clone(), string_value(t));
                }
            }
        }
        out
    };
    let mut node = Struct::default();
    for k in [
        "NAME",
        "NAMESPACE",
        "OWNER",
        "WORKLOAD_NAME",
        "ISTIO_VERSION",
        "MESH_ID",
        "CLUSTER_ID",
        "APP_CONTAINERS",
        "INSTANCE_IPS",
    ] {
        if let Some(v) = string(k) {
            node.fields.insert(k.to_string(), string_value(&v));
        }
    }
    for k in ["LABELS", "PLATFORM_METADATA"] {
        node.fields.insert(
            k.to_string(),
            Value {
                kind: Some(Kind::StructValue(strings_of(k))),
            },
        );
    }
    let mut out = vec![];
    write_struct(&node, &mut out);
    out
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn field(tag: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((tag << 3) | 2) as u64, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// Struct { map<string, Value> fields = 1 }, its entries by key.
fn write_struct(s: &Struct, out: &mut Vec<u8>) {
    let mut keys: Vec<&String> = s.fields.keys().collect();
    keys.sort();
    for k in keys {
        let mut entry = vec![];
        field(1, k.as_bytes(), &mut entry);
        let mut value = vec![];
        write_value(&s.fields[k], &mut value);
        field(2, &value, &mut entry);
        field(1, &entry, out);
    }
}

/// Value { null = 1, number = 2, string = 3, bool = 4, struct = 5, list = 6 }.
fn write_value(v: &Value, out: &mut Vec<u8>) {
    match &v.kind {
        Some(Kind::StringValue(s)) => field(3, s.as_bytes(), out),
        Some(Kind::StructValue(s)) => {
            let mut inner = vec![];
            write_struct(s, &mut inner);
            field(5, &inner, out);
        }
        Some(Kind::ListValue(l)) => {
            let mut inner = vec![];
            for item in &l.values {
                let mut one = vec![];
                write_value(item, &mut one);
                field(1, &one, &mut inner);
            }
            field(6, &inner, out);
        }
        Some(Kind::NumberValue(n)) => {
            out.push((2 << 3) | 1);
            out.extend_from_slice(&n.to_le_bytes());
        }
        Some(Kind::BoolValue(b)) => {
            out.push(4 << 3);
            out.push(*b as u8);
        }
        Some(Kind::NullValue(_)) => {
            out.push(1 << 3);
            out.push(0);
        }
        None => {}
    }
}

/// A metadata header's value as JSON (None when it is not base64 of a Struct).
pub fn decode(header: &str) -> Option<serde_json::Value> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(header.trim())
        .ok()?;
    let s = <Struct as prost::Message>::decode(bytes.as_slice()).ok()?;
    Some(struct_json(&s))
}

pub(crate) fn struct_json(s: &Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_json(v)))
            .collect(),
    )
}

fn value_json(v: &Value) -> serde_json::Value {
    match &v.kind {
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::NumberValue(n)) => (*n).into(),
        Some(Kind::BoolValue(b)) => (*b).into(),
        Some(Kind::StructValue(s)) => struct_json(s),
        Some(Kind::ListValue(l)) => l.values.iter().map(value_json).collect(),
        _ => serde_json::Value::Null,
    }
}

/// `istio.alpn`: the ALPN protocols offered upstream for each protocol a request goes upstream
/// in (HTTP/1.0, HTTP/1.1, HTTP/2).
#[derive(Debug, Clone, Default)]
pub struct AlpnOverride {
    pub http10: Option<Vec<Vec<u8>>>,
    pub http11: Option<Vec<Vec<u8>>>,
    pub http2: Option<Vec<Vec<u8>>>,
}

impl AlpnOverride {
    pub fn new(c: &pilotfish_api::istio::alpn::FilterConfig) -> AlpnOverride {
        use pilotfish_api::istio::alpn::Protocol;
        let mut o = AlpnOverride::default();
        for entry in &c.alpn_override {
            let protocols = Some(
                entry
                    .alpn_override
                    .iter()
                    .map(|p| p.as_bytes().to_vec())
                    .collect(),
            );
            match Protocol::try_from(entry.upstream_protocol).unwrap_or(Protocol::Http10) {
                Protocol::Http10 => o.http10 = protocols,
                Protocol::Http11 => o.http11 = protocols,
                Protocol::Http2 => o.http2 = protocols,
            }
        }
        o
    }

    pub fn for_protocol(&self, http2: bool, http10: bool) -> Option<&Vec<Vec<u8>>> {
        if http2 {
            self.http2.as_ref()
        } else if http10 {
            self.http10.as_ref()
        } else {
            self.http11.as_ref()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_metadata_round_trips() {
        let mut labels = Struct::default();
        labels.fields.insert("app".into(), string_value("x"));
        let mut m = Struct::default();
        m.fields.insert("NAME".into(), string_value("pod-1"));
        m.fields
            .insert("SERVICE_ACCOUNT".into(), string_value("sa"));
        m.fields.insert(
            "LABELS".into(),
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        );
        let x = MetadataExchange::new(
            "sidecar~1.2.3.4~pod-1.ns~ns.svc.cluster.local",
            Some(&m),
            pilotfish_api::pb::envoy::config::core::v3::TrafficDirection::Outbound as i32,
        );
        let mut h = HeaderMap::new();
        h.insert(PEER_METADATA, HeaderValue::from_static("bm90IGEgc3RydWN0"));
        h.insert(PEER_METADATA_ID, HeaderValue::from_static("downstream"));
        let peer = x.on_request(&mut h);
        assert_eq!(peer.id.as_deref(), Some("downstream"));
        // An outbound sidecar sends its own; SERVICE_ACCOUNT is not among what Istio exchanges.
        let sent = decode(h[PEER_METADATA].to_str().unwrap()).unwrap();
        assert_eq!(
            sent,
            serde_json::json!({ "NAME": "pod-1", "LABELS": { "app": "x" }, "PLATFORM_METADATA": {} })
        );
        let mut response = HeaderMap::new();
        response.insert(PEER_METADATA_ID, HeaderValue::from_static("upstream"));
        assert_eq!(x.on_response(&mut response).id.as_deref(), Some("upstream"));
        assert!(response.is_empty());
    }

    #[test]
    fn alpn_override_by_protocol() {
        use pilotfish_api::istio::alpn::{AlpnOverride as Entry, FilterConfig, Protocol};
        let entry = |p: Protocol, alpn: &[&str]| Entry {
            upstream_protocol: p as i32,
            alpn_override: alpn.iter().map(|s| s.to_string()).collect(),
        };
        let o = AlpnOverride::new(&FilterConfig {
            alpn_override: vec![
                entry(Protocol::Http10, &["istio-http/1.0", "istio"]),
                entry(Protocol::Http11, &["istio-http/1.1", "istio"]),
                entry(Protocol::Http2, &["istio-h2", "istio"]),
            ],
        });
        assert_eq!(o.for_protocol(false, false).unwrap()[0], b"istio-http/1.1");
        assert_eq!(o.for_protocol(true, false).unwrap()[0], b"istio-h2");
        assert_eq!(o.for_protocol(false, true).unwrap()[0], b"istio-http/1.0");
    }
}
