//! The connection manager's `tracing`: the sampling decision Envoy takes for each request
//! (x-client-trace-id, x-envoy-force-trace, random and overall sampling, by the x-request-id
//! when the UUID request id extension says so, the reason packed into the x-request-id), the
//! Zipkin tracer's B3 context (extracted from x-b3-* or `b3`, a span of this proxy's, injected
//! for the upstream), and the route's `decorator` (x-envoy-decorator-operation: on the response
//! of an inbound listener, on the upstream request of an outbound one). Spans are not exported
//! to the collector: the collector fields are listed by `validate`.

use hyper::header::{HeaderMap, HeaderValue};
use pilotfish_api::pb::envoy::config::trace::v3::ZipkinConfig;
use pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use pilotfish_api::pb::envoy::extensions::request_id::uuid::v3::UuidRequestIdConfig;
use pilotfish_config::resources::ResourceSet;

/// Why a request is traced, as Envoy packs it into the x-request-id (its 15th character).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    NotTraceable,
    Sampling,
    ServiceForced,
    ClientForced,
}

impl Reason {
    fn of_request_id(rid: &str) -> Reason {
        if rid.len() != 36 {
            return Reason::NotTraceable;
        }
        match rid.as_bytes()[14] {
            b'9' => Reason::Sampling,
            b'a' => Reason::ServiceForced,
            b'b' => Reason::ClientForced,
            _ => Reason::NotTraceable,
        }
    }

    fn mark(self) -> u8 {
        match self {
            Reason::NotTraceable => b'4',
            Reason::Sampling => b'9',
            Reason::ServiceForced => b'a',
            Reason::ClientForced => b'b',
        }
    }
}

/// One connection manager's tracing, built with it.
pub struct Tracing {
    /// Sampling, in hundredths of a percent.
    client: u64,
    random: u64,
    overall: u64,
    pack_trace_reason: bool,
    use_request_id_for_sampling: bool,
    zipkin: Option<Zipkin>,
    /// An outbound listener's: the decorator goes to the upstream, not the response.
    egress: bool,
}

#[derive(Clone, Copy)]
struct Zipkin {
    trace_id_128bit: bool,
    shared_span_context: bool,
}

const ZIPKIN: &str = "envoy.config.trace.v3.ZipkinConfig";

