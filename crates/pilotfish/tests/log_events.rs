//! The debug log tells a connection's story as Envoy's does. Through an Istio-style inbound
//! listener (iptables redirect to 15006, original_dst, the chain for the destination port, an
//! ORIGINAL_DST cluster bound to 127.0.0.6), run by real Envoy and by pilotfish in the same
//! network namespaces: one mTLS connection (tls_inspector, TLS, tcp_proxy), and one plaintext
//! HTTP request (the http_connection_manager, the router, the upstream pool). The events Envoy
//! logs for each appear in pilotfish's log in the same order, each line carrying the
//! connection's id (and the stream's). Both then clean the host the connection created out of
//! the cluster once `cleanup_interval` passes unused.

mod common;
use common::netns::*;
use common::tls::{tls_client, Pki};
use common::*;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The events of a TLS connection, as (name, pattern in Envoy's words).
const EVENTS: &[(&str, &str)] = &[
    (
        "original_dst restores the destination",
        "original_dst: set destination to 172.21.206.230:9999",
    ),
    (
        "tls_inspector reads the SNI",
        "tls:onServerName(), requestedServerName: server.example",
    ),
    ("new connection", "new connection from 172.21.206.228:"),
    (
        "tcp_proxy picks the cluster",
        "Creating connection to cluster inbound|9999||",
    ),
    (
        "upstream host created",
        "Created host inbound|9999||172.21.206.230:9999",
    ),
    ("connecting", "connecting to 172.21.206.230:9999"),
    ("connected", "connected"),
];

/// The events of an HTTP request, as (name, pattern in Envoy's words): the walk-through of
/// ../shared/seed/README.md.
const HTTP_EVENTS: &[(&str, &str)] = &[
    (
        "original_dst restores the destination",
        "original_dst: set destination to 172.21.206.230:8080",
    ),
    ("new connection", "new connection from 172.21.206.228:"),
    ("new stream", "new stream"),
    (
        "request headers complete",
        "request headers complete (end_stream=true):",
    ),
    (
        "route to the cluster",
        "cluster 'inbound|8080||' match for URL '/hello'",
    ),
    (
        "upstream host created",
        "Created host inbound|8080||172.21.206.230:8080",
    ),
    ("router decoding headers", "router decoding headers:"),
    (
        "queued for a connection",
        "queueing stream due to no available connections",
    ),
    ("new upstream connection", "creating a new connection"),
    ("connecting", "connecting to 172.21.206.230:8080"),
    ("connected", "connected"),
    ("pool ready", "pool ready"),
    (
        "upstream headers complete",
        "upstream headers complete: end_stream=false",
    ),
    (
        "encoding headers",
        "encoding headers via codec (end_stream=false):",
    ),
    ("stream done", "Codec completed encoding stream."),
];

/// An inbound listener whose port-8080 chain is an http_connection_manager to an ORIGINAL_DST
/// cluster, as Istio's 15006 is.
fn http_bootstrap() -> String {
    r#"admin: { address: { socket_address: { address: 127.0.0.1, port_value: 15000 } } }
static_resources:
  listeners:
  - name: virtualInbound
    address: { socket_address: { address: 0.0.0.0, port_value: 15006 } }
    listener_filters:
    - { name: envoy.filters.listener.original_dst, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst } }
    filter_chains:
    - filter_chain_match: { destination_port: 8080 }
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound_0.0.0.0_8080
          server_name: istio-envoy
          route_config: { name: "inbound|8080||", virtual_hosts: [{ name: "inbound|http|8080", domains: ["*"], routes: [{ name: default, match: { prefix: / }, route: { cluster: "inbound|8080||", timeout: 0s } }] }] }
          http_filters: [{ name: envoy.filters.http.router, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router } }]
  clusters:
  - name: "inbound|8080||"
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
    cleanup_interval: 0.5s
    upstream_bind_config: { source_address: { address: 127.0.0.6, port_value: 0 } }
"#
    .to_string()
}

