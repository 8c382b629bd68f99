//! Routing a request through a route configuration, as Envoy's router does: virtual host by
//! `:authority`, then the first route whose match accepts the request, then what its action makes
//! of it (a cluster, rewritten path and host, a redirect, a direct response).

use crate::matcher::{query_param, CompiledHeaderMatcher, CompiledQueryMatcher, FullRegex};
use crate::{Reason, Verdict};
use pilotfish_api::pb::envoy::config::route::v3::{
    redirect_action, route, route_action, route_match, virtual_host::TlsRequirementType,
    weighted_cluster, RedirectAction, Route, RouteAction, RouteConfiguration,
};
use pilotfish_api::pb::envoy::r#type::matcher::v3::RegexMatchAndSubstitute;
use std::collections::HashMap;

/// A request as routing sees it. Header names are lower case; pseudo-headers (`:authority`,
/// `:path`, `:method`, `:scheme`) are taken from the fields.
#[derive(Debug, Clone)]
pub struct Request {
    pub authority: String,
    pub path: String,
    pub method: String,
    /// `http` or `https` (what `x-forwarded-proto` says to Envoy's router).
    pub scheme: String,
    pub headers: Vec<(String, String)>,
    /// The random value that picks a weighted cluster and decides runtime fractions.
    pub random_value: u64,
    /// Sent from inside the mesh (`x-envoy-internal: true`): matters for `require_tls: EXTERNAL_ONLY`.
    pub internal: bool,
    pub runtime: Runtime,
}

/// How `runtime_fraction` matches are decided: from their default fraction and the request's random
/// value (what Envoy does when the runtime key is not set), or, as Envoy's router_check_tool does,
/// enabled exactly for the named keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runtime {
    Defaults,
    EnabledKeys(Vec<String>),
}

impl Request {
    pub fn new(authority: &str, path: &str) -> Request {
        Request {
            authority: authority.into(),
            path: path.into(),
            method: "GET".into(),
            scheme: "http".into(),
            headers: vec![],
            random_value: 0,
            internal: false,
            runtime: Runtime::Defaults,
        }
    }

    /// Every value of a header joined with ',', as Envoy presents multiple values to matchers.
    pub fn header(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        match name.as_str() {
            ":authority" | "host" => return Some(self.authority.clone()),
            ":path" => return Some(self.path.clone()),
            ":method" => return Some(self.method.clone()),
            ":scheme" => return Some(self.scheme.clone()),
            _ => {}
        }
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(&name))
            .map(|(_, v)| v.as_str())
            .collect();
        if values.is_empty() {
            None
        } else {
            Some(values.join(","))
        }
    }

    fn first_header(&self, name: &str) -> Option<String> {
        match name.to_ascii_lowercase().as_str() {
            ":authority" | "host" | ":path" | ":method" | ":scheme" => self.header(name),
            n => self
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone()),
        }
    }

    /// The path without query string and fragment: what path matchers compare.
    pub fn path_only(&self) -> &str {
        let end = self.path.find(['?', '#']).unwrap_or(self.path.len());
        &self.path[..end]
    }

    fn query(&self) -> &str {
        self.path.find('?').map_or("", |i| &self.path[i..])
    }
}

#[derive(Debug, Clone)]
enum PathMatch {
    Prefix(String),
    Path(String),
    Regex(FullRegex, String),
    SeparatedPrefix(String),
    Connect,
    /// A path specifier pilotfish cannot evaluate; the route never matches and says why.
    Unsupported(String),
}

#[derive(Debug, Clone)]
struct CompiledRoute {
    name: String,
    path: PathMatch,
    case_sensitive: bool,
    headers: Vec<CompiledHeaderMatcher>,
    query: Vec<CompiledQueryMatcher>,
    grpc: bool,
    runtime: Option<(String, u64, u64)>,
    unsupported: Vec<String>,
    route: Route,
}

#[derive(Debug, Clone)]
struct CompiledVirtualHost {
    name: String,
    domains: Vec<String>,
    routes: Vec<CompiledRoute>,
    require_tls: TlsRequirementType,
    virtual_clusters: Vec<(String, Vec<CompiledHeaderMatcher>)>,
}

/// A route configuration compiled for matching: domains indexed, regexes compiled.
#[derive(Debug, Clone)]
pub struct RouteTable {
    pub name: String,
    /// The configuration it was compiled from (header mutations, names, match text).
    pub config: RouteConfiguration,
    vhosts: Vec<CompiledVirtualHost>,
    exact: HashMap<String, usize>,
    /// `*.example.com` domains as (suffix, vhost), longest suffix first.
    suffixes: Vec<(String, usize)>,
    /// `example.*` domains as (prefix, vhost), longest prefix first.
    prefixes: Vec<(String, usize)>,
    default: Option<usize>,
    ignore_port: bool,
}

/// What a route's action makes of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Forwarded to a cluster (`cluster` empty when `cluster_header` named an absent header).
    Forward {
        cluster: String,
        chosen_by: String,
        path: String,
        host: String,
    },
    Redirect {
        location: String,
        code: u32,
    },
    DirectResponse {
        status: u32,
        body: String,
    },
    /// No virtual host or no route matched: Envoy answers 404.
    NoRoute,
}

#[derive(Debug, Clone)]
pub struct RouteDecision {
    pub virtual_host: Option<String>,
    pub virtual_host_index: Option<usize>,
    /// For weighted clusters, which of them was picked.
    pub weighted_index: Option<usize>,
    pub route_index: Option<usize>,
    pub route_name: Option<String>,
    pub action: Action,
    /// The virtual cluster the request counts under: "other" when the virtual host has virtual
    /// clusters and none matched, None when it has none.
    pub virtual_cluster: Option<String>,
    pub reasons: Vec<Reason>,
}

