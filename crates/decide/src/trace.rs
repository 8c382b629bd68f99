//! The whole path of one connection (and, for HTTP, one request) through a configuration: every
//! decision in data path order, with what it chose and why the alternatives lost. `pilotfish
//! trace` prints it; the same steps are what the debug log tells about a real connection.

use crate::cluster::{hosts, Host};
use crate::filter_chain::{self, ChainInput, Selected};
use crate::listener::{self, Connection, Entry};
use crate::router::{Action, Request, RouteTable};
use crate::{Reason, Verdict};
use pilotfish_api::pb::envoy::config::core::v3::transport_socket;
use pilotfish_api::pb::envoy::config::listener::v3::{filter, FilterChain};
use pilotfish_api::pb::envoy::config::route::v3::RouteConfiguration;
use pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, HttpConnectionManager,
};
use pilotfish_api::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use pilotfish_api::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, DownstreamTlsContext,
};
use pilotfish_config::model::{effective_type_url, unpack};
use pilotfish_config::resources::ResourceSet;
use serde_json::{json, Value};
use std::net::SocketAddr;

#[derive(Debug, Clone)]
pub struct Step {
    /// `listener`, `listener_filter`, `filter_chain`, `transport_socket`, `network_filters`,
    /// `http_filters`, `route_config`, `virtual_host`, `route`, `action`, `cluster`, `host`,
    /// `upstream_transport`.
    pub stage: &'static str,
    pub title: String,
    pub detail: String,
    /// The alternatives considered and why they lost (and notes).
    pub reasons: Vec<Reason>,
}

#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub steps: Vec<Step>,
    /// How the path ends: `forwarded to host ...`, `closed: no filter chain`, `404 no route`...
    pub outcome: String,
}

impl Trace {
    fn step(
        &mut self,
        stage: &'static str,
        title: impl Into<String>,
        detail: impl Into<String>,
        reasons: Vec<Reason>,
    ) {
        self.steps.push(Step {
            stage,
            title: title.into(),
            detail: detail.into(),
            reasons,
        });
    }

