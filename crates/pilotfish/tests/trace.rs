//! `pilotfish trace` on the seed dump: the article's inbound request and the outbound call its
//! app makes, step by step.

mod common;
use common::*;
use serde_json::Value;

fn trace_json(args: &[&str]) -> Value {
    let mut full = vec!["trace"];
    full.extend_from_slice(args);
    full.push("--json");
    let out = pilotfish(&full);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap()
}

fn step<'a>(t: &'a Value, stage: &str) -> &'a Value {
    t["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == stage)
        .unwrap_or_else(|| panic!("no {stage} step in {t:#}"))
}

fn steps<'a>(t: &'a Value, stage: &str) -> Vec<&'a Value> {
    t["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["stage"] == stage)
        .collect()
}

#[test]
fn the_articles_inbound_request() {
    let Some(shared) = shared_dir("trace inbound") else {
        return;
    };
    let seed = shared.join("corpus/istio-1.14-sidecar-fortio-server.config_dump.yaml");
    let t = trace_json(&[
        seed.to_str().unwrap(),
        "--inbound",
        "--destination",
        "172.21.206.230:8080",
        "--source",
        "172.21.206.228:52352",
        "--tls",
        "--sni",
        "outbound_.8080_._.fortio-server.mark.svc.cluster.local",
        "--alpn",
        "istio-http/1.1,istio,http/1.1",
        "--authority",
        "fortio-server:8080",
        "--path",
        "/",
    ]);
    assert_eq!(step(&t, "listener")["title"], "virtualInbound");
    let lf = steps(&t, "listener_filter");
    assert_eq!(lf.len(), 3);
    assert_eq!(lf[0]["title"], "envoy.filters.listener.original_dst");
    assert!(lf[0]["detail"]
        .as_str()
        .unwrap()
        .contains("172.21.206.230:8080"));
    assert_eq!(lf[1]["title"], "envoy.filters.listener.tls_inspector");
    assert!(lf[1]["detail"]
        .as_str()
        .unwrap()
        .contains("SNI outbound_.8080_._.fortio-server.mark.svc.cluster.local"));
    assert_eq!(lf[2]["title"], "envoy.filters.listener.http_inspector");
    assert!(
        lf[2]["detail"]
            .as_str()
            .unwrap()
            .starts_with("skipped: filter_disabled"),
        "{}",
        lf[2]["detail"]
    );
    let fc = step(&t, "filter_chain");
    assert!(
        fc["title"].as_str().unwrap().ends_with("'0.0.0.0_8080'"),
        "{}",
        fc["title"]
    );
    assert!(fc["detail"]
        .as_str()
        .unwrap()
        .contains("transport_protocol tls"));
    // Each of the other eleven chains is accounted for.
    let rejected = fc["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["verdict"] != "chosen")
        .count();
    assert_eq!(rejected, 11, "{fc:#}");
    let ts = step(&t, "transport_socket");
    assert_eq!(ts["title"], "envoy.transport_sockets.tls");
    for want in [
        "client certificate required",
        "SDS 'default'",
        "SDS 'ROOTCA'",
        "spiffe://cluster.local/",
    ] {
        assert!(
            ts["detail"].as_str().unwrap().contains(want),
            "{want}: {ts:#}"
        );
    }
    assert_eq!(
        step(&t, "network_filters")["title"],
        "istio.metadata_exchange -> envoy.filters.network.http_connection_manager"
    );
    assert!(step(&t, "http_filters")["title"]
        .as_str()
        .unwrap()
        .ends_with("envoy.filters.http.router"));
    assert_eq!(step(&t, "route_config")["title"], "inbound|8080||");
    assert_eq!(step(&t, "virtual_host")["title"], "inbound|http|8080");
    assert_eq!(step(&t, "route")["title"], "routes[0] 'default'");
    assert_eq!(
        step(&t, "action")["title"],
        "route to cluster 'inbound|8080||'"
    );
    let cluster = step(&t, "cluster");
    assert_eq!(cluster["title"], "inbound|8080||");
    assert!(cluster["detail"].as_str().unwrap().contains("ORIGINAL_DST"));
    assert!(cluster["detail"].as_str().unwrap().contains("127.0.0.6"));
    assert!(step(&t, "hosts")["detail"]
        .as_str()
        .unwrap()
        .starts_with("172.21.206.230:8080"));
    assert_eq!(step(&t, "upstream_transport")["title"], "plaintext");
    assert_eq!(
        t["outcome"],
        "forwarded to cluster 'inbound|8080||', host 172.21.206.230:8080"
    );
}

#[test]
fn the_apps_outbound_call_through_15001() {
    let Some(shared) = shared_dir("trace outbound") else {
        return;
    };
    let seed = shared.join("corpus/istio-1.14-sidecar-fortio-server.config_dump.yaml");
    // fortio-server-l2's ClusterIP in the dump is 10.111.46.197.
    let t = trace_json(&[
        seed.to_str().unwrap(),
        "--outbound",
        "--destination",
        "10.111.46.197:8080",
        "--source",
        "172.21.206.230:40000",
        "--authority",
        "fortio-server-l2:8080",
        "--path",
        "/echo",
    ]);
    let l = step(&t, "listener");
    assert_eq!(l["title"], "0.0.0.0_8080");
    let reasons = l["reasons"].as_array().unwrap();
    assert!(reasons[0]["subject"]
        .as_str()
        .unwrap()
        .contains("virtualOutbound"));
    assert!(reasons[1]["detail"]
        .as_str()
        .unwrap()
        .contains("use_original_dst"));
    let lf = steps(&t, "listener_filter");
    assert!(lf
        .iter()
        .any(|f| f["title"] == "envoy.filters.listener.http_inspector"
            && f["detail"].as_str().unwrap().contains("http/1.1")));
    assert!(step(&t, "filter_chain")["detail"]
        .as_str()
        .unwrap()
        .contains("application_protocols [http/1.1, h2c]"));
    let rc = step(&t, "route_config");
    assert_eq!(rc["title"], "8080");
    assert_eq!(rc["detail"], "by name (RDS)");
    assert_eq!(
        step(&t, "virtual_host")["title"],
        "fortio-server-l2.mark.svc.cluster.local:8080"
    );
    let cluster = step(&t, "cluster");
    assert_eq!(
        cluster["title"],
        "outbound|8080||fortio-server-l2.mark.svc.cluster.local"
    );
    assert!(cluster["detail"].as_str().unwrap().starts_with("EDS"));
    assert!(step(&t, "hosts")["detail"]
        .as_str()
        .unwrap()
        .contains("tlsMode-istio"));
    let up = step(&t, "upstream_transport");
    assert_eq!(up["title"], "TLS");
    let detail = up["detail"].as_str().unwrap();
    assert!(
        detail.contains("SNI outbound_.8080_._.fortio-server-l2.mark.svc.cluster.local"),
        "{detail}"
    );
    assert!(
        detail.contains("ALPN [istio-peer-exchange, istio]"),
        "{detail}"
    );
}

#[test]
fn a_destination_no_listener_owns_stays_in_virtual_outbound() {
    let Some(shared) = shared_dir("trace passthrough") else {
        return;
    };
    let seed = shared.join("corpus/istio-1.14-sidecar-fortio-server.config_dump.yaml");
    let t = trace_json(&[
        seed.to_str().unwrap(),
        "--outbound",
        "--destination",
        "203.0.113.7:4444",
        "--protocol",
        "tcp",
    ]);
    assert_eq!(step(&t, "listener")["title"], "virtualOutbound");
    assert!(
        t["outcome"]
            .as_str()
            .unwrap()
            .contains("PassthroughCluster"),
        "{t:#}"
    );
}

#[test]
fn the_text_form_tells_the_same_path() {
    let out = pilotfish(&[
        "trace",
        "examples/bootstrap.yaml",
        "--destination",
        "127.0.0.1:10000",
        "--authority",
        "shop.example",
        "--path",
        "/api/cart",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for want in [
        "listener           http_ingress",
        "route              routes[0]",
        "cluster 'api'",
        "127.0.0.1:8081",
        "outcome            forwarded to cluster 'api'",
    ] {
        assert!(text.contains(want), "{want} in:\n{text}");
    }
    let tcp = stdout(&pilotfish(&[
        "trace",
        "examples/bootstrap.yaml",
        "--destination",
        "127.0.0.1:10001",
        "--protocol",
        "tcp",
    ]));
    assert!(
        tcp.contains("tcp_proxy to cluster 'web'") && tcp.contains("127.0.0.1:8082"),
        "{tcp}"
    );
}
