//! `pilotfish -c FILE` as a proxy, with real sockets on loopback: tcp_proxy to a cluster's hosts
//! (round robin, bytes both ways, half-close), SNI- and ALPN-based filter chains via
//! tls_inspector and http_inspector (the bytes reach the upstream untouched), a connection no
//! chain takes is closed, and the admin API answers in Envoy's shapes.

mod common;
use common::proxy::Proxy;
use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// Sends bytes, waits for the answer, half-closes, and returns everything the proxy sent back
/// (nothing when it closed the connection). A client that half-closes while listener filters
/// still look is closed, as Envoy does, so the answer comes first.
fn exchange(port: u16, bytes: &[u8]) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(bytes).unwrap();
    let mut out = vec![0u8; 64 * 1024];
    let n = c.read(&mut out).unwrap_or(0);
    out.truncate(n);
    if n > 0 {
        // The answer may come in pieces: read until the upstream echoed it all.
        while out.len() < bytes.len() + 2 {
            let mut more = [0u8; 4096];
            match c.read(&mut more) {
                Ok(0) | Err(_) => break,
                Ok(m) => out.extend(&more[..m]),
            }
            if out.ends_with(bytes) {
                break;
            }
        }
        c.shutdown(Shutdown::Write).unwrap();
        let _ = c.read_to_end(&mut out);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn tcp_proxy(prefix: &str, cluster: &str) -> String {
    format!("{{ name: envoy.filters.network.tcp_proxy, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: {prefix}, cluster: {cluster} }} }}")
}

fn static_cluster(name: &str, ports: &[u16]) -> String {
    let eps: Vec<String> = ports
        .iter()
        .map(|p| format!("{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }} }}"))
        .collect();
    format!("  - {{ name: {name}, type: STATIC, connect_timeout: 1s, load_assignment: {{ cluster_name: {name}, endpoints: [{{ locality: {{ region: r1, zone: z1 }}, lb_endpoints: [{}] }}] }} }}\n", eps.join(", "))
}

#[test]
fn tcp_proxy_round_robins_a_static_cluster_and_counts_like_envoy() {
    let (a, b) = (upstream("a"), upstream("b"));
    let port = free_port();
    let p = Proxy::start(
        "rr",
        &format!(
            "static_resources:\n  listeners:\n  - {{ name: l1, address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}, filter_chains: [{{ filters: [{}] }}] }}\n  clusters:\n{}",
            tcp_proxy("tp", "c1"),
            static_cluster("c1", &[a, b])
        ),
        &["-l", "debug"],
    );
    let answers: Vec<String> = (0..4)
        .map(|i| exchange(port, format!("hello {i}").as_bytes()))
        .collect();
    assert_eq!(
        answers,
        ["a:hello 0", "b:hello 1", "a:hello 2", "b:hello 3"]
    );
    let (code, clusters) = p.get("/clusters");
    assert_eq!(code, 200);
    for port in [a, b] {
        assert!(
            clusters.contains(&format!("c1::127.0.0.1:{port}::cx_total::2\n")),
            "{clusters}"
        );
        assert!(
            clusters.contains(&format!("c1::127.0.0.1:{port}::region::r1\n")),
            "{clusters}"
        );
        assert!(clusters.contains(&format!("c1::127.0.0.1:{port}::health_flags::healthy\n")));
    }
    let (_, stats) = p.get("/stats?filter=^(cluster.c1|tcp.tp|listener)");
    for line in [
        "cluster.c1.upstream_cx_total: 4",
        "cluster.c1.upstream_cx_active: 0",
        "tcp.tp.downstream_cx_total: 4",
        "tcp.tp.downstream_cx_rx_bytes_total: 28",
        &format!("listener.127.0.0.1_{port}.downstream_cx_total: 4"),
    ] {
        assert!(
            stats.contains(&format!("{line}\n")),
            "{line} missing from\n{stats}"
        );
    }
    let (_, prom) = p.get("/stats/prometheus");
    assert!(
        prom.contains("envoy_cluster_upstream_cx_total{envoy_cluster_name=\"c1\"} 4\n"),
        "{prom}"
    );
    // The debug log tells each connection's story with its id.
    let log = p.log();
    for event in [
        "[conn_handler]",
        "new connection from 127.0.0.1:",
        "[filter]",
        "Creating connection to cluster c1",
        "[pool]",
        "connecting to 127.0.0.1:",
        "[connection]",
        "connected",
    ] {
        assert!(log.contains(event), "{event} not in the log:\n{log}");
    }
    assert!(
        log.lines()
            .any(|l| l.contains("][debug][conn_handler] [")
                && l.contains("] [C0] new connection from")),
        "{log}"
    );
}

#[test]
fn chains_by_sni_alpn_and_http_inspector_and_no_chain_closes() {
    let (a, b, h, d) = (
        upstream("sni-a"),
        upstream("sni-wild"),
        upstream("http"),
        upstream("default"),
    );
    let port = free_port();
    let resources = format!(
        r#"static_resources:
  listeners:
  - name: l1
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    listener_filters:
    - {{ name: envoy.filters.listener.tls_inspector, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }} }}
    - {{ name: envoy.filters.listener.http_inspector, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector }} }}
    filter_chains:
    - {{ filter_chain_match: {{ server_names: [a.example.com], application_protocols: [h2] }}, filters: [{}] }}
    - {{ filter_chain_match: {{ server_names: ["*.example.com"] }}, filters: [{}] }}
    - {{ filter_chain_match: {{ transport_protocol: raw_buffer, application_protocols: [http/1.1] }}, filters: [{}] }}
    - {{ filter_chain_match: {{ transport_protocol: raw_buffer, source_prefix_ranges: [{{ address_prefix: 10.0.0.0, prefix_len: 8 }}] }}, filters: [{}] }}
  clusters:
{}{}{}{}"#,
        tcp_proxy("a", "a"),
        tcp_proxy("w", "w"),
        tcp_proxy("h", "h"),
        tcp_proxy("d", "d"),
        static_cluster("a", &[a]),
        static_cluster("w", &[b]),
        static_cluster("h", &[h]),
        static_cluster("d", &[d]),
    );
    let p = Proxy::start("chains", &resources, &[]);
    let hello = client_hello("a.example.com", &["h2", "http/1.1"]);
    let got = exchange(port, &hello);
    // tls_inspector consumed nothing: the upstream got the ClientHello byte for byte.
    let mut want = b"sni-a:".to_vec();
    want.extend(&hello);
    assert_eq!(got, String::from_utf8_lossy(&want));
    // Same name without h2: the exact-name chain loses on ALPN; no going back to the wildcard
    // (server names were decided first), so the connection is closed.
    assert_eq!(
        exchange(port, &client_hello("a.example.com", &["http/1.1"])),
        ""
    );
    assert!(exchange(port, &client_hello("b.example.com", &[])).starts_with("sni-wild:"));
    assert_eq!(
        exchange(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"),
        "http:GET / HTTP/1.1\r\nhost: x\r\n\r\n"
    );
    // Plaintext that is not HTTP from 127.0.0.1: no chain.
    assert_eq!(exchange(port, b"SSH-2.0-client\r\n"), "");
    let (_, stats) = p.get(&format!(
        "/stats?filter=listener.127.0.0.1_{port}.no_filter_chain_match"
    ));
    assert!(stats.contains("no_filter_chain_match: 2"), "{stats}");
}