    pub fn find(&self, stage: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.stage == stage)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "steps": self.steps.iter().map(|s| json!({
                "stage": s.stage,
                "title": s.title,
                "detail": s.detail,
                "reasons": s.reasons.iter().map(|r| json!({"subject": r.subject, "verdict": r.verdict.label(), "detail": r.detail})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "outcome": self.outcome,
        })
    }

    /// Text for a terminal. `verbose` adds every rejected alternative, not just the choice.
    pub fn to_text(&self, verbose: bool) -> String {
        let mut out = String::new();
        for s in &self.steps {
            let label = s.stage.replace('_', " ");
            out.push_str(&format!("{:<18} {}", label, s.title));
            if !s.detail.is_empty() {
                out.push_str(&format!(": {}", s.detail));
            }
            out.push('\n');
            for r in &s.reasons {
                let show = verbose
                    || matches!(r.verdict, Verdict::Note)
                    || (r.verdict == Verdict::Skipped && s.stage == "listener_filter");
                if show && !(r.verdict == Verdict::Chosen && r.subject == s.title) {
                    out.push_str(&format!(
                        "{:<18}   {} {}: {}\n",
                        "",
                        r.verdict.label(),
                        r.subject,
                        r.detail
                    ));
                }
            }
        }
        out.push_str(&format!("{:<18} {}\n", "outcome", self.outcome));
        out
    }
}

/// The request part of a trace: what an HTTP request on this connection carries.
pub fn trace(set: &ResourceSet, conn: &Connection, entry: &Entry, req: Option<&Request>) -> Trace {
    let mut t = Trace::default();
    let ld = match listener::select(set, conn, entry) {
        Ok(d) => d,
        Err(reasons) => {
            t.step(
                "listener",
                "none",
                "no listener takes the connection",
                reasons,
            );
            t.outcome = "refused: no listener".into();
            return t;
        }
    };
    let addr = |l: &pilotfish_config::resources::Resource<
        pilotfish_api::pb::envoy::config::listener::v3::Listener,
    >| {
        l.value
            .address
            .as_ref()
            .and_then(pilotfish_config::model::format_address)
            .unwrap_or_default()
    };
    t.step(
        "listener",
        ld.serves.name.clone(),
        addr(ld.serves),
        ld.reasons.clone(),
    );
    let detected = listener::run_listener_filters(&ld.serves.value, conn, ld.local);
    for f in &detected.filters {
        let detail = if f.verdict == Verdict::Skipped {
            format!("skipped: {}", f.detail)
        } else {
            f.detail.clone()
        };
        t.step("listener_filter", f.subject.clone(), detail, vec![]);
    }
    let input = ChainInput {
        local: detected.local,
        source: conn.source,
        direct_source: conn.source,
        server_name: detected.server_name.clone(),
        transport_protocol: detected.transport_protocol.clone(),
        application_protocols: detected.application_protocols.clone(),
    };
    let (selected, reasons) = filter_chain::select(&ld.serves.value, &input);
    let l = &ld.serves.value;
    let Some(fc) = filter_chain::chain(l, &selected) else {
        t.step("filter_chain", "none", "no filter chain matches", reasons);
        t.outcome = "closed: no filter chain matches".into();
        return t;
    };
    let title = match selected {
        Selected::Chain(i) => filter_chain::chain_label(l, i),
        _ => "default_filter_chain".into(),
    };
    t.step("filter_chain", title, match_summary(fc), reasons);
    transport(&mut t, fc);
    let names: Vec<&str> = fc.filters.iter().map(|f| f.name.as_str()).collect();
    t.step("network_filters", names.join(" -> "), "", vec![]);
    for f in &fc.filters {
        let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            continue;
        };
        if let Some(hcm) = unpack::<HttpConnectionManager>(any) {
            http(&mut t, set, &hcm, conn, detected.local, req);
            return t;
        }
        if let Some(tcp) = unpack::<TcpProxy>(any) {
            let cluster = match &tcp.cluster_specifier {
                Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => c.clone(),
                Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => w
                    .clusters
                    .first()
                    .map(|c| c.name.clone())
                    .unwrap_or_default(),
                None => String::new(),
            };
            t.step(
                "action",
                format!("tcp_proxy to cluster '{cluster}'"),
                format!("stat_prefix {}", tcp.stat_prefix),
                vec![],
            );
            upstream(&mut t, set, &cluster, detected.local);
            return t;
        }
        let ty = effective_type_url(any);
        if pilotfish_api::type_url_message_name(&ty).contains("direct_response") {
            t.outcome = "answered by the direct_response network filter".into();
            return t;
        }
    }
    t.outcome =
        "no terminal network filter pilotfish knows (http_connection_manager, tcp_proxy)".into();
    t
}

fn match_summary(fc: &FilterChain) -> String {
    let parts = fc
        .filter_chain_match
        .as_ref()
        .map(filter_chain::match_parts)
        .unwrap_or_default();
    if parts.is_empty() {
        "matches everything".into()
    } else {
        parts.join(", ")
    }
}

fn transport(t: &mut Trace, fc: &FilterChain) {
    let Some(ts) = &fc.transport_socket else {
        t.step("transport_socket", "raw_buffer", "plaintext", vec![]);
        return;
    };
    let mut detail = vec![];
    if let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type {
        if let Some(d) = unpack::<DownstreamTlsContext>(any) {
            detail.push("terminates TLS".to_string());
            if d.require_client_certificate
                .as_ref()
                .is_some_and(|v| v.value)
            {
                detail.push("client certificate required".into());
            }
            if let Some(c) = &d.common_tls_context {
                let certs: Vec<String> = c
                    .tls_certificate_sds_secret_configs
                    .iter()
                    .map(|s| format!("SDS '{}'", s.name))
                    .collect();
                if !certs.is_empty() {
                    detail.push(format!("certificate from {}", certs.join(", ")));
                }
                if let Some(common_tls_context::ValidationContextType::CombinedValidationContext(
                    cv,
                )) = &c.validation_context_type
                {
                    if let Some(s) = &cv.validation_context_sds_secret_config {
                        detail.push(format!("trusted CA from SDS '{}'", s.name));
                    }
                    if let Some(dv) = &cv.default_validation_context {
                        #[allow(deprecated)]
                        let sans: Vec<String> = dv
                            .match_subject_alt_names
                            .iter()
                            .filter_map(|m| crate::matcher::CompiledStringMatcher::new(m).ok())
                            .map(|m| m.describe())
                            .collect();
                        if !sans.is_empty() {
                            detail.push(format!("peer SAN {}", sans.join(" | ")));
                        }
                    }
                }
                if !c.alpn_protocols.is_empty() {
                    detail.push(format!("ALPN [{}]", c.alpn_protocols.join(", ")));
                }
            }
        }
    }
    t.step(
        "transport_socket",
        ts.name.clone(),
        detail.join(", "),
        vec![],
    );
}

fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

fn http(
    t: &mut Trace,
    set: &ResourceSet,
    hcm: &HttpConnectionManager,
    conn: &Connection,
    local: SocketAddr,
    req: Option<&Request>,
) {
    let names: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    t.step(
        "http_filters",
        names.join(" -> "),
        format!("stat_prefix {}", hcm.stat_prefix),
        vec![],
    );
    let rc: Option<RouteConfiguration> = match &hcm.route_specifier {
        Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
            t.step(
                "route_config",
                rc.name.clone(),
                "inline in the http_connection_manager",
                vec![],
            );
            Some(rc.clone())
        }
        Some(http_connection_manager::RouteSpecifier::Rds(rds)) => match set
            .route_configs
            .iter()
            .find(|r| r.name == rds.route_config_name && !r.origin.is_static())
            .or_else(|| set.route_config(&rds.route_config_name))
        {
            Some(r) => {
                t.step(
                    "route_config",
                    rds.route_config_name.clone(),
                    "by name (RDS)",
                    vec![],
                );
                Some(r.value.clone())
            }
            None => {
                t.step(
                    "route_config",
                    rds.route_config_name.clone(),
                    "RDS: not in this configuration",
                    vec![],
                );
                None
            }
        },
        _ => None,
    };
    let Some(rc) = rc else {
        t.outcome = "no route configuration: Envoy answers 404 (NR)".into();
        return;
    };
    let table = match RouteTable::new(&rc) {
        Ok(t) => t,
        Err(e) => {
            t.outcome = format!("route configuration cannot be compiled: {e}");
            return;
        }
    };
    let mut request = req
        .cloned()
        .unwrap_or_else(|| Request::new(&conn.destination.to_string(), "/"));
    // The HCM may strip the port before virtual host matching.
    let original_authority = request.authority.clone();
    if hcm.strip_matching_host_port && request.authority.ends_with(&format!(":{}", local.port())) {
        request.authority = strip_port(&request.authority).to_string();
    } else if let Some(http_connection_manager::StripPortMode::StripAnyHostPort(true)) =
        &hcm.strip_port_mode
    {
        request.authority = strip_port(&request.authority).to_string();
    }
    let d = table.route(&request);
    let mut vh_reasons = vec![];
    let mut route_reasons = vec![];
    for r in d.reasons.iter().cloned() {
        if r.subject.starts_with("virtual host") || r.subject.starts_with("route configuration") {
            vh_reasons.push(r);
        } else {
            route_reasons.push(r);
        }
    }
    let host_note = if original_authority != request.authority {
        format!(" (port stripped from '{original_authority}')")
    } else {
        String::new()
    };
    match &d.virtual_host {
        Some(vh) => t.step(
            "virtual_host",
            vh.clone(),
            format!(":authority '{}'{host_note}", request.authority),
            vh_reasons,
        ),
        None => {
            t.step(
                "virtual_host",
                "none",
                format!(":authority '{}'", request.authority),
                vh_reasons,
            );
            t.outcome = "404: no virtual host matches (NR)".into();
            return;
        }
    }
    let route_title = match (d.route_index, &d.route_name) {
        (Some(i), Some(n)) => format!("routes[{i}] '{n}'"),
        (Some(i), None) => format!("routes[{i}]"),
        _ => "none".into(),
    };
    t.step(
        "route",
        route_title,
        format!("{} {}", request.method, request.path),
        route_reasons,
    );
    match d.action {
        Action::Forward {
            cluster,
            chosen_by,
            path,
            host,
        } => {
            let mut rewrites = vec![];
            if path != request.path {
                rewrites.push(format!("path rewritten to {path}"));
            }
            if host != request.authority {
                rewrites.push(format!("host rewritten to {host}"));
            }
            let detail = if rewrites.is_empty() {
                chosen_by
            } else {
                format!("{chosen_by}; {}", rewrites.join(", "))
            };
            t.step(
                "action",
                format!("route to cluster '{cluster}'"),
                detail,
                vec![],
            );
            if cluster.is_empty() {
                t.outcome = "503: no cluster to route to (NC)".into();
                return;
            }
            upstream(t, set, &cluster, local);
        }
        Action::Redirect { location, code } => {
            t.step(
                "action",
                format!("redirect {code}"),
                location.clone(),
                vec![],
            );
            t.outcome = format!("{code} redirect to {location}");
        }
        Action::DirectResponse { status, body } => {
            t.step(
                "action",
                format!("direct_response {status}"),
                format!("{} byte body", body.len()),
                vec![],
            );
            t.outcome = format!("{status} direct response");
        }
        Action::NoRoute => t.outcome = "404: no route matches (NR)".into(),
    }
}

