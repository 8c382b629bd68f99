//! L4 conformance against real Envoy: each scenario's bootstrap runs in Envoy 1.40 and in
//! `pilotfish -c`, the same connections go through both, and the answers must be the same: which
//! upstream got the bytes (each upstream answers with its name), whether the connection was
//! closed without an answer, the core counters, and for some scenarios the `/clusters` host list.

mod common;
use common::side_by_side::{self, Running};
use common::tls::{tls_client, tls_upstream, Leaf, Pki};
use common::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

/// An upstream that answers health checks over HTTP/1.1 (`/healthz` 200, `/sick` 503) and
/// otherwise answers like the others, with its name.
fn http_upstream(name: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                let Ok(n) = c.read(&mut buf) else { return };
                let got = &buf[..n];
                let status = if got.starts_with(b"GET /healthz ") {
                    Some("200 OK")
                } else if got.starts_with(b"GET /sick ") {
                    Some("503 Service Unavailable")
                } else {
                    None
                };
                match status {
                    Some(s) => {
                        let _ = write!(
                            c,
                            "HTTP/1.1 {s}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        );
                    }
                    None => {
                        let mut reply = format!("{name}:").into_bytes();
                        reply.extend(got);
                        let _ = c.write_all(&reply);
                        let _ = c.read(&mut buf);
                    }
                }
            });
        }
    });
    port
}

/// An upstream that answers like the others (as `late`) while started, and refuses otherwise.
/// Its port is held all along by a socket bound but not listening (which refuses connections),
/// so nothing else can take it between runs.
struct Late {
    port: u16,
    held: std::sync::Mutex<socket2::Socket>,
    running: std::sync::Mutex<Option<std::sync::Arc<std::sync::atomic::AtomicBool>>>,
}

/// A socket bound to 127.0.0.1:`port` (0 for any) that may share its port with the listener.
fn holder(port: u16) -> socket2::Socket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_reuse_port(true).unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    s.bind(&addr.into()).unwrap();
    s
}

impl Late {
    fn new() -> Late {
        let held = holder(0);
        let port = held.local_addr().unwrap().as_socket().unwrap().port();
        Late {
            port,
            held: std::sync::Mutex::new(held),
            running: Default::default(),
        }
    }

    fn start(&self) {
        // The held socket starts listening; a fresh one holds the port for after `stop`.
        let l = std::mem::replace(&mut *self.held.lock().unwrap(), holder(self.port));
        l.listen(128).unwrap();
        let l: TcpListener = l.into();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        *self.running.lock().unwrap() = Some(stop.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let Ok(mut c) = c else { continue };
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 4096];
                    let mut first = true;
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 {
                            return;
                        }
                        let mut reply = if first { b"late:".to_vec() } else { vec![] };
                        first = false;
                        reply.extend(&buf[..n]);
                        if c.write_all(&reply).is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }

    fn stop(&self) {
        if let Some(stop) = self.running.lock().unwrap().take() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            // Wake the accept loop so it sees the flag and drops the listener.
            let _ = TcpStream::connect(("127.0.0.1", self.port));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

struct Upstreams {
    u: [u16; 3],
    v6: u16,
    /// Answers HTTP health checks.
    h: u16,
    /// Nothing listens here: connections are refused.
    refused: u16,
    /// An upstream the steps start and stop.
    late: Late,
    /// A TLS upstream requiring a client certificate, and the PKI of the TLS scenarios, whose
    /// files the configurations name ({CA}, {SCERT}, {SKEY}, {CCERT}, {CKEY}).
    tls: u16,
    pki: Pki,
    good: Leaf,
    wrong_san: Leaf,
    untrusted: Leaf,
    files: Vec<(&'static str, String)>,
}

enum Step {
    /// A TLS client (trusting the test CA for server.example), with the named certificate
    /// (`good`, `wrong_san`, `untrusted`, or none): what came back, or `refused`.
    Tls {
        cert: Option<&'static str>,
        payload: &'static str,
    },
    /// Connect (from this source address), send, wait for the first answer, half-close, read the
    /// answer to the end.
    Send {
        from: &'static str,
        payload: Vec<u8>,
    },
    /// Let time pass (health checks run).
    Sleep {
        ms: u64,
    },
    /// Start the `late` upstream on its port ({LATE}), which refuses connections until then.
    Listen,
    /// Stop it again, so the next run starts the same way.
    Unlisten,
    /// Connect, send, wait for the answer, and keep the connection open.
    Open {
        payload: &'static [u8],
    },
    /// Send on every open connection after the given idle pause; see who still answers.
    Idle {
        ms: u64,
    },
    CloseAll,
}

struct Scenario {
    name: &'static str,
    /// The static_resources block; {L} listener port, {U0} {U1} {U2} upstream ports, {V6} the IPv6
    /// upstream, {R} a refused port.
    resources: String,
    steps: Vec<Step>,
    /// Stats compared after the steps ({L} is replaced by the listener's stat scope).
    stats: &'static [&'static str],
    clusters: bool,
}

fn send(s: &'static [u8]) -> Step {
    Step::Send {
        from: "127.0.0.1",
        payload: s.to_vec(),
    }
}

fn send_from(from: &'static str, s: &'static [u8]) -> Step {
    Step::Send {
        from,
        payload: s.to_vec(),
    }
}

/// A tcp_proxy filter whose config (besides its stat_prefix) is `spec`.
fn tp_with(spec: &str) -> String {
    format!("{{ name: envoy.filters.network.tcp_proxy, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: tp, {spec} }} }}")
}

fn tp(cluster: &str) -> String {
    tp_with(&format!("cluster: {cluster}"))
}

/// A filter chain with only a tcp_proxy configured by `spec`.
fn chain_with(spec: &str) -> String {
    format!("    - filters: [{}]\n", tp_with(spec))
}

fn cluster(name: &str, ports: &[&str], extra: &str) -> String {
    side_by_side::static_cluster(name, ports, extra)
}

/// A STATIC cluster `c` over U0, U1, U2 with the given host weights (and `extra` cluster fields).
fn weighted_cluster(weights: [u32; 3], extra: &str) -> String {
    let eps: Vec<String> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{{ load_balancing_weight: {w}, endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {{U{i}}} }} }} }} }}"))
        .collect();
    format!("  - {{ name: c, type: STATIC, connect_timeout: 1s{extra}, load_assignment: {{ cluster_name: c, endpoints: [{{ lb_endpoints: [{}] }}] }} }}\n", eps.join(", "))
}

