//! Envoy v3 configuration, loaded: a bootstrap or a `/config_dump` (YAML or JSON) becomes typed
//! Envoy protobuf messages, then one [`ResourceSet`] (as if every resource had come through xDS),
//! then the resolved [`Model`]. Loading checks what Envoy checks and lists what pilotfish does not
//! implement yet ([`coverage`]). [`output`] writes the configuration back out as a config dump or a
//! standalone bootstrap.

pub mod coverage;
pub mod dynamic;
pub mod error;
pub mod istio;
pub mod model;
pub mod output;
pub mod parse;
mod pgv;
pub mod resources;
pub mod summary;
pub mod validate;
pub mod walk;

pub use error::{ConfigError, ConfigErrors};
pub use model::Model;
pub use parse::{DocumentKind, Format};
pub use resources::ResourceSet;

use pilotfish_api::pb::envoy::admin::v3::ConfigDump;
use pilotfish_api::pb::envoy::config::bootstrap::v3::Bootstrap;
use prost::Message as _;
use std::collections::BTreeSet;
use std::path::Path;

/// A loaded configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: String,
    pub kind: DocumentKind,
    pub format: Format,
    pub resources: ResourceSet,
    pub model: Model,
    /// Type URLs kept as opaque JSON (no schema in pilotfish).
    pub opaque_types: BTreeSet<String>,
    /// Deprecated API fields the configuration sets; Envoy warns about each at start-up.
    pub deprecated: Vec<Deprecated>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deprecated {
    pub field: String,
    pub count: usize,
    pub example: String,
}

impl Config {
    /// Non-fatal findings: dangling references, opaque types, redacted keys, inactive resources.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = vec![];
        for t in &self.opaque_types {
            w.push(format!(
                "{t}: no schema known to pilotfish; kept as opaque JSON, not interpreted"
            ));
        }
        for r in &self.model.references {
            if !r.resolved && !r.fatal {
                w.push(format!(
                    "{}: {} '{}' is not in this configuration",
                    r.from,
                    r.kind.label(),
                    r.name
                ));
            }
        }
        for s in &self.model.redacted_secrets {
            w.push(format!("secret '{s}': the dump redacted its private key; TLS with this certificate cannot work until the real key is supplied"));
        }
        w.extend(self.resources.not_active.iter().cloned());
        for d in &self.deprecated {
            w.push(format!(
                "deprecated field {} is set {} time(s), e.g. {} (Envoy warns about it too)",
                d.field, d.count, d.example
            ));
        }
        w
    }
}

/// Lets go of what reading configuration keeps for the next read: the descriptor pool and the
/// constraint checks' caches over it. A proxy calls it once its configuration is loaded; the next
/// read (an admin dump, an update) builds them again.
pub fn release_load_caches() {
    pgv::release();
    pilotfish_api::release_descriptor_pool();
}

pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(&file, "", format!("cannot read: {e}")))?;
    load_str(&file, &text, None)
}

/// Loads one Envoy message of type `T` (a route configuration for `route-check`, say) with the
/// same checks as a whole configuration: syntax, schema, API constraints, regexes.
pub fn load_message<T: prost::Message + prost::Name + Default>(
    file: &str,
    text: &str,
) -> Result<T, ConfigErrors> {
    load_message_as(file, text, Format::detect(file, text))
}

fn load_message_as<T: prost::Message + prost::Name + Default>(
    file: &str,
    text: &str,
    format: Format,
) -> Result<T, ConfigErrors> {
    let message = parse::parse_as(file, text, format, &T::full_name())?;
    ConfigErrors::check(file, validate::check_document(&message).0)?;
    message
        .transcode_to()
        .map_err(|e| ConfigError::new(file, "", e.to_string()).into())
}

/// Loads a bootstrap with `--config-yaml` laid over it, as Envoy does: protobuf merge semantics
/// (set scalars replace, messages merge, repeated fields append).
pub fn load_with_overlay(file: &str, text: &str, overlay: &str) -> Result<Config, ConfigErrors> {
    use prost::Message;
    if DocumentKind::detect(text) != DocumentKind::Bootstrap {
        return Err(ConfigError::new(
            file,
            "",
            "--config-yaml merges into a bootstrap; this file is a config dump",
        )
        .into());
    }
    let mut base: Bootstrap = load_message(file, text)?;
    let over: Bootstrap = load_message_as("--config-yaml", overlay, Format::Yaml)?;
    base.merge(over.encode_to_vec().as_slice())
        .map_err(|e| ConfigError::new(file, "", e.to_string()))?;
    let merged = serde_json::to_string(&output::to_json(&base)).expect("json");
    load_str(
        &format!("{file} with --config-yaml"),
        &merged,
        Some(DocumentKind::Bootstrap),
    )
}

