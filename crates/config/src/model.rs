//! The resolved model: the resource set with its names resolved (RDS, EDS and SDS names, clusters
//! named by routes, weighted clusters and tcp_proxy) and every reference recorded, resolved or
//! dangling. Later consumers (the proxy, trace/explain, the admin API) read this, not the raw
//! protos' cross-references.

use crate::resources::{Origin, ResourceSet};
use pilotfish_api::pb::envoy::config::cluster::v3::{cluster, Cluster};
use pilotfish_api::pb::envoy::config::core::v3::{
    address, transport_socket, Address, TransportSocket,
};
use pilotfish_api::pb::envoy::config::listener::v3::{
    filter, listener_filter, FilterChain, Listener,
};
use pilotfish_api::pb::envoy::config::route::v3::{route, route_action, RouteConfiguration};
use pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, HttpConnectionManager,
};
use pilotfish_api::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use pilotfish_api::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, UpstreamTlsContext,
};
use pilotfish_api::pb::google::protobuf::Any;
use pilotfish_api::prost_reflect::ReflectMessage;
use pilotfish_api::type_url_message_name;
use prost::{Message, Name};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefKind {
    /// An HTTP connection manager's `rds.route_config_name`.
    RouteConfig,
    /// An EDS cluster's service name.
    Endpoints,
    /// An `SdsSecretConfig` name.
    Secret,
    /// A cluster named by a route, a weighted cluster or tcp_proxy.
    Cluster,
}