/// A tcp_proxy to `c` hashing the source address, over `cluster`.
fn by_source_ip(cluster: String) -> String {
    format!(
        "{}{cluster}",
        listener(
            "",
            &chain_with("cluster: c, hash_policy: [{ source_ip: {} }]")
        )
    )
}

/// Connections from nine loopback source addresses.
fn from_nine_sources() -> Vec<Step> {
    [
        "127.0.0.1",
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
        "127.0.0.5",
        "127.0.0.6",
        "127.0.0.7",
        "127.0.0.8",
        "127.0.0.9",
    ]
    .iter()
    .map(|from| send_from(from, b"hash"))
    .collect()
}

fn listener(filters: &str, chains: &str) -> String {
    format!("static_resources:\n  listeners:\n  - name: l\n    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {{L}} }} }}\n{filters}    filter_chains:\n{chains}  clusters:\n")
}

fn one_chain(cluster_name: &str) -> String {
    listener("", &format!("    - filters: [{}]\n", tp(cluster_name)))
}

const TLS_INSPECTOR: &str = "    listener_filters: [{ name: envoy.filters.listener.tls_inspector, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector } }]\n";
const BOTH_INSPECTORS: &str = "    listener_filters:\n    - { name: envoy.filters.listener.tls_inspector, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector } }\n    - { name: envoy.filters.listener.http_inspector, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector } }\n";

fn hello(sni: &str, alpn: &[&str]) -> Step {
    Step::Send {
        from: "127.0.0.1",
        payload: client_hello(sni, alpn),
    }
}

fn sc(
    name: &'static str,
    resources: String,
    steps: Vec<Step>,
    stats: &'static [&'static str],
    clusters: bool,
) -> Scenario {
    Scenario {
        name,
        resources,
        steps,
        stats,
        clusters,
    }
}

/// A filter chain with a match, to a tcp_proxy for `cluster`.
fn chain(m: &str, cluster: &str) -> String {
    format!(
        "    - {{ filter_chain_match: {m}, filters: [{}] }}\n",
        tp(cluster)
    )
}

/// A STATIC cluster whose hosts carry a priority and an EDS health status.
fn health_cluster(hosts: &[(&str, u32, &str)]) -> String {
    let mut by_priority: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (port, priority, health) in hosts {
        by_priority.entry(*priority).or_default().push(format!(
            "{{ health_status: {health}, endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }}"
        ));
    }
    let levels: Vec<String> = by_priority
        .iter()
        .map(|(p, eps)| {
            format!(
                "{{ priority: {p}, locality: {{ region: r{p}, zone: z{p} }}, lb_endpoints: [{}] }}",
                eps.join(", ")
            )
        })
        .collect();
    format!(
        "  - {{ name: c, type: STATIC, connect_timeout: 1s, load_assignment: {{ cluster_name: c, endpoints: [{}] }} }}\n",
        levels.join(", ")
    )
}

fn with_default(resources: String, cluster: &str) -> String {
    resources.replace(
        "  clusters:\n",
        &format!(
            "    default_filter_chain: {{ filters: [{}] }}\n  clusters:\n",
            tp(cluster)
        ),
    )
}

const SNI_MATCHER: &str = r#"    filter_chain_matcher:
      matcher_tree:
        input: { name: sni, typed_config: { "@type": type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.ServerNameInput } }
        exact_match_map:
          map:
            a.example.com: { action: { name: x, typed_config: { "@type": type.googleapis.com/google.protobuf.StringValue, value: fa } } }
      on_no_match: { action: { name: x, typed_config: { "@type": type.googleapis.com/google.protobuf.StringValue, value: fc } } }
"#;

const HTTP_INSPECTOR_DISABLED: &str = "    listener_filters:\n    - { name: envoy.filters.listener.http_inspector, filter_disabled: { destination_port_range: { start: 1, end: 65535 } }, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector } }\n";

/// A TLS filter chain to cluster `c`: the server certificate and CA from files, SPIFFE SANs of
/// the mesh accepted.
fn downstream_mtls(require: bool) -> String {
    format!(
        r#"    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: {require}
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificates: [{{ certificate_chain: {{ filename: "{{SCERT}}" }}, private_key: {{ filename: "{{SKEY}}" }} }}]
            validation_context:
              trusted_ca: {{ filename: "{{CA}}" }}
              match_typed_subject_alt_names: [{{ san_type: URI, matcher: {{ prefix: "spiffe://cluster.local/" }} }}]
      filters: [{}]
"#,
        tp("c")
    )
}

/// A cluster reaching the TLS upstream with Istio's upstream TLS shape.
fn upstream_tls_cluster(name: &str, san: &str) -> String {
    format!(
        r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: outbound_.8080_._.fortio-server.mark.svc.cluster.local
        common_tls_context:
          alpn_protocols: [istio-peer-exchange, istio]
          tls_params: {{ tls_maximum_protocol_version: TLSv1_3 }}
          tls_certificates: [{{ certificate_chain: {{ filename: "{{CCERT}}" }}, private_key: {{ filename: "{{CKEY}}" }} }}]
          validation_context:
            trusted_ca: {{ filename: "{{CA}}" }}
            match_subject_alt_names: [{{ exact: "{san}" }}]
    load_assignment: {{ cluster_name: {name}, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {{T}} }} }} }} }}] }}] }}