fn bootstrap(dir: &Path, pki: &Pki) -> String {
    let server = pki.leaf(
        &["server.example"],
        "spiffe://cluster.local/ns/mark/sa/fortio-server",
    );
    for (name, text) in [
        ("ca.pem", &pki.ca_pem),
        ("server.pem", &server.cert),
        ("server.key", &server.key),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let f = |n: &str| dir.join(n).display().to_string();
    format!(
        r#"admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15000 }} }} }}
static_resources:
  listeners:
  - name: virtualInbound
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: 15006 }} }}
    listener_filters:
    - {{ name: envoy.filters.listener.original_dst, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst }} }}
    - {{ name: envoy.filters.listener.tls_inspector, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }} }}
    filter_chains:
    - filter_chain_match: {{ destination_port: 9999, transport_protocol: tls }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificates: [{{ certificate_chain: {{ filename: "{cert}" }}, private_key: {{ filename: "{key}" }} }}]
            validation_context:
              trusted_ca: {{ filename: "{ca}" }}
              match_typed_subject_alt_names: [{{ san_type: URI, matcher: {{ prefix: "spiffe://cluster.local/" }} }}]
      filters: [{{ name: envoy.filters.network.tcp_proxy, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: inbound, cluster: "inbound|9999||" }} }}]
  clusters:
  - name: "inbound|9999||"
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 1s
    cleanup_interval: 0.5s
    upstream_bind_config: {{ source_address: {{ address: 127.0.0.6, port_value: 0 }} }}
"#,
        cert = f("server.pem"),
        key = f("server.key"),
        ca = f("ca.pem")
    )
}

/// The host a story's connection makes in its ORIGINAL_DST cluster, and whether it is cleaned up
/// once unused.
struct MadeHost {
    cluster: &'static str,
    address: &'static str,
    cleaned_up: bool,
}

/// Envoy's log and pilotfish's of the same story: each runs `config` in turn while a client
/// from `client` sends the traffic.
fn envoy_then_pilotfish<C>(
    ns: &Namespaces,
    envoy: &Path,
    config: &Path,
    tag: &str,
    client: impl Fn() -> C,
    made: &MadeHost,
) -> [String; 2]
where
    C: FnOnce() -> Result<String, String> + Send + 'static,
{
    let pilotfish = Path::new(env!("CARGO_BIN_EXE_pilotfish"));
    [(envoy, true, "envoy"), (pilotfish, false, "pilotfish")].map(|(bin, is_envoy, name)| {
        let log = ns.dir.join(format!("{name}-{tag}.log"));
        run(
            &ns.pod,
            &ns.peer,
            (bin, is_envoy),
            config,
            &log,
            client(),
            made,
        )
    })
}

