//! xDS: the same management server drives real Envoy and pilotfish, and both must hold the same
//! conversation with it (the requests, ACKs and NACKs it sees, in order), end with the same
//! resources and versions in `/config_dump`, and route test requests the same way.

mod common;
// Only this test binary carries the server (tonic's server code is not small to compile).
#[path = "common/xds.rs"]
mod xds_server;

use common::side_by_side;
use pilotfish_api::pb::envoy::config::cluster::v3::Cluster;
use pilotfish_api::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use pilotfish_api::pb::envoy::config::listener::v3::Listener;
use pilotfish_api::pb::envoy::config::route::v3::RouteConfiguration;
use std::io::{Read, Write};
use std::path::Path;
use xds_server::{Seen, Snapshot, XdsServer};

/// A bootstrap in the shape of Istio's: node, ADS over the static `xds-grpc` cluster (HTTP/2),
/// clusters and listeners through ADS.
fn bootstrap(xds_port: u16, extra_lds: &str) -> String {
    bootstrap_at(
        &format!("socket_address: {{ address: 127.0.0.1, port_value: {xds_port} }}"),
        extra_lds,
    )
}

/// The same with the management server at `address` (a socket address or a pipe).
fn bootstrap_at(address: &str, extra_lds: &str) -> String {
    format!(
        r#"node: {{ id: "sidecar~127.0.0.1~test.default~default.svc.cluster.local", cluster: test }}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services: [{{ envoy_grpc: {{ cluster_name: xds-grpc }} }}]
  cds_config: {{ ads: {{}}, resource_api_version: V3 }}
  lds_config: {{ ads: {{}}, resource_api_version: V3{extra_lds} }}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ {address} }} }} }}] }}]
"#
    )
}

fn load<T: prost::Message + prost::Name + Default>(yaml: &str) -> T {
    pilotfish_config::load_message::<T>("test.yaml", yaml)
        .unwrap_or_else(|e| panic!("test resource: {e}"))
}

/// Version `version` of the configuration: an EDS cluster `backend` on `upstream`, a listener
/// on `listen` whose connection manager takes route configuration `local_route` from RDS.
fn snapshot(version: &str, listen: u16, upstream: u16) -> Snapshot {
    snapshot_with(version, listen, upstream, "http")
}

/// The same, with the connection manager's `stat_prefix` given (empty breaks an API constraint).
fn snapshot_with(version: &str, listen: u16, upstream: u16, stat_prefix: &str) -> Snapshot {
    let cluster: Cluster = load(
        "name: backend\ntype: EDS\nconnect_timeout: 1s\neds_cluster_config: { eds_config: { ads: {}, resource_api_version: V3 } }\n",
    );
    let cla: ClusterLoadAssignment = load(&format!(
        "cluster_name: backend\nendpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream} }} }} }} }}] }}]\n"
    ));
    let mut listener: Listener = load(&format!(
        r#"name: http
address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: http
      rds: {{ route_config_name: local_route, config_source: {{ ads: {{}}, resource_api_version: V3 }} }}
      http_filters: [{{ name: envoy.filters.http.router, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }} }}]
"#
    ));
    if stat_prefix != "http" {
        // Set past the loader, which would refuse what the API forbids.
        use pilotfish_api::pb::envoy::config::listener::v3::filter::ConfigType;
        use pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
        use prost::Message;
        let Some(ConfigType::TypedConfig(any)) =
            &mut listener.filter_chains[0].filters[0].config_type
        else {
            unreachable!("the listener above has a typed_config")
        };
        let mut hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
        hcm.stat_prefix = stat_prefix.to_string();
        any.value = hcm.encode_to_vec();
    }
    let route: RouteConfiguration = load(
        "name: local_route\nvirtual_hosts: [{ name: all, domains: [\"*\"], routes: [{ match: { prefix: \"/\" }, route: { cluster: backend } }] }]\n",
    );
    Snapshot::new(version)
        .with("backend", &cluster)
        .with("backend", &cla)
        .with("http", &listener)
        .with("local_route", &route)
}

/// An HTTP/1.1 upstream answering every request with `name`.
fn http_upstream(name: &'static str) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut head = vec![];
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match c.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                    name.len()
                );
            });
        }
    });
    port
}