/// Loads `text`; `file` names it in messages. The format follows the name's extension (else the
/// content); `kind` is detected when not given.
pub fn load_str(
    file: &str,
    text: &str,
    kind: Option<DocumentKind>,
) -> Result<Config, ConfigErrors> {
    load_str_as(file, text, kind, Format::detect(file, text))
}

/// `envoy --config-yaml`: the configuration as a YAML string (JSON being YAML too).
pub fn load_config_yaml(text: &str) -> Result<Config, ConfigErrors> {
    load_str_as("--config-yaml", text, None, Format::Yaml)
}

fn load_str_as(
    file: &str,
    text: &str,
    kind: Option<DocumentKind>,
    format: Format,
) -> Result<Config, ConfigErrors> {
    let kind = kind.unwrap_or_else(|| DocumentKind::detect(text));
    // Reading goes through a tree of dynamic messages many times the size of what is kept. Built
    // on a thread of its own (its own allocator arena under glibc), that tree's memory is given
    // back whole when it goes, instead of staying between the pages the kept configuration
    // landed on: with 10,000 services that was a fifth of the proxy's memory.
    let read = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("config-read".into())
            // As deep as the main thread's: nesting in a document is the input's to choose.
            .stack_size(8 << 20)
            .spawn_scoped(s, || read_document(file, text, format, kind))
            .expect("a thread to read the configuration")
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?;
    let decode_error = |e: prost::DecodeError| ConfigError::new(file, "", e.to_string());
    let resources = match kind {
        DocumentKind::Bootstrap => {
            ResourceSet::from_bootstrap(Bootstrap::decode(&read.bytes[..]).map_err(decode_error)?)
        }
        DocumentKind::ConfigDump => {
            let d = ConfigDump::decode(&read.bytes[..]).map_err(decode_error)?;
            ResourceSet::from_config_dump(file, &d)?
        }
    };
    let deprecated_uses = read.deprecated_uses;
    let model = Model::build(&resources, kind == DocumentKind::Bootstrap);
    ConfigErrors::check(file, validate::check_resources(&resources, &model))?;
    let mut deprecated: Vec<Deprecated> = vec![];
    for (path, field) in deprecated_uses {
        match deprecated.iter_mut().find(|d| d.field == field) {
            Some(d) => d.count += 1,
            None => deprecated.push(Deprecated {
                field,
                count: 1,
                example: path,
            }),
        }
    }
    Ok(Config {
        file: file.to_string(),
        kind,
        format,
        resources,
        model,
        opaque_types: read.opaque_types,
        deprecated,
    })
}

/// A document read and checked against the API, as the protobuf encoding of its message.
struct Read {
    bytes: Vec<u8>,
    opaque_types: BTreeSet<String>,
    deprecated_uses: Vec<(String, String)>,
}

