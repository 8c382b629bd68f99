//! Writing configuration back out: Envoy's `/config_dump` JSON (loading it again gives the same
//! resources), and a standalone bootstrap that stock Envoy runs, so a production sidecar's
//! configuration can be replayed on a laptop.

use crate::model::{effective_type_url, unpack};
use crate::resources::{Origin, Resource, ResourceSet};
use pilotfish_api::pb::envoy::admin::v3::{self as admin, *};
use pilotfish_api::pb::envoy::config::bootstrap::v3::bootstrap::StaticResources;
use pilotfish_api::pb::envoy::config::cluster::v3::{cluster, Cluster};
use pilotfish_api::pb::envoy::config::core::v3::{
    data_source, transport_socket, DataSource, TransportSocket,
};
use pilotfish_api::pb::envoy::config::listener::v3::{filter, FilterChain, Listener};
use pilotfish_api::pb::envoy::config::route::v3::RouteConfiguration;
use pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, http_filter, HttpConnectionManager,
};
use pilotfish_api::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, secret, CommonTlsContext, DownstreamTlsContext, Secret, TlsCertificate,
    UpstreamTlsContext,
};
use pilotfish_api::pb::google::protobuf::Any;
use pilotfish_api::prost_reflect::{DynamicMessage, SerializeOptions};
use pilotfish_api::{descriptor_pool, type_url_message_name, OPAQUE_ANY_TYPE};
use prost::{Message, Name};
use serde_json::Value;

fn pack<T: Message + Name>(v: &T) -> Any {
    Any {
        type_url: T::type_url(),
        value: v.encode_to_vec(),
    }
}

/// A typed message as Envoy prints it: proto field names, defaults left out, whole doubles
/// without `.0`, opaque types restored to their original JSON.
pub fn to_json<T: Message + Name>(v: &T) -> Value {
    let desc = descriptor_pool()
        .get_message_by_name(&T::full_name())
        .expect("type in pool");
    let dm = DynamicMessage::decode(desc, v.encode_to_vec().as_slice()).expect("re-decode");
    let opts = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true);
    let mut value = dm
        .serialize_with_options(serde_json::value::Serializer, &opts)
        .expect("serialize");
    restore(&mut value);
    value
}

fn restore(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map.get("@type").and_then(Value::as_str) == Some(OPAQUE_ANY_TYPE) {
                let url = map.get("type_url").cloned().unwrap_or(Value::Null);
                let json = map.remove("json").unwrap_or(Value::Null);
                map.clear();
                map.insert("@type".into(), url);
                if let Value::Object(inner) = json {
                    map.extend(inner);
                }
                map.values_mut().for_each(restore);
                return;
            }
            map.values_mut().for_each(restore);
        }
        Value::Array(items) => items.iter_mut().for_each(restore),
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| !n.is_i64() && !n.is_u64()) {
                if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 {
                    *v = Value::from(f as i64);
                }
            }
        }
        _ => {}
    }
}

fn dynamic(
    origin: &Origin,
) -> Option<(
    String,
    Option<pilotfish_api::pb::google::protobuf::Timestamp>,
)> {
    match origin {
        Origin::Static => None,
        Origin::Dynamic {
            version_info,
            last_updated,
        } => Some((version_info.clone(), *last_updated)),
    }
}

