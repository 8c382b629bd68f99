//! Differential test of filter chain selection against real Envoy: generated listeners (chains
//! matching on destination port and IP, server names exact and wildcard, transport protocol,
//! ALPN, direct source and source prefixes, source type and source ports; and listeners that use
//! `filter_chain_matcher` instead) run in a real Envoy where every chain answers with its own
//! name (the direct_response network filter). Generated connections (from 127.0.0.1-4 and chosen
//! source ports, plaintext or a TLS ClientHello with SNI and ALPN) must land in the chain
//! pilotfish's decision picks, or be closed where pilotfish finds none.
//!
//! Seeded like the routing test (PILOTFISH_CHAINS_SEED).

mod common;
use common::*;
use pilotfish_decide::filter_chain::{self, ChainInput, Selected};
use serde_json::{json, Value};
use socket2::{Domain, Socket, Type};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CONFIGS: usize = 8;
const CONNECTIONS_PER_CONFIG: usize = 40;

const SERVER_NAMES: &[&str] = &["a.example.com", "*.example.com", "*.com", "b.example.org"];
const SNIS: &[&str] = &[
    "a.example.com",
    "x.example.com",
    "b.example.org",
    "foo.com",
    "other.net",
];
const ALPNS: &[&[&str]] = &[&["h2"], &["http/1.1"], &["h2", "http/1.1"], &["istio"]];

fn cidr(a: &str, len: u32) -> Value {
    json!({"address_prefix": a, "prefix_len": len})
}

/// A filter_chain_match drawn from every criterion FilterChainManager knows.
fn chain_match(rng: &mut Rng, port: u16, source_port: u16) -> Value {
    let mut m = json!({});
    if rng.chance(30) {
        m["destination_port"] = json!(if rng.chance(80) { port } else { port + 1 });
    }
    if rng.chance(25) {
        m["prefix_ranges"] = json!([rng.pick(&[
            cidr("127.0.0.1", 32),
            cidr("127.0.0.0", 8),
            cidr("10.0.0.0", 8)
        ])]);
    }
    if rng.chance(35) {
        let a = *rng.pick(SERVER_NAMES);
        let b = *rng.pick(SERVER_NAMES);
        m["server_names"] = if a == b { json!([a]) } else { json!([a, b]) };
    }
    if rng.chance(40) {
        m["transport_protocol"] = json!(rng.pick(&["tls", "raw_buffer"]));
    }
    if rng.chance(25) {
        m["application_protocols"] = json!(rng.pick(ALPNS));
    }
    if rng.chance(15) {
        m["direct_source_prefix_ranges"] =
            json!([rng.pick(&[cidr("127.0.0.2", 32), cidr("127.0.0.0", 24)])]);
    }
    if rng.chance(10) {
        m["source_type"] = json!(rng.pick(&["SAME_IP_OR_LOOPBACK", "EXTERNAL"]));
    }
    if rng.chance(20) {
        m["source_prefix_ranges"] =
            json!([rng.pick(&[cidr("127.0.0.3", 32), cidr("127.0.0.0", 30)])]);
    }
    if rng.chance(10) {
        m["source_ports"] = json!([source_port]);
    }
    m
}

fn input(name: &str, ty: &str) -> Value {
    json!({"name": name, "typed_config": {"@type": format!("type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.{ty}")}})
}

fn action(chain: &str) -> Value {
    json!({"action": {"name": "chain", "typed_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": chain}}})
}

/// A predicate on one network input.
fn single(rng: &mut Rng, source_port: u16) -> Value {
    let p = match rng.below(6) {
        0 => {
            json!({"input": input("sni", "ServerNameInput"), "value_match": rng.pick(&[json!({"exact": "a.example.com"}), json!({"suffix": ".example.com"}), json!({"prefix": "b."})])})
        }
        1 => {
            json!({"input": input("transport", "TransportProtocolInput"), "value_match": {"exact": rng.pick(&["tls", "raw_buffer"])}})
        }
        2 => {
            json!({"input": input("alpn", "ApplicationProtocolInput"), "value_match": {"contains": rng.pick(&["'h2'", "'http/1.1'"])}})
        }
        3 => {
            json!({"input": input("source", "SourceIPInput"), "custom_match": {"name": "ip", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.matching.input_matchers.ip.v3.Ip",
            "stat_prefix": "ip", "cidr_ranges": [rng.pick(&[cidr("127.0.0.2", 32), cidr("127.0.0.0", 31)])]}}})
        }
        4 => {
            json!({"input": input("source_port", "SourcePortInput"), "value_match": {"exact": source_port.to_string()}})
        }
        _ => {
            json!({"input": input("source_type", "SourceTypeInput"), "value_match": {"exact": "local"}})
        }
    };
    json!({"single_predicate": p})
}