impl RefKind {
    pub fn label(self) -> &'static str {
        match self {
            RefKind::RouteConfig => "route configuration (RDS)",
            RefKind::Endpoints => "endpoints (EDS)",
            RefKind::Secret => "secret (SDS)",
            RefKind::Cluster => "cluster",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    pub kind: RefKind,
    pub name: String,
    /// Where the reference is made.
    pub from: String,
    pub resolved: bool,
    /// A missing target that makes the configuration invalid (Envoy refuses it), not just
    /// incomplete: a route to an unknown cluster under `validate_clusters`, an SDS name with no
    /// config source and no static secret.
    pub fatal: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
    Unspecified,
}

#[derive(Debug, Clone)]
pub struct ListenerModel {
    pub name: String,
    pub path: String,
    /// `ip:port`, `[ip]:port`, `pipe:/path` or `internal:name`; None when the listener has none.
    pub address: Option<String>,
    pub direction: Direction,
    pub use_original_dst: bool,
    pub bind_to_port: bool,
    pub listener_filters: Vec<String>,
    pub filter_chains: Vec<FilterChainModel>,
    pub default_filter_chain: Option<FilterChainModel>,
}

#[derive(Debug, Clone)]
pub struct FilterChainModel {
    pub name: String,
    pub path: String,
    /// Transport socket name (`envoy.transport_sockets.tls`, ...), None for plaintext.
    pub transport_socket: Option<String>,
    pub filters: Vec<NetworkFilterModel>,
}

#[derive(Debug, Clone)]
pub struct NetworkFilterModel {
    pub name: String,
    /// The configuration's type, TypedStruct wrappers looked through.
    pub type_url: String,
    pub path: String,
    /// For an HTTP connection manager: where its routes come from (index into `route_configs`).
    pub route_config: Option<usize>,
    pub http_filters: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteConfigSource {
    /// Delivered by name (RDS, or a dump's route configurations).
    Rds,
    /// Inline in a listener's HTTP connection manager.
    Inline { listener: String },
}

#[derive(Debug, Clone)]
pub struct RouteConfigModel {
    pub name: String,
    pub path: String,
    pub source: RouteConfigSource,
    pub virtual_hosts: usize,
    pub routes: usize,
    pub validate_clusters: bool,
}

#[derive(Debug, Clone)]
pub struct ClusterModel {
    pub name: String,
    pub path: String,
    /// `STATIC`, `STRICT_DNS`, `LOGICAL_DNS`, `EDS`, `ORIGINAL_DST`, or a custom cluster type's name.
    pub discovery: String,
    /// For EDS, the service name endpoints are looked up by.
    pub eds_service_name: Option<String>,
    /// Hosts known now (inline or from the resolved EDS assignment).
    pub hosts: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Model {
    pub listeners: Vec<ListenerModel>,
    pub clusters: Vec<ClusterModel>,
    pub route_configs: Vec<RouteConfigModel>,
    pub references: Vec<Reference>,
    /// Secrets whose private key a config dump redacted: loadable, but TLS with them cannot work.
    pub redacted_secrets: Vec<String>,
}

/// Decodes an Any of a known type; TypedStruct wrappers are converted through JSON as Envoy does.
pub fn unpack<T: Message + Name + Default>(any: &Any) -> Option<T> {
    let name = type_url_message_name(&any.type_url);
    if name == T::full_name() {
        return T::decode(any.value.as_slice()).ok();
    }
    if name == "udpa.type.v1.TypedStruct" || name == "xds.type.v3.TypedStruct" {
        let desc = pilotfish_api::descriptor_pool().get_message_by_name(name)?;
        let ts = pilotfish_api::prost_reflect::DynamicMessage::decode(desc, any.value.as_slice())
            .ok()?;
        let inner = crate::walk::unpack_typed_struct(&ts, "", &mut vec![])?;
        if inner.descriptor().full_name() == T::full_name() {
            return inner.transcode_to().ok();
        }
    }
    None
}

/// The type a `typed_config` really configures: a TypedStruct's `type_url`, an opaque Any's
/// original type, or the Any's own type.
/// The plugin a Wasm filter (HTTP or network) runs in Istio's null VM, by its code name
/// (`envoy.wasm.metadata_exchange`, `envoy.wasm.stats`); None for anything else.
pub fn null_vm_plugin(any: &Any) -> Option<String> {
    null_vm_plugin_configuration(any).map(|(code, _)| code)
}

/// A null-VM Wasm plugin's code name and its configuration string (a `StringValue`, empty when
/// unset).
pub fn null_vm_plugin_configuration(any: &Any) -> Option<(String, String)> {
    use pilotfish_api::prost_reflect::{DynamicMessage, SerializeOptions};
    let name = type_url_message_name(&effective_type_url(any)).to_string();
    if name != "envoy.extensions.filters.http.wasm.v3.Wasm"
        && name != "envoy.extensions.filters.network.wasm.v3.Wasm"
    {
        return None;
    }
    let desc = pilotfish_api::descriptor_pool()
        .get_message_by_name(type_url_message_name(&any.type_url))?;
    let dm = DynamicMessage::decode(desc, any.value.as_slice()).ok()?;
    let opts = SerializeOptions::new().use_proto_field_name(true);
    let v = dm
        .serialize_with_options(serde_json::value::Serializer, &opts)
        .ok()?;
    // A TypedStruct carries the Wasm config under `value`.
    let json = v.get("value").cloned().unwrap_or(v);
    let runtime = json.pointer("/config/vm_config/runtime")?.as_str()?;
    if runtime != "envoy.wasm.runtime.null" {
        return None;
    }
    let code = json
        .pointer("/config/vm_config/code/local/inline_string")
        .and_then(|c| c.as_str())
        .unwrap_or("?")
        .to_string();
    let configuration = json
        .pointer("/config/configuration/value")
        .and_then(|c| c.as_str())
        .unwrap_or_default()
        .to_string();
    Some((code, configuration))
}

pub fn effective_type_url(any: &Any) -> String {
    let name = type_url_message_name(&any.type_url);
    let wrapped = |m: &str| -> Option<String> {
        let desc = pilotfish_api::descriptor_pool().get_message_by_name(m)?;
        let msg = pilotfish_api::prost_reflect::DynamicMessage::decode(desc, any.value.as_slice())
            .ok()?;
        Some(msg.get_field_by_name("type_url")?.as_str()?.to_string())
    };
    match name {
        "udpa.type.v1.TypedStruct"
        | "xds.type.v3.TypedStruct"
        | "pilotfish.config.v1.OpaqueAny" => wrapped(name).unwrap_or_else(|| any.type_url.clone()),
        _ => any.type_url.clone(),
    }
}

pub fn format_address(a: &Address) -> Option<String> {
    Some(match a.address.as_ref()? {
        address::Address::SocketAddress(s) => {
            let port = match &s.port_specifier {
                Some(pilotfish_api::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => p.to_string(),
                Some(pilotfish_api::pb::envoy::config::core::v3::socket_address::PortSpecifier::NamedPort(n)) => n.clone(),
                None => "0".into(),
            };
            if s.address.contains(':') {
                format!("[{}]:{port}", s.address)
            } else {
                format!("{}:{port}", s.address)
            }
        }
        address::Address::Pipe(p) => format!("pipe:{}", p.path),
        address::Address::EnvoyInternalAddress(i) => {
            format!("internal:{:?}", i.address_name_specifier)
        }
    })
}

pub fn discovery_name(c: &Cluster) -> String {
    match &c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) => cluster::DiscoveryType::try_from(*t)
            .map(|d| d.as_str_name().to_string())
            .unwrap_or_else(|_| t.to_string()),
        Some(cluster::ClusterDiscoveryType::ClusterType(ct)) => ct.name.clone(),
        None => "STATIC".into(),
    }
}

/// The service name an EDS cluster's endpoints are published under.
pub fn eds_service_name(c: &Cluster) -> Option<String> {
    if discovery_name(c) != "EDS" {
        return None;
    }
    let svc = c
        .eds_cluster_config
        .as_ref()
        .map(|e| e.service_name.clone())
        .unwrap_or_default();
    Some(if svc.is_empty() { c.name.clone() } else { svc })
}

impl Model {
    pub fn build(set: &ResourceSet, static_bootstrap: bool) -> Model {
        let mut m = Model::default();
        // Route configurations delivered by name first, so HCMs can point at them. A dump lists
        // inline route configurations again as static ones; they are taken from their listener.
        for r in set.route_configs.iter().filter(|r| !r.origin.is_static()) {
            m.add_route_config(&r.value, &r.path, RouteConfigSource::Rds, set);
        }
        for l in &set.listeners {
            let lm = m.listener(&l.value, &l.path, set, static_bootstrap);
            m.listeners.push(lm);
        }
        for c in &set.clusters {
            let cm = m.cluster(&c.value, &c.path, set, static_bootstrap);
            m.clusters.push(cm);
        }
        for s in &set.secrets {
            if let Some(tc) = &s.value.r#type {
                use pilotfish_api::pb::envoy::extensions::transport_sockets::tls::v3::secret::Type;
                if let Type::TlsCertificate(cert) = tc {
                    if let Some(pk) = &cert.private_key {
                        use pilotfish_api::pb::envoy::config::core::v3::data_source::Specifier;
                        if let Some(Specifier::InlineBytes(b)) = &pk.specifier {
                            if b.as_slice() == b"[redacted]" {
                                m.redacted_secrets.push(s.name.clone());
                            }
                        }
                    }
                }
            }
        }
        m
    }