"#
    )
}

/// A file access log at the run's own path, with this log_format.
fn file_log(log_format: &str) -> String {
    format!("{{ name: envoy.access_loggers.file, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: \"{{ACCESS_LOG}}\", log_format: {{ {log_format} }} }} }}")
}

/// A file access log writing `name` and the response flags, behind `filter`.
fn filtered_log(name: &str, filter: &str) -> String {
    file_log(&format!(
        "text_format_source: {{ inline_string: \"{name} %RESPONSE_FLAGS%\\n\" }}"
    ))
    .replacen(
        "{ name: envoy.access_loggers.file,",
        &format!("{{ name: envoy.access_loggers.file, filter: {{ {filter} }},"),
        1,
    )
}

/// Active health checking every 200 ms (with or without traffic), one result deciding.
fn hc(checker: &str) -> String {
    format!(", health_checks: [{{ timeout: 0.5s, interval: 0.2s, no_traffic_interval: 0.2s, unhealthy_threshold: 1, healthy_threshold: 1, {checker} }}]")
}

/// Not here: a client that sends and half-closes at once, before the listener filters are done.
/// Real Envoy closes it mostly, and sometimes serves it, depending on whether it reads the bytes
/// and the close in one event; pilotfish closes it (downstream_listener_filter_remote_close).
fn scenarios() -> Vec<Scenario> {
    let c0 = cluster("c", &["{U0}"], "");
    let three = cluster("c", &["{U0}", "{U1}", "{U2}"], "");
    let abc = format!(
        "{}{}{}",
        cluster("a", &["{U0}"], ""),
        cluster("b", &["{U1}"], ""),
        cluster("c", &["{U2}"], "")
    );
    let counters: &[&str] = &[
        "cluster.c.upstream_cx_total",
        "cluster.c.upstream_cx_connect_fail",
        "tcp.tp.downstream_cx_total",
        "{L}.downstream_cx_total",
        "{L}.no_filter_chain_match",
    ];
    let sni_chains = [
        chain("{ server_names: [a.example.com] }", "a"),
        chain("{ server_names: [\"*.example.com\"] }", "b"),
        chain("{ transport_protocol: raw_buffer }", "c"),
    ]
    .concat();
    let sni = listener(TLS_INSPECTOR, &sni_chains);
    let ab = |first: &str, second: &str| [chain(first, "a"), chain(second, "b")].concat();
    let with_c = |first: &str| [chain(first, "a"), chain("{}", "c")].concat();
    let ipv6 = format!(
        "static_resources:\n  listeners:\n  - name: l\n    address: {{ socket_address: {{ address: \"::1\", port_value: {{L}} }} }}\n    filter_chains: [{{ filters: [{}] }}]\n  clusters:\n  - {{ name: c, type: STATIC, connect_timeout: 1s, load_assignment: {{ cluster_name: c, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: \"::1\", port_value: {{V6}} }} }} }} }}] }}] }} }}\n",
        tp("c")
    );
    let large: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    vec![
        sc("one host", format!("{}{c0}", one_chain("c")), vec![send(b"x"), send(b"y")], counters, true),
        sc("round robin", format!("{}{three}", one_chain("c")), (0..6).map(|_| send(b"rr")).collect(), counters, true),
        sc("refused host", format!("{}{}", one_chain("c"), cluster("c", &["{R}"], "")), vec![send(b"x")], counters, true),
        sc(
            "max_connect_attempts",
            format!("{}{}", listener("", &chain_with("cluster: c, max_connect_attempts: 2")), cluster("c", &["{R}", "{R}"], "")),
            vec![send(b"x")],
            counters,
            true,
        ),
        sc(
            "weighted clusters 1000000:1",
            format!(
                "{}{}{}",
                listener("", &chain_with("weighted_clusters: { clusters: [{ name: a, weight: 1000000 }, { name: b, weight: 1 }] }")),
                cluster("a", &["{U0}"], ""),
                cluster("b", &["{U1}"], "")
            ),
            vec![send(b"w"), send(b"w"), send(b"w")],
            &["cluster.a.upstream_cx_total", "cluster.b.upstream_cx_total"],
            false,
        ),
        sc(
            "priorities: P0 unhealthy goes to P1",
            format!("{}{}", one_chain("c"), health_cluster(&[("{U0}", 0, "UNHEALTHY"), ("{U1}", 1, "HEALTHY")])),
            vec![send(b"p"), send(b"p")],
            counters,
            true,
        ),
        sc(
            "draining host left out",
            format!("{}{}", one_chain("c"), health_cluster(&[("{U0}", 0, "DRAINING"), ("{U1}", 0, "HEALTHY")])),
            vec![send(b"d"), send(b"d")],
            counters,
            true,
        ),
        sc(
            "all hosts unhealthy: panic",
            format!("{}{}", one_chain("c"), health_cluster(&[("{U0}", 0, "UNHEALTHY")])),
            vec![send(b"u")],
            &["cluster.c.upstream_cx_total", "cluster.c.upstream_cx_none_healthy"],
            true,
        ),
        sc(
            "unknown cluster",
            format!("{}{c0}", one_chain("missing")),
            vec![send(b"x")],
            &["tcp.tp.downstream_cx_no_route", "tcp.tp.downstream_cx_total"],
            false,
        ),
        sc("SNI exact", format!("{sni}{abc}"), vec![hello("a.example.com", &[])], &["cluster.a.upstream_cx_total"], false),
        sc(
            "SNI wildcard",
            format!("{sni}{abc}"),
            vec![hello("x.y.example.com", &[]), hello("example.com", &[])],
            &["cluster.b.upstream_cx_total", "{L}.no_filter_chain_match"],
            false,
        ),
        sc("plaintext to raw_buffer chain", format!("{sni}{abc}"), vec![send(b"plain")], &["cluster.c.upstream_cx_total"], false),
        sc(
            "TLS without SNI, default chain",
            format!("{}{abc}", with_default(sni.clone(), "c")),
            vec![hello("", &["h2"])],
            &["cluster.c.upstream_cx_total"],
            false,
        ),
        sc(
            "ALPN",
            format!("{}{abc}", listener(TLS_INSPECTOR, &ab("{ application_protocols: [h2] }", "{ application_protocols: [http/1.1] }"))),
            vec![hello("s", &["h2", "http/1.1"]), hello("s", &["http/1.1"]), hello("s", &["istio"])],
            &["cluster.a.upstream_cx_total", "cluster.b.upstream_cx_total"],
            false,
        ),
        sc(
            "http_inspector HTTP/1.1 and h2c",
            format!(
                "{}{abc}",
                listener(
                    BOTH_INSPECTORS,
                    &[ab("{ application_protocols: [http/1.1] }", "{ application_protocols: [h2c] }"), chain("{}", "c")].concat()
                )
            ),
            vec![send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"), send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), send(b"HELLO there\r\n")],
            &["cluster.a.upstream_cx_total", "cluster.b.upstream_cx_total", "cluster.c.upstream_cx_total"],
            false,
        ),
        sc(
            "http_inspector disabled by port",
            format!("{}{abc}", listener(HTTP_INSPECTOR_DISABLED, &with_c("{ application_protocols: [http/1.1] }"))),
            vec![send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")],
            &["cluster.a.upstream_cx_total", "cluster.c.upstream_cx_total"],
            false,
        ),
        sc(
            "source prefix ranges",
            format!(
                "{}{abc}",
                listener(
                    "",
                    &ab(
                        "{ source_prefix_ranges: [{ address_prefix: 127.0.0.2, prefix_len: 32 }] }",
                        "{ source_prefix_ranges: [{ address_prefix: 127.0.0.0, prefix_len: 8 }] }"
                    )
                )
            ),
            vec![send_from("127.0.0.2", b"s"), send_from("127.0.0.3", b"s"), send(b"s")],
            &["cluster.a.upstream_cx_total", "cluster.b.upstream_cx_total"],
            false,
        ),
        sc(
            "direct source prefix",
            format!("{}{abc}", listener("", &with_c("{ direct_source_prefix_ranges: [{ address_prefix: 127.0.0.4, prefix_len: 32 }] }"))),
            vec![send_from("127.0.0.4", b"d"), send(b"d")],
            &["cluster.a.upstream_cx_total", "cluster.c.upstream_cx_total"],
            false,
        ),
        sc(
            "source type",
            format!("{}{abc}", listener("", &ab("{ source_type: SAME_IP_OR_LOOPBACK }", "{ source_type: EXTERNAL }"))),
            vec![send(b"t"), send_from("127.0.0.5", b"t")],
            &["cluster.a.upstream_cx_total", "cluster.b.upstream_cx_total"],
            false,
        ),
        sc(
            "destination port mismatch closes",
            format!("{}{abc}", listener("", &chain("{ destination_port: 1 }", "a"))),
            vec![send(b"p")],
            &["{L}.no_filter_chain_match", "{L}.downstream_cx_total"],
            false,
        ),
        sc(
            "destination prefix ranges",
            format!(
                "{}{abc}",
                listener(
                    "",
                    &ab(
                        "{ prefix_ranges: [{ address_prefix: 127.0.0.0, prefix_len: 8 }] }",
                        "{ prefix_ranges: [{ address_prefix: 127.0.0.1, prefix_len: 32 }] }"
                    )
                )
            ),
            vec![send(b"p")],
            &["cluster.a.upstream_cx_total", "cluster.b.upstream_cx_total"],
            false,
        ),
        sc(
            "filter_chain_matcher by SNI",
            format!(
                "{}{abc}",
                listener(
                    &format!("{TLS_INSPECTOR}{SNI_MATCHER}"),
                    &format!("    - {{ name: fa, filters: [{}] }}\n    - {{ name: fc, filters: [{}] }}\n", tp("a"), tp("c"))
                )
            ),
            vec![hello("a.example.com", &[]), hello("b.example.com", &[]), send(b"plain")],
            &["cluster.a.upstream_cx_total", "cluster.c.upstream_cx_total"],
            false,
        ),
        sc(
            "circuit breaker max_connections",
            format!("{}{}", one_chain("c"), cluster("c", &["{U0}"], ", circuit_breakers: { thresholds: [{ max_connections: 1 }] }")),
            vec![Step::Open { payload: b"held" }, send(b"over"), Step::CloseAll],
            &["cluster.c.upstream_cx_total", "cluster.c.upstream_cx_overflow"],
            false,
        ),
        sc(
            "idle timeout",
            format!("{}{c0}", listener("", &chain_with("cluster: c, idle_timeout: 0.5s"))),
            vec![Step::Open { payload: b"a" }, Step::Idle { ms: 1200 }, Step::CloseAll],
            &["tcp.tp.idle_timeout"],
            false,
        ),
        sc(
            "half close and a large payload",
            format!("{}{c0}", one_chain("c")),
            vec![Step::Send { from: "127.0.0.1", payload: large.clone() }],
            &["tcp.tp.downstream_cx_rx_bytes_total"],
            false,
        ),
        sc(
            "TLS termination with client certificates",
            format!("{}{c0}", listener("", &downstream_mtls(true))),
            vec![
                Step::Tls { cert: Some("good"), payload: "hello" },
                Step::Tls { cert: Some("wrong_san"), payload: "x" },
                Step::Tls { cert: Some("untrusted"), payload: "x" },
                Step::Tls { cert: None, payload: "x" },
            ],
            &["cluster.c.upstream_cx_total", "{L}.ssl.handshake", "{L}.ssl.fail_verify_san"],
            false,
        ),
        sc(
            "TLS termination, client certificate optional",
            format!("{}{c0}", listener("", &downstream_mtls(false))),
            vec![Step::Tls { cert: None, payload: "anon" }, Step::Tls { cert: Some("good"), payload: "known" }],
            &["cluster.c.upstream_cx_total", "{L}.ssl.handshake", "{L}.ssl.no_certificate"],
            false,
        ),
        sc(
            "upstream TLS: SNI, ALPN, client certificate, server SAN",
            format!("{}{}", one_chain("t"), upstream_tls_cluster("t", "spiffe://cluster.local/ns/mark/sa/fortio-server")),
            vec![send(b"hi")],
            &["cluster.t.upstream_cx_total", "cluster.t.upstream_cx_connect_fail"],
            false,
        ),
        sc(
            "upstream TLS: the server's SAN is not the expected one",
            format!("{}{}", one_chain("t"), upstream_tls_cluster("t", "spiffe://cluster.local/ns/mark/sa/other")),
            vec![send(b"hi")],
            &["cluster.t.upstream_cx_total"],
            false,
        ),
        sc(
            "TCP health check fails a refused host",
            format!("{}{}", one_chain("c"), cluster("c", &["{U0}", "{R}"], &hc("tcp_health_check: {}"))),
            vec![Step::Sleep { ms: 1000 }, send(b"h"), send(b"h"), send(b"h")],
            &["cluster.c.upstream_cx_total", "cluster.c.upstream_cx_connect_fail", "cluster.c.health_check.healthy"],
            true,
        ),
        sc(
            "HTTP health check by status",
            format!("{}{}", one_chain("c"), cluster("c", &["{H}", "{U0}"], &hc("http_health_check: { path: /healthz }"))),
            vec![Step::Sleep { ms: 1000 }, send(b"h"), send(b"h")],
            &["cluster.c.upstream_cx_total", "cluster.c.health_check.success", "cluster.c.health_check.healthy"],
            true,
        ),
        sc(
            "HTTP health check with expected statuses",
            format!(
                "{}{}",
                one_chain("c"),
                cluster("c", &["{H}"], &hc("http_health_check: { path: /sick, expected_statuses: [{ start: 503, end: 504 }] }"))
            ),
            vec![Step::Sleep { ms: 1000 }, send(b"h")],
            &["cluster.c.upstream_cx_total", "cluster.c.health_check.healthy"],
            true,
        ),
        sc(
            "outlier detection ejects a refusing host",
            format!(
                "{}{}",
                one_chain("c"),
                cluster("c", &["{U0}", "{R}"], ", outlier_detection: { consecutive_5xx: 2, max_ejection_percent: 100, base_ejection_time: 30s }")
            ),
            (0..6).map(|_| send(b"o")).collect(),
            &[
                "cluster.c.upstream_cx_connect_fail",
                "cluster.c.outlier_detection.ejections_enforced_total",
                "cluster.c.outlier_detection.ejections_active",
                "cluster.c.outlier_detection.ejections_enforced_consecutive_5xx",
            ],
            true,
        ),
        sc(
            "outlier detection bounded by max_ejection_percent",
            format!("{}{}", one_chain("c"), cluster("c", &["{U0}", "{R}"], ", outlier_detection: { consecutive_5xx: 2 }")),
            (0..6).map(|_| send(b"o")).collect(),
            &["cluster.c.upstream_cx_connect_fail", "cluster.c.outlier_detection.ejections_enforced_total"],
            true,
        ),
        sc(
            "access log, text format",
            format!(
                "{}{c0}{}",
                listener("", &chain_with(&format!("cluster: c, access_log: [{}]", file_log("text_format_source: { inline_string: \"%UPSTREAM_CLUSTER% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% %REQUESTED_SERVER_NAME% %RESPONSE_CODE% %PROTOCOL% %UPSTREAM_HOST%\\n\" }")))),
                cluster("r", &["{R}"], "")
            ),
            vec![send(b"hello"), send(b"again!")],
            &[],
            false,
        ),
        sc(
            "access log, JSON format, upstream failure",
            format!(
                "{}{}",
                listener("", &chain_with(&format!("cluster: c, access_log: [{}]", file_log("json_format: { cluster: \"%UPSTREAM_CLUSTER%\", flags: \"%RESPONSE_FLAGS%\", rx: \"%BYTES_RECEIVED%\", code: \"%RESPONSE_CODE%\", host: \"%UPSTREAM_HOST%\" }")))),
                cluster("c", &["{R}"], "")
            ),
            vec![send(b"x")],
            &[],
            false,
        ),
        sc(
            "STRICT_DNS and LOGICAL_DNS clusters",
            format!(
                "{}  - {{ name: c, type: STRICT_DNS, connect_timeout: 1s, load_assignment: {{ cluster_name: c, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: localhost, port_value: {{U0}} }} }} }} }}] }}] }} }}\n  - {{ name: l, type: LOGICAL_DNS, dns_lookup_family: V4_ONLY, connect_timeout: 1s, load_assignment: {{ cluster_name: l, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: localhost, port_value: {{U1}} }} }} }} }}] }}] }} }}\n",
                listener("", &[chain("{ destination_port: 1 }", "l"), chain("{}", "c")].concat())
            ),
            vec![send(b"dns"), send(b"dns")],
            &["cluster.c.upstream_cx_total"],
            true,
        ),
        sc(
            "proxy_protocol header sets the source",
            format!(
                "{}{abc}",
                listener(
                    "    listener_filters: [{ name: envoy.filters.listener.proxy_protocol, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol } }]\n",
                    &[
                        format!(
                            "    - {{ filter_chain_match: {{ source_prefix_ranges: [{{ address_prefix: 10.0.0.0, prefix_len: 8 }}] }}, filters: [{}] }}\n",
                            tp_with(&format!("cluster: a, access_log: [{}]", file_log("text_format_source: { inline_string: \"%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %BYTES_RECEIVED%\\n\" }")))
                        ),
                        chain("{}", "c"),
                    ]
                    .concat()
                )
            ),
            vec![
                send(b"PROXY TCP4 10.1.2.3 192.0.2.1 5555 80\r\nhi"),
                send(b"PROXY TCP4 192.0.2.9 192.0.2.1 6666 80\r\nyo"),
                send(b"no header"),
            ],
            &["cluster.a.upstream_cx_total", "cluster.c.upstream_cx_total"],
            false,
        ),
        sc(
            "health check recovery",
            format!("{}{}", one_chain("c"), cluster("c", &["{LATE}"], &hc("tcp_health_check: {}"))),
            vec![
                Step::Sleep { ms: 600 },
                send(b"down"),
                Step::Listen,
                Step::Sleep { ms: 1000 },
                send(b"up"),
                Step::Unlisten,
            ],
            &["cluster.c.health_check.healthy", "cluster.c.upstream_cx_total"],
            true,
        ),
        sc(
            "outlier ejection ends after base_ejection_time",
            format!(
                "{}{}",
                one_chain("c"),
                cluster(
                    "c",
                    &["{U0}", "{R}"],
                    ", outlier_detection: { consecutive_5xx: 1, max_ejection_percent: 100, base_ejection_time: 1s, interval: 0.3s }"
                )
            ),
            vec![send(b"o"), send(b"o"), send(b"o"), Step::Sleep { ms: 1800 }],
            &[
                "cluster.c.outlier_detection.ejections_enforced_total",
                "cluster.c.outlier_detection.ejections_active",
            ],
            true,
        ),
        sc(
            "ring hash by source IP",
            by_source_ip(weighted_cluster([1, 1, 1], ", lb_policy: RING_HASH")),
            from_nine_sources(),
            &["cluster.c.upstream_cx_total"],
            false,
        ),
        sc(
            "ring hash, MurmurHash2, weights, a small ring",
            by_source_ip(weighted_cluster(
                [1, 2, 3],
                ", lb_policy: RING_HASH, ring_hash_lb_config: { minimum_ring_size: 5, maximum_ring_size: 11, hash_function: MURMUR_HASH_2 }",
            )),
            from_nine_sources(),
            &[],
            false,
        ),
        sc(
            "maglev by source IP",
            by_source_ip(weighted_cluster([1, 1, 1], ", lb_policy: MAGLEV")),
            from_nine_sources(),
            &["cluster.c.upstream_cx_total"],
            false,
        ),
        sc(
            "maglev, weights, a small table",
            by_source_ip(weighted_cluster([3, 1, 2], ", lb_policy: MAGLEV, maglev_lb_config: { table_size: 13 }")),
            from_nine_sources(),
            &[],
            false,
        ),
        sc(
            "ring hash skips an unhealthy host",
            by_source_ip(
                "  - { name: c, type: STATIC, connect_timeout: 1s, lb_policy: RING_HASH, load_assignment: { cluster_name: c, endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {U0} } } } }, { health_status: UNHEALTHY, endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {U1} } } } }, { endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {U2} } } } }] }] } }\n".to_string(),
            ),
            from_nine_sources(),
            &[],
            false,
        ),
        sc(
            "weighted round robin",
            format!("{}{}", one_chain("c"), weighted_cluster([1, 2, 3], "")),
            (0..12).map(|_| send(b"w")).collect(),
            &["cluster.c.upstream_cx_total"],
            true,
        ),
        sc(
            "locality weighted round robin",
            format!(
                "{}  - {{ name: c, type: STATIC, connect_timeout: 1s, common_lb_config: {{ locality_weighted_lb_config: {{}} }}, load_assignment: {{ cluster_name: c, endpoints: [{{ locality: {{ zone: a }}, load_balancing_weight: 1, lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {{U0}} }} }} }} }}] }}, {{ locality: {{ zone: b }}, load_balancing_weight: 3, lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {{U1}} }} }} }} }}] }}, {{ locality: {{ zone: c }}, lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {{U2}} }} }} }} }}] }}] }} }}\n",
                one_chain("c")
            ),
            (0..8).map(|_| send(b"loc")).collect(),
            &["cluster.c.upstream_cx_total"],
            true,
        ),
        sc(
            "circuit breaker max_pending_requests",
            format!(
                "{}{}",
                listener("", &chain_with(&format!("cluster: c, max_connect_attempts: 3, access_log: [{}]", file_log("text_format_source: { inline_string: \"%RESPONSE_FLAGS% %UPSTREAM_HOST%\\n\" }")))),
                cluster("c", &["{U0}"], ", circuit_breakers: { thresholds: [{ max_pending_requests: 0, max_retries: 7, track_remaining: true }] }")
            ),
            vec![send(b"pending")],
            &[
                "cluster.c.upstream_rq_pending_overflow",
                "cluster.c.upstream_cx_connect_attempts_exceeded",
                "cluster.c.upstream_cx_total",
                "cluster.c.circuit_breakers.default.rq_pending_open",
                "cluster.c.circuit_breakers.default.remaining_retries",
            ],
            false,
        ),
        sc(
            "per_connection_buffer_limit_bytes",
            format!(
                "{}{}",
                one_chain("c").replace("    filter_chains:", "    per_connection_buffer_limit_bytes: 1024\n    filter_chains:"),
                cluster("c", &["{U0}"], ", per_connection_buffer_limit_bytes: 1024")
            ),
            vec![Step::Send { from: "127.0.0.1", payload: large.clone() }],
            &["tcp.tp.downstream_cx_rx_bytes_total", "cluster.c.upstream_rq_total"],
            false,
        ),
        sc(
            "access log filters",
            format!(
                "{}{}",
                listener(
                    "",
                    &chain_with(&format!(
                        "cluster: c, max_connect_attempts: 1, access_log: [{}, {}, {}, {}, {}, {}]",
                        filtered_log("failed", "or_filter: { filters: [{ response_flag_filter: { flags: [UF] } }, { duration_filter: { comparison: { op: GE, value: { default_value: 100000, runtime_key: k } } } }] }"),
                        filtered_log("status0", "status_code_filter: { comparison: { op: EQ, value: { default_value: 0, runtime_key: k } } }"),
                        filtered_log("traced", "traceable_filter: {}"),
                        filtered_log("sampled", "and_filter: { filters: [{ runtime_filter: { runtime_key: k, percent_sampled: { numerator: 100 } } }, { not_health_check_filter: {} }] }"),
                        filtered_log("end", "log_type_filter: { types: [TcpConnectionEnd] }"),
                        filtered_log("noflags", "response_flag_filter: {}"),
                    ))
                ),
                cluster("c", &["{U0}", "{R}"], "")
            ),
            vec![send(b"f"), send(b"f")],
            &[],
            false,
        ),
        sc("IPv6", ipv6, vec![Step::Send { from: "::1", payload: b"six".to_vec() }], &["cluster.c.upstream_cx_total"], true),
    ]
}

fn admin_get(admin: u16, path: &str) -> String {
    admin_request(admin, "GET", path).1
}

fn start(
    bin: &Path,
    is_envoy: bool,
    resources: &str,
    up: &Upstreams,
    dir: &Path,
    tag: &str,
) -> Running {
    let mut text = resources.to_string();
    for (k, v) in &up.files {
        text = text.replace(k, v);
    }
    let text = text
        .replace("{U0}", &up.u[0].to_string())
        .replace("{U1}", &up.u[1].to_string())
        .replace("{U2}", &up.u[2].to_string())
        .replace("{V6}", &up.v6.to_string())
        .replace("{R}", &up.refused.to_string())
        .replace("{LATE}", &up.late.port.to_string())
        .replace("{T}", &up.tls.to_string())
        .replace("{H}", &up.h.to_string());
    side_by_side::start(bin, is_envoy, &text, dir, tag)
}

fn is_v6(r: &Running) -> bool {
    r.text.contains("\"::1\", port_value: ")
}

fn connect(r: &Running, from: &str) -> TcpStream {
    let ip: std::net::IpAddr = from.parse().unwrap();
    let target: SocketAddr = if is_v6(r) {
        format!("[::1]:{}", r.listen)
    } else {
        format!("127.0.0.1:{}", r.listen)
    }
    .parse()
    .unwrap();
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    socket.bind(&SocketAddr::new(ip, 0).into()).unwrap();
    socket.connect(&target.into()).unwrap();
    let s: TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn outcome(bytes: Vec<u8>) -> String {
    if bytes.is_empty() {
        "closed".into()
    } else if bytes.len() > 64 {
        format!(
            "{} bytes, starting {:?}",
            bytes.len(),
            String::from_utf8_lossy(&bytes[..16])
        )
    } else {
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Runs the steps; returns what each connection saw (upstream answers sorted for round robin,
/// whose starting host is Envoy's own choice).
fn run_steps(r: &Running, steps: &[Step], up: &Upstreams) -> Vec<String> {
    let mut seen = vec![];
    let mut open: Vec<TcpStream> = vec![];
    for s in steps {
        match s {
            Step::Send { from, payload } => {
                let mut c = connect(r, from);
                let _ = c.write_all(payload);
                let mut out = vec![0u8; 64 * 1024];
                let n = c.read(&mut out).unwrap_or(0);
                out.truncate(n);
                if n > 0 {
                    let _ = c.shutdown(Shutdown::Write);
                    let _ = c.read_to_end(&mut out);
                }
                seen.push(outcome(out));
            }
            Step::Tls { cert, payload } => {
                let leaf = match cert {
                    Some("good") => Some(&up.good),
                    Some("wrong_san") => Some(&up.wrong_san),
                    Some("untrusted") => Some(&up.untrusted),
                    _ => None,
                };
                let got = tls_client(r.listen, &up.pki.ca_pem, leaf, &["h2"], payload);
                seen.push(got.unwrap_or_else(|_| "refused".into()));
            }
            Step::Sleep { ms } => std::thread::sleep(Duration::from_millis(*ms)),
            Step::Listen => up.late.start(),
            Step::Unlisten => up.late.stop(),
            Step::Open { payload } => {
                let mut c = connect(r, "127.0.0.1");
                c.write_all(payload).unwrap();
                let mut buf = [0u8; 256];
                let n = c.read(&mut buf).unwrap_or(0);
                seen.push(format!("open: {}", outcome(buf[..n].to_vec())));
                open.push(c);
            }
            Step::Idle { ms } => {
                std::thread::sleep(Duration::from_millis(*ms));
                for c in &mut open {
                    let _ = c.write_all(b"again");
                    let mut buf = [0u8; 256];
                    let n = c.read(&mut buf).unwrap_or(0);
                    seen.push(format!("after idle: {}", outcome(buf[..n].to_vec())));
                }
            }
            Step::CloseAll => open.clear(),
        }
    }
    // Let counters settle (connection teardown is asynchronous in both).
    std::thread::sleep(Duration::from_millis(300));
    seen
}

fn stat_values(r: &Running, names: &[&str]) -> BTreeMap<String, String> {
    let scope = if is_v6(r) {
        format!("listener.[__1]_{}", r.listen)
    } else {
        format!("listener.127.0.0.1_{}", r.listen)
    };
    side_by_side::stat_values(r.admin, names, |n| n.replace("{L}", &scope))
}

/// `/clusters` host lines, ports replaced so both runs compare.
fn host_lines(r: &Running, up: &Upstreams) -> Vec<String> {
    let mut ports: Vec<(u16, &str)> = vec![
        (up.u[0], "U0"),
        (up.u[1], "U1"),
        (up.u[2], "U2"),
        (up.v6, "V6"),
        (up.refused, "R"),
        (up.late.port, "LATE"),
    ];
    ports.sort();
    // Envoy lists clusters in no particular order: compare the lines sorted.
    let mut lines: Vec<String> = admin_get(r.admin, "/clusters")
        .lines()
        .filter(|l| {
            l.matches("::").count() >= 3 && (l.contains("127.0.0.1:") || l.contains("[::1]:"))
        })
        .filter(|l| {
            [
                "cx_total",
                "cx_connect_fail",
                "health_flags",
                "weight",
                "region",
                "zone",
                "priority",
                "hostname",
            ]
            .iter()
            .any(|k| l.contains(&format!("::{k}::")))
        })
        .map(|l| {
            let mut l = l.to_string();
            for (p, n) in &ports {
                l = l.replace(&format!(":{p}::"), &format!(":{n}::"));
            }
            l
        })
        .collect();
    lines.sort();
    lines
}

#[test]
fn pilotfish_carries_bytes_as_envoy_does() {
    let Some(envoy) = envoy("envoy l4") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("pilotfish-envoy-l4-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = Pki::new("mesh ca");
    let server = pki.leaf(
        &["server.example"],
        "spiffe://cluster.local/ns/mark/sa/fortio-server",
    );
    let good = pki.leaf(&[], "spiffe://cluster.local/ns/mark/sa/default");
    let wrong_san = pki.leaf(&[], "spiffe://elsewhere.local/ns/x/sa/y");
    let untrusted = Pki::new("another ca").leaf(&[], "spiffe://cluster.local/ns/mark/sa/default");
    let mut files = vec![];
    for (key, name, text) in [
        ("{CA}", "ca.pem", &pki.ca_pem),
        ("{SCERT}", "server.pem", &server.cert),
        ("{SKEY}", "server.key", &server.key),
        ("{CCERT}", "client.pem", &good.cert),
        ("{CKEY}", "client.key", &good.key),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        files.push((key, path.display().to_string()));
    }
    let up = Upstreams {
        u: [
            upstream_on("u0", "127.0.0.1"),
            upstream_on("u1", "127.0.0.1"),
            upstream_on("u2", "127.0.0.1"),
        ],
        v6: upstream_on("v6", "::1"),
        h: http_upstream("h"),
        refused: free_port(),
        late: Late::new(),
        tls: tls_upstream(
            &server,
            &pki.ca_pem,
            "spiffe://cluster.local/ns/mark/sa/default",
        ),
        pki,
        good,
        wrong_san,
        untrusted,
        files,
    };
    let pilotfish = Path::new(env!("CARGO_BIN_EXE_pilotfish"));
    let mut failures = vec![];
    let mut answered = 0;
    let all = scenarios();
    // PILOTFISH_L4_ONLY=<part of a name> runs only the matching scenarios (when debugging one).
    let only = std::env::var("PILOTFISH_L4_ONLY").ok();
    for (i, s) in all.iter().enumerate() {
        if only.as_ref().is_some_and(|o| !s.name.contains(o.as_str())) {
            continue;
        }
        let mut results = vec![];
        for (bin, is_envoy, tag) in [
            (envoy.as_path(), true, "envoy"),
            (pilotfish, false, "pilotfish"),
        ] {
            let r = start(
                bin,
                is_envoy,
                &s.resources,
                &up,
                &dir,
                &format!("{i}-{tag}"),
            );
            let mut seen = run_steps(&r, &s.steps, &up);
            // Access log lines, once Envoy has flushed them.
            std::thread::sleep(Duration::from_millis(200));
            let log = std::fs::read_to_string(&r.access_log).unwrap_or_default();
            let mut lines: Vec<String> = log.lines().map(|l| format!("log: {l}")).collect();
            lines.sort();
            seen.extend(lines);
            // Envoy's round robin starts where it likes: compare what each got, not the order.
            if s.name.contains("round robin")
                || s.name.starts_with("outlier")
                || s.name == "access log filters"
            {
                seen.sort();
            }
            let stats = stat_values(&r, s.stats);
            let hosts = if s.clusters {
                host_lines(&r, &up)
            } else {
                vec![]
            };
            results.push((seen, stats, hosts));
        }
        let (e, p) = (&results[0], &results[1]);
        if only.is_some() {
            eprintln!("{}: envoy {:?}", s.name, e);
        }
        if e.0.iter().any(|o| o.contains(':') || o.contains("bytes")) {
            answered += 1;
        }
        if e != p {
            failures.push(format!(
                "scenario {i} '{}':\n  envoy:     {:?}\n  pilotfish: {:?}",
                s.name, e, p
            ));
        }
    }
    assert!(all.len() >= 25);
    // Most scenarios carry bytes somewhere: agreement is not two proxies closing everything.
    assert!(
        answered >= 20 || only.is_some(),
        "only {answered} scenarios got an upstream's answer from Envoy"
    );
    assert!(
        failures.is_empty(),
        "{} of {} scenarios differ (configs and logs in {}):\n{}",
        failures.len(),
        all.len(),
        dir.display(),
        failures.join("\n")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