/// The configuration as Envoy's `/config_dump` shows it.
pub fn config_dump(set: &ResourceSet, include_eds: bool) -> ConfigDump {
    let mut configs = vec![pack(&BootstrapConfigDump {
        bootstrap: Some(set.bootstrap.clone()),
        last_updated: None,
    })];
    let mut clusters = ClustersConfigDump::default();
    for c in &set.clusters {
        match dynamic(&c.origin) {
            None => clusters
                .static_clusters
                .push(clusters_config_dump::StaticCluster {
                    cluster: Some(pack(&c.value)),
                    last_updated: c.last_updated,
                }),
            Some((version_info, last_updated)) => {
                clusters
                    .dynamic_active_clusters
                    .push(clusters_config_dump::DynamicCluster {
                        version_info,
                        cluster: Some(pack(&c.value)),
                        last_updated,
                        ..Default::default()
                    })
            }
        }
    }
    for c in &set.warming_clusters {
        if let Some((version_info, last_updated)) = dynamic(&c.origin) {
            clusters
                .dynamic_warming_clusters
                .push(clusters_config_dump::DynamicCluster {
                    version_info,
                    cluster: Some(pack(&c.value)),
                    last_updated,
                    ..Default::default()
                });
        }
    }
    configs.push(pack(&clusters));
    let mut listeners = ListenersConfigDump::default();
    for l in &set.listeners {
        match dynamic(&l.origin) {
            None => listeners
                .static_listeners
                .push(listeners_config_dump::StaticListener {
                    listener: Some(pack(&l.value)),
                    last_updated: l.last_updated,
                }),
            Some((version_info, last_updated)) => {
                listeners
                    .dynamic_listeners
                    .push(listeners_config_dump::DynamicListener {
                        name: l.name.clone(),
                        active_state: Some(listeners_config_dump::DynamicListenerState {
                            version_info,
                            listener: Some(pack(&l.value)),
                            last_updated,
                        }),
                        ..Default::default()
                    })
            }
        }
    }
    // Warming listeners: beside the version in service, if there is one.
    for l in &set.warming_listeners {
        let Some((version_info, last_updated)) = dynamic(&l.origin) else {
            continue;
        };
        let warming_state = Some(listeners_config_dump::DynamicListenerState {
            version_info,
            listener: Some(pack(&l.value)),
            last_updated,
        });
        match listeners
            .dynamic_listeners
            .iter_mut()
            .find(|d| d.name == l.name)
        {
            Some(d) => d.warming_state = warming_state,
            None => listeners
                .dynamic_listeners
                .push(listeners_config_dump::DynamicListener {
                    name: l.name.clone(),
                    warming_state,
                    ..Default::default()
                }),
        }
    }
    // Refused updates: the listener as it was sent and why it was refused.
    for e in &set.update_errors {
        if pilotfish_api::type_url_message_name(&e.type_url) != Listener::full_name() {
            continue;
        }
        let error_state = Some(UpdateFailureState {
            failed_configuration: Some(e.failed_configuration.clone()),
            last_update_attempt: e.last_update_attempt,
            details: e.details.clone(),
            version_info: String::new(),
        });
        // A listener in service whose update was refused shows both, in one entry.
        match listeners
            .dynamic_listeners
            .iter_mut()
            .find(|l| !e.name.is_empty() && l.name == e.name)
        {
            Some(l) => l.error_state = error_state,
            None => listeners
                .dynamic_listeners
                .push(listeners_config_dump::DynamicListener {
                    name: e.name.clone(),
                    error_state,
                    ..Default::default()
                }),
        }
    }
    configs.push(pack(&listeners));
    let mut routes = RoutesConfigDump::default();
    for r in &set.route_configs {
        match dynamic(&r.origin) {
            None => routes
                .static_route_configs
                .push(routes_config_dump::StaticRouteConfig {
                    route_config: Some(pack(&r.value)),
                    last_updated: r.last_updated,
                }),
            Some((version_info, last_updated)) => {
                routes
                    .dynamic_route_configs
                    .push(routes_config_dump::DynamicRouteConfig {
                        version_info,
                        route_config: Some(pack(&r.value)),
                        last_updated,
                        ..Default::default()
                    })
            }
        }
    }
    configs.push(pack(&routes));
    let mut secrets = SecretsConfigDump::default();
    for s in &set.secrets {
        match dynamic(&s.origin) {
            None => secrets
                .static_secrets
                .push(secrets_config_dump::StaticSecret {
                    name: s.name.clone(),
                    last_updated: s.last_updated,
                    secret: Some(pack(&s.value)),
                }),
            Some((version_info, last_updated)) => {
                secrets
                    .dynamic_active_secrets
                    .push(secrets_config_dump::DynamicSecret {
                        name: s.name.clone(),
                        version_info,
                        last_updated,
                        secret: Some(pack(&s.value)),
                        ..Default::default()
                    })
            }
        }
    }
    configs.push(pack(&secrets));
    if include_eds {
        let mut eps = EndpointsConfigDump::default();
        for e in &set.endpoints {
            match dynamic(&e.origin) {
                None => {
                    eps.static_endpoint_configs
                        .push(endpoints_config_dump::StaticEndpointConfig {
                            endpoint_config: Some(pack(&e.value)),
                            last_updated: e.last_updated,
                        })
                }
                Some((version_info, last_updated)) => eps.dynamic_endpoint_configs.push(
                    endpoints_config_dump::DynamicEndpointConfig {
                        version_info,
                        endpoint_config: Some(pack(&e.value)),
                        last_updated,
                        ..Default::default()
                    },
                ),
            }
        }
        configs.push(pack(&eps));
    }
    admin::ConfigDump { configs }
}

pub fn config_dump_json(set: &ResourceSet, include_eds: bool) -> String {
    serde_json::to_string_pretty(&to_json(&config_dump(set, include_eds))).expect("json")
}