fn predicate(rng: &mut Rng, source_port: u16, depth: usize) -> Value {
    if depth > 0 || rng.chance(50) {
        return single(rng, source_port);
    }
    match rng.below(3) {
        0 => {
            json!({"or_matcher": {"predicate": [predicate(rng, source_port, 1), predicate(rng, source_port, 1)]}})
        }
        1 => {
            json!({"and_matcher": {"predicate": [predicate(rng, source_port, 1), predicate(rng, source_port, 1)]}})
        }
        _ => json!({"not_matcher": predicate(rng, source_port, 1)}),
    }
}

/// A filter_chain_matcher over the chains: a list of predicates, or a tree on a port or
/// transport, nested lists, and sometimes an on_no_match.
fn chain_matcher(rng: &mut Rng, chains: usize, port: u16, source_port: u16) -> Value {
    let list = |rng: &mut Rng| {
        let n = 1 + rng.below(3);
        let matchers: Vec<Value> = (0..n)
            .map(|_| {
                let mut on_match = action(&format!("fc{}", rng.below(chains)));
                if rng.chance(15) {
                    on_match = json!({"matcher": {"matcher_list": {"matchers": [{"predicate": single(rng, source_port), "on_match": action(&format!("fc{}", rng.below(chains)))}]}}});
                }
                json!({"predicate": predicate(rng, source_port, 0), "on_match": on_match})
            })
            .collect();
        json!({"matcher_list": {"matchers": matchers}})
    };
    let mut m = if rng.chance(50) {
        list(rng)
    } else {
        let mut map = serde_json::Map::new();
        let (inp, keys) = if rng.chance(50) {
            (
                input("port", "DestinationPortInput"),
                vec![port.to_string(), (port + 1).to_string()],
            )
        } else {
            (
                input("transport", "TransportProtocolInput"),
                vec!["tls".to_string(), "raw_buffer".to_string()],
            )
        };
        for k in keys {
            if rng.chance(70) {
                let on_match = if rng.chance(50) {
                    json!({"matcher": list(rng)})
                } else {
                    action(&format!("fc{}", rng.below(chains)))
                };
                map.insert(k, on_match);
            }
        }
        json!({"matcher_tree": {"input": inp, "exact_match_map": {"map": map}}})
    };
    if rng.chance(40) {
        m["on_no_match"] = action(&format!("fc{}", rng.below(chains)));
    }
    m
}

fn listener(rng: &mut Rng, n: usize, port: u16, source_port: u16) -> Value {
    let unified = n % 3 == 2;
    let mut chains: Vec<Value> = vec![];
    let mut seen = vec![];
    let want = 3 + rng.below(6);
    while chains.len() < want {
        let m = if unified {
            json!({})
        } else {
            chain_match(rng, port, source_port)
        };
        // Envoy refuses two chains with the same match; so would pilotfish.
        if !unified && seen.contains(&m) {
            continue;
        }
        seen.push(m.clone());
        let name = format!("fc{}", chains.len());
        chains.push(json!({
            "name": name,
            "filter_chain_match": m,
            "filters": [{"name": "envoy.filters.network.direct_response", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config",
                "response": {"inline_string": name}}}]
        }));
    }
    let mut l = json!({
        "name": format!("chains-{n}"),
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "listener_filters": [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
        "filter_chains": chains,
    });
    if unified {
        l["filter_chain_matcher"] = chain_matcher(rng, want, port, source_port);
    }
    if rng.chance(40) {
        l["default_filter_chain"] = json!({"name": "default", "filters": [{"name": "envoy.filters.network.direct_response", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.direct_response.v3.Config",
            "response": {"inline_string": "default"}}}]});
    }
    l
}