#[test]
fn admin_api_answers_in_envoys_shapes() {
    let port = free_port();
    let a = upstream("a");
    let resources = format!(
        "static_resources:\n  listeners:\n  - {{ name: l1, address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}, filter_chains: [{{ filters: [{}] }}] }}\n  clusters:\n{}",
        tcp_proxy("tp", "c1"),
        static_cluster("c1", &[a])
    );
    let p = Proxy::start("admin", &resources, &["--service-node", "node-1"]);
    assert_eq!(p.get("/ready"), (200, "LIVE\n".into()));
    assert_eq!(
        p.get("/listeners"),
        (200, format!("l1::127.0.0.1:{port}\n"))
    );
    let (_, j) = p.get("/listeners?format=json");
    let j: Value = serde_json::from_str(&j).unwrap();
    assert_eq!(
        j["listener_statuses"][0]["local_address"]["socket_address"]["port_value"],
        port
    );
    let (_, info) = p.get("/server_info");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["state"], "LIVE");
    assert_eq!(info["command_line_options"]["service_node"], "node-1");
    assert_eq!(info["command_line_options"]["concurrency"], 2);
    // /config_dump is `pilotfish config-dump` of the same file.
    let (_, dump) = p.get("/config_dump");
    let file = p.dir.join("bootstrap.yaml");
    let cli = pilotfish(&[
        "config-dump",
        file.to_str().unwrap(),
        "--include-eds",
        "false",
    ]);
    let a_dump: Value = serde_json::from_str(&dump).unwrap();
    let b_dump: Value = serde_json::from_str(&stdout(&cli)).unwrap();
    assert_eq!(a_dump, b_dump);
    let (code, only) = p.get("/config_dump?resource=static_clusters");
    assert_eq!(code, 200);
    let only: Value = serde_json::from_str(&only).unwrap();
    assert_eq!(only["configs"][0]["cluster"]["name"], "c1");
    // A field mask keeps only the named fields (and @type) of each dumped config.
    let (_, masked) = p.get("/config_dump?mask=static_clusters");
    let masked: Value = serde_json::from_str(&masked).unwrap();
    // (Real Envoy answers these two exactly so: configs left empty are dropped, and a mask goes
    // through the Any of each resource, keeping its @type.)
    let configs = masked["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 1, "{masked:#}");
    let keys: Vec<&String> = configs[0].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["@type", "static_clusters"]);
    let (_, names) = p.get("/config_dump?resource=static_clusters&mask=cluster.name");
    let names: Value = serde_json::from_str(&names).unwrap();
    assert_eq!(
        names["configs"][0]["cluster"],
        serde_json::json!({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "c1"})
    );
    let (_, none) = p.get("/config_dump?resource=static_clusters&name_regex=^zzz");
    assert_eq!(
        serde_json::from_str::<Value>(&none).unwrap()["configs"],
        serde_json::json!([])
    );
    // /logging: POST only; changes levels at run time.
    assert_eq!(p.get("/logging").0, 405);
    let (code, body) = p.request("POST", "/logging?upstream=trace");
    assert_eq!(code, 200);
    assert!(
        body.contains("  upstream: trace\n") && body.contains("  conn_handler: info\n"),
        "{body}"
    );
    let (code, body) = p.request("POST", "/logging?level=debug");
    assert_eq!(code, 200);
    assert!(body.contains("  upstream: debug\n"), "{body}");
    assert_eq!(p.request("POST", "/logging?nonsense=debug").0, 404);
    assert_eq!(exchange(port, b"x"), "a:x");
    assert!(
        p.log().contains("[C0] new connection from"),
        "debug set at run time shows connections"
    );
    assert_eq!(p.get("/quitquitquit").0, 405);
    let (_, mem) = p.get("/memory");
    assert!(
        serde_json::from_str::<Value>(&mem).unwrap()["allocated"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
    assert_eq!(p.request("POST", "/reset_counters"), (200, "OK\n".into()));
    let (_, stats) = p.get("/stats?filter=tcp.tp.downstream_cx_total");
    assert_eq!(stats, "tcp.tp.downstream_cx_total: 0\n");
    assert_eq!(p.get("/nope").0, 404);
    // /quitquitquit ends the process.
    let mut p = p;
    assert_eq!(p.request("POST", "/quitquitquit"), (200, "OK\n".into()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "still running after /quitquitquit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_drains_then_exits() {
    let port = free_port();
    let slow = TcpListener::bind("127.0.0.1:0").unwrap();
    let slow_port = slow.local_addr().unwrap().port();
    let resources = format!(
        "static_resources:\n  listeners:\n  - {{ name: l1, address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}, filter_chains: [{{ filters: [{}] }}] }}\n  clusters:\n{}",
        tcp_proxy("tp", "c1"),
        static_cluster("c1", &[slow_port])
    );
    let mut p = Proxy::start("drain", &resources, &["--drain-time-s", "30"]);
    // An open connection through the proxy, its upstream holding it.
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    c.write_all(b"open").unwrap();
    let (mut up, _) = slow.accept().unwrap();
    up.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = [0u8; 4];
    up.read_exact(&mut buf).unwrap();
    let pid = p.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // Draining: new connections are refused, /ready says so, the open one still works.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "still accepting while draining");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(p.get("/ready").0, 503);
    up.write_all(b"still here").unwrap();
    let mut got = [0u8; 10];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still here");
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "exited with a connection open"
    );
    // The connection attempts that probed for draining also reached the upstream's backlog;
    // closing the upstream listener resets them.
    drop(slow);
    drop(up);
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "did not exit after its last connection closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn config_yaml_merges_over_the_config_file_as_in_envoy() {
    let (a, b) = (upstream("a"), upstream("b"));
    let (p1, p2) = (free_port(), free_port());
    let base = format!(
        "static_resources:\n  listeners:\n  - {{ name: l1, address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p1} }} }}, filter_chains: [{{ filters: [{}] }}] }}\n  clusters:\n{}",
        tcp_proxy("one", "c1"),
        static_cluster("c1", &[a])
    );
    // Repeated fields append (a second listener and cluster), as protobuf merging does.
    let overlay = format!(
        "{{ static_resources: {{ listeners: [{{ name: l2, address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p2} }} }}, filter_chains: [{{ filters: [{}] }}] }}], clusters: [{{ name: c2, type: STATIC, load_assignment: {{ cluster_name: c2, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {b} }} }} }} }}] }}] }} }}] }} }}",
        tcp_proxy("two", "c2")
    );
    let p = Proxy::start("overlay", &base, &["--config-yaml", &overlay]);
    let (_, listeners) = p.get("/listeners");
    assert_eq!(
        listeners,
        format!("l1::127.0.0.1:{p1}\nl2::127.0.0.1:{p2}\n")
    );
    assert_eq!(exchange(p1, b"x"), "a:x");
    assert_eq!(exchange(p2, b"y"), "b:y");
}

/// Listeners without a name (Istio's static 15090 and 15021) each run their own filter chains:
/// one unnamed listener is not taken for another.
#[test]
fn unnamed_listeners_each_run_their_own_chains() {
    let (a, b) = (free_port(), free_port());
    let listener = |port: u16, body: &str| {
        format!("  - address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: s{port}\n          route_config: {{ virtual_hosts: [{{ name: v, domains: [\"*\"], routes: [{{ match: {{ prefix: \"/\" }}, direct_response: {{ status: 200, body: {{ inline_string: {body} }} }} }}] }}] }}\n          http_filters: [{{ name: envoy.filters.http.router, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }} }}]\n")
    };
    let p = Proxy::start(
        "unnamed_listeners",
        &format!(
            "static_resources:\n  listeners:\n{}{}",
            listener(a, "first"),
            listener(b, "second")
        ),
        &[],
    );
    for (port, body) in [(a, "first"), (b, "second")] {
        let got = exchange(
            port,
            b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        );
        assert!(got.ends_with(body), "port {port}: {got}\n{}", p.log());
    }
}