fn upstream(t: &mut Trace, set: &ResourceSet, cluster: &str, original_destination: SocketAddr) {
    let Some(c) = set.cluster(cluster) else {
        t.step(
            "cluster",
            cluster.to_string(),
            "not in this configuration",
            vec![],
        );
        t.outcome = "503: unknown cluster".into();
        return;
    };
    let d = hosts(set, &c.value, Some(original_destination));
    let mut detail = d.kind.clone();
    if let Some(src) = &d.source_address {
        detail.push_str(&format!(
            ", upstream connections from {src} (upstream_bind_config)"
        ));
    }
    t.step("cluster", cluster.to_string(), detail, d.reasons.clone());
    if d.hosts.is_empty() {
        t.outcome = "503: no healthy upstream (UH)".into();
        return;
    }
    let shown: Vec<String> = d.hosts.iter().take(8).map(host_text).collect();
    let more = if d.hosts.len() > 8 {
        format!(" (+{} more)", d.hosts.len() - 8)
    } else {
        String::new()
    };
    t.step(
        "hosts",
        format!("{} host(s)", d.hosts.len()),
        format!("{}{more}", shown.join("; ")),
        vec![],
    );
    let first = &d.hosts[0];
    let tr = &first.transport;
    let mut detail = vec![format!(
        "{} (transport_socket_matches: {})",
        tr.socket, tr.matched
    )];
    if let Some(sni) = &tr.sni {
        detail.push(format!("SNI {sni}"));
    }
    if !tr.alpn.is_empty() {
        detail.push(format!("ALPN [{}]", tr.alpn.join(", ")));
    }
    let tls = tr.socket.ends_with(".tls");
    t.step(
        "upstream_transport",
        if tls { "TLS" } else { "plaintext" },
        detail.join(", "),
        vec![],
    );
    t.outcome = format!(
        "forwarded to cluster '{cluster}', host {}{}",
        first.address,
        if d.hosts.len() > 1 {
            " (one of several; the load balancer picks)"
        } else {
            ""
        }
    );
}

fn host_text(h: &Host) -> String {
    let mut s = h.address.clone();
    let mut attrs = vec![];
    if h.priority > 0 {
        attrs.push(format!("priority {}", h.priority));
    }
    if !h.locality.is_empty() {
        attrs.push(h.locality.clone());
    }
    if h.health != "UNKNOWN" && h.health != "HEALTHY" {
        attrs.push(h.health.clone());
    }
    attrs.push(h.transport.matched.clone());
    s.push_str(&format!(" [{}]", attrs.join(", ")));
    s
}
