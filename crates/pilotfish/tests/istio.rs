//! Istio's own HTTP filters as pilotfish runs them natively: the metadata exchange headers
//! (the seed sidecar's, byte for byte as the article's log shows them; taken off and added by
//! the listener's direction), istio.alpn (the ALPN offered to a TLS upstream) and istio.stats
//! on TCP (Istio's TCP metrics and labels).

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The x-envoy-peer-metadata values the article's log shows: netshoot's (on the request into
/// fortio-server's sidecar), then fortio-server's (on its response).
fn article_headers(shared: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(shared.join("seed/000_db0fe29df8d52e0c.txt")).unwrap();
    let re = regex::Regex::new(r"'x-envoy-peer-metadata', '([^']*)'").unwrap();
    re.captures_iter(&text).map(|c| c[1].to_string()).collect()
}

#[test]
fn the_seed_sidecar_sends_the_metadata_the_article_shows() {
    let Some(shared) = shared_dir("istio metadata exchange") else {
        return;
    };
    let headers = article_headers(&shared);
    assert_eq!(headers.len(), 2);
    let seed = corpus_files(&shared)
        .into_iter()
        .find(|f| f.display().to_string().contains("fortio-server"))
        .unwrap();
    let cfg = pilotfish_config::load_file(&seed).unwrap();
    let node = cfg.resources.bootstrap.node.as_ref().unwrap();
    use base64::Engine;
    let ours = base64::engine::general_purpose::STANDARD.encode(
        pilotfish_proxy::http::istio::encode_node(node.metadata.as_ref().unwrap()),
    );
    // fortio-server's own metadata, as its sidecar put it on the response.
    assert_eq!(ours, headers[1]);
    // netshoot's, as it arrived: what Istio exchanges of a node.
    let netshoot = pilotfish_proxy::http::istio::decode(&headers[0]).unwrap();
    assert_eq!(netshoot["NAME"], "netshoot");
    assert_eq!(netshoot["NAMESPACE"], "mark");
    assert_eq!(netshoot["INSTANCE_IPS"], "172.21.206.228");
    assert_eq!(netshoot["LABELS"]["security.istio.io/tlsMode"], "istio");
    assert_eq!(
        netshoot["OWNER"],
        "kubernetes://apis/v1/namespaces/mark/pods/netshoot"
    );
    let mut keys: Vec<&String> = netshoot.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "APP_CONTAINERS",
            "CLUSTER_ID",
            "INSTANCE_IPS",
            "ISTIO_VERSION",
            "LABELS",
            "MESH_ID",
            "NAME",
            "NAMESPACE",
            "OWNER",
            "PLATFORM_METADATA",
            "WORKLOAD_NAME"
        ]
    );
}

const METADATA_EXCHANGE: &str = "{ name: istio.metadata_exchange, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm, config: { vm_config: { runtime: envoy.wasm.runtime.null, code: { local: { inline_string: envoy.wasm.metadata_exchange } } }, configuration: { \"@type\": type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange } } } }";
const ALPN: &str = "{ name: istio.alpn, typed_config: { \"@type\": type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig, alpn_override: [{ alpn_override: [istio-http/1.0, istio, http/1.0] }, { upstream_protocol: HTTP11, alpn_override: [istio-http/1.1, istio, http/1.1] }, { upstream_protocol: HTTP2, alpn_override: [istio-h2, istio, h2] }] } }";
const ROUTER: &str = "{ name: envoy.filters.http.router, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router } }";

fn listener(name: &str, port: u16, direction: &str, filters: &str, cluster: &str) -> String {
    format!("  - name: {name}\n    traffic_direction: {direction}\n    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: {name}\n          route_config: {{ virtual_hosts: [{{ name: v, domains: [\"*\"], routes: [{{ match: {{ prefix: \"/\" }}, route: {{ cluster: {cluster} }} }}] }}] }}\n          http_filters: [{filters}, {ROUTER}]\n")
}

