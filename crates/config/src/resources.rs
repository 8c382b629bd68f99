//! The resource set: every listener, cluster, route configuration, endpoint assignment and secret
//! of one configuration, as if each had arrived through xDS, whichever form it was loaded from.

use crate::error::ConfigError;
use pilotfish_api::pb::envoy::admin::v3 as admin;
use pilotfish_api::pb::envoy::config::bootstrap::v3::Bootstrap;
use pilotfish_api::pb::envoy::config::cluster::v3::Cluster;
use pilotfish_api::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use pilotfish_api::pb::envoy::config::listener::v3::Listener;
use pilotfish_api::pb::envoy::config::route::v3::RouteConfiguration;
use pilotfish_api::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use pilotfish_api::pb::google::protobuf::{Any, Timestamp};
use prost::{Message, Name};

/// Where a resource came from: the bootstrap's `static_resources`, or (in a dump) an xDS update.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Origin {
    #[default]
    Static,
    Dynamic {
        version_info: String,
        last_updated: Option<Timestamp>,
    },
}

impl Origin {
    pub fn is_static(&self) -> bool {
        matches!(self, Origin::Static)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Resource<T> {
    pub name: String,
    pub origin: Origin,
    /// Where in the loaded document the resource is, for messages about it.
    pub path: String,
    /// When it was loaded (static resources in a dump carry one too).
    pub last_updated: Option<Timestamp>,
    pub value: T,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceSet {
    /// The bootstrap (for a dump, the one inside `BootstrapConfigDump`), `static_resources` included.
    pub bootstrap: Bootstrap,
    pub listeners: Vec<Resource<Listener>>,
    pub clusters: Vec<Resource<Cluster>>,
    /// Route configurations delivered on their own (RDS, or a dump's route configs). Route
    /// configurations inline in an HTTP connection manager stay in their listener.
    pub route_configs: Vec<Resource<RouteConfiguration>>,
    /// Endpoint assignments delivered on their own (EDS). Inline `load_assignment`s stay in their
    /// cluster.
    pub endpoints: Vec<Resource<ClusterLoadAssignment>>,
    pub secrets: Vec<Resource<Secret>>,
    /// Things in the document that are not part of the running configuration (warming or draining
    /// listeners, warming clusters and secrets, update errors): reported, not loaded.
    pub not_active: Vec<String>,
    /// xDS updates refused (NACKed), resource by resource, as Envoy's dump shows them
    /// (`error_state`).
    pub update_errors: Vec<UpdateError>,
    /// Listeners and clusters delivered over xDS and still warming (waiting for their route
    /// configurations or endpoints): not in service, shown by the dump as Envoy shows them
    /// (`warming_state`, `dynamic_warming_clusters`).
    pub warming_listeners: Vec<Resource<Listener>>,
    pub warming_clusters: Vec<Resource<Cluster>>,
}

/// A resource of an xDS response that was refused, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateError {
    pub type_url: String,
    pub name: String,
    pub details: String,
    pub failed_configuration: Any,
    pub last_update_attempt: Option<Timestamp>,
}

impl ResourceSet {
    pub fn from_bootstrap(bootstrap: Bootstrap) -> ResourceSet {
        let mut set = ResourceSet::default();
        if let Some(sr) = &bootstrap.static_resources {
            for (i, l) in sr.listeners.iter().enumerate() {
                // Envoy keeps the first of two static listeners with one name and ignores the rest.
                if !l.name.is_empty() && set.listeners.iter().any(|x| x.name == l.name) {
                    set.not_active.push(format!(
                        "static_resources.listeners[{i}]: a listener named '{}' is already defined; Envoy keeps the first definition and ignores this one, and so does pilotfish",
                        l.name
                    ));
                    continue;
                }
                set.listeners.push(stat(
                    l.name.clone(),
                    format!("static_resources.listeners[{i}]"),
                    l.clone(),
                ));
            }
            for (i, c) in sr.clusters.iter().enumerate() {
                set.clusters.push(stat(
                    c.name.clone(),
                    format!("static_resources.clusters[{i}]"),
                    c.clone(),
                ));
            }
            for (i, s) in sr.secrets.iter().enumerate() {
                set.secrets.push(stat(
                    s.name.clone(),
                    format!("static_resources.secrets[{i}]"),
                    s.clone(),
                ));
            }
            // Envoy lists inline route configurations among its static ones; so do we.
            set.route_configs = inline_route_configs(&set.listeners);
        }
        set.bootstrap = bootstrap;
        set
    }

    pub fn from_config_dump(
        file: &str,
        dump: &admin::ConfigDump,
    ) -> Result<ResourceSet, ConfigError> {
        let mut set = ResourceSet::default();
        for (i, any) in dump.configs.iter().enumerate() {
            let at = format!("configs[{i}]");
            let name = pilotfish_api::type_url_message_name(&any.type_url);
            match name {
                "envoy.admin.v3.BootstrapConfigDump" => {
                    let b: admin::BootstrapConfigDump = decode(file, &at, any)?;
                    set.bootstrap = b.bootstrap.unwrap_or_default();
                }
                "envoy.admin.v3.ListenersConfigDump" => {
                    set.add_listeners(file, &at, decode(file, &at, any)?)?
                }
                "envoy.admin.v3.ClustersConfigDump" => {
                    set.add_clusters(file, &at, decode(file, &at, any)?)?
                }
                "envoy.admin.v3.RoutesConfigDump" => {
                    set.add_routes(file, &at, decode(file, &at, any)?)?
                }
                "envoy.admin.v3.EndpointsConfigDump" => {
                    set.add_endpoints(file, &at, decode(file, &at, any)?)?
                }
                "envoy.admin.v3.SecretsConfigDump" => {
                    set.add_secrets(file, &at, decode(file, &at, any)?)?
                }
                "envoy.admin.v3.ScopedRoutesConfigDump" => {
                    let s: admin::ScopedRoutesConfigDump = decode(file, &at, any)?;
                    if !s.inline_scoped_route_configs.is_empty()
                        || !s.dynamic_scoped_route_configs.is_empty()
                    {
                        set.not_active.push(format!(
                            "{at}: scoped route configurations are not loaded by pilotfish yet"
                        ));
                    }
                }
                other => set.not_active.push(format!(
                    "{at}: {other} is not part of the running configuration"
                )),
            }
        }
        Ok(set)
    }

    fn add_listeners(
        &mut self,
        file: &str,
        at: &str,
        d: admin::ListenersConfigDump,
    ) -> Result<(), ConfigError> {
        for (i, s) in d.static_listeners.iter().enumerate() {
            let path = format!("{at}.static_listeners[{i}].listener");
            let l: Listener = decode_opt(file, &path, &s.listener)?;
            self.listeners.push(Resource {
                name: l.name.clone(),
                origin: Origin::Static,
                path,
                last_updated: s.last_updated,
                value: l,
            });
        }
        for (i, dl) in d.dynamic_listeners.iter().enumerate() {
            let base = format!("{at}.dynamic_listeners[{i}]");
            for (state, what) in [
                (&dl.warming_state, "warming_state"),
                (&dl.draining_state, "draining_state"),
            ] {
                if state.is_some() {
                    self.not_active.push(format!("{base}.{what}: listener '{}' is {} in the dump; only its active state is loaded", dl.name, what.trim_end_matches("_state")));
                }
            }
            if let Some(e) = &dl.error_state {
                self.not_active.push(format!(
                    "{base}.error_state: listener '{}' had a rejected update: {}",
                    dl.name, e.details
                ));
            }
            if let Some(active) = &dl.active_state {
                let path = format!("{base}.active_state.listener");
                let l: Listener = decode_opt(file, &path, &active.listener)?;
                self.listeners.push(Resource {
                    name: l.name.clone(),
                    origin: Origin::Dynamic {
                        version_info: active.version_info.clone(),
                        last_updated: active.last_updated,
                    },
                    path,
                    last_updated: active.last_updated,
                    value: l,
                });
            }
        }
        Ok(())
    }

    fn add_clusters(
        &mut self,
        file: &str,
        at: &str,
        d: admin::ClustersConfigDump,
    ) -> Result<(), ConfigError> {
        for (i, s) in d.static_clusters.iter().enumerate() {
            let path = format!("{at}.static_clusters[{i}].cluster");
            let c: Cluster = decode_opt(file, &path, &s.cluster)?;
            self.clusters.push(Resource {
                name: c.name.clone(),
                origin: Origin::Static,
                path,
                last_updated: s.last_updated,
                value: c,
            });
        }
        for (i, dc) in d.dynamic_active_clusters.iter().enumerate() {
            let path = format!("{at}.dynamic_active_clusters[{i}].cluster");
            let c: Cluster = decode_opt(file, &path, &dc.cluster)?;
            self.clusters.push(Resource {
                name: c.name.clone(),
                origin: Origin::Dynamic {
                    version_info: dc.version_info.clone(),
                    last_updated: dc.last_updated,
                },
                path,
                last_updated: dc.last_updated,
                value: c,
            });
        }
        for (i, _) in d.dynamic_warming_clusters.iter().enumerate() {
            self.not_active.push(format!(
                "{at}.dynamic_warming_clusters[{i}]: a warming cluster is not loaded"
            ));
        }
        Ok(())
    }

    fn add_routes(
        &mut self,
        file: &str,
        at: &str,
        d: admin::RoutesConfigDump,
    ) -> Result<(), ConfigError> {
        for (i, s) in d.static_route_configs.iter().enumerate() {
            let path = format!("{at}.static_route_configs[{i}].route_config");
            let r: RouteConfiguration = decode_opt(file, &path, &s.route_config)?;
            self.route_configs.push(Resource {
                name: r.name.clone(),
                origin: Origin::Static,
                path,
                last_updated: s.last_updated,
                value: r,
            });
        }
        for (i, dr) in d.dynamic_route_configs.iter().enumerate() {
            let path = format!("{at}.dynamic_route_configs[{i}].route_config");
            let r: RouteConfiguration = decode_opt(file, &path, &dr.route_config)?;
            self.route_configs.push(Resource {
                name: r.name.clone(),
                origin: Origin::Dynamic {
                    version_info: dr.version_info.clone(),
                    last_updated: dr.last_updated,
                },
                path,
                last_updated: dr.last_updated,
                value: r,
            });
        }
        Ok(())
    }

    fn add_endpoints(
        &mut self,
        file: &str,
        at: &str,
        d: admin::EndpointsConfigDump,
    ) -> Result<(), ConfigError> {
        for (i, s) in d.static_endpoint_configs.iter().enumerate() {
            let path = format!("{at}.static_endpoint_configs[{i}].endpoint_config");
            let e: ClusterLoadAssignment = decode_opt(file, &path, &s.endpoint_config)?;
            self.endpoints.push(Resource {
                name: e.cluster_name.clone(),
                origin: Origin::Static,
                path,
                last_updated: s.last_updated,
                value: e,
            });
        }
        for (i, de) in d.dynamic_endpoint_configs.iter().enumerate() {
            let path = format!("{at}.dynamic_endpoint_configs[{i}].endpoint_config");
            let e: ClusterLoadAssignment = decode_opt(file, &path, &de.endpoint_config)?;
            self.endpoints.push(Resource {
                name: e.cluster_name.clone(),
                origin: Origin::Dynamic {
                    version_info: de.version_info.clone(),
                    last_updated: de.last_updated,
                },
                path,
                last_updated: de.last_updated,
                value: e,
            });
        }
        Ok(())
    }

    fn add_secrets(
        &mut self,
        file: &str,
        at: &str,
        d: admin::SecretsConfigDump,
    ) -> Result<(), ConfigError> {
        for (i, s) in d.static_secrets.iter().enumerate() {
            let path = format!("{at}.static_secrets[{i}].secret");
            let v: Secret = decode_opt(file, &path, &s.secret)?;
            self.secrets.push(Resource {
                name: s.name.clone(),
                origin: Origin::Static,
                path,
                last_updated: s.last_updated,
                value: v,
            });
        }
        for (i, s) in d.dynamic_active_secrets.iter().enumerate() {
            let path = format!("{at}.dynamic_active_secrets[{i}].secret");
            let v: Secret = decode_opt(file, &path, &s.secret)?;
            self.secrets.push(Resource {
                name: s.name.clone(),
                origin: Origin::Dynamic {
                    version_info: s.version_info.clone(),
                    last_updated: s.last_updated,
                },
                path,
                last_updated: s.last_updated,
                value: v,
            });
        }
        for (i, _) in d.dynamic_warming_secrets.iter().enumerate() {
            self.not_active.push(format!(
                "{at}.dynamic_warming_secrets[{i}]: a warming secret is not loaded"
            ));
        }
        Ok(())
    }

    pub fn listener(&self, name: &str) -> Option<&Resource<Listener>> {
        self.listeners.iter().find(|r| r.name == name)
    }
    pub fn cluster(&self, name: &str) -> Option<&Resource<Cluster>> {
        self.clusters.iter().find(|r| r.name == name)
    }
    pub fn route_config(&self, name: &str) -> Option<&Resource<RouteConfiguration>> {
        self.route_configs.iter().find(|r| r.name == name)
    }
    pub fn endpoints_for(&self, service_name: &str) -> Option<&Resource<ClusterLoadAssignment>> {
        self.endpoints.iter().find(|r| r.name == service_name)
    }
    pub fn secret(&self, name: &str) -> Option<&Resource<Secret>> {
        self.secrets.iter().find(|r| r.name == name)
    }
}

pub(crate) fn inline_route_configs(
    listeners: &[Resource<Listener>],
) -> Vec<Resource<RouteConfiguration>> {
    use pilotfish_api::pb::envoy::config::listener::v3::filter::ConfigType;
    use pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        http_connection_manager::RouteSpecifier, HttpConnectionManager,
    };
    let mut out = vec![];
    for l in listeners {
        let chains = l
            .value
            .filter_chains
            .iter()
            .enumerate()
            .map(|(i, fc)| (format!("{}.filter_chains[{i}]", l.path), fc));
        let default = l
            .value
            .default_filter_chain
            .iter()
            .map(|fc| (format!("{}.default_filter_chain", l.path), fc));
        for (at, fc) in chains.chain(default) {
            for (i, f) in fc.filters.iter().enumerate() {
                let Some(ConfigType::TypedConfig(any)) = &f.config_type else {
                    continue;
                };
                let Some(hcm) = crate::model::unpack::<HttpConnectionManager>(any) else {
                    continue;
                };
                if let Some(RouteSpecifier::RouteConfig(rc)) = hcm.route_specifier {
                    out.push(stat(
                        rc.name.clone(),
                        format!("{at}.filters[{i}].typed_config.route_config"),
                        rc,
                    ));
                }
            }
        }
    }
    out
}

fn stat<T>(name: String, path: String, value: T) -> Resource<T> {
    Resource {
        name,
        origin: Origin::Static,
        path,
        last_updated: None,
        value,
    }
}

fn decode<T: Message + Name + Default>(
    file: &str,
    path: &str,
    any: &Any,
) -> Result<T, ConfigError> {
    let want = T::type_url();
    if pilotfish_api::type_url_message_name(&any.type_url)
        != pilotfish_api::type_url_message_name(&want)
    {
        return Err(ConfigError::new(
            file,
            path,
            format!("expected {want}, found {}", any.type_url),
        ));
    }
    T::decode(any.value.as_slice())
        .map_err(|e| ConfigError::new(file, path, format!("cannot decode {want}: {e}")))
}

fn decode_opt<T: Message + Name + Default>(
    file: &str,
    path: &str,
    any: &Option<Any>,
) -> Result<T, ConfigError> {
    match any {
        Some(a) => decode(file, path, a),
        None => Err(ConfigError::new(file, path, "missing resource")),
    }
}