impl RouteTable {
    pub fn new(rc: &RouteConfiguration) -> Result<RouteTable, String> {
        let mut t = RouteTable {
            name: rc.name.clone(),
            config: rc.clone(),
            vhosts: vec![],
            exact: HashMap::new(),
            suffixes: vec![],
            prefixes: vec![],
            default: None,
            ignore_port: rc.ignore_port_in_host_matching,
        };
        for (vi, vh) in rc.virtual_hosts.iter().enumerate() {
            for d in &vh.domains {
                let d = d.to_ascii_lowercase();
                if d == "*" {
                    t.default.get_or_insert(vi);
                } else if let Some(s) = d.strip_prefix('*') {
                    t.suffixes.push((s.to_string(), vi));
                } else if let Some(p) = d.strip_suffix('*') {
                    t.prefixes.push((p.to_string(), vi));
                } else {
                    t.exact.entry(d).or_insert(vi);
                }
            }
            let routes = vh
                .routes
                .iter()
                .enumerate()
                .map(|(ri, r)| {
                    compile_route(r).map_err(|e| format!("virtual_hosts[{vi}].routes[{ri}]: {e}"))
                })
                .collect::<Result<_, _>>()?;
            let virtual_clusters = vh
                .virtual_clusters
                .iter()
                .map(|vc| {
                    Ok((
                        vc.name.clone(),
                        vc.headers
                            .iter()
                            .map(CompiledHeaderMatcher::new)
                            .collect::<Result<Vec<_>, String>>()?,
                    ))
                })
                .collect::<Result<_, String>>()?;
            t.vhosts.push(CompiledVirtualHost {
                name: vh.name.clone(),
                domains: vh.domains.clone(),
                routes,
                require_tls: TlsRequirementType::try_from(vh.require_tls)
                    .unwrap_or(TlsRequirementType::None),
                virtual_clusters,
            });
        }
        // Longest first; among equals, the first configured wins (stable sort).
        t.suffixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        t.prefixes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Ok(t)
    }

    pub fn virtual_host_names(&self) -> impl Iterator<Item = &str> {
        self.vhosts.iter().map(|v| v.name.as_str())
    }

    /// Envoy's virtual host selection: exact domain, then `*.suffix` (longest first, at least one
    /// character for the `*`), then `prefix.*` (longest first), then `*`.
    pub fn select_virtual_host(&self, authority: &str, reasons: &mut Vec<Reason>) -> Option<usize> {
        let mut host = authority.to_ascii_lowercase();
        if self.ignore_port {
            host = strip_port(&host).to_string();
        }
        if let Some(&i) = self.exact.get(&host) {
            reasons.push(Reason::new(
                format!("virtual host '{}'", self.vhosts[i].name),
                Verdict::Chosen,
                format!("domain '{host}' matches exactly"),
            ));
            return Some(i);
        }
        for (suffix, i) in &self.suffixes {
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                reasons.push(Reason::new(
                    format!("virtual host '{}'", self.vhosts[*i].name),
                    Verdict::Chosen,
                    format!("'{host}' matches wildcard '*{suffix}' (longest suffix)"),
                ));
                return Some(*i);
            }
        }
        for (prefix, i) in &self.prefixes {
            if host.len() > prefix.len() && host.starts_with(prefix.as_str()) {
                reasons.push(Reason::new(
                    format!("virtual host '{}'", self.vhosts[*i].name),
                    Verdict::Chosen,
                    format!("'{host}' matches wildcard '{prefix}*' (longest prefix)"),
                ));
                return Some(*i);
            }
        }
        if let Some(i) = self.default {
            reasons.push(Reason::new(
                format!("virtual host '{}'", self.vhosts[i].name),
                Verdict::Chosen,
                format!("no exact or wildcard domain matches '{host}'; '*' catches it"),
            ));
            return Some(i);
        }
        reasons.push(Reason::new(
            format!("route configuration '{}'", self.name),
            Verdict::Rejected,
            format!("no virtual host has a domain matching '{host}'"),
        ));
        None
    }

    pub fn route(&self, req: &Request) -> RouteDecision {
        let mut reasons = vec![];
        let Some(vi) = self.select_virtual_host(&req.authority, &mut reasons) else {
            return RouteDecision {
                virtual_host: None,
                virtual_host_index: None,
                weighted_index: None,
                route_index: None,
                route_name: None,
                action: Action::NoRoute,
                virtual_cluster: None,
                reasons,
            };
        };
        let vh = &self.vhosts[vi];
        let virtual_cluster = if vh.virtual_clusters.is_empty() {
            None
        } else {
            Some(
                vh.virtual_clusters
                    .iter()
                    .find(|(_, hs)| hs.iter().all(|h| h.matches(req.header(&h.name).as_deref())))
                    .map_or("other".to_string(), |(n, _)| n.clone()),
            )
        };
        let decision = |route_index, route_name, action: Action, reasons| RouteDecision {
            virtual_host: Some(vh.name.clone()),
            virtual_host_index: Some(vi),
            weighted_index: match &action {
                Action::Forward { chosen_by, .. } => chosen_by
                    .strip_prefix("weighted_clusters[")
                    .and_then(|r| r.split(']').next())
                    .and_then(|n| n.parse().ok()),
                _ => None,
            },
            route_index,
            route_name,
            action,
            virtual_cluster: virtual_cluster.clone(),
            reasons,
        };
        let needs_tls = match vh.require_tls {
            TlsRequirementType::All => true,
            TlsRequirementType::ExternalOnly => !req.internal,
            TlsRequirementType::None => false,
        };
        if needs_tls && req.scheme != "https" {
            reasons.push(Reason::new(
                format!("virtual host '{}'", vh.name),
                Verdict::Note,
                "require_tls: the request is not TLS, so Envoy redirects it to https",
            ));
            let location = format!("https://{}{}", req.authority, req.path);
            return decision(
                None,
                None,
                Action::Redirect {
                    location,
                    code: 301,
                },
                reasons,
            );
        }
        for (ri, r) in vh.routes.iter().enumerate() {
            let subject = match r.name.as_str() {
                "" => format!("routes[{ri}]"),
                n => format!("routes[{ri}] '{n}'"),
            };
            match route_matches(r, req) {
                Ok(why) => {
                    reasons.push(Reason::new(subject, Verdict::Chosen, why));
                    let action = action(r, req, &mut reasons);
                    let name = (!r.name.is_empty()).then(|| r.name.clone());
                    return decision(Some(ri), name, action, reasons);
                }
                Err(why) => reasons.push(Reason::new(subject, Verdict::Rejected, why)),
            }
        }
        reasons.push(Reason::new(
            format!("virtual host '{}'", vh.name),
            Verdict::Rejected,
            "no route matches: Envoy answers 404",
        ));
        decision(None, None, Action::NoRoute, reasons)
    }

    /// The number of routes in each virtual host, for coverage.
    pub fn route_counts(&self) -> Vec<(String, Vec<String>)> {
        self.vhosts
            .iter()
            .map(|v| {
                (
                    v.name.clone(),
                    v.routes.iter().map(|r| r.name.clone()).collect(),
                )
            })
            .collect()
    }

    pub fn domains(&self, vhost: usize) -> &[String] {
        &self.vhosts[vhost].domains
    }
}