/// GET / through the proxy: status and body (0 when the connection fails).
fn get(port: u16) -> (u16, String) {
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = c.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let _ = c.write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    let mut raw = String::new();
    let _ = c.read_to_string(&mut raw);
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (status, body.unwrap_or_default())
}

/// The dynamic resources `/config_dump` shows: (kind, name, version).
fn dumped(admin: u16) -> Vec<(String, String, String)> {
    let (status, body) = common::admin_request(admin, "GET", "/config_dump");
    assert_eq!(status, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut out = vec![];
    for config in dump["configs"].as_array().unwrap() {
        for (list, kind, inner, name) in [
            ("dynamic_active_clusters", "cluster", "cluster", "name"),
            ("dynamic_listeners", "listener", "", "name"),
            (
                "dynamic_route_configs",
                "route_config",
                "route_config",
                "name",
            ),
        ] {
            for r in config[list].as_array().into_iter().flatten() {
                let (version, name) = if kind == "listener" {
                    // A refused listener shows its error instead of an active state. (Envoy
                    // 1.40 also lists each refusal a second time without a name: left out.)
                    if r[name].as_str().unwrap_or("").is_empty() {
                        continue;
                    }
                    let version = if r["error_state"].is_object() {
                        "refused".to_string()
                    } else {
                        r["active_state"]["version_info"]
                            .as_str()
                            .unwrap_or("")
                            .to_string()
                    };
                    (version, r[name].as_str().unwrap_or("").to_string())
                } else {
                    (
                        r["version_info"].as_str().unwrap_or("").to_string(),
                        r[inner][name].as_str().unwrap_or("").to_string(),
                    )
                };
                out.push((kind.to_string(), name, version));
            }
        }
    }
    out.sort();
    out
}

struct Outcome {
    conversation: Vec<String>,
    first_has_node: bool,
    later_have_node: bool,
    dumped: Vec<(String, String, String)>,
    answer: (u16, String),
    nacks: Vec<String>,
}

/// Starts `bin` against a fresh management server holding `snapshot`, sends a request through
/// its listener, and reads back what happened once `settled` holds for what the server saw.
fn drive(
    bin: &Path,
    is_envoy: bool,
    dir: &Path,
    snapshot: Snapshot,
    listen: u16,
    extra_lds: &str,
    settled: impl Fn(&[Seen]) -> bool,
) -> Outcome {
    let tag = if is_envoy { "envoy" } else { "pilotfish" };
    let server = XdsServer::start(snapshot);
    let proxy = side_by_side::start(
        bin,
        is_envoy,
        &bootstrap(server.addr.port(), extra_lds),
        dir,
        tag,
    );
    let answer = get(listen);
    let seen = server.wait_for("the expected conversation", settled);
    Outcome {
        conversation: seen.iter().map(Seen::summary).collect(),
        first_has_node: seen.first().is_some_and(|s| s.has_node),
        later_have_node: seen.iter().skip(1).any(|s| s.has_node),
        dumped: dumped(proxy.admin),
        answer,
        nacks: seen.iter().filter_map(|s| s.error.clone()).collect(),
    }
}

fn pilotfish_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pilotfish"))
}

#[test]
fn ads_initial_configuration_as_envoy_takes_it() {
    let Some(envoy) = common::envoy("ads_initial_configuration_as_envoy_takes_it") else {
        return;
    };
    let dir = common::proxy::temp_dir("xds-initial");
    // Everything accepted: each type's ACK of version 1.
    let acked = |s: &[Seen]| s.iter().filter(|r| r.version_info == "1").count() >= 4;
    let run = |bin: &Path, is_envoy| {
        let listen = common::free_port();
        let upstream = http_upstream("backend-1");
        drive(
            bin,
            is_envoy,
            &dir,
            snapshot("1", listen, upstream),
            listen,
            "",
            acked,
        )
    };
    let pf = run(pilotfish_bin(), false);
    let ev = run(&envoy, true);
    assert_eq!(ev.answer, (200, "backend-1".to_string()), "Envoy");
    assert_eq!(pf.answer, ev.answer, "pilotfish routes as Envoy does");
    assert_eq!(
        pf.conversation, ev.conversation,
        "the management server sees the same requests, ACKs and order"
    );
    assert!(ev.first_has_node && !ev.later_have_node);
    assert_eq!(
        (pf.first_has_node, pf.later_have_node),
        (true, false),
        "set_node_on_first_message_only"
    );
    assert_eq!(
        ev.dumped,
        vec![
            ("cluster".into(), "backend".into(), "1".into()),
            ("listener".into(), "http".into(), "1".into()),
            ("route_config".into(), "local_route".into(), "1".into()),
        ]
    );
    assert_eq!(
        pf.dumped, ev.dumped,
        "the same resources and versions in /config_dump"
    );
}

