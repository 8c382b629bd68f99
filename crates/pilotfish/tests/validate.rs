//! `pilotfish validate`, `config-dump` and `bootstrap` as a user runs them.

mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;

/// Counts taken straight from a dump's text, independent of pilotfish's loader.
struct RawCounts {
    listeners_static: usize,
    listeners_dynamic: usize,
    listener_names: Vec<String>,
    clusters_static: usize,
    clusters_dynamic: usize,
    cluster_types: BTreeMap<String, usize>,
    route_configs: usize,
    endpoint_assignments: usize,
    secrets: usize,
}

fn raw_counts(text: &str) -> RawCounts {
    let doc: Value = serde_yaml_ng::from_str(text).unwrap();
    let by_type = |suffix: &str| -> Value {
        doc["configs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| {
                c["@type"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!(".{suffix}"))
            })
            .cloned()
            .unwrap_or(Value::Null)
    };
    let len = |v: &Value| v.as_array().map_or(0, Vec::len);
    let l = by_type("ListenersConfigDump");
    let dynamic_active: Vec<&Value> = l["dynamic_listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| !d["active_state"].is_null())
        .collect();
    let mut listener_names: Vec<String> = l["static_listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| s["listener"]["name"].as_str().unwrap_or("").to_string())
        .chain(
            dynamic_active
                .iter()
                .map(|d| d["name"].as_str().unwrap().to_string()),
        )
        .collect();
    listener_names.sort();
    let c = by_type("ClustersConfigDump");
    let mut cluster_types = BTreeMap::new();
    for cl in c["static_clusters"].as_array().into_iter().flatten().chain(
        c["dynamic_active_clusters"]
            .as_array()
            .into_iter()
            .flatten(),
    ) {
        let t = cl["cluster"]["type"]
            .as_str()
            .map(str::to_string)
            .or_else(|| {
                cl["cluster"]["cluster_type"]["name"]
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "STATIC".into());
        *cluster_types.entry(t).or_default() += 1;
    }
    let r = by_type("RoutesConfigDump");
    let e = by_type("EndpointsConfigDump");
    let s = by_type("SecretsConfigDump");
    RawCounts {
        listeners_static: len(&l["static_listeners"]),
        listeners_dynamic: dynamic_active.len(),
        listener_names,
        clusters_static: len(&c["static_clusters"]),
        clusters_dynamic: len(&c["dynamic_active_clusters"]),
        cluster_types,
        route_configs: len(&r["static_route_configs"]) + len(&r["dynamic_route_configs"]),
        endpoint_assignments: len(&e["static_endpoint_configs"])
            + len(&e["dynamic_endpoint_configs"]),
        secrets: len(&s["static_secrets"]) + len(&s["dynamic_active_secrets"]),
    }
}

#[test]
fn every_corpus_dump_validates_and_the_summary_matches_its_content() {
    let Some(shared) = shared_dir("corpus summary") else {
        return;
    };
    for file in corpus_files(&shared) {
        let out = pilotfish(&["validate", "--json", file.to_str().unwrap()]);
        assert!(out.status.success(), "{}: {}", file.display(), stderr(&out));
        let j: Value = serde_json::from_str(&stdout(&out)).unwrap();
        let raw = raw_counts(&std::fs::read_to_string(&file).unwrap());
        assert_eq!(j["kind"], "config_dump");
        assert_eq!(
            j["listeners"]["static"],
            raw.listeners_static,
            "{}",
            file.display()
        );
        assert_eq!(j["listeners"]["dynamic"], raw.listeners_dynamic);
        let mut names: Vec<String> = j["listeners"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        assert_eq!(names, raw.listener_names);
        assert_eq!(j["clusters"]["static"], raw.clusters_static);
        assert_eq!(j["clusters"]["dynamic"], raw.clusters_dynamic);
        let types: BTreeMap<String, usize> =
            serde_json::from_value(j["clusters"]["by_type"].clone()).unwrap();
        assert_eq!(types, raw.cluster_types);
        assert_eq!(j["route_configs"]["total"], raw.route_configs);
        assert_eq!(j["endpoints"]["assignments"], raw.endpoint_assignments);
        assert_eq!(j["secrets"]["total"], raw.secrets);
    }
}

#[test]
fn the_seed_dump_is_the_sidecar_the_article_describes() {
    let Some(shared) = shared_dir("seed summary") else {
        return;
    };
    let seed = shared.join("corpus/istio-1.14-sidecar-fortio-server.config_dump.yaml");
    let out = pilotfish(&["validate", "--json", seed.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (
            j["listeners"]["total"].as_u64(),
            j["listeners"]["static"].as_u64(),
            j["listeners"]["dynamic"].as_u64()
        ),
        (Some(37), Some(2), Some(35))
    );
    assert_eq!(
        (
            j["clusters"]["total"].as_u64(),
            j["clusters"]["static"].as_u64(),
            j["clusters"]["dynamic"].as_u64()
        ),
        (Some(55), Some(5), Some(50))
    );
    assert_eq!(j["route_configs"]["total"], 29);
    assert_eq!(
        j["secrets"]["names"],
        serde_json::json!(["default", "ROOTCA"])
    );
    // Every RDS, EDS and SDS name in the dump resolves.
    assert_eq!(j["references"]["dangling"], serde_json::json!([]));
    let items = j["listeners"]["items"].as_array().unwrap();
    let inbound = items
        .iter()
        .find(|l| l["name"] == "virtualInbound")
        .unwrap();
    assert_eq!(inbound["address"], "0.0.0.0:15006");
    assert_eq!(inbound["direction"], "INBOUND");
    assert_eq!(inbound["filter_chains"], 12);
    assert_eq!(
        inbound["listener_filters"],
        serde_json::json!([
            "envoy.filters.listener.original_dst",
            "envoy.filters.listener.tls_inspector",
            "envoy.filters.listener.http_inspector"
        ])
    );
    let outbound = items
        .iter()
        .find(|l| l["name"] == "virtualOutbound")
        .unwrap();
    assert_eq!(outbound["address"], "0.0.0.0:15001");
    assert_eq!(outbound["use_original_dst"], true);
    let l8080 = items.iter().find(|l| l["name"] == "0.0.0.0_8080").unwrap();
    assert_eq!(l8080["bind_to_port"], false);
    // The redacted private key is called out, not silently loaded.
    let warnings = j["warnings"].as_array().unwrap();
    assert!(warnings
        .iter()
        .any(|w| w.as_str().unwrap().contains("secret 'default'")
            && w.as_str().unwrap().contains("redacted")));
    // What pilotfish does not implement yet is listed, with counts and example paths.
    let gaps = j["not_implemented"].as_array().unwrap();
    // Istio's null-VM Wasm plugins (metadata exchange, stats) run natively, all of the seed's
    // stats configuration is read, and the TCP metadata exchange (network and cluster filter)
    // runs.
    assert!(
        !gaps.iter().any(|g| g["key"]
            .as_str()
            .is_some_and(|k| k.ends_with("wasm.v3.Wasm")
                || k.starts_with("istio.stats")
                || k.contains("metadataexchange")
                || k == "envoy.config.cluster.v3.Cluster.filters")),
        "{gaps:#?}"
    );
    assert!(gaps.iter().any(|g| g["key"]
        == "envoy.config.endpoint.v3.ClusterLoadAssignment.policy"
        && g["kind"] == "field"));
    // What is implemented is not listed: the fault and CORS filters, the route's retry policy,
    // the stream timers, HTTP/2 settings.
    let implemented = [
        "envoy.extensions.filters.http.fault.v3.HTTPFault",
        "envoy.extensions.filters.http.cors.v3.Cors",
        "envoy.config.route.v3.RouteAction.retry_policy",
        "envoy.config.route.v3.RouteAction.MaxStreamDuration.max_stream_duration",
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.stream_idle_timeout",
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.http2_protocol_options",
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.tracing",
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.request_id_extension",
        "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
        "envoy.config.route.v3.Route.decorator",
        "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
    ];
    assert!(!gaps
        .iter()
        .any(|g| implemented.contains(&g["key"].as_str().unwrap_or(""))));
    // The human summary names the same things.
    let text = stdout(&pilotfish(&["validate", seed.to_str().unwrap()]));
    assert!(
        text.contains("Listeners: 37 (2 static, 35 dynamic)"),
        "{text}"
    );
    assert!(
        text.contains("Clusters: 55 (5 static, 50 dynamic)"),
        "{text}"
    );
    assert!(
        text.contains("envoy.config.endpoint.v3.ClusterLoadAssignment.policy"),
        "{text}"
    );
}

#[test]
fn invalid_inputs_are_rejected_naming_file_path_and_problem() {
    let cases = invalid_cases();
    assert!(cases.len() >= 25, "only {} invalid inputs", cases.len());
    for c in cases {
        let f = c.file.to_str().unwrap();
        let out = pilotfish(&["validate", f]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{f} should be rejected: {err}");
        let rel = c
            .file
            .strip_prefix(repo_root())
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let line = err
            .lines()
            .find(|l| l.contains(&format!(": {}: ", c.path)))
            .unwrap_or_else(|| panic!("{rel}: no error at path '{}':\n{err}", c.path));
        assert!(
            line.contains(&c.error),
            "{rel}: expected '{}' in:\n{line}",
            c.error
        );
        assert!(
            line.starts_with(&format!("error: {f}")),
            "{rel}: the message must name the file:\n{line}"
        );
    }
}

#[test]
fn syntax_errors_carry_the_line_the_parser_knows() {
    for (name, line) in [
        ("01-yaml-syntax.yaml", ":6:4: "),
        ("02-json-syntax.json", ":1:37: "),
    ] {
        let f = format!("tests/invalid/{name}");
        let err = stderr(&pilotfish(&["validate", &f]));
        assert!(err.contains(&format!("{f}{line}")), "{err}");
    }
    // Schema errors streamed from YAML keep their line too.
    let err = stderr(&pilotfish(&[
        "validate",
        "tests/invalid/08-bad-enum-lb-policy.yaml",
    ]));
    let text =
        std::fs::read_to_string(repo_root().join("tests/invalid/08-bad-enum-lb-policy.yaml"))
            .unwrap();
    let want = text
        .lines()
        .position(|l| l.contains("lb_policy: ROUND_ROBBIN"))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!("08-bad-enum-lb-policy.yaml:{want}:")),
        "line {want} expected: {err}"
    );
}

#[test]
fn the_example_bootstrap_validates() {
    let out = pilotfish(&["validate", "examples/bootstrap.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("http_ingress") && text.contains("127.0.0.1:10000"),
        "{text}"
    );
    assert!(text.contains("local_route"), "{text}");
}

fn temp_file(name: &str, body: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pilotfish-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

const VENDOR_FILTER: &str = r#"
static_resources:
  listeners:
  - name: l
    address: { socket_address: { address: 127.0.0.1, port_value: 10000 } }
    filter_chains:
    - filters:
      - name: acme.magic
        typed_config:
          "@type": type.googleapis.com/acme.filters.network.v1.Magic
          spell: abracadabra
          power: 3
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: c
  clusters:
  - name: c
    load_assignment:
      cluster_name: c
      endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 8080 } } } }] }]
