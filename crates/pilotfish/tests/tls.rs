//! TLS through `pilotfish -c`: downstream termination with client certificates (a SPIFFE SAN
//! accepted, another refused, an untrusted CA and a missing certificate refused), certificates
//! from a file, inline and from an SDS secret; upstream TLS with SNI, ALPN, a client
//! certificate and SAN verification of the server; and Istio's transport_socket_matches picking
//! mTLS or plaintext per endpoint by its `tlsMode` metadata.

mod common;
use common::free_port;
use common::proxy::{temp_dir, Proxy};
use common::tls::{tls_client, tls_upstream, Pki};
use common::upstream as plain_upstream;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn indent(pem: &str, spaces: usize) -> String {
    pem.lines()
        .map(|l| format!("{}{l}\n", " ".repeat(spaces)))
        .collect()
}

#[test]
fn downstream_mtls_accepts_the_right_san_and_refuses_the_rest() {
    let pki = Pki::new("mesh ca");
    let other = Pki::new("another ca");
    let server = pki.leaf(
        &["server.example"],
        "spiffe://cluster.local/ns/mark/sa/fortio-server",
    );
    let good = pki.leaf(&[], "spiffe://cluster.local/ns/mark/sa/default");
    let wrong_san = pki.leaf(&[], "spiffe://elsewhere.local/ns/x/sa/y");
    let untrusted = other.leaf(&[], "spiffe://cluster.local/ns/mark/sa/default");
    let up = plain_upstream("app");
    let port = free_port();
    let dir = temp_dir("down");
    // The server certificate from files through an SDS secret, the CA inline.
    std::fs::write(dir.join("cert.pem"), &server.cert).unwrap();
    std::fs::write(dir.join("key.pem"), &server.key).unwrap();
    let resources = format!(
        r#"static_resources:
  secrets:
  - name: default
    tls_certificate:
      certificate_chain: {{ filename: {cert} }}
      private_key: {{ filename: {key} }}
  listeners:
  - name: inbound
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    listener_filters: [{{ name: envoy.filters.listener.tls_inspector, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }} }}]
    filter_chains:
    - filter_chain_match: {{ transport_protocol: tls }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificate_sds_secret_configs: [{{ name: default }}]
            validation_context:
              match_typed_subject_alt_names: [{{ san_type: URI, matcher: {{ prefix: "spiffe://cluster.local/" }} }}]
              trusted_ca:
                inline_string: |
{ca}
      filters: [{{ name: envoy.filters.network.tcp_proxy, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: in, cluster: app }} }}]
  clusters:
  - {{ name: app, type: STATIC, load_assignment: {{ cluster_name: app, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {up} }} }} }} }}] }}] }} }}
"#,
        cert = dir.join("cert.pem").display(),
        key = dir.join("key.pem").display(),
        ca = indent(&pki.ca_pem, 18),
    );
    let p = Proxy::start_in(dir, &resources, &["-l", "debug"]);
    // The right SAN: TLS terminated, the app gets plaintext.
    assert_eq!(
        tls_client(port, &pki.ca_pem, Some(&good), &["h2"], "hello").as_deref(),
        Ok("app:hello")
    );
    // A SAN outside the matcher: the handshake completes, then the connection is closed.
    assert!(tls_client(port, &pki.ca_pem, Some(&wrong_san), &[], "x").is_err());
    // A certificate from another CA, and none at all: refused in the handshake.
    assert!(tls_client(port, &pki.ca_pem, Some(&untrusted), &[], "x").is_err());
    assert!(tls_client(port, &pki.ca_pem, None, &[], "x").is_err());
    let (_, stats) = common::admin_request(
        p.admin,
        "GET",
        &format!("/stats?filter=listener.127.0.0.1_{port}.ssl"),
    );
    for line in [
        "ssl.handshake: 1",
        "ssl.fail_verify_san: 1",
        "ssl.connection_error: 2",
    ] {
        assert!(stats.contains(line), "{line} not in\n{stats}");
    }
}

