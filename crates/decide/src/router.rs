//! Routing a request through a route configuration, as Envoy's router does: virtual host by
//! `:authority`, then the first route whose match accepts the request, then what its action makes
//! of it (a cluster, rewritten path and host, a redirect, a direct response).

use crate::matcher::{query_param, CompiledHeaderMatcher, CompiledQueryMatcher, FullRegex};
use crate::{Reason, Verdict};
use pilotfish_api::pb::envoy::config::route::v3::{
    redirect_action, route, route_action, route_match, virtual_host::TlsRequirementType,
    RedirectAction, Route, RouteAction, RouteConfiguration,
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
                format!("cluster_header '{h}' is absent (Envoy answers 404)"),
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
            let selected = req.random_value % total;
            let mut begin = 0u64;
            let mut chosen = (String::new(), String::new());
            for (i, c) in w.clusters.iter().enumerate() {
                let end = begin + c.weight.as_ref().map_or(0, |v| v.value as u64);
                if selected >= begin && selected < end {
                    chosen = (c.name.clone(), format!("weighted_clusters[{i}]: random value {} % {total} = {selected} falls in [{begin}, {end})", req.random_value));
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
    if rd.strip_query {
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
