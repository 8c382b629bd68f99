//! The data-flow graph of a configuration, as the founding article drew it by hand: listeners
//! (with their listener filters) -> filter chains (with their match and transport socket) ->
//! network filters -> route configurations -> virtual hosts -> routes -> clusters -> endpoints.
//! One graph, several renderings ([`render`]): SVG laid out here (no external tool at run time),
//! Graphviz DOT, Mermaid, a draw.io file, and an indented text tree. A trace can be laid over it
//! to highlight the one path a connection takes.

pub mod render;

use crate::cluster::hosts;
use crate::trace::Trace;
use pilotfish_api::pb::envoy::config::listener::v3::filter;
use pilotfish_api::pb::envoy::config::route::v3::{
    route, route_action, route_match, RouteConfiguration,
};
use pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, HttpConnectionManager,
};
use pilotfish_api::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use pilotfish_config::model::{discovery_name, format_address, unpack};
use pilotfish_config::resources::ResourceSet;
use std::collections::{BTreeSet, HashMap};

/// The columns of the picture, in data path order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Column {
    Listener,
    FilterChain,
    NetworkFilter,
    RouteConfig,
    VirtualHost,
    Route,
    Cluster,
    Endpoints,
}

impl Column {
    pub const ALL: [Column; 8] = [
        Column::Listener,
        Column::FilterChain,
        Column::NetworkFilter,
        Column::RouteConfig,
        Column::VirtualHost,
        Column::Route,
        Column::Cluster,
        Column::Endpoints,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Column::Listener => "listeners & listener filters",
            Column::FilterChain => "filter chains & transport",
            Column::NetworkFilter => "network filters",
            Column::RouteConfig => "route configurations",
            Column::VirtualHost => "virtual hosts",
            Column::Route => "routes",
            Column::Cluster => "clusters",
            Column::Endpoints => "endpoints",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub id: String,
    pub column: Column,
    /// First line: the name. Further lines: details.
    pub lines: Vec<String>,
    pub highlighted: bool,
}

#[derive(Debug, Clone)]
pub struct Edge {
    pub from: String,
    pub to: String,
    pub label: String,
    pub highlighted: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

/// Which part of the configuration to draw.
#[derive(Debug, Clone, Default)]
pub struct Focus {
    pub listener: Option<String>,
    pub port: Option<u16>,
    /// `INBOUND` or `OUTBOUND`.
    pub direction: Option<String>,
    pub cluster: Option<String>,
}

impl Graph {
    fn node(&mut self, id: String, column: Column, lines: Vec<String>) -> String {
        if !self.nodes.iter().any(|n| n.id == id) {
            self.nodes.push(Node {
                id: id.clone(),
                column,
                lines,
                highlighted: false,
            });
        }
        id
    }

    fn edge(&mut self, from: &str, to: &str, label: impl Into<String>) {
        if !self.edges.iter().any(|e| e.from == from && e.to == to) {
            self.edges.push(Edge {
                from: from.into(),
                to: to.into(),
                label: label.into(),
                highlighted: false,
            });
        }
    }

