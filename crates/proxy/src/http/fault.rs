//! The `envoy.filters.http.fault` HTTP filter: delays and aborts injected into a share of the
//! requests (fixed, or asked for by `x-envoy-fault-*` headers when the configuration says so),
//! limited to requests whose headers match and to one upstream cluster when set; a route's or
//! virtual host's `typed_per_filter_config` replaces the filter's own configuration, as Istio's
//! fault injection uses it (see `super::PerRoute`).

use pilotfish_api::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
use pilotfish_api::pb::envoy::extensions::filters::http::fault::v3::{
    fault_abort::ErrorType, HttpFault,
};
use pilotfish_api::pb::envoy::r#type::v3::{
    fractional_percent::DenominatorType, FractionalPercent,
};
use pilotfish_api::pb::google::protobuf::Any;
use pilotfish_decide::matcher::CompiledHeaderMatcher;
use pilotfish_decide::router::Request;
use std::time::Duration;

/// What the fault filter does to one request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Injected {
    pub delay: Option<Duration>,
    /// (HTTP status, body)
    pub abort: Option<(u16, String)>,
    /// gRPC status for gRPC requests' aborts.
    pub grpc_status: Option<u32>,
}

fn share(p: Option<&FractionalPercent>) -> (u64, u64) {
    let Some(p) = p else { return (0, 100) };
    let d = match DenominatorType::try_from(p.denominator).unwrap_or(DenominatorType::Hundred) {
        DenominatorType::Hundred => 100,
        DenominatorType::TenThousand => 10_000,
        DenominatorType::Million => 1_000_000,
    };
    (p.numerator as u64, d)
}

fn header_u64(req: &Request, name: &str) -> Option<u64> {
    req.header(name).and_then(|v| v.trim().parse().ok())
}

/// A fault configuration with its header matchers compiled once; None when one does not
/// compile (the fault then never applies).
pub struct Fault {
    config: HttpFault,
    headers: Option<Vec<CompiledHeaderMatcher>>,
}

impl Fault {
    pub fn new(config: HttpFault) -> Fault {
        let headers = config
            .headers
            .iter()
            .map(CompiledHeaderMatcher::new)
            .collect::<Result<Vec<_>, _>>()
            .ok();
        Fault { config, headers }
    }

    /// A route's or virtual host's `typed_per_filter_config` for the filter named `name`.
    pub fn per_filter(name: &str, m: &std::collections::HashMap<String, Any>) -> Option<Fault> {
        pilotfish_config::model::unpack(m.get(name)?).map(Fault::new)
    }
}

/// What to inject into this request, drawing on `random` for the percentages.
pub fn decide(f: &Fault, req: &Request, cluster: Option<&str>, random: u64) -> Injected {
    let mut out = Injected::default();
    let c = &f.config;
    if !c.upstream_cluster.is_empty() && cluster != Some(c.upstream_cluster.as_str()) {
        return out;
    }
    let Some(headers) = &f.headers else {
        return out;
    };
    if !headers
        .iter()
        .all(|m| m.matches(req.header(&m.name).as_deref()))
    {
        return out;
    }
    // Delay and abort each draw their own share.
    let chosen = |p: (u64, u64), salt: u64| p.1 > 0 && crate::random(random ^ salt) % p.1 < p.0;
    if let Some(d) = &c.delay {
        let (duration, mut pct) = match &d.fault_delay_secifier {
            Some(FaultDelaySecifier::FixedDelay(t)) => (
                Some(crate::duration(Some(t), Duration::ZERO)),
                share(d.percentage.as_ref()),
            ),
            Some(FaultDelaySecifier::HeaderDelay(_)) => (
                header_u64(req, "x-envoy-fault-delay-request").map(Duration::from_millis),
                share(d.percentage.as_ref()),
            ),
            None => (None, (0, 100)),
        };
        if let Some(n) = header_u64(req, "x-envoy-fault-delay-request-percentage") {
            if matches!(
                d.fault_delay_secifier,
                Some(FaultDelaySecifier::HeaderDelay(_))
            ) {
                pct.0 = pct.0.min(n);
            }
        }
        if duration.is_some() && chosen(pct, 0xde1a) {
            out.delay = duration;
        }
    }
    if let Some(a) = &c.abort {
        let mut pct = share(a.percentage.as_ref());
        let status = match &a.error_type {
            Some(ErrorType::HttpStatus(s)) => Some(*s as u16),
            Some(ErrorType::GrpcStatus(g)) => {
                out.grpc_status = Some(*g);
                Some(200)
            }
            Some(ErrorType::HeaderAbort(_)) => {
                if let Some(n) = header_u64(req, "x-envoy-fault-abort-request-percentage") {
                    pct.0 = pct.0.min(n);
                }
                header_u64(req, "x-envoy-fault-abort-request")
                    .filter(|s| (200..600).contains(s))
                    .map(|s| s as u16)
            }
            None => None,
        };
        if let Some(s) = status.filter(|_| chosen(pct, 0xab07)) {
            let body = if a.response_body.is_empty() {
                "fault filter abort".to_string()
            } else {
                a.response_body.clone()
            };
            out.abort = Some((s, body));
        } else {
            out.grpc_status = None;
        }
    }
    out
}