fn read_document(
    file: &str,
    text: &str,
    format: Format,
    kind: DocumentKind,
) -> Result<Read, ConfigErrors> {
    let parsed = parse::parse(file, text, format, kind)?;
    let (findings, deprecated_uses) = validate::check_document(&parsed.message);
    ConfigErrors::check(file, findings)?;
    Ok(Read {
        bytes: parsed.message.encode_to_vec(),
        opaque_types: parsed.opaque_types,
        deprecated_uses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
static_resources:
  listeners:
  - name: l
    address: { socket_address: { address: 127.0.0.1, port_value: 10000 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: s
          ROUTES
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  clusters:
  - name: c
    type: EDS
    eds_cluster_config: { service_name: svc, eds_config: { ads: {} } }
"#;

    fn load(routes: &str) -> Result<Config, ConfigErrors> {
        load_str("t.yaml", &BASE.replace("ROUTES", routes), None)
    }

    fn first_error(r: Result<Config, ConfigErrors>) -> ConfigError {
        r.expect_err("should be rejected").0.remove(0)
    }

    #[test]
    fn rds_outside_the_file_is_a_warning_not_an_error() {
        let cfg = load("rds: { route_config_name: r1, config_source: { ads: {} } }").unwrap();
        let w = cfg.warnings();
        assert!(
            w.iter()
                .any(|w| w.contains("route configuration (RDS) 'r1' is not in this configuration")),
            "{w:?}"
        );
        assert!(
            w.iter().any(|w| w.contains("endpoints (EDS) 'svc'")),
            "{w:?}"
        );
    }

    #[test]
    fn inline_routes_validate_clusters_by_default_and_can_opt_out() {
        let routes = |extra: &str| {
            format!("route_config: {{ name: r{extra}, virtual_hosts: [{{ name: v, domains: ['*'], routes: [{{ match: {{ prefix: / }}, route: {{ cluster: nope }} }}] }}] }}")
        };
        let e = first_error(load(&routes("")));
        assert!(e.message.contains("unknown cluster 'nope'"), "{e}");
        assert!(e.path.ends_with("routes[0].route.cluster"), "{e}");
        let cfg = load(&routes(", validate_clusters: false")).unwrap();
        assert!(cfg
            .warnings()
            .iter()
            .any(|w| w.contains("cluster 'nope' is not in this configuration")));
    }

    #[test]
    fn parse_errors_name_the_path_inside_anys() {
        let e = first_error(load(
            "route_config: { name: r, virtual_hosts: [{ name: v, domainz: ['*'] }] }",
        ));
        assert_eq!(e.path, "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].domainz");
        assert_eq!(e.message, "unknown field 'domainz'");
        assert!(e.line.is_some());
    }

    #[test]
    fn camel_case_field_names_are_accepted_as_in_envoy() {
        let cfg = load("routeConfig: { name: r, virtualHosts: [{ name: v, domains: ['*'], routes: [{ match: { prefix: / }, directResponse: { status: 200 } }] }] }").unwrap();
        assert_eq!(cfg.model.route_configs[0].routes, 1);
    }

    #[test]
    fn json_and_yaml_give_the_same_resources() {
        let yaml = BASE.replace(
            "ROUTES",
            "rds: { route_config_name: r1, config_source: { ads: {} } }",
        );
        let from_yaml = load_str("a.yaml", &yaml, None).unwrap();
        let as_json = output::config_dump_json(&from_yaml.resources, true);
        let from_json = load_str("a.json", &as_json, None).unwrap();
        assert_eq!(from_json.kind, DocumentKind::ConfigDump);
        assert_eq!(
            from_json.resources.listeners[0].value,
            from_yaml.resources.listeners[0].value
        );
    }

    #[test]
    fn constraints_from_the_api_are_enforced() {
        for (routes, path_end, msg) in [
            ("route_config: { name: r, virtual_hosts: [{ name: '', domains: ['*'] }] }", "virtual_hosts[0].name", "at least 1 characters"),
            ("route_config: { name: r, virtual_hosts: [{ name: v, domains: ['*'], routes: [{ match: {}, route: { cluster: c } }] }] }", "routes[0].match", "one of"),
            ("route_config: { name: r, virtual_hosts: [{ name: v, domains: ['*'], routes: [{ match: { prefix: / }, direct_response: { status: 99 } }] }] }", "direct_response.status", "greater than or equal to 200"),
            ("route_config: { name: r, virtual_hosts: [{ name: v, domains: ['*'], routes: [{ match: { prefix: / }, route: { cluster: c, timeout: -2s } }] }] }", "route.timeout", ""),
        ] {
            let r = load(routes);
            if msg.is_empty() {
                // Envoy takes a negative route timeout literally (no constraint); so do we.
                assert!(r.is_ok() || !r.as_ref().unwrap_err().0[0].path.ends_with(path_end));
                continue;
            }
            let e = first_error(r);
            assert!(e.path.ends_with(path_end), "{e}");
            assert!(e.message.contains(msg), "{e}");
        }
    }

    #[test]
    fn unknown_envoy_types_fail_but_vendor_types_stay_opaque() {
        let doc = |t: &str| {
            BASE.replace("ROUTES", "route_config: { name: r }").replace(
                "- name: envoy.filters.http.router\n            typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }",
                &format!("- name: x\n            typed_config: {{ \"@type\": type.googleapis.com/{t} }}\n          - name: envoy.filters.http.router\n            typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}"),
            )
        };
        let e = first_error(load_str(
            "t.yaml",
            &doc("envoy.extensions.filters.http.nope.v3.Nope"),
            None,
        ));
        assert!(
            e.message
                .contains("envoy.extensions.filters.http.nope.v3.Nope"),
            "{e}"
        );
        let cfg = load_str("t.yaml", &doc("example.com.Thing"), None).unwrap();
        assert!(cfg
            .opaque_types
            .contains("type.googleapis.com/example.com.Thing"));
        let gaps = coverage::gaps(&cfg.resources);
        assert!(gaps.iter().any(|g| g.key == "example.com.Thing"
            && g.kind == coverage::GapKind::Opaque
            && g.names == ["x"]));
    }

    #[test]
    fn coverage_lists_unimplemented_fields_once_per_kind_with_an_example() {
        let cfg = load("route_config: { name: r, virtual_hosts: [{ name: v, domains: ['*'], routes: [{ match: { prefix: /a }, route: { cluster: c, priority: HIGH } }, { match: { prefix: / }, route: { cluster: c, priority: HIGH, hedge_policy: { hedge_on_per_try_timeout: true } } }] }] }").unwrap();
        let gaps = coverage::gaps(&cfg.resources);
        let priority = gaps
            .iter()
            .find(|g| g.key == "envoy.config.route.v3.RouteAction.priority")
            .unwrap();
        assert_eq!(priority.count, 2);
        assert!(
            priority.example.ends_with("routes[0].route.priority"),
            "{}",
            priority.example
        );
        assert!(gaps
            .iter()
            .any(|g| g.key == "envoy.config.route.v3.RouteAction.hedge_policy" && g.count == 1));
        // Implemented fields are not listed; the inline route config is walked once, via its
        // listener, though the resource set also lists it as a static route configuration.
        assert!(!gaps.iter().any(|g| g.key.ends_with("RouteAction.cluster")));
    }

    #[test]
    fn coverage_lists_config_sources_pilotfish_cannot_subscribe_with() {
        let grpc = "{ api_config_source: { api_type: GRPC, grpc_services: [{ envoy_grpc: { cluster_name: x } }] }, initial_fetch_timeout: 1s }";
        let text = format!(
            "dynamic_resources: {{ cds_config: {{ path_config_source: {{ path: /etc/envoy/cds.yaml }} }}, lds_config: {grpc} }}\n"
        );
        let cfg = load_str("t.yaml", &text, None).unwrap();
        let gaps = coverage::gaps(&cfg.resources);
        let keys: Vec<&str> = gaps.iter().map(|g| g.key.as_str()).collect();
        assert_eq!(
            keys,
            ["envoy.config.core.v3.ConfigSource.path_config_source"],
            "{gaps:?}"
        );
        assert_eq!(
            gaps[0].example,
            "bootstrap.dynamic_resources.cds_config.path_config_source"
        );
    }

    #[test]
    fn what_maps_hold_is_walked_too() {
        // typed_extension_protocol_options: the upstream HTTP options inside are checked, and
        // a field implemented downstream only is listed there.
        let text = BASE.replace("ROUTES", "common_http_protocol_options: { max_headers_count: 50 }\n          route_config: { name: r }").replace(
            "    type: EDS\n",
            "    type: EDS\n    typed_extension_protocol_options: { envoy.extensions.upstreams.http.v3.HttpProtocolOptions: { \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, common_http_protocol_options: { idle_timeout: 1s, max_headers_count: 50 }, explicit_http_config: { http2_protocol_options: { max_concurrent_streams: 9 } } } }\n",
        );
        let cfg = load_str("t.yaml", &text, None).unwrap();
        let gaps = coverage::gaps(&cfg.resources);
        let headers = gaps
            .iter()
            .find(|g| g.key.ends_with("HttpProtocolOptions.max_headers_count"))
            .expect("listed");
        assert_eq!(
            headers.example,
            "static_resources.clusters[0].typed_extension_protocol_options[\"envoy.extensions.upstreams.http.v3.HttpProtocolOptions\"].common_http_protocol_options.max_headers_count"
        );
        assert_eq!(headers.count, 1);
        assert!(!gaps.iter().any(|g| g.key.contains("Http2ProtocolOptions")));
        assert!(!gaps.iter().any(|g| g.key.ends_with("idle_timeout")));
    }

    #[test]
    fn forms_envoy_accepts_beyond_proto3_json_load_too() {
        // Envoy 1.40 takes a Duration as {seconds, nanos} and a lone value for a list.
        let cfg = load("route_config: { name: r, virtual_hosts: [{ name: v, domains: '*', routes: [{ match: { prefix: / }, route: { cluster: c, timeout: { seconds: 30, nanos: 5 } } }] }] }").unwrap();
        let dump = output::config_dump_json(&cfg.resources, false);
        assert!(dump.contains("\"timeout\": \"30.000000005s\""), "{dump}");
        assert!(dump.contains("\"domains\": [\n"), "{dump}");
        // Anything else still fails, with the streaming parser's line and path.
        let e = first_error(load("route_config: { name: r, virtual_hosts: [{ name: v, domains: ['*'], routes: [{ match: { prefix: / }, route: { cluster: c, timeout: { sec: 30 } } }] }] }"));
        assert!(e.line.is_some(), "{e}");
        assert!(e.path.ends_with("route.timeout"), "{e}");
    }
}