#[test]
fn ads_invalid_listener_is_nacked_as_envoy_does() {
    let Some(envoy) = common::envoy("ads_invalid_listener_is_nacked_as_envoy_does") else {
        return;
    };
    let dir = common::proxy::temp_dir("xds-nack");
    let nacked = |s: &[Seen]| s.iter().any(|r| r.error.is_some());
    // The listener's connection manager has an empty stat_prefix, which the API forbids: the
    // listener update is refused, and after LDS's initial fetch timeout (1 s here) the proxy
    // goes on with its clusters and no listener.
    let run = |bin: &Path, is_envoy| {
        let listen = common::free_port();
        let upstream = http_upstream("backend-1");
        let snap = snapshot_with("1", listen, upstream, "");
        drive(
            bin,
            is_envoy,
            &dir,
            snap,
            listen,
            ", initial_fetch_timeout: 1s",
            nacked,
        )
    };
    let pf = run(pilotfish_bin(), false);
    let ev = run(&envoy, true);
    assert_eq!(ev.nacks.len(), 1, "Envoy: {:?}", ev.conversation);
    assert_eq!(pf.conversation, ev.conversation, "the same ACKs and NACK");
    assert!(
        pf.nacks[0].contains("stat_prefix"),
        "the NACK names the field: {}",
        pf.nacks[0]
    );
    assert_eq!(ev.answer.0, 0, "Envoy has no listener");
    assert_eq!(pf.answer.0, 0, "nor has pilotfish");
    assert_eq!(
        ev.dumped,
        vec![
            ("cluster".into(), "backend".into(), "1".into()),
            ("listener".into(), "http".into(), "refused".into()),
        ]
    );
    assert_eq!(pf.dumped, ev.dumped);
}

/// Live updates are not applied yet: pilotfish refuses them by NACK (the control plane sees it
/// keeps its start-up configuration) and goes on serving that configuration.
#[test]
fn ads_update_after_start_is_refused_and_the_configuration_kept() {
    let dir = common::proxy::temp_dir("xds-update");
    let listen = common::free_port();
    let server = XdsServer::start(snapshot("1", listen, http_upstream("backend-1")));
    let proxy = side_by_side::start(
        pilotfish_bin(),
        false,
        &bootstrap(server.addr.port(), ""),
        &dir,
        "pilotfish",
    );
    server.wait_for("the ACK of every type", |s: &[Seen]| {
        s.iter().filter(|r| r.version_info == "1").count() >= 4
    });
    server.set(snapshot("2", listen, http_upstream("backend-2")));
    let seen = server.wait_for("NACKs of version 2", |s: &[Seen]| {
        s.iter().filter(|r| r.error.is_some()).count() >= 4
    });
    for r in seen.iter().filter(|r| r.error.is_some()) {
        assert_eq!(
            r.version_info, "1",
            "a NACK keeps the accepted version: {r:?}"
        );
        assert!(
            r.error.as_deref().unwrap().contains("not implemented"),
            "{r:?}"
        );
    }
    assert_eq!(get(listen), (200, "backend-1".to_string()));
    assert!(dumped(proxy.admin).iter().all(|(_, _, v)| v == "1"));
}

/// istio-agent serves xDS to its sidecar on a Unix socket: the same start-up through one.
#[test]
fn ads_over_a_unix_socket() {
    let dir = common::proxy::temp_dir("xds-unix");
    let listen = common::free_port();
    let socket = dir.join("XDS");
    let server = XdsServer::start_unix(snapshot("1", listen, http_upstream("backend-1")), &socket);
    let boot = bootstrap_at(&format!("pipe: {{ path: {} }}", socket.display()), "");
    let proxy = side_by_side::start(pilotfish_bin(), false, &boot, &dir, "pilotfish");
    assert_eq!(get(listen), (200, "backend-1".to_string()));
    server.wait_for("the ACK of every type", |s: &[Seen]| {
        s.iter().filter(|r| r.version_info == "1").count() >= 4
    });
    assert_eq!(dumped(proxy.admin).len(), 3);
}