    fn add_route_config(
        &mut self,
        rc: &RouteConfiguration,
        path: &str,
        source: RouteConfigSource,
        set: &ResourceSet,
    ) -> usize {
        let validate_clusters = match &rc.validate_clusters {
            Some(v) => v.value,
            None => matches!(source, RouteConfigSource::Inline { .. }),
        };
        let mut routes = 0;
        for (vi, vh) in rc.virtual_hosts.iter().enumerate() {
            for (ri, r) in vh.routes.iter().enumerate() {
                routes += 1;
                let Some(route::Action::Route(action)) = &r.action else {
                    continue;
                };
                let at = format!("{path}.virtual_hosts[{vi}].routes[{ri}].route");
                match &action.cluster_specifier {
                    Some(route_action::ClusterSpecifier::Cluster(name)) => {
                        self.cluster_ref(name, format!("{at}.cluster"), set, validate_clusters)
                    }
                    Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
                        for (i, c) in w.clusters.iter().enumerate() {
                            self.cluster_ref(
                                &c.name,
                                format!("{at}.weighted_clusters.clusters[{i}].name"),
                                set,
                                validate_clusters,
                            );
                        }
                    }
                    _ => {}
                }
            }
        }
        self.route_configs.push(RouteConfigModel {
            name: rc.name.clone(),
            path: path.to_string(),
            source,
            virtual_hosts: rc.virtual_hosts.len(),
            routes,
            validate_clusters,
        });
        self.route_configs.len() - 1
    }

    fn cluster_ref(&mut self, name: &str, from: String, set: &ResourceSet, fatal_if_missing: bool) {
        let resolved = set.cluster(name).is_some();
        self.references.push(Reference {
            kind: RefKind::Cluster,
            name: name.to_string(),
            from,
            resolved,
            fatal: !resolved && fatal_if_missing,
        });
    }