fn strip_port(host: &str) -> &str {
    // `[v6]:port`, `host:port`; a bare IPv6 address has more than one ':' and no brackets.
    if let Some(rest) = host.strip_prefix('[') {
        return rest
            .split(']')
            .next()
            .map_or(host, |h| &host[..h.len() + 2]);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

fn compile_route(r: &Route) -> Result<CompiledRoute, String> {
    let m = r.r#match.clone().unwrap_or_default();
    let mut unsupported = vec![];
    let path = match &m.path_specifier {
        Some(route_match::PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(route_match::PathSpecifier::Path(p)) => PathMatch::Path(p.clone()),
        Some(route_match::PathSpecifier::SafeRegex(re)) => {
            PathMatch::Regex(FullRegex::from_matcher(re)?, re.regex.clone())
        }
        Some(route_match::PathSpecifier::PathSeparatedPrefix(p)) => {
            PathMatch::SeparatedPrefix(p.clone())
        }
        Some(route_match::PathSpecifier::ConnectMatcher(_)) => PathMatch::Connect,
        Some(route_match::PathSpecifier::PathMatchPolicy(p)) => {
            PathMatch::Unsupported(format!("path_match_policy '{}'", p.name))
        }
        None => PathMatch::Unsupported("no path specifier".into()),
    };
    if !m.cookies.is_empty() {
        unsupported.push("cookies".to_string());
    }
    if m.tls_context.is_some() {
        unsupported.push("tls_context".into());
    }
    if !m.dynamic_metadata.is_empty() {
        unsupported.push("dynamic_metadata".into());
    }
    if !m.filter_state.is_empty() {
        unsupported.push("filter_state".into());
    }
    let runtime = m.runtime_fraction.as_ref().map(|rf| {
        let (num, den) = rf.default_value.as_ref().map_or((0, 100), |f| {
            let den = match f.denominator {
                1 => 10_000,
                2 => 1_000_000,
                _ => 100,
            };
            (f.numerator as u64, den)
        });
        (rf.runtime_key.clone(), num, den)
    });
    Ok(CompiledRoute {
        name: r.name.clone(),
        path,
        case_sensitive: m.case_sensitive.as_ref().is_none_or(|v| v.value),
        headers: m
            .headers
            .iter()
            .map(CompiledHeaderMatcher::new)
            .collect::<Result<_, _>>()?,
        query: m
            .query_parameters
            .iter()
            .map(CompiledQueryMatcher::new)
            .collect::<Result<_, _>>()?,
        grpc: m.grpc.is_some(),
        runtime,
        unsupported,
        route: r.clone(),
    })
}

/// Ok(why it matched) or Err(the first criterion that failed).
fn route_matches(r: &CompiledRoute, req: &Request) -> Result<String, String> {
    if let Some(u) = r.unsupported.first() {
        return Err(format!(
            "matches on {u}, which pilotfish cannot evaluate yet"
        ));
    }
    let path = req.path_only();
    let eq = |a: &str, b: &str| {
        if r.case_sensitive {
            a == b
        } else {
            a.eq_ignore_ascii_case(b)
        }
    };
    let starts = |a: &str, p: &str| {
        a.len() >= p.len() && a.is_char_boundary(p.len()) && eq(&a[..p.len()], p)
    };
    let mut why = match &r.path {
        PathMatch::Prefix(p) => {
            if !starts(path, p) {
                return Err(format!("path '{path}' does not start with '{p}'"));
            }
            format!("prefix '{p}'")
        }
        PathMatch::Path(p) => {
            if !eq(path, p) {
                return Err(format!("path '{path}' != '{p}'"));
            }
            format!("path '{p}'")
        }
        PathMatch::SeparatedPrefix(p) => {
            let ok = eq(path, p) || (starts(path, p) && path[p.len()..].starts_with('/'));
            if !ok {
                return Err(format!("path '{path}' is not '{p}' or below '{p}/'"));
            }
            format!("path_separated_prefix '{p}'")
        }
        PathMatch::Regex(re, src) => {
            if !re.is_match(path) {
                return Err(format!("path '{path}' does not match /{src}/"));
            }
            format!("safe_regex /{src}/")
        }
        PathMatch::Connect => {
            if req.method != "CONNECT" {
                return Err(format!("method {} is not CONNECT", req.method));
            }
            "CONNECT".into()
        }
        PathMatch::Unsupported(what) => {
            return Err(format!("{what}: pilotfish cannot evaluate it yet"))
        }
    };
    if !r.case_sensitive {
        why.push_str(" (case-insensitive)");
    }
    for h in &r.headers {
        if !h.matches(req.header(&h.name).as_deref()) {
            return Err(format!(
                "{} fails (value {:?})",
                h.describe(),
                req.header(&h.name)
            ));
        }
        why.push_str(&format!(", {}", h.describe()));
    }
    for q in &r.query {
        let v = query_param(&req.path, &q.name);
        if !q.matches(v.as_deref()) {
            return Err(format!("{} fails (value {v:?})", q.describe()));
        }
        why.push_str(&format!(", {}", q.describe()));
    }
    if r.grpc {
        let ct = req.header("content-type").unwrap_or_default();
        if !ct.starts_with("application/grpc") {
            return Err(format!("grpc: content-type '{ct}' is not application/grpc"));
        }
        why.push_str(", grpc");
    }
    if let Some((key, num, den)) = &r.runtime {
        let on = match &req.runtime {
            Runtime::Defaults => req.random_value % den < *num,
            Runtime::EnabledKeys(keys) => keys.iter().any(|k| k == key),
        };
        if !on {
            return Err(match &req.runtime {
                Runtime::Defaults => format!(
                    "runtime_fraction '{key}': random value {} % {den} >= {num}",
                    req.random_value
                ),
                Runtime::EnabledKeys(_) => format!("runtime_fraction '{key}' is not enabled"),
            });
        }
        why.push_str(&format!(", runtime_fraction '{key}' on"));
    }
    Ok(why)
}

fn action(r: &CompiledRoute, req: &Request, reasons: &mut Vec<Reason>) -> Action {
    match &r.route.action {
        Some(route::Action::Route(ra)) => forward(r, ra, req, reasons),
        Some(route::Action::Redirect(rd)) => redirect(r, rd, req),
        Some(route::Action::DirectResponse(d)) => {
            use pilotfish_api::pb::envoy::config::core::v3::data_source::Specifier;
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                Some(Specifier::InlineString(s)) => s.clone(),
                Some(Specifier::InlineBytes(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(Specifier::Filename(f)) => std::fs::read_to_string(f).unwrap_or_default(),
                _ => String::new(),
            };
            Action::DirectResponse {
                status: d.status,
                body,
            }
        }
        _ => Action::NoRoute,
    }
}

fn forward(
    r: &CompiledRoute,
    ra: &RouteAction,
    req: &Request,
    reasons: &mut Vec<Reason>,
) -> Action {
    let (cluster, chosen_by) = match &ra.cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => (c.clone(), "cluster".to_string()),
        Some(route_action::ClusterSpecifier::ClusterHeader(h)) => match req.first_header(h) {
            Some(v) => (v, format!("cluster_header '{h}'")),
            None => (
                String::new(),
                format!("cluster_header '{h}' is absent: no cluster (Envoy answers 503, NC)"),
            ),
        },
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
            let total: u64 = w
                .clusters
                .iter()
                .map(|c| c.weight.as_ref().map_or(0, |v| v.value as u64))
                .sum();
            #[allow(deprecated)]
            let total = w
                .total_weight
                .as_ref()
                .map_or(total, |t| t.value as u64)
                .max(1);
            // A header may carry the random value, so proxies in a chain pick alike; absent or
            // not a number, Envoy falls back to its own random value.
            let (random, from) = match &w.random_value_specifier {
                Some(weighted_cluster::RandomValueSpecifier::HeaderName(h)) => {
                    match req
                        .first_header(h)
                        .and_then(|v| v.trim().parse::<u64>().ok())
                    {
                        Some(v) => (v, format!("header '{h}'")),
                        None => (req.random_value, "random value".to_string()),
                    }
                }
                _ => (req.random_value, "random value".to_string()),
            };
            let selected = random % total;
            let mut begin = 0u64;
            let mut chosen = (String::new(), String::new());
            for (i, c) in w.clusters.iter().enumerate() {
                let end = begin + c.weight.as_ref().map_or(0, |v| v.value as u64);
                if selected >= begin && selected < end {
                    chosen = (c.name.clone(), format!("weighted_clusters[{i}]: {from} {random} % {total} = {selected} falls in [{begin}, {end})"));
                    break;
                }
                begin = end;
            }
            chosen
        }
        Some(other) => (String::new(), format!("{other:?} is not implemented")),
        None => (String::new(), "no cluster".into()),
    };
    reasons.push(Reason::new(
        format!("cluster '{cluster}'"),
        Verdict::Chosen,
        chosen_by.clone(),
    ));
    let path = rewritten_path(
        r,
        ra.prefix_rewrite.as_str(),
        ra.regex_rewrite.as_ref(),
        req,
    );
    let host = rewritten_host(ra, req);
    Action::Forward {
        cluster,
        chosen_by,
        path,
        host,
    }
}

/// The path after `prefix_rewrite` or `regex_rewrite`; the query string is kept.
fn rewritten_path(
    r: &CompiledRoute,
    prefix_rewrite: &str,
    regex_rewrite: Option<&RegexMatchAndSubstitute>,
    req: &Request,
) -> String {
    if !prefix_rewrite.is_empty() {
        // What the match consumed: the prefix for prefix matches, the whole path otherwise.
        let matched = match &r.path {
            PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) => p.len(),
            _ => req.path_only().len(),
        };
        return format!(
            "{prefix_rewrite}{}",
            &req.path[matched.min(req.path.len())..]
        );
    }
    if let Some(rr) = regex_rewrite {
        if let Some(pattern) = &rr.pattern {
            if let Ok(re) = regex::Regex::new(&pattern.regex) {
                let sub = re2_substitution(&rr.substitution);
                return format!(
                    "{}{}",
                    re.replace_all(req.path_only(), sub.as_str()),
                    req.query()
                );
            }
        }
    }
    req.path.clone()
}

/// RE2 writes group references as `\1`; the regex crate as `${1}`.
fn re2_substitution(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str(&format!("${{{d}}}"));
                chars.next();
            }
            ('\\', Some('\\')) => {
                out.push('\\');
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

fn rewritten_host(ra: &RouteAction, req: &Request) -> String {
    use route_action::HostRewriteSpecifier as H;
    match &ra.host_rewrite_specifier {
        Some(H::HostRewriteLiteral(h)) => h.clone(),
        Some(H::HostRewrite(h)) if !h.contains('%') && !h.is_empty() => h.clone(),
        Some(H::HostRewriteHeader(name)) => req
            .first_header(name)
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| req.authority.clone()),
        Some(H::HostRewritePathRegex(rr)) => rr
            .pattern
            .as_ref()
            .and_then(|p| regex::Regex::new(&p.regex).ok())
            .map_or(req.authority.clone(), |re| {
                re.replace_all(req.path_only(), re2_substitution(&rr.substitution).as_str())
                    .into_owned()
            }),
        _ => req.authority.clone(),
    }
}

fn redirect(r: &CompiledRoute, rd: &RedirectAction, req: &Request) -> Action {
    use redirect_action::{PathRewriteSpecifier as P, SchemeRewriteSpecifier as S};
    let scheme = match &rd.scheme_rewrite_specifier {
        Some(S::HttpsRedirect(true)) => "https".to_string(),
        Some(S::SchemeRedirect(s)) if !s.is_empty() => s.to_ascii_lowercase(),
        _ => req.scheme.clone(),
    };
    let mut host = if rd.host_redirect.is_empty() {
        req.authority.clone()
    } else {
        rd.host_redirect.clone()
    };
    if rd.port_redirect != 0 {
        host = format!("{}:{}", strip_port(&host), rd.port_redirect);
    } else if scheme != req.scheme {
        // Changing scheme drops the old scheme's default port.
        let default = if req.scheme == "https" { "443" } else { "80" };
        if host.rsplit_once(':').is_some_and(|(_, p)| p == default) {
            host = strip_port(&host).to_string();
        }
    }
    let mut path = match &rd.path_rewrite_specifier {
        Some(P::PathRedirect(p)) => {
            if p.contains('?') {
                p.clone()
            } else {
                format!("{p}{}", req.query())
            }
        }
        Some(P::PrefixRewrite(p)) => rewritten_path(r, p, None, req),
        Some(P::RegexRewrite(rr)) => rewritten_path(r, "", Some(rr), req),
        // A formatter-based rewrite: literal text only, as far as pilotfish goes yet.
        Some(P::PathRewrite(p)) if !p.contains('%') => p.clone(),
        Some(P::PathRewrite(_)) | None => req.path.clone(),
    };
    // strip_query drops the request's query; a query written into path_redirect stays.
    let own_query =
        matches!(&rd.path_rewrite_specifier, Some(P::PathRedirect(p)) if p.contains('?'));
    if rd.strip_query && !own_query {
        if let Some(i) = path.find('?') {
            path.truncate(i);
        }
    }
    let code = match redirect_action::RedirectResponseCode::try_from(rd.response_code)
        .unwrap_or(redirect_action::RedirectResponseCode::MovedPermanently)
    {
        redirect_action::RedirectResponseCode::MovedPermanently => 301,
        redirect_action::RedirectResponseCode::Found => 302,
        redirect_action::RedirectResponseCode::SeeOther => 303,
        redirect_action::RedirectResponseCode::TemporaryRedirect => 307,
        redirect_action::RedirectResponseCode::PermanentRedirect => 308,
    };
    Action::Redirect {
        location: format!("{scheme}://{host}{path}"),
        code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(yaml: &str) -> RouteTable {
        let rc: RouteConfiguration =
            pilotfish_config::load_message("rc.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
        RouteTable::new(&rc).unwrap()
    }

    fn vhost(t: &RouteTable, authority: &str) -> Option<String> {
        t.select_virtual_host(authority, &mut vec![])
            .map(|i| t.vhosts[i].name.clone())
    }

    const HOSTS: &str = r#"
name: hosts
virtual_hosts:
- { name: exact, domains: [www.example.com, "api.example.com:8080"], routes: [] }
- { name: suffix-short, domains: ["*.example.com"], routes: [] }
- { name: suffix-long, domains: ["*.api.example.com"], routes: [] }
- { name: suffix-dash, domains: ["*-bar.foo.com"], routes: [] }
- { name: prefix, domains: ["example.*"], routes: [] }
- { name: prefix-long, domains: ["example.co.*"], routes: [] }
- { name: default, domains: ["*"], routes: [] }
"#;

    #[test]
    fn virtual_hosts_are_chosen_exact_then_suffix_then_prefix_then_default() {
        let t = table(HOSTS);
        assert_eq!(vhost(&t, "www.example.com").as_deref(), Some("exact"));
        // Case does not matter.
        assert_eq!(vhost(&t, "WWW.Example.COM").as_deref(), Some("exact"));
        // The port is part of the host (unless the HCM strips it or the route configuration
        // ignores it): "www.example.com:80" ends in ":80", not ".example.com".
        assert_eq!(vhost(&t, "www.example.com:80").as_deref(), Some("default"));
        assert_eq!(vhost(&t, "api.example.com:8080").as_deref(), Some("exact"));
        assert_eq!(
            vhost(&t, "api.example.com").as_deref(),
            Some("suffix-short")
        );
        // The longest suffix wins.
        assert_eq!(
            vhost(&t, "v1.api.example.com").as_deref(),
            Some("suffix-long")
        );
        assert_eq!(vhost(&t, "a.example.com").as_deref(), Some("suffix-short"));
        // `*` stands for at least one character.
        assert_eq!(vhost(&t, ".example.com").as_deref(), Some("default"));
        assert_eq!(vhost(&t, "example.com").as_deref(), Some("prefix"));
        assert_eq!(vhost(&t, "baz-bar.foo.com").as_deref(), Some("suffix-dash"));
        assert_eq!(vhost(&t, "-bar.foo.com").as_deref(), Some("default"));
        // Prefix wildcards, longest first, after every suffix wildcard.
        assert_eq!(vhost(&t, "example.org").as_deref(), Some("prefix"));
        assert_eq!(vhost(&t, "example.co.uk").as_deref(), Some("prefix-long"));
        assert_eq!(vhost(&t, "example.").as_deref(), Some("default"));
        assert_eq!(vhost(&t, "other.net").as_deref(), Some("default"));
        let no_default = table("virtual_hosts: [{ name: only, domains: [a.com], routes: [] }]");
        assert_eq!(vhost(&no_default, "b.com"), None);
        let d = no_default.route(&Request::new("b.com", "/"));
        assert_eq!(d.action, Action::NoRoute);
    }

    #[test]
    fn ignore_port_in_host_matching_strips_the_port() {
        let t = table("ignore_port_in_host_matching: true\nvirtual_hosts: [{ name: a, domains: [a.com], routes: [] }, { name: d, domains: ['*'], routes: [] }]");
        assert_eq!(vhost(&t, "a.com:9999").as_deref(), Some("a"));
        assert_eq!(vhost(&t, "[::1]:80").as_deref(), Some("d"));
    }

    fn routed(t: &RouteTable, req: &Request) -> (Option<usize>, Action) {
        let d = t.route(req);
        (d.route_index, d.action)
    }

    fn cluster_of(t: &RouteTable, req: &Request) -> String {
        match t.route(req).action {
            Action::Forward { cluster, .. } => cluster,
            other => format!("{other:?}"),
        }
    }

    const ROUTES: &str = r#"
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - { match: { path: /exact }, route: { cluster: exact } }
  - { match: { path: /Exact-ci, case_sensitive: false }, route: { cluster: exact-ci } }
  - { match: { prefix: /API/, case_sensitive: false }, route: { cluster: api-ci, prefix_rewrite: /v2/ } }
  - { match: { safe_regex: { regex: "/users/[0-9]+" } }, route: { cluster: regex } }
  - { match: { path_separated_prefix: /sep }, route: { cluster: separated } }
  - match: { prefix: /hdr, headers: [{ name: x-env, string_match: { exact: canary } }, { name: x-debug, present_match: true }] }
    route: { cluster: headers }
  - match: { prefix: /hdr, headers: [{ name: x-env, string_match: { exact: canary }, invert_match: true }] }
    route: { cluster: not-canary }
  - match: { prefix: /q, query_parameters: [{ name: v, string_match: { prefix: "2" } }] }
    route: { cluster: query }
  - { match: { prefix: /grpc, grpc: {} }, route: { cluster: grpc } }
  - match: { prefix: /range, headers: [{ name: x-n, range_match: { start: 10, end: 20 } }] }
    route: { cluster: range }
  - match: { prefix: /frac, runtime_fraction: { runtime_key: k, default_value: { numerator: 25, denominator: HUNDRED } } }
    route: { cluster: fraction }
  - { match: { prefix: / }, route: { cluster: fallback } }
"#;

    #[test]
    fn routes_match_in_order_with_every_match_kind() {
        let t = table(ROUTES);
        let r = |path: &str| Request::new("h", path);
        assert_eq!(cluster_of(&t, &r("/exact")), "exact");
        // Exact paths ignore the query string but not a trailing slash.
        assert_eq!(cluster_of(&t, &r("/exact?x=1")), "exact");
        assert_eq!(cluster_of(&t, &r("/exact/")), "fallback");
        assert_eq!(cluster_of(&t, &r("/EXACT")), "fallback");
        assert_eq!(cluster_of(&t, &r("/exact-CI")), "exact-ci");
        assert_eq!(cluster_of(&t, &r("/api/x")), "api-ci");
        // Regexes match the whole path, without the query string.
        assert_eq!(cluster_of(&t, &r("/users/42")), "regex");
        assert_eq!(cluster_of(&t, &r("/users/42?a=b")), "regex");
        assert_eq!(cluster_of(&t, &r("/users/42/x")), "fallback");
        // path_separated_prefix: the prefix itself or below it, not a longer name.
        assert_eq!(cluster_of(&t, &r("/sep")), "separated");
        assert_eq!(cluster_of(&t, &r("/sep/a")), "separated");
        assert_eq!(cluster_of(&t, &r("/separate")), "fallback");
        // Headers: all must match; inversion; absent headers fail an inverted matcher too.
        let mut h = r("/hdr");
        h.headers = vec![
            ("x-env".into(), "canary".into()),
            ("x-debug".into(), "".into()),
        ];
        assert_eq!(cluster_of(&t, &h), "headers");
        h.headers = vec![("x-env".into(), "canary".into())];
        assert_eq!(cluster_of(&t, &h), "fallback");
        h.headers = vec![("x-env".into(), "prod".into())];
        assert_eq!(cluster_of(&t, &h), "not-canary");
        h.headers = vec![];
        assert_eq!(cluster_of(&t, &h), "fallback");
        // Query parameters.
        assert_eq!(cluster_of(&t, &r("/q?v=2.1")), "query");
        assert_eq!(cluster_of(&t, &r("/q?v=1")), "fallback");
        assert_eq!(cluster_of(&t, &r("/q")), "fallback");
        // gRPC needs an application/grpc content type.
        let mut g = r("/grpc");
        assert_eq!(cluster_of(&t, &g), "fallback");
        g.headers = vec![("content-type".into(), "application/grpc+proto".into())];
        assert_eq!(cluster_of(&t, &g), "grpc");
        // Ranges are half open.
        let mut n = r("/range");
        n.headers = vec![("x-n".into(), "19".into())];
        assert_eq!(cluster_of(&t, &n), "range");
        n.headers = vec![("x-n".into(), "20".into())];
        assert_eq!(cluster_of(&t, &n), "fallback");
        // Runtime fractions: the random value decides, deterministically.
        let mut f = r("/frac");
        f.random_value = 124;
        assert_eq!(cluster_of(&t, &f), "fraction");
        f.random_value = 125;
        assert_eq!(cluster_of(&t, &f), "fallback");
        f.runtime = Runtime::EnabledKeys(vec![]);
        f.random_value = 1;
        assert_eq!(cluster_of(&t, &f), "fallback");
        f.runtime = Runtime::EnabledKeys(vec!["k".into()]);
        assert_eq!(cluster_of(&t, &f), "fraction");
    }

    #[test]
    fn every_rejected_route_says_why() {
        let t = table(ROUTES);
        let d = t.route(&Request::new("h", "/q?v=1"));
        let q = d
            .reasons
            .iter()
            .find(|r| r.subject.starts_with("routes[7]"))
            .unwrap();
        assert_eq!(q.verdict, Verdict::Rejected);
        assert!(q.detail.contains("query parameter v"), "{}", q.detail);
        let exact = d
            .reasons
            .iter()
            .find(|r| r.subject.starts_with("routes[0]"))
            .unwrap();
        assert!(
            exact.detail.contains("'/q' != '/exact'"),
            "{}",
            exact.detail
        );
        assert_eq!(d.reasons.last().unwrap().verdict, Verdict::Chosen);
    }

    #[test]
    fn forwarding_rewrites_path_and_host() {
        let t = table(
            r#"
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - { match: { prefix: /old/ }, route: { cluster: c, prefix_rewrite: /new/, host_rewrite_literal: upstream.local } }
  - { match: { path: /whole }, route: { cluster: c, prefix_rewrite: /other } }
  - match: { prefix: /re/ }
    route: { cluster: c, regex_rewrite: { pattern: { regex: "^/re/([a-z]+)/(.*)$" }, substitution: "/\\2/\\1" } }
  - { match: { prefix: /hh }, route: { cluster: c, host_rewrite_header: x-host } }
  - { match: { prefix: /ch }, route: { cluster_header: x-cluster } }
"#,
        );
        let fwd = |path: &str, headers: Vec<(&str, &str)>| {
            let mut r = Request::new("orig.example", path);
            r.headers = headers
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            match t.route(&r).action {
                Action::Forward {
                    cluster,
                    path,
                    host,
                    ..
                } => (cluster, path, host),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            fwd("/old/a?x=1", vec![]),
            ("c".into(), "/new/a?x=1".into(), "upstream.local".into())
        );
        assert_eq!(fwd("/whole?q", vec![]).1, "/other?q");
        assert_eq!(fwd("/re/abc/def?k=v", vec![]).1, "/def/abc?k=v");
        assert_eq!(fwd("/hh", vec![("x-host", "from-header")]).2, "from-header");
        assert_eq!(fwd("/hh", vec![]).2, "orig.example");
        assert_eq!(fwd("/ch", vec![("x-cluster", "picked")]).0, "picked");
        assert_eq!(fwd("/ch", vec![]).0, "");
    }

    #[test]
    fn weighted_clusters_split_by_the_random_value() {
        let t = table(
            r#"
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - match: { prefix: / }
    route: { weighted_clusters: { clusters: [{ name: a, weight: 30 }, { name: b, weight: 30 }, { name: c, weight: 40 }] } }
"#,
        );
        let pick = |n: u64| {
            let mut r = Request::new("h", "/");
            r.random_value = n;
            let d = t.route(&r);
            (cluster_of(&t, &r), d.weighted_index)
        };
        assert_eq!(pick(0), ("a".into(), Some(0)));
        assert_eq!(pick(29), ("a".into(), Some(0)));
        assert_eq!(pick(30), ("b".into(), Some(1)));
        assert_eq!(pick(59), ("b".into(), Some(1)));
        assert_eq!(pick(60), ("c".into(), Some(2)));
        assert_eq!(pick(99), ("c".into(), Some(2)));
        assert_eq!(pick(115), ("a".into(), Some(0)));
    }

    #[test]
    fn weighted_clusters_take_the_random_value_from_header_name_when_it_is_a_number() {
        let t = table(
            r#"
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - match: { prefix: / }
    route: { weighted_clusters: { header_name: x-random, clusters: [{ name: a, weight: 1 }, { name: b, weight: 1 }] } }
"#,
        );
        let pick = |header: Option<&str>, random: u64| {
            let mut r = Request::new("h", "/");
            r.random_value = random;
            if let Some(v) = header {
                r.headers.push(("x-random".into(), v.into()));
            }
            cluster_of(&t, &r)
        };
        assert_eq!(pick(Some("1"), 0), "b");
        assert_eq!(pick(Some("4"), 1), "a");
        // Absent or not a number: the proxy's own random value.
        assert_eq!(pick(None, 1), "b");
        assert_eq!(pick(Some("x"), 0), "a");
        assert_eq!(pick(Some("-1"), 1), "b");
    }

    #[test]
    fn redirects_direct_responses_and_tls_requirements() {
        let t = table(
            r#"
virtual_hosts:
- name: secure
  domains: [secure.example]
  require_tls: ALL
  routes: [{ match: { prefix: / }, route: { cluster: c } }]
- name: v
  domains: ["*"]
  routes:
  - { match: { prefix: /https }, redirect: { https_redirect: true } }
  - { match: { prefix: /host }, redirect: { host_redirect: new.example, response_code: FOUND } }
  - { match: { prefix: /port }, redirect: { port_redirect: 8443 } }
  - { match: { prefix: /path }, redirect: { path_redirect: /elsewhere } }
  - { match: { prefix: /strip }, redirect: { path_redirect: /s, strip_query: true, response_code: PERMANENT_REDIRECT } }
  - { match: { prefix: /own }, redirect: { path_redirect: "/o?x=1", strip_query: true } }
  - { match: { prefix: /pre/ }, redirect: { prefix_rewrite: /post/ } }
  - { match: { prefix: /ping }, direct_response: { status: 200, body: { inline_string: pong } } }
"#,
        );
        let r = |host: &str, path: &str| t.route(&Request::new(host, path)).action;
        let redirect = |host: &str, path: &str| match r(host, path) {
            Action::Redirect { location, code } => (location, code),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            redirect("a.example", "/https?x=1"),
            ("https://a.example/https?x=1".into(), 301)
        );
        assert_eq!(
            redirect("a.example:80", "/https"),
            ("https://a.example/https".into(), 301)
        );
        assert_eq!(
            redirect("a.example", "/host/x"),
            ("http://new.example/host/x".into(), 302)
        );
        assert_eq!(
            redirect("a.example:8080", "/port"),
            ("http://a.example:8443/port".into(), 301)
        );
        assert_eq!(
            redirect("a.example", "/path?keep=1"),
            ("http://a.example/elsewhere?keep=1".into(), 301)
        );
        assert_eq!(
            redirect("a.example", "/strip?drop=1"),
            ("http://a.example/s".into(), 308)
        );
        // strip_query drops the request's query, never the one path_redirect writes (as Envoy 1.40
        // answers; the differential test found it).
        assert_eq!(
            redirect("a.example", "/own?drop=1"),
            ("http://a.example/o?x=1".into(), 301)
        );
        assert_eq!(
            redirect("a.example", "/pre/x"),
            ("http://a.example/post/x".into(), 301)
        );
        assert_eq!(
            r("a.example", "/ping"),
            Action::DirectResponse {
                status: 200,
                body: "pong".into()
            }
        );
        assert_eq!(
            redirect("secure.example", "/x"),
            ("https://secure.example/x".into(), 301)
        );
        let mut tls = Request::new("secure.example", "/x");
        tls.scheme = "https".into();
        assert_eq!(routed(&t, &tls).0, Some(0));
    }

    #[test]
    fn virtual_clusters_are_named_or_other() {
        let t = table(
            r#"
virtual_hosts:
- name: v
  domains: ["*"]
  routes: [{ match: { prefix: / }, route: { cluster: c } }]
  virtual_clusters:
  - name: create
    headers: [{ name: ":path", string_match: { safe_regex: { regex: "^/items$" } } }, { name: ":method", string_match: { exact: POST } }]
- name: plain
  domains: [plain]
  routes: [{ match: { prefix: / }, route: { cluster: c } }]
"#,
        );
        let mut post = Request::new("h", "/items");
        post.method = "POST".into();
        assert_eq!(t.route(&post).virtual_cluster.as_deref(), Some("create"));
        assert_eq!(
            t.route(&Request::new("h", "/items"))
                .virtual_cluster
                .as_deref(),
            Some("other")
        );
        assert_eq!(
            t.route(&Request::new("plain", "/items")).virtual_cluster,
            None
        );
    }
}