"#;

#[test]
fn an_unknown_vendor_type_is_kept_opaque_named_and_written_back() {
    let f = temp_file("vendor.yaml", VENDOR_FILTER);
    let out = pilotfish(&["validate", "--json", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(
        j["warnings"].as_array().unwrap().iter().any(|w| w
            .as_str()
            .unwrap()
            .contains("acme.filters.network.v1.Magic")),
        "{j}"
    );
    let gap = j["not_implemented"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["key"] == "acme.filters.network.v1.Magic")
        .expect("listed");
    assert_eq!(gap["kind"], "opaque");
    assert_eq!(gap["names"], serde_json::json!(["acme.magic"]));
    let dump: Value =
        serde_json::from_str(&stdout(&pilotfish(&["config-dump", f.to_str().unwrap()]))).unwrap();
    let listener = &dump["configs"][2]["static_listeners"][0]["listener"];
    let tc = &listener["filter_chains"][0]["filters"][0]["typed_config"];
    assert_eq!(
        tc,
        &serde_json::json!({"@type": "type.googleapis.com/acme.filters.network.v1.Magic", "spell": "abracadabra", "power": 3})
    );
}

#[test]
fn a_typed_struct_whose_value_does_not_fit_its_type_is_an_error() {
    let body = VENDOR_FILTER.replace(
        "\"@type\": type.googleapis.com/acme.filters.network.v1.Magic\n          spell: abracadabra\n          power: 3",
        "\"@type\": type.googleapis.com/udpa.type.v1.TypedStruct\n          type_url: type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm\n          value: { config: { vm_confg: {} } }",
    );
    let f = temp_file("typed-struct.yaml", &body);
    let out = pilotfish(&["validate", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.value"
        ),
        "{err}"
    );
    assert!(err.contains("vm_confg"), "{err}");
}

#[test]
fn a_duplicate_listener_name_keeps_the_first_like_envoy() {
    let body = format!(
        "{}  - name: l\n    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 10009 }} }}\n    filter_chains: []\n",
        VENDOR_FILTER.split("  clusters:").next().unwrap()
    ) + "  clusters:" + VENDOR_FILTER.split("  clusters:").nth(1).unwrap();
    let f = temp_file("dup.yaml", &body);
    let out = pilotfish(&["validate", "--json", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(j["listeners"]["total"], 1);
    assert_eq!(j["listeners"]["items"][0]["address"], "127.0.0.1:10000");
    assert!(j["warnings"].as_array().unwrap().iter().any(|w| w
        .as_str()
        .unwrap()
        .contains("static_resources.listeners[1]")));
}

#[test]
fn the_standalone_bootstrap_of_each_dump_loads_again_as_a_bootstrap() {
    let Some(shared) = shared_dir("standalone bootstrap") else {
        return;
    };
    for file in corpus_files(&shared) {
        let out = pilotfish(&["bootstrap", file.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        let f = temp_file("standalone.yaml", &text);
        let j: Value = serde_json::from_str(&stdout(&pilotfish(&[
            "validate",
            "--json",
            f.to_str().unwrap(),
        ])))
        .unwrap();
        let orig: Value = serde_json::from_str(&stdout(&pilotfish(&[
            "validate",
            "--json",
            file.to_str().unwrap(),
        ])))
        .unwrap();
        assert_eq!(j["kind"], "bootstrap");
        assert_eq!(j["listeners"]["total"], orig["listeners"]["total"]);
        assert_eq!(j["clusters"]["total"], orig["clusters"]["total"]);
        // Everything now comes from the file itself.
        assert_eq!(j["references"]["dangling"], serde_json::json!([]));
        assert_eq!(j["clusters"]["by_type"].get("EDS"), None);
        // Each Istio-only extension that was dropped is named in a comment.
        assert!(
            text.contains("# ") && text.contains("istio.alpn") && text.contains("dropped"),
            "no comments about dropped extensions"
        );
        let body: String = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(
            !body.contains("istio.envoy.config.filter.http.alpn"),
            "an Istio-only type is still in the bootstrap"
        );
    }
}