impl Tracing {
    /// The tracing of `hcm` (None when it has none), its tracer its own `provider` or the
    /// bootstrap's.
    pub fn of(set: &ResourceSet, hcm: &HttpConnectionManager, egress: bool) -> Option<Tracing> {
        let t = hcm.tracing.as_ref()?;
        let per_10000 = |p: Option<&pilotfish_api::pb::envoy::r#type::v3::Percent>| {
            p.map_or(10_000, |p| {
                (p.value.clamp(0.0, 100.0) * 100.0).round() as u64
            })
        };
        // Istio still writes the tracer into the bootstrap, where Envoy reads it as a default.
        #[allow(deprecated)]
        let provider = t
            .provider
            .clone()
            .or_else(|| set.bootstrap.tracing.as_ref().and_then(|b| b.http.clone()));
        let zipkin = provider.and_then(|p| {
            use pilotfish_api::pb::envoy::config::trace::v3::tracing::http::ConfigType;
            let Some(ConfigType::TypedConfig(any)) = &p.config_type else {
                return None;
            };
            if !any.type_url.ends_with(ZIPKIN) {
                return None;
            }
            let z: ZipkinConfig = pilotfish_config::model::unpack(any)?;
            Some(Zipkin {
                trace_id_128bit: z.trace_id_128bit,
                shared_span_context: z.shared_span_context.as_ref().is_none_or(|v| v.value),
            })
        });
        let uuid: UuidRequestIdConfig = hcm
            .request_id_extension
            .as_ref()
            .and_then(|r| r.typed_config.as_ref())
            .and_then(pilotfish_config::model::unpack)
            .unwrap_or_default();
        Some(Tracing {
            client: per_10000(t.client_sampling.as_ref()),
            random: per_10000(t.random_sampling.as_ref()),
            overall: per_10000(t.overall_sampling.as_ref()),
            pack_trace_reason: uuid.pack_trace_reason.as_ref().is_none_or(|v| v.value),
            use_request_id_for_sampling: uuid
                .use_request_id_for_trace_sampling
                .as_ref()
                .is_none_or(|v| v.value),
            zipkin,
            egress,
        })
    }

    /// Envoy's sampling decision for a request, packed into its x-request-id; whether it is
    /// traced. `random` is this stream's random number.
    pub fn decide(&self, h: &mut HeaderMap, random: u64) -> bool {
        let Some(rid) = h
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
        else {
            return false;
        };
        // The request id's first 8 hex digits are its number; one that has none is not traced.
        let by_id = rid.get(..8).and_then(|p| u64::from_str_radix(p, 16).ok());
        let Some(by_id) = by_id else {
            return false;
        };
        let value = if self.use_request_id_for_sampling {
            by_id % 10_000
        } else {
            random % 10_000
        };
        let mut reason = Reason::of_request_id(&rid);
        let mut set = None;
        if reason == Reason::NotTraceable {
            if h.contains_key("x-client-trace-id") && (random >> 20) % 10_000 < self.client {
                set = Some(Reason::ClientForced);
            } else if h.contains_key("x-envoy-force-trace") {
                set = Some(Reason::ServiceForced);
            } else if value < self.random {
                set = Some(Reason::Sampling);
            }
        }
        if value >= self.overall {
            set = Some(Reason::NotTraceable);
        }
        if let Some(r) = set {
            reason = r;
            if self.pack_trace_reason && rid.len() == 36 {
                let mut bytes = rid.into_bytes();
                bytes[14] = r.mark();
                if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                    h.insert("x-request-id", v);
                }
            }
        }
        reason != Reason::NotTraceable
    }

    /// The B3 context for the upstream: the request's own continued with a span of this proxy,
    /// or a new trace; in the form it came in (`b3`, or x-b3-*).
    pub fn propagate(&self, h: &mut HeaderMap, traced: bool, random: u64) {
        let Some(z) = self.zipkin else {
            return;
        };
        let incoming = B3::extract(h);
        let span = random_span_id(random);
        let (trace, span, parent, sampled) = match &incoming {
            Some(B3 {
                trace: Some(trace),
                span: Some(their),
                parent,
                sampled,
                ..
            }) => {
                let sampled = sampled.unwrap_or(traced);
                if z.shared_span_context {
                    (*trace, *their, *parent, sampled)
                } else {
                    (*trace, span, Some(*their), sampled)
                }
            }
            other => {
                let high = if z.trace_id_128bit {
                    random_span_id(random.rotate_left(17) ^ 0x5bd1_e995)
                } else {
                    0
                };
                let sampled = other.as_ref().and_then(|b| b.sampled).unwrap_or(traced);
                ((high, span), span, None, sampled)
            }
        };
        let trace = match trace {
            (0, lo) => format!("{lo:016x}"),
            (hi, lo) => format!("{hi:016x}{lo:016x}"),
        };
        let flag = if sampled { "1" } else { "0" };
        if incoming.as_ref().is_some_and(|b| b.single) {
            let mut v = format!("{trace}-{span:016x}-{flag}");
            if let Some(p) = parent.filter(|p| *p != 0) {
                v.push_str(&format!("-{p:016x}"));
            }
            set(h, "b3", &v);
            return;
        }
        // Envoy sets each header by removing it and adding it again: the four end up last, in
        // this order, after whatever the request carried (the app sees them so).
        const B3: [&str; 4] = [
            "x-b3-traceid",
            "x-b3-spanid",
            "x-b3-parentspanid",
            "x-b3-sampled",
        ];
        move_to_end(h, &B3);
        let parent = parent.filter(|p| *p != 0).map(|p| format!("{p:016x}"));
        for (name, value) in B3.into_iter().zip([
            Some(trace),
            Some(format!("{span:016x}")),
            parent,
            Some(flag.to_string()),
        ]) {
            if let Some(v) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                h.append(name, v);
            }
        }
    }

    /// Where the route's decorator operation goes: the response (inbound) or the upstream
    /// request (outbound, unless `propagate` is off).
    pub fn decorator_on_response(&self) -> bool {
        !self.egress
    }
}

/// Takes `names` out of `h`, keeping the order of the others (`HeaderMap::remove` would move the
/// last header into the gap).
fn move_to_end(h: &mut HeaderMap, names: &[&str]) {
    if !names.iter().any(|n| h.contains_key(*n)) {
        return;
    }
    let mut last: Option<hyper::header::HeaderName> = None;
    for (k, v) in std::mem::take(h) {
        let name = match k {
            Some(k) => {
                last = Some(k.clone());
                k
            }
            None => match &last {
                Some(k) => k.clone(),
                None => continue,
            },
        };
        if !names.contains(&name.as_str()) {
            h.append(name, v);
        }
    }
}