#[test]
fn upstream_tls_by_transport_socket_match_with_sni_alpn_and_client_certificate() {
    let pki = Pki::new("mesh ca");
    let upstream_cert = pki.leaf(
        &["server.example"],
        "spiffe://cluster.local/ns/mark/sa/fortio-server",
    );
    let client = pki.leaf(&[], "spiffe://cluster.local/ns/mark/sa/default");
    let tls_up = tls_upstream(
        &upstream_cert,
        &pki.ca_pem,
        "spiffe://cluster.local/ns/mark/sa/default",
    );
    let plain = plain_upstream("plain");
    let (port, port_bad) = (free_port(), free_port());
    let dir = temp_dir("up");
    let ctx = |san: &str| {
        format!(
            r#"
        transport_socket:
          name: envoy.transport_sockets.tls
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
            sni: outbound_.8080_._.fortio-server.mark.svc.cluster.local
            common_tls_context:
              alpn_protocols: [istio-peer-exchange, istio]
              tls_certificates:
              - certificate_chain: {{ inline_string: "{cert}" }}
                private_key: {{ inline_string: "{key}" }}
              combined_validation_context:
                default_validation_context:
                  match_subject_alt_names: [{{ exact: "{san}" }}]
                validation_context_sds_secret_config: {{ name: ROOTCA }}"#,
            cert = client.cert.replace('\n', "\\n"),
            key = client.key.replace('\n', "\\n"),
        )
    };
    let cluster = |name: &str, san: &str| {
        format!(
            r#"
  - name: {name}
    type: STATIC
    transport_socket_matches:
    - name: tlsMode-istio
      match: {{ tlsMode: istio }}{}
    - name: tlsMode-disabled
      match: {{}}
      transport_socket: {{ name: envoy.transport_sockets.raw_buffer, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer }} }}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {tls_up} }} }} }}
          metadata: {{ filter_metadata: {{ envoy.transport_socket_match: {{ tlsMode: istio }} }} }}
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {plain} }} }} }}
          metadata: {{ filter_metadata: {{ envoy.transport_socket_match: {{ tlsMode: disabled }} }} }}"#,
            ctx(san).replace("\n        ", "\n      ")
        )
    };
    let listener = |name: &str, port: u16, cluster: &str| {
        format!(
            "  - {{ name: {name}, address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}, filter_chains: [{{ filters: [{{ name: envoy.filters.network.tcp_proxy, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: {name}, cluster: {cluster} }} }}] }}] }}\n"
        )
    };
    let resources = format!(
        "static_resources:\n  secrets:\n  - name: ROOTCA\n    validation_context:\n      trusted_ca:\n        inline_string: |\n{}  listeners:\n{}{}  clusters:{}{}\n",
        indent(&pki.ca_pem, 10),
        listener("out", port, "mesh"),
        listener("out_bad", port_bad, "mesh_wrong_san"),
        cluster("mesh", "spiffe://cluster.local/ns/mark/sa/fortio-server"),
        cluster("mesh_wrong_san", "spiffe://cluster.local/ns/mark/sa/somebody-else"),
    );
    let p = Proxy::start_in(dir, &resources, &["-l", "debug"]);
    let ask = |port: u16| -> String {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"hi").unwrap();
        // Each upstream answers in one piece (nothing, when the proxy closes instead).
        let mut buf = vec![0u8; 4096];
        let n = c.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // Round robin over the two endpoints: one gets mTLS, the other plaintext.
    let mut answers = [ask(port), ask(port)];
    answers.sort();
    assert_eq!(answers[0], "plain:hi");
    assert_eq!(
        answers[1],
        "tls upstream: sni=outbound_.8080_._.fortio-server.mark.svc.cluster.local alpn=istio-peer-exchange client_san=true got=hi"
    );
    // The server's SAN is not the one expected: the TLS endpoint's connection fails, the
    // plaintext one still works.
    let mut answers = [ask(port_bad), ask(port_bad)];
    answers.sort();
    assert_eq!(answers, ["".to_string(), "plain:hi".to_string()]);
    let (_, stats) = common::admin_request(
        p.admin,
        "GET",
        "/stats?filter=cluster.mesh_wrong_san.upstream_cx_connect_fail",
    );
    assert!(stats.contains("upstream_cx_connect_fail: 1"), "{stats}");
}

#[test]
fn downstream_tls_resumes_sessions_and_keeps_to_its_ecdh_curves() {
    let pki = Pki::new("mesh ca");
    let server = pki.leaf(&["server.example"], "spiffe://cluster.local/ns/a/sa/b");
    let up = plain_upstream("app");
    let (resuming, not_resuming) = (free_port(), free_port());
    let listener = |name: &str, port: u16, extra: &str| {
        format!(
            r#"  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
{extra}          common_tls_context:
            tls_params: {{ ecdh_curves: [P-384] }}
            tls_certificates:
            - certificate_chain: {{ inline_string: "{}" }}
              private_key: {{ inline_string: "{}" }}
      filters: [{{ name: envoy.filters.network.tcp_proxy, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: t, cluster: app }} }}]
"#,
            server.cert.replace('\n', "\\n"),
            server.key.replace('\n', "\\n"),
        )
    };
    let resources = format!(
        "static_resources:\n  listeners:\n{}{}  clusters:\n  - {{ name: app, type: STATIC, load_assignment: {{ cluster_name: app, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {up} }} }} }} }}] }}] }} }}\n",
        listener("resuming", resuming, ""),
        listener(
            "not_resuming",
            not_resuming,
            "          disable_stateless_session_resumption: true\n          disable_stateful_session_resumption: true\n"
        ),
    );
    let _p = Proxy::start("resume", &resources, &[]);
    use common::tls::{tls_client_config, tls_handshake};
    use rustls::HandshakeKind::{Full, Resumed};
    // Only P-384 is accepted for the key exchange.
    let x25519 = tls_client_config(&pki.ca_pem, &["X25519"]);
    assert!(tls_handshake(resuming, &x25519).is_err());
    let p384 = tls_client_config(&pki.ca_pem, &["P-384"]);
    assert_eq!(tls_handshake(resuming, &p384), Ok(Full));
    assert_eq!(tls_handshake(resuming, &p384), Ok(Resumed));
    // With both kinds of resumption turned off, every handshake is a full one.
    let fresh = tls_client_config(&pki.ca_pem, &["P-384"]);
    assert_eq!(tls_handshake(not_resuming, &fresh), Ok(Full));
    assert_eq!(tls_handshake(not_resuming, &fresh), Ok(Full));
}