    fn listener(
        &mut self,
        l: &Listener,
        path: &str,
        set: &ResourceSet,
        static_bootstrap: bool,
    ) -> ListenerModel {
        let direction = match l.traffic_direction {
            1 => Direction::Inbound,
            2 => Direction::Outbound,
            _ => Direction::Unspecified,
        };
        let listener_filters = l
            .listener_filters
            .iter()
            .map(|f| {
                let _ = matches!(
                    f.config_type,
                    Some(listener_filter::ConfigType::TypedConfig(_))
                );
                f.name.clone()
            })
            .collect();
        let filter_chains = l
            .filter_chains
            .iter()
            .enumerate()
            .map(|(i, fc)| {
                self.filter_chain(
                    fc,
                    &format!("{path}.filter_chains[{i}]"),
                    &l.name,
                    set,
                    static_bootstrap,
                )
            })
            .collect();
        let default_filter_chain = l.default_filter_chain.as_ref().map(|fc| {
            self.filter_chain(
                fc,
                &format!("{path}.default_filter_chain"),
                &l.name,
                set,
                static_bootstrap,
            )
        });
        ListenerModel {
            name: l.name.clone(),
            path: path.to_string(),
            address: l.address.as_ref().and_then(format_address),
            direction,
            use_original_dst: l.use_original_dst.as_ref().is_some_and(|v| v.value),
            bind_to_port: l.bind_to_port.as_ref().is_none_or(|v| v.value),
            listener_filters,
            filter_chains,
            default_filter_chain,
        }
    }

    fn filter_chain(
        &mut self,
        fc: &FilterChain,
        path: &str,
        listener: &str,
        set: &ResourceSet,
        static_bootstrap: bool,
    ) -> FilterChainModel {
        let transport_socket = fc.transport_socket.as_ref().map(|ts| {
            self.transport_socket_secrets(
                ts,
                &format!("{path}.transport_socket"),
                set,
                static_bootstrap,
            );
            ts.name.clone()
        });
        let mut filters = vec![];
        for (i, f) in fc.filters.iter().enumerate() {
            let fpath = format!("{path}.filters[{i}]");
            let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                filters.push(NetworkFilterModel {
                    name: f.name.clone(),
                    type_url: String::new(),
                    path: fpath,
                    route_config: None,
                    http_filters: vec![],
                });
                continue;
            };
            let type_url = effective_type_url(any);
            let mut nf = NetworkFilterModel {
                name: f.name.clone(),
                type_url: type_url.clone(),
                path: fpath.clone(),
                route_config: None,
                http_filters: vec![],
            };
            if let Some(hcm) = unpack::<HttpConnectionManager>(any) {
                nf.http_filters = hcm.http_filters.iter().map(|h| h.name.clone()).collect();
                let at = format!("{fpath}.typed_config");
                match &hcm.route_specifier {
                    Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
                        let idx = self.add_route_config(
                            rc,
                            &format!("{at}.route_config"),
                            RouteConfigSource::Inline {
                                listener: listener.to_string(),
                            },
                            set,
                        );
                        nf.route_config = Some(idx);
                    }
                    Some(http_connection_manager::RouteSpecifier::Rds(rds)) => {
                        let idx = self.route_configs.iter().position(|r| {
                            r.source == RouteConfigSource::Rds && r.name == rds.route_config_name
                        });
                        self.references.push(Reference {
                            kind: RefKind::RouteConfig,
                            name: rds.route_config_name.clone(),
                            from: format!("{at}.rds.route_config_name"),
                            resolved: idx.is_some(),
                            fatal: false,
                        });
                        nf.route_config = idx;
                    }
                    _ => {}
                }
            } else if let Some(tcp) = unpack::<TcpProxy>(any) {
                let at = format!("{fpath}.typed_config");
                match &tcp.cluster_specifier {
                    Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => {
                        self.cluster_ref(c, format!("{at}.cluster"), set, false)
                    }
                    Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
                        for (i, c) in w.clusters.iter().enumerate() {
                            self.cluster_ref(
                                &c.name,
                                format!("{at}.weighted_clusters.clusters[{i}].name"),
                                set,
                                false,
                            );
                        }
                    }
                    None => {}
                }
            }
            filters.push(nf);
        }
        FilterChainModel {
            name: fc.name.clone(),
            path: path.to_string(),
            transport_socket,
            filters,
        }
    }

    fn cluster(
        &mut self,
        c: &Cluster,
        path: &str,
        set: &ResourceSet,
        static_bootstrap: bool,
    ) -> ClusterModel {
        let eds = eds_service_name(c);
        let mut hosts = c
            .load_assignment
            .as_ref()
            .map(|la| la.endpoints.iter().map(|e| e.lb_endpoints.len()).sum())
            .unwrap_or(0);
        if let Some(svc) = &eds {
            let found = set.endpoints_for(svc);
            if let Some(cla) = found {
                hosts = cla
                    .value
                    .endpoints
                    .iter()
                    .map(|e| e.lb_endpoints.len())
                    .sum();
            }
            self.references.push(Reference {
                kind: RefKind::Endpoints,
                name: svc.clone(),
                from: format!("{path}.eds_cluster_config"),
                resolved: found.is_some(),
                fatal: false,
            });
        }
        if let Some(ts) = &c.transport_socket {
            self.transport_socket_secrets(
                ts,
                &format!("{path}.transport_socket"),
                set,
                static_bootstrap,
            );
        }
        for (i, m) in c.transport_socket_matches.iter().enumerate() {
            if let Some(ts) = &m.transport_socket {
                self.transport_socket_secrets(
                    ts,
                    &format!("{path}.transport_socket_matches[{i}].transport_socket"),
                    set,
                    static_bootstrap,
                );
            }
        }
        ClusterModel {
            name: c.name.clone(),
            path: path.to_string(),
            discovery: discovery_name(c),
            eds_service_name: eds,
            hosts,
        }
    }

    fn transport_socket_secrets(
        &mut self,
        ts: &TransportSocket,
        path: &str,
        set: &ResourceSet,
        static_bootstrap: bool,
    ) {
        let Some(common) = common_tls_context(ts) else {
            return;
        };
        let at = format!("{path}.typed_config");
        for (name, from, sds) in sds_configs(&common, &format!("{at}.common_tls_context")) {
            let resolved = set.secret(&name).is_some();
            // Without a config source the name can only mean a static secret (Envoy refuses the
            // configuration otherwise); with one, the control plane would send it later.
            let fatal = !resolved && !sds && static_bootstrap;
            self.references.push(Reference {
                kind: RefKind::Secret,
                name,
                from,
                resolved,
                fatal,
            });
        }
    }
}

