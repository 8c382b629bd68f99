//! The debug log tells a connection's story as Envoy's does. One mTLS connection through an
//! Istio-style inbound listener (iptables redirect to 15006, original_dst, tls_inspector, the TLS
//! filter chain, tcp_proxy to an ORIGINAL_DST cluster bound to 127.0.0.6), run by real Envoy and
//! by pilotfish in the same network namespaces: the events Envoy logs for it appear in
//! pilotfish's log in the same order, each line carrying the connection's id. Both then clean
//! the host the connection created out of the cluster once `cleanup_interval` passes unused.

mod common;
use common::netns::*;
use common::tls::{tls_client, Pki};
use common::*;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The events of a connection, as (name, pattern in Envoy's words).
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

/// Runs one proxy in the pod namespace, sends one mTLS connection from the peer, returns its log.
fn run(
    pod: &str,
    peer: &str,
    bin: &Path,
    config: &Path,
    log: &Path,
    is_envoy: bool,
    pki: &Pki,
) -> String {
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
    let client = pki.leaf(&[], "spiffe://cluster.local/ns/mark/sa/default");
    let ca = pki.ca_pem.clone();
    let got = in_netns(peer, move || {
        // The client dials the pod's IP (tls_client dials 127.0.0.1): reach the pod through a
        // local forwarder in this namespace.
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
    });
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
    let host_line = "inbound|9999||::172.21.206.230:9999::cx_total::1";
    assert!(
        clusters().contains(host_line),
        "{}: no host after the connection:\n{}",
        bin.display(),
        clusters()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while clusters().contains("inbound|9999||::172.21.206.230:9999::") {
        assert!(
            Instant::now() < deadline,
            "{}: the unused host was not cleaned up:\n{}",
            bin.display(),
            clusters()
                .lines()
                .filter(|l| l.contains("inbound"))
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

/// The events of the story, in the order the log tells them, with the connection ids seen.
fn story(log: &str) -> Vec<&'static str> {
    let mut out = vec![];
    for line in log.lines() {
        for (name, pattern) in EVENTS {
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

#[test]
fn one_tls_connection_tells_envoys_story() {
    let Some(shared) = shared_dir("log events") else {
        return;
    };
    if !can_run() {
        return;
    }
    let Some(envoy) = envoy("log events") else {
        return;
    };
    let ns = setup_pod("log-events", &shared);
    serve(
        in_netns(&ns.pod, || TcpListener::bind("0.0.0.0:9999").unwrap()),
        "app",
    );
    let pki = Pki::new("mesh ca");
    let config = ns.dir.join("inbound.yaml");
    std::fs::write(&config, bootstrap(&ns.dir, &pki)).unwrap();
    let envoy_log = run(
        &ns.pod,
        &ns.peer,
        &envoy,
        &config,
        &ns.dir.join("envoy.log"),
        true,
        &pki,
    );
    let ours_log = run(
        &ns.pod,
        &ns.peer,
        Path::new(env!("CARGO_BIN_EXE_pilotfish")),
        &config,
        &ns.dir.join("pilotfish.log"),
        false,
        &pki,
    );
    let (theirs, ours) = (story(&envoy_log), story(&ours_log));
    assert_eq!(
        theirs.len(),
        EVENTS.len(),
        "Envoy's log lacks some events:\n{theirs:?}\n{envoy_log}"
    );
    assert_eq!(ours, theirs, "\npilotfish's log:\n{ours_log}");
    // Every line of the story names its connection.
    for line in ours_log.lines().filter(|l| {
        EVENTS
            .iter()
            .any(|(_, p)| *p != "connected" && l.contains(p))
    }) {
        assert!(line.contains("] [C"), "no connection id: {line}");
    }
}