/// An HTTP/1.1 upstream over TLS (ALPN istio-http/1.1 or http/1.1) that answers with the ALPN
/// it negotiated and the request headers it saw, and adds the metadata exchange headers of an
/// upstream sidecar to its response.
fn tls_app(pki: &common::tls::Pki) -> u16 {
    let leaf = pki.leaf(
        &["server.example"],
        "spiffe://cluster.local/ns/mark/sa/default",
    );
    let acceptor = tokio_rustls::TlsAcceptor::from(common::tls::server_config(
        &leaf,
        &["istio-http/1.1", "http/1.1"],
    ));
    serve_on_loopback(move |s| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(tls) = acceptor.accept(s).await else {
                return;
            };
            let alpn = String::from_utf8_lossy(tls.get_ref().1.alpn_protocol().unwrap_or(b"-"))
                .into_owned();
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let alpn = alpn.clone();
                    async move {
                        let mut seen: Vec<String> =
                            req.headers().keys().map(|k| k.to_string()).collect();
                        seen.sort();
                        let text = format!(
                            "alpn={alpn} id={:?} headers={}",
                            req.headers().get("x-envoy-peer-metadata-id"),
                            seen.join(",")
                        );
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header(
                                    "x-envoy-peer-metadata-id",
                                    "sidecar~10.0.0.9~upstream.ns~ns.svc.cluster.local",
                                )
                                .header("x-envoy-peer-metadata", "ChEKBE5BTUUSCRoHdXBzdHJlYW0=")
                                .body(http_body_util::Full::new(bytes::Bytes::from(text)))
                                .unwrap(),
                        )
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
        }
    })
}

/// One HTTP/1.1 GET with `headers`; the response's head (header names lower-case) and body.
fn get(port: u16, headers: &[(&str, &str)]) -> (Vec<String>, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut text = "GET / HTTP/1.1\r\nhost: app\r\nconnection: close\r\n".to_string();
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str("\r\n");
    s.write_all(text.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut head = vec![];
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        let line = line.trim();
        head.push(match line.split_once(':') {
            Some((k, v)) => format!("{}: {}", k.to_ascii_lowercase(), v.trim()),
            None => line.to_string(),
        });
    }
    let mut body = String::new();
    let _ = r.read_to_string(&mut body);
    (head, body)
}

#[test]
fn metadata_exchange_and_alpn_by_the_listener_direction() {
    let pki = common::tls::Pki::new("mesh ca");
    let dir = common::proxy::temp_dir("istio-filters");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let app = tls_app(&pki);
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let plain_app = plain.local_addr().unwrap().port();
    common::netns::serve_http(plain, "app");
    let (inbound, outbound) = (free_port(), free_port());
    let config = format!(
        "node:\n  id: sidecar~10.0.0.1~netshoot.mark~mark.svc.cluster.local\n  metadata: {{ NAME: netshoot, NAMESPACE: mark, SERVICE_ACCOUNT: default, LABELS: {{ app: netshoot }} }}\nstatic_resources:\n  listeners:\n{}{}  clusters:\n  - {{ name: app, type: STATIC, connect_timeout: 1s, load_assignment: {{ cluster_name: app, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {plain_app} }} }} }} }}] }}] }} }}\n  - {{ name: mesh, type: STATIC, connect_timeout: 1s, transport_socket: {{ name: envoy.transport_sockets.tls, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, sni: server.example, common_tls_context: {{ alpn_protocols: [istio-peer-exchange, istio], validation_context: {{ trusted_ca: {{ filename: \"{}\" }} }} }} }} }}, load_assignment: {{ cluster_name: mesh, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {app} }} }} }} }}] }}] }} }}\n",
        listener("inbound", inbound, "INBOUND", METADATA_EXCHANGE, "app"),
        listener("outbound", outbound, "OUTBOUND", &format!("{METADATA_EXCHANGE}, {ALPN}"), "mesh"),
        ca.display()
    );
    let _proxy = common::proxy::Proxy::start_in(dir, &config, &[]);

    // Inbound: the downstream sidecar's headers stop here; the response carries this node's.
    let (head, body) = get(
        inbound,
        &[
            (
                "x-envoy-peer-metadata-id",
                "sidecar~10.0.0.2~fortio.mark~mark.svc.cluster.local",
            ),
            ("x-envoy-peer-metadata", "ChEKBE5BTUUSCRoHZG93bnN0cg=="),
        ],
    );
    assert!(
        !body.contains("x-envoy-peer-metadata"),
        "the app saw the peer headers: {body}"
    );
    assert!(
        head.contains(
            &"x-envoy-peer-metadata-id: sidecar~10.0.0.1~netshoot.mark~mark.svc.cluster.local"
                .to_string()
        ),
        "{head:?}"
    );
    let sent = head
        .iter()
        .find_map(|l| l.strip_prefix("x-envoy-peer-metadata: "))
        .expect("metadata on the response");
    let sent = pilotfish_proxy::http::istio::decode(sent).expect("a Struct in base64");
    assert_eq!(
        sent,
        serde_json::json!({ "NAME": "netshoot", "NAMESPACE": "mark", "LABELS": { "app": "netshoot" }, "PLATFORM_METADATA": {} })
    );

    // Outbound: this node's headers go upstream, over TLS with Istio's HTTP/1.1 ALPN; the
    // upstream sidecar's come back and stop here.
    let (head, body) = get(outbound, &[]);
    assert!(body.starts_with("alpn=istio-http/1.1 "), "{body}");
    assert!(
        body.contains("id=Some(\"sidecar~10.0.0.1~netshoot.mark~mark.svc.cluster.local\")"),
        "{body}"
    );
    assert!(body.contains("x-envoy-peer-metadata,"), "{body}");
    assert!(
        !head.iter().any(|l| l.starts_with("x-envoy-peer-metadata")),
        "{head:?}"
    );
}

