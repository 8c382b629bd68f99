//! The seed sidecar for real: two network namespaces joined by a veth pair (the pod at
//! 172.21.206.230, a peer at 172.21.206.228 that also hosts the metrics-server endpoint
//! 172.30.207.152), istio-init's iptables rules in the pod, and `pilotfish -c <the seed dump>`
//! running there as uid 1337 like istio-proxy. Inbound: a peer's connection to the pod's port
//! 9999 is redirected to 15006, original_dst restores the destination, the passthrough chain's
//! ORIGINAL_DST cluster connects to it from 127.0.0.6; an HTTP request to the app's port 8080
//! goes through the dump's `0.0.0.0_8080` chain (its http_connection_manager and route) and
//! comes back with the headers the sidecar adds (`server: istio-envoy`). Outbound: the app's connection to the
//! metrics-server VIP is redirected to 15001 and handed to the `10.104.76.155_443` listener,
//! whose EDS cluster reaches the endpoint in plaintext (tlsMode-disabled). The dump's admin
//! answers /ready and returns its resources from /config_dump.
//!
//! Needs root, `ip` and `iptables-restore`; says so and skips without them (CI must run it).

mod common;
use common::netns::*;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn admin_get(ns: &str, path: &str) -> (u16, String) {
    let path = path.to_string();
    in_netns(ns, move || {
        let Ok(mut c) = TcpStream::connect("127.0.0.1:15000") else {
            return (0, String::new());
        };
        write!(
            c,
            "GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut r = BufReader::new(c);
        let mut status = String::new();
        r.read_line(&mut status).unwrap();
        let mut rest = String::new();
        r.read_to_string(&mut rest).unwrap();
        let code = status
            .split_whitespace()
            .nth(1)
            .unwrap_or("0")
            .parse()
            .unwrap_or(0);
        (
            code,
            rest.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default(),
        )
    })
}

fn exchange(ns: &str, to: &'static str, bytes: &'static [u8]) -> String {
    in_netns(ns, move || {
        let mut c = TcpStream::connect(to).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // Send, then wait for the answer: a client that closes its side while the listener
        // filters still look is closed, by Envoy as by pilotfish.
        c.write_all(bytes).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        let _ = c.shutdown(Shutdown::Both);
        out
    })
}

#[test]
fn the_seed_sidecar_intercepts_inbound_and_outbound() {
    let Some(shared) = shared_dir("intercept") else {
        return;
    };
    if !can_run() {
        return;
    }
    let seed = shared.join("corpus/istio-1.14-sidecar-fortio-server.config_dump.yaml");
    let ns = setup_pod("intercept", &shared);
    let (pod, peer, dir) = (ns.pod.clone(), ns.peer.clone(), ns.dir.clone());
    let mut ns = ns;

    // The pod's app on 9999, the metrics-server endpoint in the peer namespace.
    serve(
        in_netns(&pod, || TcpListener::bind("0.0.0.0:9999").unwrap()),
        "app",
    );
    serve(
        in_netns(&peer, || TcpListener::bind("172.30.207.152:4443").unwrap()),
        "metrics-server",
    );
    serve_http(
        in_netns(&pod, || TcpListener::bind("0.0.0.0:8080").unwrap()),
        "fortio",
    );

    let log = dir.join("pilotfish.log");
    let proxy = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod,
            "setpriv",
            "--reuid",
            "1337",
            "--regid",
            "1337",
            "--clear-groups",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_pilotfish"))
        .args([
            "-c",
            seed.to_str().unwrap(),
            "-l",
            "debug",
            "--concurrency",
            "2",
            "--log-path",
            log.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    ns.proxy = Some(proxy);
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin_get(&pod, "/ready") != (200, "LIVE\n".to_string()) {
        if let Some(p) = ns.proxy.as_mut() {
            if let Ok(Some(s)) = p.try_wait() {
                panic!(
                    "pilotfish exited ({s}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "seed not ready:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, listeners) = admin_get(&pod, "/listeners");
    for l in [
        "virtualOutbound::0.0.0.0:15001",
        "virtualInbound::0.0.0.0:15006",
        "::0.0.0.0:15090",
        "::0.0.0.0:15021",
    ] {
        assert!(
            listeners.lines().any(|x| x.ends_with(l) || x == l),
            "{l} not up:\n{listeners}"
        );
    }

    // Inbound: from the peer to the pod's 9999, through 15006, to the app from 127.0.0.6.
    let got = exchange(&peer, "172.21.206.230:9999", b"ping");
    let show = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        got.starts_with("app saw 127.0.0.6:") && got.ends_with(": ping"),
        "{got}\n{}",
        show()
    );
    // Inbound HTTP: the app's port 8080, through the dump's 0.0.0.0_8080 chain.
    let got = exchange(
        &peer,
        "172.21.206.230:8080",
        b"GET /echo HTTP/1.1\r\nhost: fortio-server:8080\r\nuser-agent: netshoot\r\nconnection: close\r\n\r\n",
    );
    let (head, body) = got.split_once("\r\n\r\n").unwrap_or((&got, ""));
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{got}\n{}", show());
    assert!(head.contains("server: istio-envoy"), "{head}");
    assert!(head.contains("x-envoy-upstream-service-time: "), "{head}");
    assert!(body.starts_with("fortio saw 127.0.0.6:"), "{body}");
    for h in [
        "x-forwarded-proto: http",
        "x-request-id: ",
        "user-agent: netshoot",
        "host: fortio-server:8080",
    ] {
        assert!(body.contains(h), "the app did not see {h}:\n{body}");
    }
    // Outbound: the app's call to the metrics-server VIP, through 15001 and the hand-off.
    let got = exchange(&pod, "10.104.76.155:443", b"hello");
    assert!(
        got.starts_with("metrics-server saw 172.21.206.230:") && got.ends_with(": hello"),
        "{got}\n{}",
        show()
    );

    let (_, clusters) = admin_get(&pod, "/clusters");
    assert!(
        clusters.contains("InboundPassthroughClusterIpv4::172.21.206.230:9999::cx_total::1\n"),
        "{clusters}"
    );
    assert!(clusters.contains("outbound|443||metrics-server.kube-system.svc.cluster.local::172.30.207.152:4443::cx_total::1\n"), "{clusters}");
    let log_text = std::fs::read_to_string(&log).unwrap();
    for event in [
        "original_dst: set destination to 172.21.206.230:9999",
        "Created host InboundPassthroughClusterIpv4172.21.206.230:9999",
        "original_dst: set destination to 10.104.76.155:443",
        "use_original_dst: handing the connection to listener '10.104.76.155_443'",
        "Creating connection to cluster outbound|443||metrics-server.kube-system.svc.cluster.local",
    ] {
        assert!(
            log_text.contains(event),
            "{event} not in the log:\n{log_text}"
        );
    }
    // The dump's resources come back from /config_dump.
    let (code, dump) = admin_get(&pod, "/config_dump");
    assert_eq!(code, 200);
    let cli = pilotfish(&[
        "config-dump",
        seed.to_str().unwrap(),
        "--include-eds",
        "false",
    ]);
    let a: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let b: serde_json::Value = serde_json::from_str(&stdout(&cli)).unwrap();
    assert_eq!(a, b);
}
