//! The `envoy.filters.http.cors` HTTP filter: a request with an `Origin` the route's (else the
//! virtual host's) CORS policy allows is a CORS request; its preflight (`OPTIONS` with
//! `access-control-request-method`) is answered here, and its response gets the
//! `access-control-allow-origin` family of headers. Policies come from `typed_per_filter_config`
//! or the older `cors` fields of the route and virtual host (the route's first; see
//! `super::PerRoute`).

use pilotfish_api::pb::envoy::config::route::v3::{
    route, CorsPolicy as RoutePolicy, Route, VirtualHost,
};
use pilotfish_api::pb::envoy::extensions::filters::http::cors::v3::CorsPolicy as FilterPolicy;
use pilotfish_api::pb::envoy::r#type::matcher::v3::StringMatcher;
use pilotfish_decide::matcher::CompiledStringMatcher;

pub struct Policy {
    /// Compiled once; a matcher that does not compile matches nothing.
    origins: Vec<CompiledStringMatcher>,
    allow_methods: String,
    allow_headers: String,
    expose_headers: String,
    max_age: String,
    allow_credentials: bool,
    enabled: bool,
}

fn compile(m: &[StringMatcher]) -> Vec<CompiledStringMatcher> {
    m.iter()
        .filter_map(|m| CompiledStringMatcher::new(m).ok())
        .collect()
}

fn enabled(
    p: Option<&pilotfish_api::pb::envoy::config::core::v3::RuntimeFractionalPercent>,
) -> bool {
    p.and_then(|r| r.default_value.as_ref())
        .is_none_or(|f| f.numerator > 0)
}

impl From<&FilterPolicy> for Policy {
    fn from(p: &FilterPolicy) -> Policy {
        Policy {
            origins: compile(&p.allow_origin_string_match),
            allow_methods: p.allow_methods.clone(),
            allow_headers: p.allow_headers.clone(),
            expose_headers: p.expose_headers.clone(),
            max_age: p.max_age.clone(),
            allow_credentials: p.allow_credentials.as_ref().is_some_and(|v| v.value),
            enabled: enabled(p.filter_enabled.as_ref()),
        }
    }
}

impl From<&RoutePolicy> for Policy {
    fn from(p: &RoutePolicy) -> Policy {
        use pilotfish_api::pb::envoy::config::route::v3::cors_policy::EnabledSpecifier;
        Policy {
            origins: compile(&p.allow_origin_string_match),
            allow_methods: p.allow_methods.clone(),
            allow_headers: p.allow_headers.clone(),
            expose_headers: p.expose_headers.clone(),
            max_age: p.max_age.clone(),
            allow_credentials: p.allow_credentials.as_ref().is_some_and(|v| v.value),
            enabled: match &p.enabled_specifier {
                Some(EnabledSpecifier::FilterEnabled(f)) => enabled(Some(f)),
                None => true,
            },
        }
    }
}

impl Policy {
    /// A route's policy: its `typed_per_filter_config` for the filter named `name`, else its
    /// older `cors` field.
    pub fn of_route(name: &str, r: &Route) -> Option<Policy> {
        #[allow(deprecated)]
        let legacy = match &r.action {
            Some(route::Action::Route(a)) => a.cors.as_ref().map(Policy::from),
            _ => None,
        };
        typed(name, &r.typed_per_filter_config).or(legacy)
    }

    /// A virtual host's policy, likewise.
    pub fn of_vhost(name: &str, v: &VirtualHost) -> Option<Policy> {
        #[allow(deprecated)]
        let legacy = v.cors.as_ref().map(Policy::from);
        typed(name, &v.typed_per_filter_config).or(legacy)
    }
}

fn typed(
    name: &str,
    m: &std::collections::HashMap<String, pilotfish_api::pb::google::protobuf::Any>,
) -> Option<Policy> {
    m.get(name)
        .and_then(pilotfish_config::model::unpack::<FilterPolicy>)
        .map(|p| Policy::from(&p))
}

/// What the filter does with a request.
pub enum Cors {
    /// Not a CORS request (no Origin, no policy, or an origin it does not allow).
    No,
    /// A preflight, answered here with these headers.
    Preflight(Vec<(&'static str, String)>),
    /// A CORS request: these headers go on its response.
    Simple(Vec<(&'static str, String)>),
}

pub fn decide(p: &Policy, method: &str, origin: Option<&str>, preflight_method: bool) -> Cors {
    let Some(origin) = origin.filter(|o| !o.is_empty()) else {
        return Cors::No;
    };
    let allowed = p.enabled && p.origins.iter().any(|m| m.matches(origin));
    if !allowed {
        return Cors::No;
    }
    let mut h = vec![("access-control-allow-origin", origin.to_string())];
    if p.allow_credentials {
        h.push(("access-control-allow-credentials", "true".into()));
    }
    if method == "OPTIONS" && preflight_method {
        for (k, v) in [
            ("access-control-allow-methods", &p.allow_methods),
            ("access-control-allow-headers", &p.allow_headers),
            ("access-control-expose-headers", &p.expose_headers),
            ("access-control-max-age", &p.max_age),
        ] {
            if !v.is_empty() {
                h.push((k, v.clone()));
            }
        }
        return Cors::Preflight(h);
    }
    if !p.expose_headers.is_empty() {
        h.push(("access-control-expose-headers", p.expose_headers.clone()));
    }
    Cors::Simple(h)
}
