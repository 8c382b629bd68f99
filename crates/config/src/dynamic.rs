//! Resources delivered over xDS: each checked as Envoy checks an update (schema and API
//! constraints), then laid over the bootstrap's static resources into the one configuration the
//! proxy runs and the admin API shows, with the same checks across resources as a loaded file.

use crate::error::{ConfigError, ConfigErrors};
use crate::model::Model;
use crate::resources::{Origin, Resource, ResourceSet, UpdateError};
use crate::{validate, Config};
use pilotfish_api::pb::envoy::config::cluster::v3::Cluster;
use pilotfish_api::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use pilotfish_api::pb::envoy::config::listener::v3::Listener;
use pilotfish_api::pb::envoy::config::route::v3::RouteConfiguration;
use pilotfish_api::pb::google::protobuf::{Any, Timestamp};
use pilotfish_api::prost_reflect::DynamicMessage;
use prost::{Message, Name};

/// What a control plane has delivered and this proxy accepted, by type.
#[derive(Debug, Clone, Default)]
pub struct DynamicResources {
    pub listeners: Vec<Resource<Listener>>,
    pub clusters: Vec<Resource<Cluster>>,
    pub route_configs: Vec<Resource<RouteConfiguration>>,
    pub endpoints: Vec<Resource<ClusterLoadAssignment>>,
    /// Resources refused, the latest refusal per type and name.
    pub errors: Vec<UpdateError>,
}

/// What went wrong with a response, resource by resource where a resource can be named:
/// each `Any` that does not pass [`decode_resource`], with its name (read without the checks)
/// and the problems found.
pub fn refused<T: Message + Name + Default>(
    resources: &[Any],
    name_of: impl Fn(&T) -> String,
) -> Vec<UpdateError> {
    let at = Some(now());
    resources
        .iter()
        .enumerate()
        .filter_map(|(i, any)| {
            let Err(e) = decode_resource::<T>("ads", &format!("[{i}]"), any) else {
                return None;
            };
            let name = T::decode(any.value.as_slice())
                .map(|v| name_of(&v))
                .unwrap_or_default();
            Some(UpdateError {
                type_url: any.type_url.clone(),
                name,
                details: e.to_string(),
                failed_configuration: any.clone(),
                last_update_attempt: at,
            })
        })
        .collect()
}

impl DynamicResources {
    /// Records refusals, each replacing an earlier one of the same resource.
    /// An accepted update of a type: its earlier refusals are over (Envoy's dump drops a
    /// resource's `error_state` once an update of it is taken).
    pub fn accepted(&mut self, type_url: &str) {
        self.errors.retain(|x| x.type_url != type_url);
    }

    pub fn refuse(&mut self, errors: Vec<UpdateError>) {
        for e in errors {
            self.errors
                .retain(|x| !(x.type_url == e.type_url && x.name == e.name));
            self.errors.push(e);
        }
    }
}

/// One resource of an xDS response, decoded and checked against the API's constraints. `source`
/// names the stream (`ads`), `path` the resource in it (`clusters[outbound|80||a.b]`).
pub fn decode_resource<T: Message + Name + Default>(
    source: &str,
    path: &str,
    any: &Any,
) -> Result<T, ConfigErrors> {
    let want = T::full_name();
    if pilotfish_api::type_url_message_name(&any.type_url) != want {
        return Err(ConfigError::new(
            source,
            path,
            format!("a {} in a response for {want}", any.type_url),
        )
        .into());
    }
    let desc = pilotfish_api::descriptor_pool()
        .get_message_by_name(&want)
        .expect("Envoy's resource types are in the pool");
    let message = DynamicMessage::decode(desc, any.value.as_slice())
        .map_err(|e| ConfigError::new(source, path, format!("cannot decode: {e}")))?;
    let (findings, _) = validate::check_document(&message);
    ConfigErrors::check(
        source,
        findings
            .into_iter()
            .map(|(p, m)| (crate::walk::join(path, &p), m))
            .collect(),
    )?;
    T::decode(any.value.as_slice())
        .map_err(|e| ConfigError::new(source, path, format!("cannot decode: {e}")).into())
}

/// A resource as the set keeps one delivered by xDS.
pub fn resource<T>(name: String, path: String, version_info: &str, value: T) -> Resource<T> {
    let last_updated = Some(now());
    Resource {
        name,
        origin: Origin::Dynamic {
            version_info: version_info.to_string(),
            last_updated,
        },
        path,
        last_updated,
        value,
    }
}

fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The bootstrap's static resources with the dynamic ones beside them, checked as a whole. A
/// dynamic listener or cluster may not take the name of a static one (Envoy refuses the update:
/// "has static config").
pub fn assemble(base: &Config, dynamic: &DynamicResources) -> Result<Config, ConfigErrors> {
    let mut set: ResourceSet = base.resources.clone();
    let mut errors = vec![];
    for l in &dynamic.listeners {
        if set.listeners.iter().any(|s| s.name == l.name) {
            errors.push(ConfigError::new(
                "ads",
                &l.path,
                format!("listener '{}' has static config", l.name),
            ));
            continue;
        }
        set.listeners.push(l.clone());
    }
    for c in &dynamic.clusters {
        if set.clusters.iter().any(|s| s.name == c.name) {
            errors.push(ConfigError::new(
                "ads",
                &c.path,
                format!("cluster '{}' has static config", c.name),
            ));
            continue;
        }
        set.clusters.push(c.clone());
    }
    // Route configurations inline in the dynamic listeners, as for static ones.
    set.route_configs
        .extend(crate::resources::inline_route_configs(
            &set.listeners[base.resources.listeners.len()..],
        ));
    set.route_configs
        .extend(dynamic.route_configs.iter().cloned());
    set.endpoints.extend(dynamic.endpoints.iter().cloned());
    set.update_errors = dynamic.errors.clone();
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    // References a control plane has yet to fill (a route to a cluster not sent) are what Envoy
    // runs with too: not fatal, as in a dump.
    let model = Model::build(&set, false);
    ConfigErrors::check("ads", validate::check_resources(&set, &model))?;
    Ok(Config {
        resources: set,
        model,
        ..base.clone()
    })
}