/// Why a piece of configuration was left out of (or changed in) the standalone bootstrap.
struct Notes(Vec<String>);

/// Extensions only Istio's proxy build has: its own types, and Wasm plugins compiled into its
/// null VM. Stock Envoy refuses both.
fn istio_only(any: &Any) -> Option<String> {
    let ty = effective_type_url(any);
    let name = type_url_message_name(&ty);
    if name.starts_with("istio.") || name.starts_with("envoy.tcp.metadataexchange.") {
        return Some(format!("{name} is an Istio proxy extension"));
    }
    let code = crate::model::null_vm_plugin(any)?;
    Some(format!(
        "Wasm plugin '{code}' runs in Istio's null VM, which stock Envoy does not have"
    ))
}

/// A bootstrap with every resource static: RDS route configurations inlined into their HTTP
/// connection managers, EDS clusters turned STATIC with their endpoints, SDS secrets made static,
/// Istio-only extensions dropped. Returns the bootstrap and a note for each change.
pub fn standalone_bootstrap(
    set: &ResourceSet,
) -> (
    pilotfish_api::pb::envoy::config::bootstrap::v3::Bootstrap,
    Vec<String>,
) {
    let mut notes = Notes(vec![]);
    let mut b = set.bootstrap.clone();
    if b.dynamic_resources.take().is_some() {
        notes
            .0
            .push("bootstrap.dynamic_resources: removed; every resource below is static".into());
    }
    let mut sr = StaticResources::default();
    for (i, l) in set.listeners.iter().enumerate() {
        sr.listeners.push(static_listener(
            l,
            set,
            &format!("static_resources.listeners[{i}]"),
            &mut notes,
        ));
    }
    for (i, c) in set.clusters.iter().enumerate() {
        sr.clusters.push(static_cluster(
            c,
            set,
            &format!("static_resources.clusters[{i}]"),
            &mut notes,
        ));
    }
    for s in &set.secrets {
        sr.secrets.push(static_secret(s, &mut notes));
    }
    b.static_resources = Some(sr);
    (b, notes.0)
}

pub fn standalone_bootstrap_yaml(set: &ResourceSet) -> String {
    let (b, notes) = standalone_bootstrap(set);
    let mut out = String::from("# Standalone Envoy bootstrap written by `pilotfish bootstrap`.\n");
    out.push_str("# Changes from the loaded configuration:\n");
    for n in &notes {
        out.push_str(&format!("#   - {n}\n"));
    }
    out.push_str(&serde_yaml_ng::to_string(&to_json(&b)).expect("yaml"));
    out
}

fn static_listener(
    l: &Resource<Listener>,
    set: &ResourceSet,
    at: &str,
    notes: &mut Notes,
) -> Listener {
    let mut v = l.value.clone();
    for (i, fc) in v.filter_chains.iter_mut().enumerate() {
        static_filter_chain(fc, set, &format!("{at}.filter_chains[{i}]"), &l.name, notes);
    }
    if let Some(fc) = v.default_filter_chain.as_mut() {
        static_filter_chain(
            fc,
            set,
            &format!("{at}.default_filter_chain"),
            &l.name,
            notes,
        );
    }
    v
}

fn static_filter_chain(
    fc: &mut FilterChain,
    set: &ResourceSet,
    at: &str,
    listener: &str,
    notes: &mut Notes,
) {
    if let Some(ts) = fc.transport_socket.as_mut() {
        static_transport_socket(ts);
    }
    let mut kept = vec![];
    for (i, mut f) in std::mem::take(&mut fc.filters).into_iter().enumerate() {
        let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            kept.push(f);
            continue;
        };
        if let Some(why) = istio_only(any) {
            notes.0.push(format!(
                "{at}.filters[{i}] ({}, listener '{listener}'): dropped: {why}",
                f.name
            ));
            continue;
        }
        if let Some(mut hcm) = unpack::<HttpConnectionManager>(any) {
            if let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = &hcm.route_specifier {
                let name = rds.route_config_name.clone();
                let rc = set
                    .route_configs
                    .iter()
                    .find(|r| r.name == name && !r.origin.is_static())
                    .or_else(|| set.route_config(&name))
                    .map(|r| r.value.clone());
                let rc = rc.unwrap_or_else(|| {
                    notes.0.push(format!("{at}.filters[{i}]: RDS route configuration '{name}' is not in the dump; an empty one stands in"));
                    RouteConfiguration { name: name.clone(), ..Default::default() }
                });
                hcm.route_specifier =
                    Some(http_connection_manager::RouteSpecifier::RouteConfig(rc));
            }
            let mut hf_kept = vec![];
            for (j, hf) in std::mem::take(&mut hcm.http_filters)
                .into_iter()
                .enumerate()
            {
                if let Some(http_filter::ConfigType::TypedConfig(a)) = &hf.config_type {
                    if let Some(why) = istio_only(a) {
                        notes.0.push(format!("{at}.filters[{i}].typed_config.http_filters[{j}] ({}, listener '{listener}'): dropped: {why}", hf.name));
                        continue;
                    }
                }
                hf_kept.push(hf);
            }
            hcm.http_filters = hf_kept;
            f.config_type = Some(filter::ConfigType::TypedConfig(pack(&hcm)));
        }
        kept.push(f);
    }
    fc.filters = kept;
}