/// Runs one proxy in the pod namespace, has `client` (run in the peer namespace) send its
/// traffic, checks the host the cluster made (and its clean-up), returns the proxy's log.
fn run(
    pod: &str,
    peer: &str,
    (bin, is_envoy): (&Path, bool),
    config: &Path,
    log: &Path,
    client: impl FnOnce() -> Result<String, String> + Send + 'static,
    made: &MadeHost,
) -> String {
    let (cluster, host, cleaned_up) = (made.cluster, made.address, made.cleaned_up);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", pod]).arg(bin);
    cmd.args([
        "-c",
        config.to_str().unwrap(),
        "-l",
        "debug",
        "--concurrency",
        "1",
        "--log-path",
        log.to_str().unwrap(),
    ]);
    if is_envoy {
        cmd.arg("--disable-hot-restart");
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = || {
        let pod = pod.to_string();
        in_netns(&pod, || admin_request(15000, "GET", "/ready"))
    };
    while ready() != (200, "LIVE\n".to_string()) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "{} exited:\n{}",
            bin.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = in_netns(peer, client);
    assert!(
        got.as_deref()
            .is_ok_and(|g| g.starts_with("app saw 127.0.0.6:")),
        "{got:?}\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    // The host made for the connection is in /clusters, then cleaned up once unused.
    let clusters = || {
        let pod = pod.to_string();
        in_netns(&pod, || admin_request(15000, "GET", "/clusters").1)
    };
    let host_line = format!("{cluster}::{host}::cx_total::1");
    assert!(
        clusters().contains(&host_line),
        "{}: no host after the connection:\n{}",
        bin.display(),
        clusters()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while cleaned_up && clusters().contains(&format!("{cluster}::{host}::")) {
        assert!(
            Instant::now() < deadline,
            "{}: the unused host was not cleaned up:\n{}",
            bin.display(),
            clusters()
                .lines()
                .filter(|l| l.starts_with(cluster))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // SIGTERM, so each flushes its log file before it exits.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::read_to_string(log).unwrap()
}

/// The events of the story, in the order the log tells them, from its first event on (what the
/// admin server logs of its own requests before comes first and is no part of it).
fn story(log: &str, events: &[(&'static str, &'static str)]) -> Vec<&'static str> {
    let mut out = vec![];
    let start = log.find(events[0].1).unwrap_or(log.len());
    let start = log[..start].rfind('\n').map_or(0, |i| i + 1);
    for line in log[start..].lines() {
        for (name, pattern) in events {
            let hit = if *pattern == "connected" {
                line.ends_with("] connected") || line.ends_with(" connected")
            } else {
                line.contains(pattern)
            };
            if hit && !out.contains(name) {
                out.push(*name);
            }
        }
    }
    out
}

/// Envoy's story and pilotfish's must be the same; every line of it names its connection.
fn same_story(
    envoy_log: &str,
    ours_log: &str,
    events: &[(&'static str, &'static str)],
    id_tag: &str,
) {
    let (theirs, ours) = (story(envoy_log, events), story(ours_log, events));
    assert_eq!(
        theirs.len(),
        events.len(),
        "Envoy's log lacks some events:\n{theirs:?}\n{envoy_log}"
    );
    assert_eq!(ours, theirs, "\npilotfish's log:\n{ours_log}");
    // A line Envoy tags with its connection is tagged in pilotfish's log too.
    for (_, p) in events.iter().filter(|(_, p)| *p != "connected") {
        let tagged = envoy_log
            .lines()
            .find(|l| l.contains(p))
            .is_some_and(|l| l.contains("\"ConnectionId\""));
        if let Some(line) = ours_log.lines().find(|l| l.contains(p)) {
            assert!(!tagged || line.contains(id_tag), "no {id_tag}: {line}");
        }
    }
}

/// The namespaces, Envoy, and what the test needs, or None (said) when it cannot run here.
fn setup(name: &str) -> Option<(Namespaces, std::path::PathBuf)> {
    let shared = shared_dir("log events")?;
    if !can_run() {
        return None;
    }
    let envoy = envoy("log events")?;
    Some((setup_pod(name, &shared), envoy))
}

#[test]
fn one_tls_connection_tells_envoys_story() {
    let Some((ns, envoy)) = setup("log-events") else {
        return;
    };
    serve(
        in_netns(&ns.pod, || TcpListener::bind("0.0.0.0:9999").unwrap()),
        "app",
    );
    let pki = Pki::new("mesh ca");
    let config = ns.dir.join("inbound.yaml");
    std::fs::write(&config, bootstrap(&ns.dir, &pki)).unwrap();
    let mtls_client = || {
        let client = pki.leaf(&[], "spiffe://cluster.local/ns/mark/sa/default");
        let ca = pki.ca_pem.clone();
        move || {
            // The client dials the pod's IP (tls_client dials 127.0.0.1): reach the pod through
            // a local forwarder in this namespace.
            let fwd = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = fwd.local_addr().unwrap().port();
            std::thread::spawn(move || {
                let (mut a, _) = fwd.accept().unwrap();
                let mut b = std::net::TcpStream::connect("172.21.206.230:9999").unwrap();
                let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut b2, &mut a2);
                });
                let _ = std::io::copy(&mut a, &mut b);
                // The client is done: pass its close on, so the proxy's connection ends.
                let _ = b.shutdown(std::net::Shutdown::Write);
            });
            tls_client(port, &ca, Some(&client), &[], "ping")
        }
    };
    let made = MadeHost {
        cluster: "inbound|9999||",
        address: "172.21.206.230:9999",
        cleaned_up: true,
    };
    let logs = envoy_then_pilotfish(&ns, &envoy, &config, "tls", mtls_client, &made);
    same_story(&logs[0], &logs[1], EVENTS, "] [C");
}

#[test]
fn one_http_request_tells_envoys_story() {
    let Some((ns, envoy)) = setup("log-http") else {
        return;
    };
    serve_http(
        in_netns(&ns.pod, || TcpListener::bind("0.0.0.0:8080").unwrap()),
        "app",
    );
    let config = ns.dir.join("inbound-http.yaml");
    std::fs::write(&config, http_bootstrap()).unwrap();
    let request = || {
        let mut c =
            std::net::TcpStream::connect("172.21.206.230:8080").map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(
            b"GET /hello HTTP/1.1\r\nhost: fortio-server:8080\r\nconnection: close\r\n\r\n",
        )
        .map_err(|e| e.to_string())?;
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        // What the app answered, after the proxy's response head.
        out.split_once("\r\n\r\n")
            .map(|(head, body)| {
                assert!(head.contains("server: istio-envoy"), "{head}");
                body.to_string()
            })
            .ok_or(out)
    };
    let made = MadeHost {
        cluster: "inbound|8080||",
        address: "172.21.206.230:8080",
        // The pool's idle keep-alive connection keeps the host in use, in both.
        cleaned_up: false,
    };
    let logs = envoy_then_pilotfish(&ns, &envoy, &config, "http", || request, &made);
    same_story(&logs[0], &logs[1], HTTP_EVENTS, "[C");
}