/// `istio.stats` ahead of tcp_proxy on an inbound listener, configured as istiod writes it: a
/// connection counts as opened when its upstream answers and as closed with its bytes each way
/// when it ends, under Istio's TCP labels (no response code; protocol tcp; this node as the
/// destination; the service from the cluster's `istio` metadata; no peer metadata, so the
/// source is unknown and the connection in plaintext has policy none).
#[test]
fn istio_stats_counts_tcp_connections_with_istios_labels() {
    let app = common::upstream("app");
    let (port, refused, closed) = (free_port(), free_port(), free_port());
    let stats = r#"{ name: istio.stats, typed_config: { "@type": type.googleapis.com/udpa.type.v1.TypedStruct, type_url: type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm, value: { config: { root_id: stats_inbound, vm_config: { vm_id: tcp_stats_inbound, runtime: envoy.wasm.runtime.null, code: { local: { inline_string: envoy.wasm.stats } } }, configuration: { "@type": type.googleapis.com/google.protobuf.StringValue, value: "{\"debug\": \"false\", \"stat_prefix\": \"istio\", \"metrics\": [{\"dimensions\": {\"destination_cluster\": \"node.metadata['CLUSTER_ID']\", \"source_cluster\": \"downstream_peer.cluster_id\"}}]}" } } } } }"#;
    let config = format!(
        "node: {{ id: sidecar~127.0.0.1~fortio-server.mark~mark.svc.cluster.local, metadata: {{ NAME: fortio-server, NAMESPACE: mark, WORKLOAD_NAME: fortio-server, CLUSTER_ID: Kubernetes, LABELS: {{ app: fortio-server, version: v1, service.istio.io/canonical-name: fortio-server }} }} }}
static_resources:
  listeners:
  - name: tcp_inbound
    traffic_direction: INBOUND
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - {stats}
      - {{ name: envoy.filters.network.tcp_proxy, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: inbound_tcp, cluster: \"inbound|9000||\" }} }}
  - name: tcp_refused
    traffic_direction: INBOUND
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {refused} }} }}
    filter_chains:
    - filters:
      - {stats}
      - {{ name: envoy.filters.network.tcp_proxy, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: refused, cluster: \"inbound|9001||\" }} }}
  clusters:
  - name: \"inbound|9000||\"
    connect_timeout: 1s
    load_assignment: {{ cluster_name: x, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {app} }} }} }} }}] }}] }}
    metadata: {{ filter_metadata: {{ istio: {{ services: [{{ host: tcp-echo.mark.svc.cluster.local, name: tcp-echo, namespace: mark }}] }} }} }}
  - name: \"inbound|9001||\"
    connect_timeout: 1s
    load_assignment: {{ cluster_name: x, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {closed} }} }} }} }}] }}] }}
    metadata: {{ filter_metadata: {{ istio: {{ services: [{{ host: tcp-echo.mark.svc.cluster.local, name: tcp-echo, namespace: mark }}] }} }} }}