struct Envoy(Child);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Envoy running the listener, or its refusal (and what it said).
fn start_envoy(envoy: &Path, file: &Path, port: u16) -> Result<Envoy, String> {
    let log = file.with_extension("log");
    let child = Command::new(envoy)
        .args([
            "--disable-hot-restart",
            "-l",
            "warning",
            "--concurrency",
            "1",
            "-c",
        ])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start envoy");
    let mut envoy = Envoy(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(_)) = envoy.0.try_wait() {
            return Err(std::fs::read_to_string(&log).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "envoy did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(envoy)
}

/// Which chain answered: its name, or None when Envoy closed the connection without a word.
fn connect(source: SocketAddr, port: u16, payload: &[u8]) -> Option<String> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.bind(&source.into()).unwrap();
    socket
        .connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        .unwrap();
    let mut conn: TcpStream = socket.into();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(payload).unwrap();
    let mut out = vec![];
    // A reset after the answer (the client's unread bytes) is fine; what came first counts.
    let _ = conn.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    (!text.is_empty()).then_some(text)
}

#[test]
fn pilotfish_picks_filter_chains_as_envoy_does() {
    let Some(envoy) = envoy("envoy chains") else {
        return;
    };
    let seed: u64 = std::env::var("PILOTFISH_CHAINS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x51_7cc1_b727_220a);
    eprintln!("seed {seed} (PILOTFISH_CHAINS_SEED reproduces a run)");
    let mut rng = Rng(seed);
    let dir = std::env::temp_dir().join(format!("pilotfish-envoy-chains-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut failures = vec![];
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    let mut total = 0;
    for n in 0..CONFIGS {
        let port = free_port();
        let source_port = free_port();
        let l = listener(&mut rng, n, port, source_port);
        let file = dir.join(format!("chains-{n}.json"));
        let bootstrap = json!({"static_resources": {"listeners": [l]}});
        std::fs::write(&file, serde_json::to_string_pretty(&bootstrap).unwrap()).unwrap();
        let loaded = pilotfish_config::load_file(&file);
        let _envoy = match start_envoy(&envoy, &file, port) {
            Ok(e) => e,
            Err(log) => {
                // Envoy refused the listener: pilotfish must refuse it too.
                if loaded.is_ok() {
                    failures.push(format!(
                        "{}: envoy refuses it, pilotfish loads it:\n{log}",
                        file.display()
                    ));
                }
                *outcomes.entry("refused by both".into()).or_default() += 1;
                continue;
            }
        };
        let cfg = match loaded {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!(
                    "{}: envoy runs it, pilotfish refuses it: {e}",
                    file.display()
                ));
                continue;
            }
        };
        let lv = cfg.resources.listeners[0].value.clone();
        for i in 0..CONNECTIONS_PER_CONFIG {
            let ip = [127, 0, 0, 1 + rng.below(4) as u8];
            let sport = if rng.chance(25) { source_port } else { 0 };
            let tls = rng.chance(60);
            let sni = (tls && rng.chance(75)).then(|| rng.pick(SNIS).to_string());
            let alpn: Vec<&str> = if tls && rng.chance(60) {
                rng.pick(ALPNS).to_vec()
            } else {
                vec![]
            };
            let payload = if tls {
                client_hello(sni.as_deref().unwrap_or(""), &alpn)
            } else {
                b"plain bytes\r\n".to_vec()
            };
            // Bind first, so the port the decision sees is the one the connection uses.
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            socket.set_reuse_address(true).unwrap();
            socket.bind(&SocketAddr::from((ip, sport)).into()).unwrap();
            let source: SocketAddr = socket.local_addr().unwrap().as_socket().unwrap();
            drop(socket);
            let answered = connect(source, port, &payload);
            total += 1;
            let input = ChainInput {
                local: SocketAddr::from(([127, 0, 0, 1], port)),
                source,
                direct_source: source,
                server_name: sni.clone(),
                transport_protocol: if tls {
                    "tls".into()
                } else {
                    "raw_buffer".into()
                },
                application_protocols: alpn.iter().map(|s| s.to_string()).collect(),
            };
            let (selected, reasons) = filter_chain::select(&lv, &input);
            let ours = match selected {
                Selected::Chain(c) => Some(lv.filter_chains[c].name.clone()),
                Selected::Default => Some("default".into()),
                Selected::None => None,
            };
            *outcomes
                .entry(if ours.is_none() {
                    "closed".into()
                } else if ours.as_deref() == Some("default") {
                    "default chain".into()
                } else {
                    "a chain".into()
                })
                .or_default() += 1;
            if answered != ours {
                failures.push(format!(
                    "{} connection {i}: from {source}, {} SNI {sni:?} ALPN {alpn:?}: envoy {answered:?}, pilotfish {ours:?}\n    {}",
                    file.display(),
                    if tls { "TLS" } else { "plaintext" },
                    reasons.iter().map(|r| format!("{} {}: {}", r.verdict.label(), r.subject, r.detail)).collect::<Vec<_>>().join("\n    ")
                ));
            }
        }
    }
    eprintln!("{total} connections through real Envoy: {outcomes:?}");
    assert!(
        failures.is_empty(),
        "{} disagreements (files kept in {}):\n{}",
        failures.len(),
        dir.display(),
        failures.join("\n")
    );
    assert!(total >= 200, "only {total} connections");
    for kind in ["a chain", "closed"] {
        assert!(
            outcomes.get(kind).copied().unwrap_or(0) >= 10,
            "too few '{kind}': {outcomes:?}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