/// A TLS transport socket's common context, downstream or upstream.
fn common_tls_context(ts: &TransportSocket) -> Option<CommonTlsContext> {
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
        return None;
    };
    if let Some(d) = unpack::<DownstreamTlsContext>(any) {
        d.common_tls_context
    } else {
        unpack::<UpstreamTlsContext>(any).and_then(|u| u.common_tls_context)
    }
}

/// The SDS secrets a transport socket's TLS context names, with their config sources.
pub fn sds_secret_configs(ts: &TransportSocket) -> Vec<SdsSecretConfig> {
    let Some(c) = common_tls_context(ts) else {
        return vec![];
    };
    let mut out = c.tls_certificate_sds_secret_configs.clone();
    match c.validation_context_type {
        Some(common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(s)) => {
            out.push(s)
        }
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(cv)) => {
            out.extend(cv.validation_context_sds_secret_config)
        }
        _ => {}
    }
    out
}

/// Every transport socket of a listener (its filter chains') or a cluster (its own and its
/// matches').
pub fn listener_transport_sockets(l: &Listener) -> impl Iterator<Item = &TransportSocket> {
    l.filter_chains
        .iter()
        .chain(l.default_filter_chain.as_ref())
        .filter_map(|fc| fc.transport_socket.as_ref())
}

pub fn cluster_transport_sockets(c: &Cluster) -> impl Iterator<Item = &TransportSocket> {
    c.transport_socket.iter().chain(
        c.transport_socket_matches
            .iter()
            .filter_map(|m| m.transport_socket.as_ref()),
    )
}

/// Every SDS secret name a TLS context refers to: (name, path, has a config source).
fn sds_configs(c: &CommonTlsContext, at: &str) -> Vec<(String, String, bool)> {
    let mut out = vec![];
    let mut push =
        |s: &SdsSecretConfig, p: String| out.push((s.name.clone(), p, s.sds_config.is_some()));
    for (i, s) in c.tls_certificate_sds_secret_configs.iter().enumerate() {
        push(s, format!("{at}.tls_certificate_sds_secret_configs[{i}]"));
    }
    match &c.validation_context_type {
        Some(common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(s)) => {
            push(s, format!("{at}.validation_context_sds_secret_config"))
        }
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(cv)) => {
            if let Some(s) = &cv.validation_context_sds_secret_config {
                push(
                    s,
                    format!(
                        "{at}.combined_validation_context.validation_context_sds_secret_config"
                    ),
                );
            }
        }
        _ => {}
    }
    out
}

impl Origin {
    pub fn label(&self) -> &'static str {
        if self.is_static() {
            "static"
        } else {
            "dynamic"
        }
    }
}