    pub fn build(set: &ResourceSet, focus: &Focus) -> Graph {
        let mut g = Graph::default();
        let mut rc_cache: HashMap<String, String> = HashMap::new();
        for l in &set.listeners {
            let lv = &l.value;
            if focus.listener.as_deref().is_some_and(|n| n != l.name) {
                continue;
            }
            let addr = lv
                .address
                .as_ref()
                .and_then(format_address)
                .unwrap_or_default();
            if focus
                .port
                .is_some_and(|p| !addr.ends_with(&format!(":{p}")))
            {
                continue;
            }
            let dir = match lv.traffic_direction {
                1 => "INBOUND",
                2 => "OUTBOUND",
                _ => "",
            };
            if focus
                .direction
                .as_deref()
                .is_some_and(|d| !d.eq_ignore_ascii_case(dir))
            {
                continue;
            }
            let name = if l.name.is_empty() {
                format!("({addr})")
            } else {
                l.name.clone()
            };
            let mut lines = vec![name.clone(), format!("{addr} {dir}").trim().to_string()];
            if lv.use_original_dst.as_ref().is_some_and(|v| v.value) {
                lines.push("use_original_dst".into());
            }
            if lv.filter_chain_matcher.is_some() {
                lines.push("chains picked by filter_chain_matcher".into());
            }
            if lv.bind_to_port.as_ref().is_some_and(|v| !v.value) {
                lines.push("bind_to_port: false".into());
            }
            for f in &lv.listener_filters {
                let disabled = if f.filter_disabled.is_some() {
                    " (filter_disabled)"
                } else {
                    ""
                };
                lines.push(format!(
                    "- {}{disabled}",
                    f.name.trim_start_matches("envoy.filters.listener.")
                ));
            }
            let lid = g.node(format!("listener:{name}"), Column::Listener, lines);
            let chains = lv
                .filter_chains
                .iter()
                .enumerate()
                .map(|(i, fc)| (format!("{i}"), fc))
                .chain(
                    lv.default_filter_chain
                        .iter()
                        .map(|fc| ("default".to_string(), fc)),
                );
            for (ci, fc) in chains {
                let mut lines = vec![if fc.name.is_empty() {
                    format!("filter_chains[{ci}]")
                } else {
                    fc.name.clone()
                }];
                if let Some(m) = &fc.filter_chain_match {
                    lines.extend(crate::filter_chain::match_parts(m));
                }
                if ci == "default" {
                    lines.push("(default_filter_chain)".into());
                }
                if let Some(ts) = &fc.transport_socket {
                    lines.push(format!(
                        "socket {}",
                        ts.name.trim_start_matches("envoy.transport_sockets.")
                    ));
                }
                let cid = g.node(format!("chain:{name}#{ci}"), Column::FilterChain, lines);
                g.edge(&lid, &cid, "");
                let short: Vec<&str> = fc
                    .filters
                    .iter()
                    .map(|f| f.name.trim_start_matches("envoy.filters.network."))
                    .collect();
                let mut lines = vec![short.join(" -> ")];
                for f in &fc.filters {
                    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                        continue;
                    };
                    if let Some(hcm) = unpack::<HttpConnectionManager>(any) {
                        for h in &hcm.http_filters {
                            lines.push(format!(
                                "http: {}",
                                h.name.trim_start_matches("envoy.filters.http.")
                            ));
                        }
                    }
                }
                let nid = g.node(format!("nf:{name}#{ci}"), Column::NetworkFilter, lines);
                g.edge(&cid, &nid, "");
                for f in &fc.filters {
                    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                        continue;
                    };
                    if let Some(hcm) = unpack::<HttpConnectionManager>(any) {
                        let rc: Option<(String, RouteConfiguration, &str)> = match &hcm
                            .route_specifier
                        {
                            Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
                                Some((format!("rc:{name}#{ci}:{}", rc.name), rc.clone(), "inline"))
                            }
                            Some(http_connection_manager::RouteSpecifier::Rds(rds)) => set
                                .route_configs
                                .iter()
                                .find(|r| r.name == rds.route_config_name && !r.origin.is_static())
                                .map(|r| (format!("rc:{}", r.name), r.value.clone(), "RDS")),
                            _ => None,
                        };
                        if let Some((id, rc, how)) = rc {
                            let rid = match rc_cache.get(&id) {
                                Some(r) => r.clone(),
                                None => {
                                    let r = g.route_config(set, &id, &rc, how, focus);
                                    rc_cache.insert(id.clone(), r.clone());
                                    r
                                }
                            };
                            g.edge(&nid, &rid, how);
                        }
                    } else if let Some(tcp) = unpack::<TcpProxy>(any) {
                        let clusters: Vec<String> = match &tcp.cluster_specifier {
                            Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => vec![c.clone()],
                            Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
                                w.clusters.iter().map(|c| c.name.clone()).collect()
                            }
                            None => vec![],
                        };
                        for c in clusters {
                            if let Some(cid) = g.cluster(set, &c, focus) {
                                g.edge(&nid, &cid, "tcp_proxy");
                            }
                        }
                    }
                }
            }
        }
        g.prune(focus);
        g
    }

    fn route_config(
        &mut self,
        set: &ResourceSet,
        id: &str,
        rc: &RouteConfiguration,
        how: &str,
        focus: &Focus,
    ) -> String {
        let rid = self.node(
            id.to_string(),
            Column::RouteConfig,
            vec![
                if rc.name.is_empty() {
                    "(unnamed)".into()
                } else {
                    rc.name.clone()
                },
                format!("{how}, {} virtual host(s)", rc.virtual_hosts.len()),
            ],
        );
        for (vi, vh) in rc.virtual_hosts.iter().enumerate() {
            let mut domains = vh.domains.clone();
            let more = domains.len().saturating_sub(3);
            domains.truncate(3);
            let mut lines = vec![vh.name.clone(), domains.join(", ")];
            if more > 0 {
                lines[1].push_str(&format!(" (+{more})"));
            }
            let vid = self.node(format!("vh:{id}#{vi}"), Column::VirtualHost, lines);
            self.edge(&rid, &vid, "");
            for (ri, r) in vh.routes.iter().enumerate() {
                let m = r.r#match.clone().unwrap_or_default();
                let what = match &m.path_specifier {
                    Some(route_match::PathSpecifier::Prefix(p)) => format!("prefix {p}"),
                    Some(route_match::PathSpecifier::Path(p)) => format!("path {p}"),
                    Some(route_match::PathSpecifier::SafeRegex(re)) => {
                        format!("regex {}", re.regex)
                    }
                    Some(route_match::PathSpecifier::PathSeparatedPrefix(p)) => {
                        format!("path_separated_prefix {p}")
                    }
                    _ => "other match".into(),
                };
                let mut lines = vec![
                    if r.name.is_empty() {
                        format!("routes[{ri}]")
                    } else {
                        r.name.clone()
                    },
                    what,
                ];
                if !m.headers.is_empty() {
                    lines.push(format!("{} header matcher(s)", m.headers.len()));
                }
                let route_id = self.node(format!("route:{id}#{vi}#{ri}"), Column::Route, lines);
                self.edge(&vid, &route_id, "");
                match &r.action {
                    Some(route::Action::Route(ra)) => {
                        let clusters: Vec<(String, String)> = match &ra.cluster_specifier {
                            Some(route_action::ClusterSpecifier::Cluster(c)) => {
                                vec![(c.clone(), String::new())]
                            }
                            Some(route_action::ClusterSpecifier::WeightedClusters(w)) => w
                                .clusters
                                .iter()
                                .map(|c| {
                                    (
                                        c.name.clone(),
                                        format!(
                                            "weight {}",
                                            c.weight.as_ref().map_or(0, |v| v.value)
                                        ),
                                    )
                                })
                                .collect(),
                            Some(route_action::ClusterSpecifier::ClusterHeader(h)) => {
                                self.nodes
                                    .iter_mut()
                                    .find(|n| n.id == route_id)
                                    .unwrap()
                                    .lines
                                    .push(format!("cluster from header {h}"));
                                vec![]
                            }
                            _ => vec![],
                        };
                        for (c, label) in clusters {
                            if let Some(cid) = self.cluster(set, &c, focus) {
                                self.edge(&route_id, &cid, label);
                            }
                        }
                    }
                    Some(route::Action::Redirect(_)) => self
                        .nodes
                        .iter_mut()
                        .find(|n| n.id == route_id)
                        .unwrap()
                        .lines
                        .push("redirect".into()),
                    Some(route::Action::DirectResponse(d)) => self
                        .nodes
                        .iter_mut()
                        .find(|n| n.id == route_id)
                        .unwrap()
                        .lines
                        .push(format!("direct_response {}", d.status)),
                    _ => {}
                }
            }
        }
        rid
    }

    fn cluster(&mut self, set: &ResourceSet, name: &str, focus: &Focus) -> Option<String> {
        if focus.cluster.as_deref().is_some_and(|c| c != name) {
            return None;
        }
        let id = format!("cluster:{name}");
        if self.nodes.iter().any(|n| n.id == id) {
            return Some(id);
        }
        let Some(c) = set.cluster(name) else {
            return Some(self.node(
                id,
                Column::Cluster,
                vec![name.to_string(), "(not in this configuration)".into()],
            ));
        };
        let kind = discovery_name(&c.value);
        let mut lines = vec![name.to_string(), kind.clone()];
        if !c.value.transport_socket_matches.is_empty() {
            lines.push(format!(
                "tls by match: {}",
                c.value
                    .transport_socket_matches
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        } else if let Some(ts) = &c.value.transport_socket {
            lines.push(format!(
                "socket {}",
                ts.name.trim_start_matches("envoy.transport_sockets.")
            ));
        }
        let cid = self.node(id, Column::Cluster, lines);
        let d = hosts(set, &c.value, None);
        let mut lines = vec![format!("{} host(s)", d.hosts.len())];
        if kind == "ORIGINAL_DST" {
            lines = vec!["original destination".into()];
            if let Some(src) = &d.source_address {
                lines.push(format!("bind {src}"));
            }
        }
        for h in d.hosts.iter().take(4) {
            lines.push(
                format!(
                    "{} {}",
                    h.address,
                    if h.transport.matched == "default" {
                        String::new()
                    } else {
                        h.transport.matched.clone()
                    }
                )
                .trim()
                .to_string(),
            );
        }
        if d.hosts.len() > 4 {
            lines.push(format!("(+{} more)", d.hosts.len() - 4));
        }
        let eid = self.node(format!("eps:{name}"), Column::Endpoints, lines);
        self.edge(&cid, &eid, "");
        Some(cid)
    }

    /// With a cluster in focus, keep only what leads to it.
    fn prune(&mut self, focus: &Focus) {
        if focus.cluster.is_none() {
            return;
        }
        let mut keep: BTreeSet<String> = self
            .nodes
            .iter()
            .filter(|n| matches!(n.column, Column::Cluster | Column::Endpoints))
            .map(|n| n.id.clone())
            .collect();
        loop {
            let before = keep.len();
            for e in &self.edges {
                if keep.contains(&e.to) {
                    keep.insert(e.from.clone());
                }
            }
            if keep.len() == before {
                break;
            }
        }
        self.nodes.retain(|n| keep.contains(&n.id));
        self.edges
            .retain(|e| keep.contains(&e.from) && keep.contains(&e.to));
    }

    /// Marks the nodes and edges a trace went through.
    pub fn highlight(&mut self, t: &Trace) {
        let title = |stage: &str| t.find(stage).map(|s| s.title.clone());
        let listener = title("listener");
        let chain = title("filter_chain");
        let mut path: Vec<String> = vec![];
        // The listener that accepted the connection, then the one it was handed to, if any.
        let mut accepted: Vec<String> = t
            .find("listener")
            .map(|s| {
                s.reasons
                    .iter()
                    .filter(|r| r.verdict == crate::Verdict::Chosen)
                    .filter_map(|r| {
                        r.subject
                            .strip_prefix("listener '")?
                            .strip_suffix('\'')
                            .map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default();
        if accepted.is_empty() {
            accepted.extend(listener.clone());
        }
        for l in &accepted {
            if let Some(n) = self
                .nodes
                .iter()
                .find(|n| n.column == Column::Listener && n.lines[0] == *l)
            {
                path.push(n.id.clone());
            }
        }
        if let [a, b] = &path[..] {
            let (a, b) = (a.clone(), b.clone());
            self.edge(&a, &b, "use_original_dst");
        }
        if let (Some(l), Some(c)) = (&listener, &chain) {
            let idx = c
                .strip_prefix("filter_chains[")
                .and_then(|r| r.split(']').next())
                .map(str::to_string)
                .unwrap_or_else(|| "default".into());
            path.push(format!("chain:{l}#{idx}"));
            path.push(format!("nf:{l}#{idx}"));
        }
        // From the network filter on, follow the edges that lead to what the trace chose.
        let want_rc = title("route_config");
        let want_vh = title("virtual_host");
        let want_route_index = t.find("route").and_then(|s| {
            s.title
                .strip_prefix("routes[")?
                .split(']')
                .next()
                .map(str::to_string)
        });
        let want_cluster = title("cluster");
        let mut frontier = path.last().cloned();
        while let Some(from) = frontier.take() {
            let next = self
                .edges
                .iter()
                .map(|e| (e.from.clone(), e.to.clone()))
                .filter(|(f, _)| *f == from)
                .find_map(|(_, to)| {
                    let n = self.nodes.iter().find(|n| n.id == to)?;
                    let ok = match n.column {
                        Column::RouteConfig => want_rc.as_deref() == Some(n.lines[0].as_str()),
                        Column::VirtualHost => want_vh.as_deref() == Some(n.lines[0].as_str()),
                        // Only the chosen virtual host's routes are candidates here, so its index is enough.
                        Column::Route => want_route_index
                            .as_deref()
                            .is_some_and(|i| n.id.ends_with(&format!("#{i}"))),
                        Column::Cluster => want_cluster.as_deref() == Some(n.lines[0].as_str()),
                        Column::Endpoints => true,
                        _ => false,
                    };
                    ok.then_some(to)
                });
            if let Some(n) = next {
                path.push(n.clone());
                frontier = Some(n);
            }
        }
        for n in &mut self.nodes {
            n.highlighted = path.contains(&n.id);
            // An endpoints box lists a few hosts; say which one this connection reaches.
            if n.highlighted && n.column == Column::Endpoints {
                if let Some(h) = t.find("hosts") {
                    let first = h.detail.split(';').next().unwrap_or_default().trim();
                    n.lines.push(format!("this connection: {first}"));
                }
            }
        }
        for e in &mut self.edges {
            e.highlighted = path.windows(2).any(|w| w[0] == e.from && w[1] == e.to);
        }
    }
}