/// SDS names keep pointing at the same secrets, now static ones.
fn static_transport_socket(ts: &mut TransportSocket) {
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
        return;
    };
    let fix = |c: &mut CommonTlsContext| {
        for s in &mut c.tls_certificate_sds_secret_configs {
            s.sds_config = None;
        }
        match &mut c.validation_context_type {
            Some(common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(
                s,
            )) => s.sds_config = None,
            Some(common_tls_context::ValidationContextType::CombinedValidationContext(cv)) => {
                if let Some(s) = cv.validation_context_sds_secret_config.as_mut() {
                    s.sds_config = None;
                }
            }
            _ => {}
        }
    };
    if let Some(mut d) = unpack::<DownstreamTlsContext>(any) {
        if let Some(c) = d.common_tls_context.as_mut() {
            fix(c);
        }
        ts.config_type = Some(transport_socket::ConfigType::TypedConfig(pack(&d)));
    } else if let Some(mut u) = unpack::<UpstreamTlsContext>(any) {
        if let Some(c) = u.common_tls_context.as_mut() {
            fix(c);
        }
        ts.config_type = Some(transport_socket::ConfigType::TypedConfig(pack(&u)));
    }
}

fn static_cluster(
    c: &Resource<Cluster>,
    set: &ResourceSet,
    at: &str,
    notes: &mut Notes,
) -> Cluster {
    let mut v = c.value.clone();
    if let Some(svc) = crate::model::eds_service_name(&v) {
        let cla = set.endpoints_for(&svc).map(|e| e.value.clone()).unwrap_or_else(|| {
            notes.0.push(format!("{at} ('{}'): EDS endpoints '{svc}' are not in the dump; the cluster has no hosts", c.name));
            Default::default()
        });
        let mut cla = cla;
        cla.cluster_name = v.name.clone();
        v.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        ));
        v.eds_cluster_config = None;
        v.load_assignment = Some(cla);
    }
    if let Some(ts) = v.transport_socket.as_mut() {
        static_transport_socket(ts);
    }
    for m in &mut v.transport_socket_matches {
        if let Some(ts) = m.transport_socket.as_mut() {
            static_transport_socket(ts);
        }
    }
    let mut kept = vec![];
    for (i, f) in std::mem::take(&mut v.filters).into_iter().enumerate() {
        if let Some(why) = f.typed_config.as_ref().and_then(istio_only) {
            notes.0.push(format!(
                "{at}.filters[{i}] ({}, cluster '{}'): dropped: {why}",
                f.name, c.name
            ));
            continue;
        }
        kept.push(f);
    }
    v.filters = kept;
    v
}

const REPLAY_CERT: &str = include_str!("replay/replay.cert.pem");
const REPLAY_KEY: &str = include_str!("replay/replay.key.pem");

fn static_secret(s: &Resource<Secret>, notes: &mut Notes) -> Secret {
    let mut v = s.value.clone();
    v.name = s.name.clone();
    if let Some(secret::Type::TlsCertificate(cert)) = &v.r#type {
        let redacted = matches!(
            cert.private_key.as_ref().and_then(|k| k.specifier.as_ref()),
            Some(data_source::Specifier::InlineBytes(b)) if b.as_slice() == b"[redacted]"
        );
        if redacted {
            notes.0.push(format!(
                "secret '{}': the dump redacted its private key; pilotfish's replay certificate (spiffe://cluster.local/ns/pilotfish/sa/replay) stands in, so peers will not trust it",
                s.name
            ));
            let inline = |t: &str| DataSource {
                specifier: Some(data_source::Specifier::InlineString(t.to_string())),
                ..Default::default()
            };
            v.r#type = Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(inline(REPLAY_CERT)),
                private_key: Some(inline(REPLAY_KEY)),
                ..Default::default()
            }));
        }
    }
    v
}