"
    );
    let proxy = common::proxy::Proxy::start("istio_tcp_stats", &config, &[]);
    // A connection whose upstream refuses counts too, with its flags.
    {
        let mut c = TcpStream::connect(("127.0.0.1", refused)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut rest = vec![];
        let _ = c.read_to_end(&mut rest);
    }
    let log = proxy.log();
    assert!(!log.contains("istio.stats' (passed over)"), "{log}");
    for _ in 0..2 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"hello").unwrap();
        let mut got = [0u8; 9];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"app:hello");
    }
    let labels = "reporter=\"destination\",source_workload=\"unknown\",source_workload_namespace=\"unknown\",source_principal=\"unknown\",source_app=\"unknown\",source_version=\"unknown\",source_cluster=\"unknown\",destination_workload=\"fortio-server\",destination_workload_namespace=\"mark\",destination_principal=\"unknown\",destination_app=\"fortio-server\",destination_version=\"v1\",destination_service=\"tcp-echo.mark.svc.cluster.local\",destination_service_name=\"tcp-echo\",destination_service_namespace=\"mark\",destination_cluster=\"Kubernetes\",request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"none\",source_canonical_service=\"unknown\",destination_canonical_service=\"fortio-server\",source_canonical_revision=\"unknown\",destination_canonical_revision=\"latest\"";
    // The connections are closed by the client; the proxy counts them as they end.
    let p = scrape_until(
        &proxy,
        &[
            format!("istio_tcp_connections_opened_total{{{labels}}} 2"),
            format!("istio_tcp_connections_closed_total{{{labels}}} 2"),
            format!("istio_tcp_received_bytes_total{{{labels}}} 10"),
            format!("istio_tcp_sent_bytes_total{{{labels}}} 18"),
            format!(
                "istio_tcp_connections_closed_total{{{}}} 1",
                labels.replace("response_flags=\"-\"", "response_flags=\"UF,URX\"")
            ),
        ],
    );
    assert!(p.contains("# TYPE istio_tcp_connections_opened_total counter\n"));
    // /stats shows the counters by the names Istio's plugin gives Envoy.
    let (_, text) = proxy.get("/stats");
    assert!(
        text.contains("reporter=.=destination;.;source_workload=.=unknown;.;")
            && text.contains(";.;istio_tcp_connections_opened_total: 2\n"),
        "{text}"
    );
}

/// `/stats/prometheus` once it has every line of `want` (metrics are counted as connections
/// end), within 10 s.
fn scrape_until(proxy: &common::proxy::Proxy, want: &[String]) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = proxy.get("/stats/prometheus");
        if want.iter().all(|w| text.lines().any(|line| line == w)) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "want {want:#?}\nin\n{}",
            text.lines()
                .filter(|l| l.starts_with("istio"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stats_filter(direction: &str) -> String {
    format!(
        r#"{{ name: istio.stats, typed_config: {{ "@type": type.googleapis.com/udpa.type.v1.TypedStruct, type_url: type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm, value: {{ config: {{ root_id: stats_{direction}, vm_config: {{ vm_id: tcp_stats_{direction}, runtime: envoy.wasm.runtime.null, code: {{ local: {{ inline_string: envoy.wasm.stats }} }} }}, configuration: {{ "@type": type.googleapis.com/google.protobuf.StringValue, value: "{{\"debug\": \"false\", \"stat_prefix\": \"istio\"}}" }} }} }} }} }}"#
    )
}

const TCP_EXCHANGE: &str = r#"{ name: istio.metadata_exchange, typed_config: { "@type": type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange, protocol: istio-peer-exchange } }"#;

fn node(name: &str) -> String {
    format!("node: {{ id: sidecar~127.0.0.1~{name}.mark~mark.svc.cluster.local, metadata: {{ NAME: {name}, NAMESPACE: mark, WORKLOAD_NAME: {name}, CLUSTER_ID: Kubernetes, LABELS: {{ app: {name} }} }} }}\n")
}

/// Istio's TCP metadata exchange between two sidecars: the client sidecar's cluster filter and
/// the server sidecar's network filter, over mTLS with ALPN `istio-peer-exchange`, each send
/// their node's frame and take the other's off, so the app sees only its bytes and each side's
/// TCP metrics name the other workload.
#[test]
fn the_tcp_metadata_exchange_tells_each_sidecar_who_the_other_is() {
    let pki = common::tls::Pki::new("cluster.local");
    let id = "spiffe://cluster.local/ns/mark/sa/default";
    let (client_leaf, server_leaf) = (pki.leaf(&[], id), pki.leaf(&[], id));
    let app = common::upstream("app");
    let (inbound, outbound) = (free_port(), free_port());
    let write = |dir: &std::path::Path, leaf: &common::tls::Leaf| {
        std::fs::write(dir.join("cert.pem"), &leaf.cert).unwrap();
        std::fs::write(dir.join("key.pem"), &leaf.key).unwrap();
        std::fs::write(dir.join("ca.pem"), &pki.ca_pem).unwrap();
    };
    let tls_common = |dir: &std::path::Path, alpn: &str| {
        let d = dir.display();
        format!("common_tls_context: {{ alpn_protocols: [{alpn}], tls_certificates: [{{ certificate_chain: {{ filename: {d}/cert.pem }}, private_key: {{ filename: {d}/key.pem }} }}], validation_context: {{ trusted_ca: {{ filename: {d}/ca.pem }}, match_subject_alt_names: [{{ prefix: \"spiffe://cluster.local/\" }}] }} }}")
    };
    let server_dir = common::proxy::temp_dir("tcp_exchange_server");
    write(&server_dir, &server_leaf);
    let server = common::proxy::Proxy::start_in(
        server_dir.clone(),
        &format!(
            "{}static_resources:
  listeners:
  - name: virtualInbound
    traffic_direction: INBOUND
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {inbound} }} }}
    filter_chains:
    - transport_socket: {{ name: tls, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext, require_client_certificate: true, {} }} }}
      filters:
      - {TCP_EXCHANGE}
      - {}
      - {{ name: envoy.filters.network.tcp_proxy, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: inbound, cluster: \"inbound|9000||\" }} }}
  clusters:
  - name: \"inbound|9000||\"
    connect_timeout: 1s
    load_assignment: {{ cluster_name: x, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {app} }} }} }} }}] }}] }}
    metadata: {{ filter_metadata: {{ istio: {{ services: [{{ host: tcp-echo.mark.svc.cluster.local, name: tcp-echo, namespace: mark }}] }} }} }}