fn set(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

/// A non-zero span id from the stream's random number.
fn random_span_id(seed: u64) -> u64 {
    crate::random(seed).max(1)
}

/// A B3 context as a request carries it.
#[derive(Debug, Default)]
struct B3 {
    /// (high, low) 64 bits.
    trace: Option<(u64, u64)>,
    span: Option<u64>,
    parent: Option<u64>,
    sampled: Option<bool>,
    /// In the single `b3` header.
    single: bool,
}

impl B3 {
    fn extract(h: &HeaderMap) -> Option<B3> {
        let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok());
        let sampled = |v: &str| match v {
            "1" | "true" | "d" => Some(true),
            "0" | "false" => Some(false),
            _ => None,
        };
        if let Some(b3) = get("b3") {
            let parts: Vec<&str> = b3.split('-').collect();
            if parts.len() == 1 {
                return Some(B3 {
                    sampled: sampled(parts[0]),
                    single: true,
                    ..Default::default()
                });
            }
            let trace = trace_id(parts[0])?;
            let span = u64::from_str_radix(parts[1], 16).ok()?;
            return Some(B3 {
                trace: Some(trace),
                span: Some(span),
                sampled: parts.get(2).and_then(|s| sampled(s)),
                parent: parts.get(3).and_then(|p| u64::from_str_radix(p, 16).ok()),
                single: true,
            });
        }
        let mut b3 = B3 {
            sampled: get("x-b3-sampled").and_then(sampled),
            ..Default::default()
        };
        if get("x-b3-flags") == Some("1") {
            b3.sampled = Some(true);
        }
        if let (Some(t), Some(s)) = (get("x-b3-traceid"), get("x-b3-spanid")) {
            b3.trace = Some(trace_id(t)?);
            b3.span = Some(u64::from_str_radix(s, 16).ok()?);
            b3.parent = get("x-b3-parentspanid").and_then(|p| u64::from_str_radix(p, 16).ok());
        }
        (b3.trace.is_some() || b3.sampled.is_some()).then_some(b3)
    }
}

/// A 64- or 128-bit trace id in hex.
fn trace_id(s: &str) -> Option<(u64, u64)> {
    match s.len() {
        16 => Some((0, u64::from_str_radix(s, 16).ok()?)),
        32 => Some((
            u64::from_str_radix(&s[..16], 16).ok()?,
            u64::from_str_radix(&s[16..], 16).ok()?,
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracing(random: u64, overall: u64) -> Tracing {
        Tracing {
            client: 10_000,
            random,
            overall,
            pack_trace_reason: true,
            use_request_id_for_sampling: true,
            zipkin: Some(Zipkin {
                trace_id_128bit: true,
                shared_span_context: false,
            }),
            egress: false,
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn sampling_by_request_id_packs_the_reason() {
        // 1%: ids whose first 8 hex digits are below 100 (mod 10000) are sampled.
        let t = tracing(100, 10_000);
        let mut h = headers(&[("x-request-id", "00000063-1234-4234-8234-123456789012")]);
        assert!(t.decide(&mut h, 7));
        assert_eq!(h["x-request-id"], "00000063-1234-9234-8234-123456789012");
        let mut h = headers(&[("x-request-id", "00000064-1234-4234-8234-123456789012")]);
        assert!(!t.decide(&mut h, 7));
        assert_eq!(h["x-request-id"], "00000064-1234-4234-8234-123456789012");
        // A client's trace id forces it; so does a reason already packed.
        let mut h = headers(&[
            ("x-request-id", "00000064-1234-4234-8234-123456789012"),
            ("x-client-trace-id", "x"),
        ]);
        assert!(t.decide(&mut h, 7));
        assert_eq!(h["x-request-id"], "00000064-1234-b234-8234-123456789012");
        let mut h = headers(&[("x-request-id", "12345678-1234-b234-8234-123456789012")]);
        assert!(t.decide(&mut h, 7));
        // Overall sampling has the last word.
        let mut h = headers(&[("x-request-id", "00000063-1234-9234-8234-123456789012")]);
        assert!(!tracing(100, 0).decide(&mut h, 7));
        assert_eq!(h["x-request-id"], "00000063-1234-4234-8234-123456789012");
        // Not a number: not traced, left alone.
        let mut h = headers(&[("x-request-id", "zzz")]);
        assert!(!t.decide(&mut h, 7));
    }

    #[test]
    fn b3_continues_the_callers_trace_in_its_form() {
        let t = tracing(100, 10_000);
        let mut h = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "0"),
        ]);
        t.propagate(&mut h, true, 42);
        assert_eq!(h["x-b3-traceid"], "463ac35c9f6413ad");
        assert_eq!(h["x-b3-parentspanid"], "a2fb4a1d1a96d312");
        assert_eq!(h["x-b3-sampled"], "0");
        assert_ne!(h["x-b3-spanid"], "a2fb4a1d1a96d312");
        let mut h = headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]);
        t.propagate(&mut h, false, 42);
        let b3 = h["b3"].to_str().unwrap();
        assert!(b3.starts_with("80f198ee56343ba864fe8b2a57d3eff7-"), "{b3}");
        assert!(b3.ends_with("-1-e457b5a2e4d86bd1"), "{b3}");
        assert!(!h.contains_key("x-b3-traceid"));
        // A new trace: 128 bits, its low half the root span's id.
        let mut h = HeaderMap::new();
        t.propagate(&mut h, false, 42);
        let trace = h["x-b3-traceid"].to_str().unwrap();
        assert_eq!(trace.len(), 32);
        assert_eq!(&trace[16..], h["x-b3-spanid"].to_str().unwrap());
        assert_eq!(h["x-b3-sampled"], "0");
        assert!(!h.contains_key("x-b3-parentspanid"));
    }
}