",
            node("server-wl"),
            tls_common(&server_dir, "istio-peer-exchange, h2, http/1.1"),
            stats_filter("inbound")
        ),
        &[],
    );
    let client_dir = common::proxy::temp_dir("tcp_exchange_client");
    write(&client_dir, &client_leaf);
    let client = common::proxy::Proxy::start_in(
        client_dir.clone(),
        &format!(
            "{}static_resources:
  listeners:
  - name: outbound_9000
    traffic_direction: OUTBOUND
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {outbound} }} }}
    filter_chains:
    - filters:
      - {}
      - {{ name: envoy.filters.network.tcp_proxy, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: outbound, cluster: \"outbound|9000||tcp-echo.mark.svc.cluster.local\" }} }}
  clusters:
  - name: \"outbound|9000||tcp-echo.mark.svc.cluster.local\"
    connect_timeout: 1s
    filters: [{TCP_EXCHANGE}]
    transport_socket: {{ name: tls, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, sni: outbound_.9000_._.tcp-echo.mark.svc.cluster.local, {} }} }}
    load_assignment: {{ cluster_name: x, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {inbound} }} }} }} }}] }}] }}
    metadata: {{ filter_metadata: {{ istio: {{ services: [{{ host: tcp-echo.mark.svc.cluster.local, name: tcp-echo, namespace: mark }}] }} }} }}
",
            node("client-wl"),
            stats_filter("outbound"),
            tls_common(&client_dir, "istio-peer-exchange, istio")
        ),
        &[],
    );
    for p in [&server, &client] {
        let log = p.log();
        assert!(!log.contains("(passed over)"), "{log}");
        assert!(
            !log.contains("not implemented: envoy.tcp.metadataexchange"),
            "{log}"
        );
    }
    {
        let mut c = TcpStream::connect(("127.0.0.1", outbound)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"hello").unwrap();
        let mut got = [0u8; 9];
        c.read_exact(&mut got).unwrap();
        // The app got exactly the client's bytes: both frames were taken off.
        assert_eq!(&got, b"app:hello", "{}\n{}", server.log(), client.log());
    }
    let labels = |reporter: &str, policy: &str| {
        format!("reporter=\"{reporter}\",source_workload=\"client-wl\",source_workload_namespace=\"mark\",source_principal=\"{id}\",source_app=\"client-wl\",source_version=\"unknown\",source_cluster=\"Kubernetes\",destination_workload=\"server-wl\",destination_workload_namespace=\"mark\",destination_principal=\"{id}\",destination_app=\"server-wl\",destination_version=\"unknown\",destination_service=\"tcp-echo.mark.svc.cluster.local\",destination_service_name=\"tcp-echo\",destination_service_namespace=\"mark\",destination_cluster=\"Kubernetes\",request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"{policy}\",source_canonical_service=\"client-wl\",destination_canonical_service=\"server-wl\",source_canonical_revision=\"latest\",destination_canonical_revision=\"latest\"")
    };
    for (p, l) in [
        (&server, labels("destination", "mutual_tls")),
        (&client, labels("source", "unknown")),
    ] {
        let want = [
            format!("istio_tcp_connections_opened_total{{{l}}} 1"),
            format!("istio_tcp_connections_closed_total{{{l}}} 1"),
            format!("istio_tcp_received_bytes_total{{{l}}} 5"),
            format!("istio_tcp_sent_bytes_total{{{l}}} 9"),
        ];
        scrape_until(p, &want);
    }
}
