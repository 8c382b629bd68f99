//! HTTP conformance against real Envoy: each scenario's configuration (an http_connection_manager
//! with the router) runs in Envoy 1.40 and in `pilotfish -c`, the same requests go through both,
//! and everything a user sees must be the same: status, response headers and body (local replies
//! included), which upstream answered and the request it saw (method, path, headers), the access
//! log lines and the named counters. Values unique by nature (request ids, dates, the upstream
//! service time) are compared by shape.

mod common;
use common::side_by_side::{self, Running};
use common::*;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

/// One HTTP/1.1 request as the client writes it.
#[derive(Clone)]
struct Req {
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: &'static str,
    /// Send on the previous request's connection (keep-alive) instead of a new one.
    same_connection: bool,
    /// Send as HTTP/2 with prior knowledge (h2c), with curl.
    h2c: bool,
    /// After a 101, send these bytes on the upgraded connection and read the answer.
    upgraded: Option<&'static str>,
    /// Over TLS (with curl): (with the client certificate, HTTP/2 by ALPN).
    tls: Option<(bool, bool)>,
    /// Send only part of the request: its headers without their end, or (with a body) the
    /// body short of its content-length.
    partial: bool,
    /// After the response, wait this long (ms) for the proxy to close the connection.
    closes_within: Option<u64>,
    /// Go away this long (ms) after sending, without reading the response.
    abort_after: Option<u64>,
}

fn get(path: &'static str) -> Req {
    Req {
        method: "GET",
        path,
        host: "example.com",
        headers: vec![],
        body: "",
        same_connection: false,
        h2c: false,
        upgraded: None,
        tls: None,
        partial: false,
        closes_within: None,
        abort_after: None,
    }
}

impl Req {
    fn host(mut self, h: &'static str) -> Req {
        self.host = h;
        self
    }
    fn header(mut self, k: &'static str, v: &'static str) -> Req {
        self.headers.push((k, v));
        self
    }
    fn method(mut self, m: &'static str) -> Req {
        self.method = m;
        self
    }
    fn body(mut self, b: &'static str) -> Req {
        self.body = b;
        self
    }
    fn again(mut self) -> Req {
        self.same_connection = true;
        self
    }
    /// A websocket upgrade, then `payload` on the upgraded connection.
    fn websocket(mut self, payload: &'static str) -> Req {
        self.headers.push(("connection", "Upgrade"));
        self.headers.push(("upgrade", "websocket"));
        self.headers
            .push(("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="));
        self.headers.push(("sec-websocket-version", "13"));
        self.upgraded = Some(payload);
        self
    }
    /// Over TLS to server.example, with or without the client certificate, by ALPN h2 or not.
    fn tls(mut self, client_cert: bool, h2: bool) -> Req {
        self.tls = Some((client_cert, h2));
        self
    }
    fn h2c(mut self) -> Req {
        self.h2c = true;
        self
    }
    /// A CONNECT to `self.path` (an authority), then `payload` through the tunnel.
    fn connect(mut self, payload: &'static str) -> Req {
        self.method = "CONNECT";
        self.host = self.path;
        self.upgraded = Some(payload);
        self
    }
    fn partial(mut self) -> Req {
        self.partial = true;
        self
    }
    fn abort_after(mut self, ms: u64) -> Req {
        self.abort_after = Some(ms);
        self
    }
    fn closes_within(mut self, ms: u64) -> Req {
        self.closes_within = Some(ms);
        self
    }
}

struct Scenario {
    name: &'static str,
    /// static_resources; {L} listener, {U0} {U1} upstreams, {R} a refused port, {ACCESS_LOG}.
    resources: String,
    requests: Vec<Req>,
    stats: &'static [&'static str],
}

/// A request head and body as the upstream read it.
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    /// `name: value` lines, sorted (the order headers cross a proxy in is its own business).
    fn sorted_headers(&self) -> Vec<String> {
        let mut h: Vec<String> = self
            .headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        h.sort();
        h
    }
}

/// A chunked body, to its last chunk (or as much as arrives).
fn read_chunks(r: &mut BufReader<TcpStream>) -> Vec<u8> {
    let mut body = vec![];
    loop {
        let mut size = String::new();
        if r.read_line(&mut size).unwrap_or(0) == 0 {
            break;
        }
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        let mut chunk = vec![0u8; n + 2];
        if r.read_exact(&mut chunk).is_err() || n == 0 {
            break;
        }
        body.extend(&chunk[..n]);
    }
    body
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Seen> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = vec![];
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
    }
    let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = vec![];
    if let Some(n) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        r.read_exact(&mut body).ok()?;
    } else if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        body = read_chunks(r);
    }
    Some(Seen {
        method,
        path,
        headers,
        body,
    })
}

/// How many requests each `/flaky/N...` path has had (reset before each proxy's run).
static FLAKY: std::sync::Mutex<BTreeMap<String, u32>> = std::sync::Mutex::new(BTreeMap::new());

/// An HTTP/1.1 upstream answering as `name`: `/status/N` with status N, `/delay/MS` after MS
/// milliseconds, `/reset` by closing, `/flaky/N` with 503 to its first N requests (all
/// upstreams together), anything else with 200 and the request it saw.
fn http_upstream(name: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            std::thread::spawn(move || {
                let mut w = c.try_clone().unwrap();
                let mut r = BufReader::new(c);
                while let Some(req) = read_request(&mut r) {
                    if req.path.starts_with("/reset") {
                        return;
                    }
                    let headers = req.sorted_headers();
                    let connect = req.method == "CONNECT";
                    if connect || req.headers.iter().any(|(k, _)| k == "upgrade") {
                        let _ = if connect {
                            write!(
                                w,
                                "HTTP/1.1 200 Connection Established\r\nx-saw: CONNECT {}; {}\r\n\r\n",
                                req.path,
                                headers.join("; ")
                            )
                        } else {
                            write!(
                                w,
                                "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\nx-saw: {}\r\n\r\n",
                                headers.join("; ")
                            )
                        };
                        // Then an echo of whatever comes, in this upstream's name.
                        let mut buf = [0u8; 1024];
                        loop {
                            match r.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    let mut out = format!("{name} echoes ").into_bytes();
                                    out.extend(&buf[..n]);
                                    if w.write_all(&out).is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    }
                    // Half a body, a pause, the rest.
                    if let Some(ms) = req.path.strip_prefix("/slow/") {
                        let ms: u64 = ms.parse().unwrap_or(0);
                        let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello");
                        std::thread::sleep(Duration::from_millis(ms));
                        if w.write_all(b"world").is_err() {
                            return;
                        }
                        continue;
                    }
                    if let Some(ms) = req.path.strip_prefix("/delay/") {
                        let ms: u64 = ms.split(['/', '?']).next().unwrap().parse().unwrap_or(0);
                        std::thread::sleep(Duration::from_millis(ms));
                    }
                    let flaky = req.path.strip_prefix("/flaky/").and_then(|n| {
                        let failures: u32 = n.split(['/', '?']).next()?.parse().ok()?;
                        let mut seen = FLAKY.lock().unwrap();
                        let count = seen.entry(req.path.clone()).or_default();
                        *count += 1;
                        (*count <= failures).then_some(503u16)
                    });
                    let status = flaky
                        .or_else(|| {
                            req.path
                                .strip_prefix("/status/")
                                .and_then(|s| s.split(['/', '?']).next())
                                .and_then(|s| s.parse::<u16>().ok())
                        })
                        .unwrap_or(200);
                    let body = format!(
                        "{name} saw {} {}\n{}\nbody: {:?}\n",
                        req.method,
                        req.path,
                        headers.join("\n"),
                        String::from_utf8_lossy(&req.body)
                    );
                    let head = format!(
                        "HTTP/1.1 {status} Whatever\r\ncontent-type: text/plain\r\nx-upstream: {name}\r\nserver: upstream-server\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    if w.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    if req.method != "HEAD" && w.write_all(body.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Reads one response: status line, headers, body (by content-length, chunks, or to close).
fn read_response(r: &mut BufReader<TcpStream>, head_only: bool) -> String {
    let mut status = String::new();
    if r.read_line(&mut status).unwrap_or(0) == 0 {
        return "closed".into();
    }
    let code = status.split_whitespace().nth(1).unwrap_or("?").to_string();
    let mut headers = vec![];
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = vec![];
    let no_body = head_only || code == "204" || code == "304" || code.starts_with('1');
    if no_body {
    } else if let Some(n) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
        // As much of it as arrives: a reset stream ends it short.
        let _ = r.by_ref().take(n as u64).read_to_end(&mut body);
    } else if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        body = read_chunks(r);
    } else {
        let _ = r.read_to_end(&mut body);
    }
    let mut shown: Vec<String> = headers
        .iter()
        .filter(|(k, _)| k != "date")
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    shown.sort();
    format!(
        "{code}\n{}\n\n{}",
        shown.join("\n"),
        String::from_utf8_lossy(&body)
    )
}

/// Where the TLS scenarios' PEM files are: (CA, client certificate, client key).
static TLS_FILES: std::sync::OnceLock<(String, String, String)> = std::sync::OnceLock::new();

/// A request by curl (HTTP/2 with prior knowledge, or over TLS); the response in
/// `read_response`'s shape.
fn curl(port: u16, q: &Req) -> String {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-s", "-i", "-X", q.method]);
    let url = match q.tls {
        Some((client_cert, h2)) => {
            let (ca, cert, key) = TLS_FILES.get().expect("TLS files written");
            cmd.args([
                "--cacert",
                ca,
                "--resolve",
                &format!("server.example:{port}:127.0.0.1"),
            ]);
            if client_cert {
                cmd.args(["--cert", cert, "--key", key]);
            }
            cmd.arg(if h2 { "--http2" } else { "--http1.1" });
            format!("https://server.example:{port}{}", q.path)
        }
        None => {
            cmd.arg("--http2-prior-knowledge");
            cmd.args(["-H", &format!("host: {}", q.host)]);
            format!("http://127.0.0.1:{port}{}", q.path)
        }
    };
    for (k, v) in &q.headers {
        cmd.args(["-H", &format!("{k}: {v}")]);
    }
    if !q.body.is_empty() {
        cmd.args(["--data-binary", q.body]);
    }
    cmd.arg(url);
    let out = cmd.output().expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|s| s.split_whitespace().nth(1))
        .unwrap_or("closed")
        .to_string();
    let mut shown: Vec<String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .filter(|(k, _)| k != "date")
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    shown.sort();
    format!("{code}\n{}\n\n{body}", shown.join("\n"))
}

/// An HTTP/2 (h2c) upstream answering as `name` with the request it saw, its protocol included.
fn h2c_upstream(name: &'static str) -> u16 {
    use http_body_util::BodyExt;
    serve_on_loopback(move |s| async move {
        let svc = hyper::service::service_fn(
            move |req: hyper::Request<hyper::body::Incoming>| async move {
                if let Some(ms) = req.uri().path().strip_prefix("/delay/") {
                    let ms = ms.parse().unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let mut headers: Vec<String> = req
                    .headers()
                    .iter()
                    .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                    .collect();
                headers.sort();
                let head = format!(
                    "{name} saw {:?} {} {} authority={}\n{}",
                    req.version(),
                    req.method(),
                    req.uri().path_and_query().map_or("", |p| p.as_str()),
                    req.uri()
                        .authority()
                        .map_or("-".to_string(), |a| a.to_string()),
                    headers.join("\n")
                );
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let text = format!("{head}\nbody: {:?}\n", String::from_utf8_lossy(&body));
                Ok::<_, std::convert::Infallible>(
                    hyper::Response::builder()
                        .header("x-upstream", name)
                        .header("content-type", "text/plain")
                        .body(http_body_util::Full::new(bytes::Bytes::from(text)))
                        .unwrap(),
                )
            },
        );
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
            .await;
    })
}

fn run_requests(r: &Running, requests: &[Req]) -> Vec<String> {
    let mut out = vec![];
    let mut conn: Option<BufReader<TcpStream>> = None;
    for q in requests {
        if q.h2c || q.tls.is_some() {
            out.push(curl(r.listen, q));
            continue;
        }
        if !q.same_connection || conn.is_none() {
            let s = TcpStream::connect(("127.0.0.1", r.listen)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            conn = Some(BufReader::new(s));
        }
        let c = conn.as_mut().unwrap();
        let mut text = format!("{} {} HTTP/1.1\r\nhost: {}\r\n", q.method, q.path, q.host);
        for (k, v) in &q.headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        // A partial request: its body short of what it announces, or its headers unfinished.
        let short = if q.partial { 10 } else { 0 };
        if !q.body.is_empty() || q.method == "POST" {
            text.push_str(&format!("content-length: {}\r\n", q.body.len() + short));
        }
        if !(q.partial && q.body.is_empty()) {
            text.push_str("\r\n");
        }
        text.push_str(q.body);
        let _ = c.get_mut().write_all(text.as_bytes());
        if let Some(ms) = q.abort_after {
            std::thread::sleep(Duration::from_millis(ms));
            conn = None;
            out.push("aborted".into());
            continue;
        }
        let connect = q.method == "CONNECT";
        let mut response = read_response(c, q.method == "HEAD" || connect);
        let through = response.starts_with("101") || (connect && response.starts_with("200"));
        if let (Some(payload), true) = (q.upgraded, through) {
            let _ = c.get_mut().write_all(payload.as_bytes());
            // What comes back, however the tunnel splits it: until it pauses for 300 ms.
            let mut got = vec![];
            let mut buf = [0u8; 1024];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                c.get_mut()
                    .set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
            }
            c.get_mut()
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            response.push_str(&format!("upgraded: {}", String::from_utf8_lossy(&got)));
        }
        if let Some(ms) = q.closes_within {
            let s = c.get_mut();
            s.set_read_timeout(Some(Duration::from_millis(ms))).unwrap();
            let mut b = [0u8; 1];
            response.push_str(match s.read(&mut b) {
                Ok(0) => "\nthen: closed",
                Ok(_) => "\nthen: more data",
                Err(_) => "\nthen: still open",
            });
        }
        out.push(response);
    }
    out
}

/// Values unique by nature, and ports, replaced by their shape or name.
fn normalize(s: &str, ports: &[(u16, &str)]) -> String {
    let uuid =
        regex::Regex::new(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}").unwrap();
    let service_time = regex::Regex::new(r"x-envoy-upstream-service-time: \d+").unwrap();
    // Kept of a request id: its 15th character, where Envoy packs the trace reason.
    let mut s = uuid
        .replace_all(s, |c: &regex::Captures| format!("<uuid:{}>", &c[0][14..15]))
        .into_owned();
    // B3 ids made up by the proxy (the tests' own start with "feed").
    let b3_id = regex::Regex::new(r"\b[0-9a-f]{16}(?:[0-9a-f]{16})?\b").unwrap();
    s = s
        .split('\n')
        .map(|l| {
            if l.starts_with("x-b3-") || l.starts_with("b3: ") {
                b3_id
                    .replace_all(l, |c: &regex::Captures| {
                        if c[0].starts_with("feed") {
                            c[0].to_string()
                        } else {
                            format!("<id{}>", c[0].len() * 4)
                        }
                    })
                    .into_owned()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    s = service_time
        .replace_all(&s, "x-envoy-upstream-service-time: <ms>")
        .into_owned();
    // What is left of a route timeout when a retry starts depends on timing: compared as
    // "at most" the configured timeout it is left of.
    let expected = regex::Regex::new(r"x-envoy-expected-rq-timeout-ms: (\d+)").unwrap();
    s = expected
        .replace_all(&s, |c: &regex::Captures| {
            let v: u64 = c[1].parse().unwrap_or(0);
            match [200u64, 300, 3000, 5000, 15000]
                .iter()
                .find(|t| **t >= v && **t - v < 1000)
            {
                Some(t) => format!("x-envoy-expected-rq-timeout-ms: <= {t}"),
                None => c[0].to_string(),
            }
        })
        .into_owned();
    for (p, n) in ports {
        s = s.replace(&format!(":{p}"), &format!(":{n}"));
    }
    s
}

/// Istio's tracing of a sidecar's connection manager, with its Zipkin tracer (whose collector
/// is never reached).
const TRACING: &str = "          request_id_extension: { typed_config: { \"@type\": type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig, use_request_id_for_trace_sampling: true } }\n          tracing: { client_sampling: { value: 100 }, random_sampling: { value: 1 }, overall_sampling: { value: 100 }, provider: { name: envoy.tracers.zipkin, typed_config: { \"@type\": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig, collector_cluster: zipkin, collector_endpoint: /api/v2/spans, trace_id_128bit: true, shared_span_context: false, collector_endpoint_version: HTTP_JSON } } }\n";

/// What the timeout scenarios log of each stream.
const TIMEOUT_LOG: &str = "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %BYTES_SENT% %UPSTREAM_HOST% %UPSTREAM_CLUSTER%";

const ROUTER: &str = "{ name: envoy.filters.http.router, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router } }";

/// A listener whose one chain is an http_connection_manager (`hcm_extra` are more of its
/// fields) with the route configuration `route_config` (its fields, inline).
fn hcm(hcm_extra: &str, route_config: &str) -> String {
    format!(
        "static_resources:\n  listeners:\n  - name: l\n    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {{L}} }} }}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: h\n{hcm_extra}          route_config: {{ name: r, {route_config} }}\n          http_filters: [{ROUTER}]\n  clusters:\n"
    )
}

/// `hcm` with its chain behind TLS (server.example's certificate; client certificates checked
/// against the test CA when presented).
fn tls_hcm(hcm_extra: &str, route_config: &str) -> String {
    hcm(hcm_extra, route_config).replace(
        "    - filters:\n",
        "    - transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          common_tls_context:\n            alpn_protocols: [h2, http/1.1]\n            tls_certificates: [{ certificate_chain: { filename: \"{SCERT}\" }, private_key: { filename: \"{SKEY}\" } }]\n            validation_context: { trusted_ca: { filename: \"{CA}\" } }\n      filters:\n",
    )
}

const FAULT: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";

/// `hcm` with a fault filter (configured by `fault`) before the router.
fn with_fault(hcm_extra: &str, route_config: &str, fault: &str) -> String {
    hcm(hcm_extra, route_config).replace(
        "          http_filters: [",
        &format!("          http_filters: [{{ name: envoy.filters.http.fault, typed_config: {{ \"@type\": {FAULT}{fault} }} }}, "),
    )
}

/// `hcm` with a CORS filter before the router.
fn with_cors(route_config: &str) -> String {
    hcm("", route_config).replace(
        "          http_filters: [",
        "          http_filters: [{ name: envoy.filters.http.cors, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors } }, ",
    )
}

const CORS_POLICY: &str = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy";

/// One virtual host for every domain with these routes.
fn any_host(routes: &str) -> String {
    format!("virtual_hosts: [{{ name: v, domains: [\"*\"], routes: [{routes}] }}]")
}

fn to(prefix: &str, cluster: &str) -> String {
    format!("{{ match: {{ prefix: \"{prefix}\" }}, route: {{ cluster: {cluster} }} }}")
}

fn cluster(name: &str, ports: &[&str], extra: &str) -> String {
    side_by_side::static_cluster(name, ports, extra)
}

/// One cluster `c` on U0 behind a catch-all route, with more HCM fields.
fn simple(hcm_extra: &str) -> String {
    format!(
        "{}{}",
        hcm(hcm_extra, &any_host(&to("/", "c"))),
        cluster("c", &["{U0}"], "")
    )
}

fn file_log(format: &str) -> String {
    format!("          access_log: [{{ name: envoy.access_loggers.file, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: \"{{ACCESS_LOG}}\", log_format: {{ text_format_source: {{ inline_string: \"{format}\\n\" }} }} }} }}]\n")
}

fn sc(
    name: &'static str,
    resources: String,
    requests: Vec<Req>,
    stats: &'static [&'static str],
) -> Scenario {
    Scenario {
        name,
        resources,
        requests,
        stats,
    }
}

fn scenarios() -> Vec<Scenario> {
    let c0 = cluster("c", &["{U0}"], "");
    vec![
        sc(
            "a GET reaches the upstream with Envoy's request headers",
            simple(""),
            vec![get("/a/b?x=1").header("user-agent", "test/1").header("accept", "*/*")],
            &["http.h.downstream_rq_total", "http.h.downstream_rq_2xx", "cluster.c.upstream_rq_200", "cluster.c.upstream_rq_total"],
        ),
        sc(
            "a POST body is forwarded",
            simple(""),
            vec![
                get("/submit").method("POST").body("hello upstream"),
                get("/empty").method("PUT"),
                get("/gone").method("DELETE"),
                get("/opts").method("OPTIONS"),
            ],
            &[],
        ),
        sc(
            "keep-alive: three requests on one connection",
            simple(""),
            vec![get("/1"), get("/2").again(), get("/3").again()],
            &["http.h.downstream_cx_total", "http.h.downstream_rq_total", "cluster.c.upstream_cx_total"],
        ),
        sc(
            "HEAD",
            simple(""),
            vec![get("/h").method("HEAD")],
            &[],
        ),
        sc(
            "no route is 404 NR",
            format!("{}{c0}", hcm("", &any_host(&to("/only", "c")))),
            vec![get("/elsewhere")],
            &["http.h.no_route", "http.h.downstream_rq_4xx"],
        ),
        sc(
            "no virtual host is 404",
            format!("{}{c0}", hcm("", "virtual_hosts: [{ name: v, domains: [\"a.example\"], routes: [{ match: { prefix: \"/\" }, route: { cluster: c } }] }]")),
            vec![get("/").host("b.example"), get("/").host("a.example")],
            &["http.h.no_route"],
        ),
        sc(
            "virtual hosts by domain, port and wildcard",
            format!(
                "{}{}{}",
                hcm("", "virtual_hosts: [{ name: a, domains: [\"a.example\", \"a.example:8080\"], routes: [{ match: { prefix: \"/\" }, route: { cluster: a } }] }, { name: w, domains: [\"*.example\"], routes: [{ match: { prefix: \"/\" }, route: { cluster: b } }] }]"),
                cluster("a", &["{U0}"], ""),
                cluster("b", &["{U1}"], "")
            ),
            vec![get("/").host("a.example"), get("/").host("a.example:8080"), get("/").host("x.example"), get("/").host("other")],
            &[],
        ),
        sc(
            "direct responses",
            format!(
                "{}{c0}",
                hcm("", &any_host("{ match: { path: \"/teapot\" }, direct_response: { status: 418, body: { inline_string: \"short and stout\" } } }, { match: { path: \"/empty\" }, direct_response: { status: 204 } }, { match: { path: \"/ok\" }, direct_response: { status: 200 } }"))
            ),
            vec![get("/teapot"), get("/empty"), get("/ok")],
            &["http.h.rq_direct_response"],
        ),
        sc(
            "redirects",
            format!(
                "{}{c0}",
                hcm("", &any_host("{ match: { prefix: \"/s\" }, redirect: { https_redirect: true } }, { match: { prefix: \"/p\" }, redirect: { path_redirect: \"/new\", response_code: PERMANENT_REDIRECT } }, { match: { prefix: \"/h\" }, redirect: { host_redirect: \"other.example\", port_redirect: 8443, strip_query: true } }, { match: { prefix: \"/r\" }, redirect: { prefix_rewrite: \"/q\" } }"))
            ),
            vec![get("/s/x?a=1"), get("/p?keep=1"), get("/h?drop=1"), get("/rest")],
            &["http.h.rq_redirect"],
        ),
        sc(
            "path rewrites",
            format!(
                "{}{c0}",
                hcm("", &any_host("{ match: { prefix: \"/api/\" }, route: { cluster: c, prefix_rewrite: \"/v2/\" } }, { match: { safe_regex: { regex: \"/users/([0-9]+)/(.*)\" } }, route: { cluster: c, regex_rewrite: { pattern: { regex: \"/users/([0-9]+)/(.*)\" }, substitution: \"/u/\\\\2/\\\\1\" } } }"))
            ),
            vec![get("/api/items?x=1"), get("/users/42/profile")],
            &[],
        ),
        sc(
            "host rewrites",
            format!(
                "{}{c0}",
                hcm("", &any_host("{ match: { prefix: \"/lit\" }, route: { cluster: c, host_rewrite_literal: rewritten.example } }, { match: { prefix: \"/auto\" }, route: { cluster: c, auto_host_rewrite: true } }, { match: { prefix: \"/hdr\" }, route: { cluster: c, host_rewrite_header: x-host } }"))
            ),
            vec![get("/lit"), get("/auto"), get("/hdr").header("x-host", "from-header.example")],
            &[],
        ),
        sc(
            "routes by header, query parameter and method",
            format!(
                "{}{}{}",
                hcm("", &any_host("{ match: { prefix: \"/\", headers: [{ name: x-version, string_match: { exact: v2 } }] }, route: { cluster: b } }, { match: { prefix: \"/\", query_parameters: [{ name: beta, present_match: true }] }, route: { cluster: b } }, { match: { prefix: \"/\", headers: [{ name: \":method\", string_match: { exact: DELETE } }] }, direct_response: { status: 405 } }, { match: { prefix: \"/\" }, route: { cluster: a } }")),
                cluster("a", &["{U0}"], ""),
                cluster("b", &["{U1}"], "")
            ),
            vec![get("/x").header("x-version", "v2"), get("/x?beta"), get("/x").method("DELETE"), get("/x")],
            &[],
        ),
        sc(
            "weighted clusters",
            format!(
                "{}{}{}",
                hcm("", &any_host("{ match: { prefix: \"/\" }, route: { weighted_clusters: { clusters: [{ name: a, weight: 1000000 }, { name: b, weight: 1 }] } } }")),
                cluster("a", &["{U0}"], ""),
                cluster("b", &["{U1}"], "")
            ),
            vec![get("/w"), get("/w")],
            &["cluster.a.upstream_rq_total"],
        ),
        sc(
            "cluster_header: present and absent",
            format!(
                "{}{}",
                hcm("", &any_host("{ match: { prefix: \"/\" }, route: { cluster_header: x-cluster } }")),
                cluster("a", &["{U0}"], "")
            ),
            vec![get("/").header("x-cluster", "a"), get("/"), get("/").header("x-cluster", "nope")],
            &["http.h.no_cluster"],
        ),
        sc(
            "request headers added and removed at three levels",
            format!(
                "{}{c0}",
                hcm("", "request_headers_to_add: [{ header: { key: x-rc, value: rc } }, { header: { key: x-all, value: from-rc }, append_action: OVERWRITE_IF_EXISTS_OR_ADD }], request_headers_to_remove: [x-drop-rc], virtual_hosts: [{ name: v, domains: [\"*\"], request_headers_to_add: [{ header: { key: x-vh, value: vh } }, { header: { key: x-all, value: from-vh } }], routes: [{ match: { prefix: \"/\" }, request_headers_to_add: [{ header: { key: x-route, value: route }, append_action: ADD_IF_ABSENT }, { header: { key: x-all, value: from-route } }, { header: { key: x-only-if, value: replaced }, append_action: OVERWRITE_IF_EXISTS }], request_headers_to_remove: [x-drop-route], route: { cluster: c } }] }]")
            ),
            vec![
                get("/").header("x-drop-rc", "1").header("x-drop-route", "1").header("x-route", "client").header("x-only-if", "client"),
                get("/2"),
            ],
            &[],
        ),
        sc(
            "response headers added and removed",
            format!(
                "{}{c0}",
                hcm("", "response_headers_to_add: [{ header: { key: x-rc, value: rc } }], response_headers_to_remove: [x-upstream], virtual_hosts: [{ name: v, domains: [\"*\"], response_headers_to_add: [{ header: { key: x-vh, value: vh } }], routes: [{ match: { prefix: \"/\" }, response_headers_to_add: [{ header: { key: x-route, value: route } }, { header: { key: content-type, value: overwritten }, append_action: OVERWRITE_IF_EXISTS_OR_ADD }], route: { cluster: c } }, { match: { prefix: \"/d\" }, direct_response: { status: 200, body: { inline_string: d } } }] }]")
            ),
            vec![get("/")],
            &[],
        ),
        sc(
            "header values from the stream",
            format!(
                "{}{c0}",
                hcm("", &any_host("{ match: { prefix: \"/\" }, request_headers_to_add: [{ header: { key: x-client, value: \"%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%\" } }, { header: { key: x-proto, value: \"%PROTOCOL%\" } }, { header: { key: x-copy, value: \"%REQ(x-source)%\" } }, { header: { key: x-mixed, value: \"ip=%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% done\" } }], route: { cluster: c } }"))
            ),
            vec![get("/").header("x-source", "copied")],
            &[],
        ),
        sc(
            "the upstream's status passes through",
            simple(""),
            vec![get("/status/503"), get("/status/404"), get("/status/201")],
            &["cluster.c.upstream_rq_503", "cluster.c.upstream_rq_5xx", "http.h.downstream_rq_5xx", "http.h.downstream_rq_4xx"],
        ),
        sc(
            "a refused upstream is 503 UF",
            format!("{}{}", hcm("", &any_host(&to("/", "c"))), cluster("c", &["{R}"], "")),
            vec![get("/")],
            &["cluster.c.upstream_cx_connect_fail", "http.h.downstream_rq_5xx", "cluster.c.upstream_rq_503", "cluster.c.upstream_rq_completed"],
        ),
        sc(
            "no healthy upstream is 503 UH",
            format!(
                "{}  - {{ name: c, type: STATIC, connect_timeout: 1s, common_lb_config: {{ healthy_panic_threshold: {{ value: 0 }} }}, load_assignment: {{ cluster_name: c, endpoints: [{{ lb_endpoints: [{{ health_status: UNHEALTHY, endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {{U0}} }} }} }} }}] }}] }} }}\n",
                hcm("", &any_host(&to("/", "c")))
            ),
            vec![get("/")],
            &["cluster.c.upstream_cx_none_healthy", "cluster.c.upstream_rq_503"],
        ),
        sc(
            "route timeout is 504 UT",
            format!("{}{c0}", hcm("", &any_host("{ match: { prefix: \"/\" }, route: { cluster: c, timeout: 0.3s } }"))),
            vec![get("/delay/1500")],
            &["cluster.c.upstream_rq_timeout", "http.h.downstream_rq_5xx", "cluster.c.upstream_rq_504"],
        ),
        sc(
            "x-envoy-upstream-rq-timeout-ms",
            simple(""),
            vec![get("/delay/1500").header("x-envoy-upstream-rq-timeout-ms", "300"), get("/fast").header("x-envoy-upstream-rq-timeout-ms", "5000")],
            &["cluster.c.upstream_rq_timeout"],
        ),
        sc(
            "an internal request's x-envoy headers are honoured",
            simple("          use_remote_address: true\n          internal_address_config: { cidr_ranges: [{ address_prefix: 127.0.0.0, prefix_len: 8 }] }\n"),
            vec![
                get("/delay/1500").header("x-envoy-upstream-rq-timeout-ms", "300"),
                get("/x").header("x-envoy-internal", "false").header("x-envoy-decorator-operation", "op"),
            ],
            &["cluster.c.upstream_rq_timeout"],
        ),
        sc(
            "timeout 0 disables the route timeout",
            format!("{}{c0}", hcm("", &any_host("{ match: { prefix: \"/\" }, route: { cluster: c, timeout: 0s } }"))),
            vec![get("/delay/300")],
            &[],
        ),
        sc(
            "an upstream reset is 503 UC",
            simple(""),
            vec![get("/reset")],
            &["http.h.downstream_rq_5xx"],
        ),
        sc(
            "use_remote_address: x-forwarded-for appended, x-envoy-internal",
            simple("          use_remote_address: true\n"),
            vec![get("/").header("x-forwarded-for", "10.1.1.1").header("x-forwarded-proto", "https")],
            &[],
        ),
        sc(
            "use_remote_address with skip_xff_append",
            simple("          use_remote_address: true\n          skip_xff_append: true\n"),
            vec![get("/").header("x-forwarded-for", "10.1.1.1")],
            &[],
        ),
        sc(
            "without use_remote_address x-forwarded-* pass unchanged",
            simple(""),
            vec![get("/").header("x-forwarded-for", "203.0.113.9").header("x-forwarded-proto", "https").header("x-envoy-internal", "true")],
            &[],
        ),
        sc(
            "a client's x-request-id is kept",
            simple(""),
            vec![get("/").header("x-request-id", "my-own-id")],
            &[],
        ),
        sc(
            "generate_request_id false",
            simple("          generate_request_id: false\n"),
            vec![get("/")],
            &[],
        ),
        sc(
            "server_name and server header transformations",
            format!(
                "{}{}",
                simple("          server_name: istio-envoy\n"),
                ""
            ),
            vec![get("/"), get("/none")],
            &[],
        ),
        sc(
            "server header passed through",
            simple("          server_header_transformation: PASS_THROUGH\n"),
            vec![get("/")],
            &[],
        ),
        sc(
            "server header appended if absent",
            simple("          server_header_transformation: APPEND_IF_ABSENT\n          server_name: mine\n"),
            vec![get("/")],
            &[],
        ),
        sc(
            "hop-by-hop headers are not forwarded",
            simple(""),
            vec![get("/").header("connection", "keep-alive, x-custom").header("keep-alive", "timeout=5").header("te", "trailers").header("proxy-connection", "x")],
            &[],
        ),
        sc(
            "x-forwarded-client-cert is sanitized by default",
            simple(""),
            vec![get("/").header("x-forwarded-client-cert", "By=spiffe://x;URI=spiffe://y")],
            &[],
        ),
        sc(
            "access log: Envoy's default format",
            format!("{}{c0}", hcm("          access_log: [{ name: envoy.access_loggers.file, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: \"{ACCESS_LOG}\" } }]\n", &any_host(&to("/", "c")))),
            vec![get("/logged?q=1").header("user-agent", "agent/1").header("x-forwarded-for", "192.0.2.1").header("x-request-id", "fixed-id")],
            &[],
        ),
        sc(
            "access log: HTTP command operators",
            format!(
                "{}{}",
                hcm(
                    &file_log("%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %BYTES_RECEIVED% %BYTES_SENT% %UPSTREAM_CLUSTER% %ROUTE_NAME% %REQ(:AUTHORITY)% %RESP(X-UPSTREAM)% %REQ(X-MISSING)%"),
                    &any_host("{ name: main, match: { prefix: \"/\" }, route: { cluster: c } }, { name: gone, match: { prefix: \"/gone\" }, route: { cluster: r } }")
                ),
                [cluster("c", &["{U0}"], ""), cluster("r", &["{R}"], "")].concat()
            ),
            vec![get("/a").method("POST").body("12345"), get("/status/500"), get("/none").host("nowhere")],
            &[],
        ),
        sc(
            "access log: JSON format and a status filter",
            format!(
                "{}{c0}",
                hcm(
                    "          access_log: [{ name: envoy.access_loggers.file, filter: { status_code_filter: { comparison: { op: GE, value: { default_value: 400, runtime_key: k } } } }, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: \"{ACCESS_LOG}\", log_format: { json_format: { code: \"%RESPONSE_CODE%\", method: \"%REQ(:METHOD)%\", path: \"%REQ(:PATH)%\", flags: \"%RESPONSE_FLAGS%\" } } } }]\n",
                    &any_host(&to("/", "c"))
                )
            ),
            vec![get("/fine"), get("/status/404"), get("/status/502")],
            &[],
        ),
        sc(
            "retry on 5xx until the upstream answers",
            format!("{}{c0}", hcm(&file_log("%RESPONSE_CODE% %RESPONSE_FLAGS%"), "virtual_hosts: [{ name: v, domains: [\"*\"], include_attempt_count_in_response: true, include_request_attempt_count: true, routes: [{ match: { prefix: \"/\" }, route: { cluster: c, retry_policy: { retry_on: 5xx, num_retries: 2 } } }] }]")),
            vec![get("/flaky/2")],
            &["cluster.c.upstream_rq_retry", "cluster.c.upstream_rq_retry_success", "cluster.c.upstream_rq_total", "cluster.c.upstream_rq_503"],
        ),
        sc(
            "retries exhausted",
            format!("{}{c0}", hcm(&file_log("%RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_HOST%"), &any_host("{ match: { prefix: \"/\" }, route: { cluster: c, retry_policy: { retry_on: \"gateway-error\", num_retries: 2, retry_back_off: { base_interval: 0.001s } } } }"))),
            vec![get("/flaky/5")],
            &["cluster.c.upstream_rq_retry", "cluster.c.upstream_rq_retry_limit_exceeded", "cluster.c.upstream_rq_total"],
        ),
        sc(
            "retry on connect-failure",
            format!("{}{}", hcm(&file_log("%RESPONSE_CODE% %RESPONSE_FLAGS%"), &any_host("{ match: { prefix: \"/\" }, route: { cluster: c, retry_policy: { retry_on: connect-failure, num_retries: 3 } } }")), cluster("c", &["{R}"], "")),
            vec![get("/")],
            &["cluster.c.upstream_rq_retry", "cluster.c.upstream_cx_connect_fail", "cluster.c.upstream_rq_retry_limit_exceeded"],
        ),
        sc(
            "retriable status codes and 4xx",
            format!("{}{c0}", hcm(&file_log("%RESPONSE_CODE% %RESPONSE_FLAGS%"), &any_host("{ match: { prefix: \"/\" }, route: { cluster: c, retry_policy: { retry_on: \"retriable-status-codes,retriable-4xx\", retriable_status_codes: [418], num_retries: 1 } } }"))),
            vec![get("/status/418"), get("/status/409"), get("/status/500")],
            &["cluster.c.upstream_rq_retry", "cluster.c.upstream_rq_total"],
        ),
        sc(
            "gateway-error does not retry a 500",
            format!("{}{c0}", hcm("", &any_host("{ match: { prefix: \"/\" }, route: { cluster: c, retry_policy: { retry_on: gateway-error, num_retries: 3 } } }"))),
            vec![get("/status/500"), get("/status/504")],
            &["cluster.c.upstream_rq_retry"],
        ),
        sc(
            "retry on reset",
            format!("{}{c0}", hcm(&file_log("%RESPONSE_CODE% %RESPONSE_FLAGS%"), &any_host("{ match: { prefix: \"/\" }, route: { cluster: c, retry_policy: { retry_on: reset, num_retries: 2 } } }"))),
            vec![get("/reset")],
            &["cluster.c.upstream_rq_retry", "cluster.c.upstream_rq_total"],
        ),
        sc(
            "per-try timeout",
            format!("{}{c0}", hcm(&file_log("%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%"), &any_host("{ match: { prefix: \"/\" }, route: { cluster: c, timeout: 3s, retry_policy: { retry_on: 5xx, num_retries: 1, per_try_timeout: 0.2s } } }"))),
            vec![get("/delay/600")],
            &["cluster.c.upstream_rq_retry", "cluster.c.upstream_rq_per_try_timeout", "cluster.c.upstream_rq_timeout"],
        ),
        sc(
            "a virtual host's retry policy",
            format!("{}{c0}", hcm("", "virtual_hosts: [{ name: v, domains: [\"*\"], retry_policy: { retry_on: 5xx, num_retries: 1 }, routes: [{ match: { prefix: \"/\" }, route: { cluster: c } }] }]")),
            vec![get("/flaky/1")],
            &["cluster.c.upstream_rq_retry"],
        ),
        sc(
            "x-envoy-retry-on and x-envoy-max-retries from an internal client",
            format!("{}{c0}", hcm("          use_remote_address: true\n          internal_address_config: { cidr_ranges: [{ address_prefix: 127.0.0.0, prefix_len: 8 }] }\n", &any_host(&to("/", "c")))),
            vec![get("/flaky/2").header("x-envoy-retry-on", "5xx").header("x-envoy-max-retries", "3")],
            &["cluster.c.upstream_rq_retry"],
        ),
        sc(
            "x-envoy-retry-on from an external client is ignored",
            simple(""),
            vec![get("/flaky/1").header("x-envoy-retry-on", "5xx")],
            &["cluster.c.upstream_rq_retry"],
        ),
        sc(
            "a retried POST sends its body again",
            format!("{}{c0}", hcm("", &any_host("{ match: { prefix: \"/\" }, route: { cluster: c, retry_policy: { retry_on: 5xx, num_retries: 1 } } }"))),
            vec![get("/flaky/1").method("POST").body("again and again")],
            &["cluster.c.upstream_rq_retry"],
        ),
        sc(
            "HTTP/2 with prior knowledge to an HTTP/1.1 upstream",
            simple(""),
            vec![get("/h2?x=1").h2c().header("x-custom", "yes"), get("/post").h2c().method("POST").body("h2 body"), get("/none").h2c().method("HEAD")],
            &["http.h.downstream_rq_http2_total", "http.h.downstream_cx_http2_total", "http.h.downstream_rq_2xx"],
        ),
        sc(
            "HTTP/2 local replies",
            format!("{}{c0}", hcm("", &any_host("{ match: { prefix: \"/d\" }, direct_response: { status: 503, body: { inline_string: nope } } }, { match: { prefix: \"/r\" }, redirect: { path_redirect: /elsewhere } }"))),
            vec![get("/d").h2c(), get("/r").h2c(), get("/x").h2c()],
            &[],
        ),
        sc(
            "an HTTP/2 upstream",
            format!(
                "{}  - {{ name: c, type: STATIC, connect_timeout: 1s, typed_extension_protocol_options: {{ envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {{ \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, explicit_http_config: {{ http2_protocol_options: {{}} }} }} }}, load_assignment: {{ cluster_name: c, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {{H2}} }} }} }} }}] }}] }} }}\n",
                hcm("", &any_host(&to("/", "c")))
            ),
            vec![get("/up2?q=1").header("x-custom", "yes"), get("/post").method("POST").body("to h2"), get("/again").h2c()],
            &["cluster.c.upstream_cx_http2_total", "cluster.c.upstream_rq_200"],
        ),
        sc(
            "use_downstream_protocol",
            format!(
                "{}  - {{ name: c, type: STATIC, connect_timeout: 1s, typed_extension_protocol_options: {{ envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {{ \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, use_downstream_protocol_config: {{}} }} }}, load_assignment: {{ cluster_name: c, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {{H2}} }} }} }} }}] }}] }} }}\n",
                hcm("", &any_host(&to("/", "c")))
            ),
            vec![get("/as-h2").h2c()],
            &["cluster.c.upstream_cx_http2_total"],
        ),
        sc(
            "a websocket upgrade, configured",
            simple("          upgrade_configs: [{ upgrade_type: websocket }]\n"),
            vec![get("/ws").websocket("hello over the upgrade")],
            &["http.h.downstream_rq_1xx"],
        ),
        sc(
            "a websocket outlives request_headers_timeout (its bytes are not request headers)",
            simple("          upgrade_configs: [{ upgrade_type: websocket }]\n          request_headers_timeout: 0.2s\n"),
            vec![get("/ws").websocket("hello over the upgrade").closes_within(700)],
            &["http.h.downstream_rq_header_timeout"],
        ),
        sc(
            "a websocket upgrade, not configured",
            simple(""),
            vec![get("/ws").websocket("nobody hears")],
            &["http.h.downstream_rq_4xx"],
        ),
        sc(
            "a websocket upgrade turned off on the route",
            format!("{}{c0}", hcm("          upgrade_configs: [{ upgrade_type: websocket }]\n", &any_host("{ match: { prefix: \"/\" }, route: { cluster: c, upgrade_configs: [{ upgrade_type: websocket, enabled: false }] } }"))),
            vec![get("/ws").websocket("nobody hears")],
            &[],
        ),
        sc(
            "TLS: x-forwarded-proto https, no client certificate, XFCC dropped",
            format!("{}{c0}", tls_hcm("          forward_client_cert_details: APPEND_FORWARD\n", &any_host(&to("/", "c")))),
            vec![get("/secure").tls(false, false).header("x-forwarded-client-cert", "By=spiffe://x;URI=spiffe://y")],
            &["http.h.downstream_rq_2xx"],
        ),
        sc(
            "XFCC APPEND_FORWARD with subject, URI and DNS (Istio's inbound)",
            format!("{}{c0}", tls_hcm("          forward_client_cert_details: APPEND_FORWARD\n          set_current_client_cert_details: { subject: true, dns: true, uri: true }\n", &any_host(&to("/", "c")))),
            vec![get("/xfcc").tls(true, false), get("/xfcc2").tls(true, false).header("x-forwarded-client-cert", "By=spiffe://earlier;URI=spiffe://first")],
            &[],
        ),
        sc(
            "XFCC SANITIZE_SET with the certificate and chain",
            format!("{}{c0}", tls_hcm("          forward_client_cert_details: SANITIZE_SET\n          set_current_client_cert_details: { cert: true, chain: true }\n", &any_host(&to("/", "c")))),
            vec![get("/xfcc").tls(true, false).header("x-forwarded-client-cert", "By=spiffe://dropped")],
            &[],
        ),
        sc(
            "XFCC FORWARD_ONLY and ALWAYS_FORWARD_ONLY",
            format!(
                "{}{c0}",
                tls_hcm("          forward_client_cert_details: FORWARD_ONLY\n", &any_host(&to("/", "c")))
            ),
            vec![get("/a").tls(true, false).header("x-forwarded-client-cert", "By=spiffe://kept"), get("/b").tls(false, false).header("x-forwarded-client-cert", "By=spiffe://gone")],
            &[],
        ),
        sc(
            "XFCC ALWAYS_FORWARD_ONLY in plaintext",
            simple("          forward_client_cert_details: ALWAYS_FORWARD_ONLY\n"),
            vec![get("/").header("x-forwarded-client-cert", "By=spiffe://kept")],
            &[],
        ),
        sc(
            "HTTP/2 over TLS by ALPN",
            format!("{}{c0}", tls_hcm("", &any_host(&to("/", "c")))),
            vec![get("/h2tls").tls(true, true)],
            &["http.h.downstream_rq_http2_total"],
        ),
        sc(
            "normalize_path and merge_slashes",
            format!("{}{c0}", hcm("          normalize_path: true\n          merge_slashes: true\n", &any_host("{ match: { prefix: \"/b\" }, direct_response: { status: 200, body: { inline_string: b } } }, { match: { prefix: \"/\" }, route: { cluster: c } }"))),
            vec![get("/a/./x/../c?q=./.."), get("/a//b///c"), get("/%7Euser/%2fx/%41"), get("/a/%2E%2E/b"), get("/a/..%2F..%2Fb"), get("/../../etc"), get("/x/.."), get("/x/%2e/y")],
            &[],
        ),
        sc(
            "escaped slashes: reject, redirect, forward",
            format!(
                "{}{c0}",
                hcm("          path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD\n", &any_host(&to("/", "c")))
            ),
            vec![get("/a%2Fb%2fc?x=%2F"), get("/a%5Cb")],
            &[],
        ),
        sc(
            "escaped slashes rejected",
            simple("          path_with_escaped_slashes_action: REJECT_REQUEST\n"),
            vec![get("/a%2Fb"), get("/plain")],
            &["http.h.downstream_rq_4xx"],
        ),
        sc(
            "escaped slashes redirected",
            simple("          path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT\n"),
            vec![get("/a%2Fb?x=1")],
            &[],
        ),
        sc(
            "without normalize_path the path goes as it came",
            simple(""),
            vec![get("/a/./b/../c"), get("/a//b"), get("/%7E")],
            &[],
        ),
        sc(
            "max_request_headers_kb",
            simple("          max_request_headers_kb: 2\n"),
            vec![get("/small").header("x-some", "fine"), get("/big").header("x-big", Box::leak("y".repeat(3000).into_boxed_str()))],
            &["http.h.downstream_rq_4xx"],
        ),
        sc(
            "ring hash by header, cookie and query parameter",
            format!(
                "{}{}",
                hcm("", &any_host("{ match: { prefix: \"/h\" }, route: { cluster: c, hash_policy: [{ header: { header_name: x-user } }] } }, { match: { prefix: \"/c\" }, route: { cluster: c, hash_policy: [{ cookie: { name: session } }] } }, { match: { prefix: \"/q\" }, route: { cluster: c, hash_policy: [{ query_parameter: { name: id }, terminal: true }, { header: { header_name: x-user } }] } }, { match: { prefix: \"/both\" }, route: { cluster: c, hash_policy: [{ header: { header_name: x-user } }, { header: { header_name: x-team } }] } }")),
                cluster("c", &["{U0}", "{U1}"], ", lb_policy: RING_HASH")
            ),
            vec![
                get("/h").header("x-user", "alice"), get("/h").header("x-user", "bob"), get("/h").header("x-user", "carol"), get("/h").header("x-user", "dave"),
                get("/c").header("cookie", "a=1; session=s1"), get("/c").header("cookie", "session=s2"), get("/c").header("cookie", "session=s3; b=2"),
                get("/q?id=1").header("x-user", "alice"), get("/q?id=2"), get("/q?id=3"),
                get("/both").header("x-user", "alice").header("x-team", "t1"), get("/both").header("x-user", "bob").header("x-team", "t2"), get("/both").header("x-user", "erin").header("x-team", "t3"),
            ],
            &[],
        ),
        sc(
            "maglev by header",
            format!(
                "{}{}",
                hcm("", &any_host("{ match: { prefix: \"/\" }, route: { cluster: c, hash_policy: [{ header: { header_name: x-user } }] } }")),
                cluster("c", &["{U0}", "{U1}"], ", lb_policy: MAGLEV")
            ),
            vec![get("/m").header("x-user", "alice"), get("/m").header("x-user", "bob"), get("/m").header("x-user", "carol"), get("/m").header("x-user", "dave"), get("/m").header("x-user", "erin")],
            &[],
        ),
        sc(
            "circuit breakers: max_pending_requests and max_requests",
            format!(
                "{}{}{}",
                hcm(&file_log("%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%"), &any_host("{ match: { prefix: \"/p\" }, route: { cluster: p } }, { match: { prefix: \"/r\" }, route: { cluster: r } }")),
                cluster("p", &["{U0}"], ", circuit_breakers: { thresholds: [{ max_pending_requests: 0 }] }"),
                cluster("r", &["{U0}"], ", circuit_breakers: { thresholds: [{ max_requests: 0 }] }")
            ),
            vec![get("/p"), get("/r")],
            &[
                "cluster.p.upstream_rq_pending_overflow",
                "cluster.r.upstream_rq_active_overflow",
                "cluster.p.upstream_cx_total",
                "cluster.r.upstream_cx_total",
                "cluster.p.upstream_rq_503",
                "cluster.r.upstream_rq_503",
            ],
        ),
        sc(
            "fault: abort all requests",
            format!("{}{c0}", with_fault(&file_log("%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%"), &any_host(&to("/", "c")), ", abort: { http_status: 503, percentage: { numerator: 100 } }")),
            vec![get("/a"), get("/b")],
            &["http.h.fault.aborts_injected", "cluster.c.upstream_rq_total"],
        ),
        sc(
            "fault: a delay, then the upstream",
            format!("{}{c0}", with_fault(&file_log("%RESPONSE_CODE% %RESPONSE_FLAGS%"), &any_host(&to("/", "c")), ", delay: { fixed_delay: 0.2s, percentage: { numerator: 100 } }")),
            vec![get("/slow")],
            &["http.h.fault.delays_injected"],
        ),
        sc(
            "fault: aborts asked for by header",
            format!("{}{c0}", with_fault("", &any_host(&to("/", "c")), ", abort: { header_abort: {}, percentage: { numerator: 100 } }")),
            vec![get("/h").header("x-envoy-fault-abort-request", "429"), get("/h"), get("/h").header("x-envoy-fault-abort-request", "abc")],
            &["http.h.fault.aborts_injected"],
        ),
        sc(
            "fault: no percentage, no fault",
            format!("{}{c0}", with_fault("", &any_host(&to("/", "c")), ", abort: { http_status: 500 }")),
            vec![get("/none")],
            &["http.h.fault.aborts_injected"],
        ),
        sc(
            "fault: only matching headers and the named cluster",
            format!(
                "{}{}{}",
                with_fault("", &any_host("{ match: { prefix: \"/a\" }, route: { cluster: a } }, { match: { prefix: \"/b\" }, route: { cluster: b } }"), ", upstream_cluster: a, headers: [{ name: x-fault, string_match: { exact: \"yes\" } }], abort: { http_status: 418, percentage: { numerator: 100 } }"),
                cluster("a", &["{U0}"], ""),
                cluster("b", &["{U1}"], "")
            ),
            vec![get("/a").header("x-fault", "yes"), get("/a"), get("/b").header("x-fault", "yes")],
            &["http.h.fault.aborts_injected"],
        ),
        sc(
            "fault per route, as Istio configures it",
            format!(
                "{}{c0}",
                with_fault("", &any_host(&format!("{{ match: {{ prefix: \"/faulty\" }}, route: {{ cluster: c }}, typed_per_filter_config: {{ envoy.filters.http.fault: {{ \"@type\": {FAULT}, abort: {{ http_status: 502, percentage: {{ numerator: 100 }} }} }} }} }}, {{ match: {{ prefix: \"/\" }}, route: {{ cluster: c }} }}")), "")
            ),
            vec![get("/faulty"), get("/fine")],
            &["http.h.fault.aborts_injected"],
        ),
        sc(
            "CORS: preflight and simple requests by a virtual host's policy",
            format!(
                "{}{c0}",
                with_cors(&format!("virtual_hosts: [{{ name: v, domains: [\"*\"], typed_per_filter_config: {{ envoy.filters.http.cors: {{ \"@type\": {CORS_POLICY}, allow_origin_string_match: [{{ exact: \"https://app.example\" }}, {{ suffix: \".trusted.example\" }}], allow_methods: \"GET,POST\", allow_headers: \"x-custom,content-type\", expose_headers: \"x-upstream\", max_age: \"600\", allow_credentials: true }} }}, routes: [{{ match: {{ prefix: \"/\" }}, route: {{ cluster: c }} }}] }}]"))
            ),
            vec![
                get("/p").method("OPTIONS").header("origin", "https://app.example").header("access-control-request-method", "POST"),
                get("/s").header("origin", "https://x.trusted.example"),
                get("/s").header("origin", "https://evil.example"),
                get("/p").method("OPTIONS").header("origin", "https://evil.example").header("access-control-request-method", "POST"),
                get("/no-origin"),
                get("/p").method("OPTIONS").header("origin", "https://app.example"),
            ],
            &[],
        ),
        sc(
            "CORS: a route's policy over the virtual host's, and one turned off",
            format!(
                "{}{c0}",
                with_cors(&format!("virtual_hosts: [{{ name: v, domains: [\"*\"], typed_per_filter_config: {{ envoy.filters.http.cors: {{ \"@type\": {CORS_POLICY}, allow_origin_string_match: [{{ prefix: \"https://\" }}], allow_methods: GET }} }}, routes: [{{ match: {{ prefix: \"/route\" }}, typed_per_filter_config: {{ envoy.filters.http.cors: {{ \"@type\": {CORS_POLICY}, allow_origin_string_match: [{{ exact: \"https://only.example\" }}], allow_methods: PUT, max_age: \"5\" }} }}, route: {{ cluster: c }} }}, {{ match: {{ prefix: \"/off\" }}, typed_per_filter_config: {{ envoy.filters.http.cors: {{ \"@type\": {CORS_POLICY}, allow_origin_string_match: [{{ prefix: \"https://\" }}], filter_enabled: {{ default_value: {{ numerator: 0 }}, runtime_key: k }} }} }}, route: {{ cluster: c }} }}, {{ match: {{ prefix: \"/\" }}, route: {{ cluster: c }} }}] }}]"))
            ),
            vec![
                get("/route").method("OPTIONS").header("origin", "https://only.example").header("access-control-request-method", "PUT"),
                get("/route").method("OPTIONS").header("origin", "https://other.example").header("access-control-request-method", "PUT"),
                get("/vh").method("OPTIONS").header("origin", "https://other.example").header("access-control-request-method", "GET"),
                get("/off").header("origin", "https://other.example"),
            ],
            &[],
        ),
        sc(
            "gRPC: the timeout from grpc-timeout, and gRPC local replies",
            format!(
                "{}{c0}",
                hcm("", &any_host("{ match: { prefix: \"/old\" }, route: { cluster: c, max_grpc_timeout: 0s } }, { match: { prefix: \"/capped\" }, route: { cluster: c, max_stream_duration: { grpc_timeout_header_max: 0.3s } } }, { match: { prefix: \"/new\" }, route: { cluster: c, max_stream_duration: { grpc_timeout_header_max: 0s } } }, { match: { prefix: \"/direct\" }, direct_response: { status: 503, body: { inline_string: closed } } }"))
            ),
            vec![
                get("/old/delay").header("content-type", "application/grpc").header("grpc-timeout", "200m"),
                get("/new/x").header("content-type", "application/grpc").header("grpc-timeout", "5S"),
                get("/capped/x").header("content-type", "application/grpc").header("grpc-timeout", "10S"),
                get("/delay/800").header("content-type", "application/grpc"),
                get("/nowhere").host("x").header("content-type", "application/grpc"),
                get("/direct").header("content-type", "application/grpc+proto"),
            ],
            &["cluster.c.upstream_rq_timeout"],
        ),
        sc(
            "timeouts: stream idle, a route's idle_timeout and max_stream_duration",
            format!(
                "{}{c0}",
                hcm(
                    &format!("          stream_idle_timeout: 0.5s\n{}", file_log(TIMEOUT_LOG)),
                    &any_host("{ match: { prefix: \"/r/\" }, route: { cluster: c, prefix_rewrite: \"/\", idle_timeout: 0.25s } }, { match: { prefix: \"/m/\" }, route: { cluster: c, prefix_rewrite: \"/\", max_stream_duration: { max_stream_duration: 0.3s } } }, { match: { prefix: \"/\" }, route: { cluster: c } }")
                )
            ),
            vec![
                get("/delay/1200"),
                get("/r/delay/800"),
                get("/m/delay/800"),
                get("/slow/1000"),
                get("/post").method("POST").body("hello").partial(),
                get("/delay/100"),
            ],
            &["http.h.downstream_rq_idle_timeout", "http.h.downstream_rq_max_duration_reached", "http.h.downstream_rq_4xx", "http.h.downstream_rq_5xx"],
        ),
        sc(
            "timeouts: request_timeout, the connection manager's max_stream_duration, a route without it",
            format!(
                "{}{c0}",
                hcm(
                    &format!("          request_timeout: 0.3s\n          common_http_protocol_options: {{ max_stream_duration: 0.6s }}\n{}", file_log(TIMEOUT_LOG)),
                    &any_host("{ match: { prefix: \"/z/\" }, route: { cluster: c, prefix_rewrite: \"/\", max_stream_duration: { max_stream_duration: 0s } } }, { match: { prefix: \"/\" }, route: { cluster: c } }")
                )
            ),
            vec![
                get("/post").method("POST").body("hello").partial(),
                get("/delay/1200"),
                get("/z/delay/900"),
                get("/slow/1000"),
            ],
            &["http.h.downstream_rq_timeout", "http.h.downstream_rq_max_duration_reached"],
        ),
        sc(
            "connection limits: request_headers_timeout, max_headers_count, idle_timeout",
            format!(
                "{}{c0}",
                hcm(
                    &format!("          request_headers_timeout: 0.3s\n          drain_timeout: 0.3s\n          common_http_protocol_options: {{ idle_timeout: 0.5s, max_headers_count: 5 }}\n{}", file_log(TIMEOUT_LOG)),
                    &any_host(&to("/", "c"))
                )
            ),
            vec![
                get("/unfinished").partial(),
                get("/four").header("a", "1").header("b", "2").header("c", "3").header("d", "4"),
                get("/five").header("a", "1").header("b", "2").header("c", "3").header("d", "4").header("e", "5"),
                get("/idle").closes_within(4000),
            ],
            &["http.h.downstream_rq_header_timeout", "http.h.downstream_cx_idle_timeout", "http.h.downstream_rq_4xx"],
        ),
        sc(
            "tracing (inbound): sampling by x-request-id, B3 continued in its form, the decorator on the response",
            format!(
                "{}{c0}{}",
                hcm(&format!("{TRACING}{}", file_log("%REQ(X-REQUEST-ID)% %REQ(X-B3-SAMPLED)% %RESPONSE_CODE%")), &any_host("{ match: { prefix: \"/nodec\" }, route: { cluster: c } }, { match: { prefix: \"/\" }, route: { cluster: c }, decorator: { operation: \"fortio-server.mark.svc.cluster.local:8080/*\" } }")),
                cluster("zipkin", &["{R}"], "")
            ),
            vec![
                get("/a").header("x-request-id", "00000063-1234-4234-8234-123456789012"),
                get("/a").header("x-request-id", "00000064-1234-4234-8234-123456789012"),
                get("/a").header("x-b3-traceid", "feed000000000001").header("x-b3-spanid", "feed000000000002").header("x-b3-parentspanid", "feed000000000003").header("x-b3-sampled", "0").header("x-client-trace-id", "z"),
                // (Request ids given: a generated one would be sampled one time in a hundred.)
                get("/a").header("b3", "feedfeedfeedfeed000000000000abcd-feed000000000002-1").header("x-request-id", "00000064-1234-4234-8234-123456789012"),
                get("/nodec").header("x-request-id", "00000001"),
                get("/nodec").header("x-request-id", "12345678-1234-b234-8234-123456789012").header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                get("/a").header("x-b3-sampled", "1").header("x-request-id", "00000064-1234-4234-8234-123456789012"),
            ],
            &[],
        ),
        sc(
            "tracing (outbound): the decorator goes upstream unless not propagated; overall sampling",
            format!(
                "{}{c0}{}",
                hcm(&TRACING.replace("random_sampling: { value: 1 }", "random_sampling: { value: 100 }").replace("overall_sampling: { value: 100 }", "overall_sampling: { value: 50 }"), &any_host("{ match: { prefix: \"/noprop\" }, route: { cluster: c }, decorator: { operation: np, propagate: false } }, { match: { prefix: \"/\" }, route: { cluster: c }, decorator: { operation: out-op } }"))
                    .replace("    filter_chains:\n", "    traffic_direction: OUTBOUND\n    filter_chains:\n"),
                cluster("zipkin", &["{R}"], "")
            ),
            vec![
                get("/a").header("x-request-id", "00000063-1234-4234-8234-123456789012"),
                get("/a").header("x-request-id", "00001388-1234-9234-8234-123456789012"),
                get("/noprop").header("x-request-id", "00000063-1234-4234-8234-123456789012"),
            ],
            &[],
        ),
        sc(
            "tracing without a tracer: the sampling decision alone",
            format!(
                "{}{c0}",
                hcm("          tracing: { random_sampling: { value: 1 } }\n", &any_host("{ match: { prefix: \"/\" }, route: { cluster: c }, decorator: { operation: op } }"))
            ),
            vec![
                get("/a").header("x-request-id", "00000063-1234-4234-8234-123456789012"),
                get("/a").header("x-request-id", "00000064-1234-4234-8234-123456789012").header("x-client-trace-id", "z"),
            ],
            &[],
        ),
        sc(
            "local_reply_config: mappers by status and flag, a text and a JSON body format",
            format!(
                "{}{c0}{}",
                hcm(
                    &format!("          local_reply_config:\n            mappers:\n            - filter: {{ status_code_filter: {{ comparison: {{ op: EQ, value: {{ default_value: 404, runtime_key: lr404 }} }} }} }}\n              status_code: 410\n              body: {{ inline_string: \"gone here\" }}\n              headers_to_add: [{{ header: {{ key: x-mapped, value: \"%RESPONSE_CODE%\" }}, append_action: OVERWRITE_IF_EXISTS_OR_ADD }}]\n            - filter: {{ response_flag_filter: {{ flags: [UF] }} }}\n              body_format_override: {{ json_format: {{ status: \"%RESPONSE_CODE%\", message: \"%LOCAL_REPLY_BODY%\", flags: \"%RESPONSE_FLAGS%\" }} }}\n            body_format: {{ text_format: \"[%LOCAL_REPLY_BODY%] %RESPONSE_CODE% %REQ(:PATH)%\\n\" }}\n{}", file_log("%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %LOCAL_REPLY_BODY%")),
                    &any_host("{ match: { prefix: \"/refused\" }, route: { cluster: r } }, { match: { prefix: \"/direct\" }, direct_response: { status: 503, body: { inline_string: down } } }, { match: { prefix: \"/redirect\" }, redirect: { path_redirect: /elsewhere } }, { match: { prefix: \"/ok\" }, route: { cluster: c } }")
                ),
                cluster("r", &["{R}"], "")
            ),
            vec![
                get("/nowhere"),
                get("/refused"),
                get("/direct"),
                get("/redirect"),
                get("/ok"),
                get("/nowhere").header("content-type", "application/grpc"),
            ],
            &["http.h.downstream_rq_4xx", "http.h.downstream_rq_5xx"],
        ),
        sc(
            "connection pools: max_requests_per_connection both ways, an upstream idle_timeout",
            format!(
                "{}{}{}",
                hcm("          common_http_protocol_options: { max_requests_per_connection: 2 }\n", &any_host(&format!("{{ match: {{ prefix: \"/elsewhere/\" }}, route: {{ cluster: d, prefix_rewrite: \"/\" }} }}, {}", to("/", "c")))),
                cluster("c", &["{U0}"], ", typed_extension_protocol_options: { envoy.extensions.upstreams.http.v3.HttpProtocolOptions: { \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, common_http_protocol_options: { idle_timeout: 0.3s, max_requests_per_connection: 2 }, explicit_http_config: { http_protocol_options: {} } } }"),
                cluster("d", &["{U1}"], "")
            ),
            vec![
                get("/1"),
                get("/2").again(),
                get("/3"),
                get("/elsewhere/delay/800"),
                get("/4"),
            ],
            &["cluster.c.upstream_cx_total", "cluster.c.upstream_cx_max_requests", "cluster.c.upstream_cx_idle_timeout", "http.h.downstream_cx_max_requests_reached"],
        ),
        sc(
            "CONNECT: terminated by a route's connect_config, and refused where not configured",
            format!(
                "{}{c0}",
                hcm(&format!("          upgrade_configs: [{{ upgrade_type: CONNECT }}]\n{}", file_log("%REQ(:METHOD)% %REQ(:AUTHORITY)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %UPSTREAM_HOST%")), &any_host(&format!("{{ match: {{ connect_matcher: {{}}, headers: [{{ name: \":authority\", string_match: {{ exact: \"tunnel.example:443\" }} }}] }}, route: {{ cluster: c, upgrade_configs: [{{ upgrade_type: CONNECT, connect_config: {{}} }}] }} }}, {}", to("/", "c"))))
            ),
            vec![
                get("tunnel.example:443").connect("GET /tunnelled HTTP/1.1\r\nhost: inside.example\r\n\r\n"),
                get("tunnel.example:443").connect("GET /reset HTTP/1.1\r\nhost: inside.example\r\n\r\n").closes_within(3000),
                get("other.example:443").connect("hello"),
                get("/after"),
            ],
            &["http.h.downstream_rq_2xx", "http.h.downstream_rq_4xx", "cluster.c.upstream_cx_total"],
        ),
        sc(
            "CONNECT forwarded to an upstream proxy (no connect_config)",
            format!(
                "{}{c0}",
                hcm(&format!("          upgrade_configs: [{{ upgrade_type: CONNECT }}]\n{}", file_log("%REQ(:METHOD)% %REQ(:AUTHORITY)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %UPSTREAM_HOST%")), &any_host("{ match: { connect_matcher: {} }, route: { cluster: c } }"))
            ),
            vec![get("tunnel.example:443").connect("through the proxy")],
            &["cluster.c.upstream_rq_total"],
        ),
        sc(
            "CONNECT without upgrade_configs",
            simple(&file_log("%REQ(:METHOD)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%")),
            vec![get("tunnel.example:443").connect("hello")],
            &[],
        ),
        sc(
            "a client that goes away before its response is logged (0, DC)",
            simple(&file_log("%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%")),
            vec![get("/delay/700").abort_after(200), get("/after")],
            &["http.h.downstream_rq_active"],
        ),
        sc(
            "strip_matching_host_port",
            format!("{}{c0}", hcm("          strip_matching_host_port: true\n", "virtual_hosts: [{ name: v, domains: [\"a.example\"], routes: [{ match: { prefix: \"/\" }, route: { cluster: c } }] }]")),
            vec![get("/").host("a.example:{L}"), get("/").host("a.example:1")],
            &[],
        ),
    ]
}

#[test]
fn pilotfish_serves_http_as_envoy_does() {
    let Some(envoy) = envoy("envoy http") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("pilotfish-envoy-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (u0, u1) = (http_upstream("u0"), http_upstream("u1"));
    let h2 = h2c_upstream("h2");
    let pki = common::tls::Pki::new("mesh ca");
    let server = pki.leaf(
        &["server.example"],
        "spiffe://cluster.local/ns/mark/sa/fortio-server",
    );
    let client = pki.leaf(
        &["client.example"],
        "spiffe://cluster.local/ns/mark/sa/default",
    );
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (ca, scert, skey) = (
        file("ca.pem", &pki.ca_pem),
        file("server.pem", &server.cert),
        file("server.key", &server.key),
    );
    let _ = TLS_FILES.set((
        ca.clone(),
        file("client.pem", &client.cert),
        file("client.key", &client.key),
    ));
    let refused = free_port();
    let pilotfish = Path::new(env!("CARGO_BIN_EXE_pilotfish"));
    let only = std::env::var("PILOTFISH_HTTP_ONLY").ok();
    let mut failures = vec![];
    let all = scenarios();
    let mut ran = 0;
    // Times differ between any two runs.
    let time = regex::Regex::new(r"\[\d{4}-\d\d-\d\dT[0-9:.]+Z\]").unwrap();
    // So do durations: the default format's %DURATION% and upstream service time.
    let durations = regex::Regex::new(r#"(" \d{3} \S+ \d+ \d+ )\d+ (\d+|-) ""#).unwrap();
    for (i, s) in all.iter().enumerate() {
        if only.as_ref().is_some_and(|o| !s.name.contains(o.as_str())) {
            continue;
        }
        ran += 1;
        let text = s
            .resources
            .replace("{U0}", &u0.to_string())
            .replace("{U1}", &u1.to_string())
            .replace("{H2}", &h2.to_string())
            .replace("{CA}", &ca)
            .replace("{SCERT}", &scert)
            .replace("{SKEY}", &skey)
            .replace("{R}", &refused.to_string());
        let mut results = vec![];
        for (bin, is_envoy, tag) in [
            (envoy.as_path(), true, "envoy"),
            (pilotfish, false, "pilotfish"),
        ] {
            let r = side_by_side::start(bin, is_envoy, &text, &dir, &format!("{i}-{tag}"));
            FLAKY.lock().unwrap().clear();
            // Requests may name the listener's port ({L}) in their host.
            let requests: Vec<Req> = s
                .requests
                .iter()
                .map(|q| {
                    let mut q = q.clone();
                    if q.host.contains("{L}") {
                        q.host = Box::leak(
                            q.host
                                .replace("{L}", &r.listen.to_string())
                                .into_boxed_str(),
                        );
                    }
                    q
                })
                .collect();
            let ports = [
                (r.listen, "L"),
                (u0, "U0"),
                (u1, "U1"),
                (h2, "H2"),
                (refused, "R"),
            ];
            let mut seen: Vec<String> = run_requests(&r, &requests)
                .iter()
                .map(|o| normalize(o, &ports))
                .collect();
            // Access log lines, once flushed.
            std::thread::sleep(Duration::from_millis(250));
            let log = std::fs::read_to_string(&r.access_log).unwrap_or_default();
            let mut lines: Vec<String> = log
                .lines()
                .map(|l| {
                    let l = time.replace_all(l, "[<time>]");
                    let l = durations.replace_all(&l, |c: &regex::Captures| {
                        let service = if &c[2] == "-" { "-" } else { "<ms>" };
                        format!("{}<ms> {service} \"", &c[1])
                    });
                    format!("log: {}", normalize(&l, &ports))
                })
                .collect();
            lines.sort();
            seen.extend(lines);
            let stats: BTreeMap<String, String> =
                side_by_side::stat_values(r.admin, s.stats, str::to_string);
            results.push((seen, stats));
        }
        let (e, p) = (&results[0], &results[1]);
        if only.is_some() {
            eprintln!("{}: envoy {:#?}", s.name, e);
        }
        if e != p {
            let mut diff = String::new();
            for (k, (a, b)) in e.0.iter().zip(&p.0).enumerate() {
                if a != b {
                    diff.push_str(&format!("  [{k}] envoy:\n{a}\n  [{k}] pilotfish:\n{b}\n"));
                }
            }
            if e.0.len() != p.0.len() {
                diff.push_str(&format!("  envoy {:?}\n  pilotfish {:?}\n", e.0, p.0));
            }
            if e.1 != p.1 {
                diff.push_str(&format!(
                    "  stats envoy {:?}\n  stats pilotfish {:?}\n",
                    e.1, p.1
                ));
            }
            failures.push(format!("scenario {i} '{}':\n{diff}", s.name));
        }
    }
    assert!(ran > 0, "no scenario matched PILOTFISH_HTTP_ONLY");
    assert!(
        failures.is_empty(),
        "{} of {} scenarios differ (configs and logs in {}):\n{}",
        failures.len(),
        ran,
        dir.display(),
        failures.join("\n")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `r`'s access log lines, once flushed, sorted, each as `log: <line>`.
fn log_lines(r: &Running) -> Vec<String> {
    std::thread::sleep(Duration::from_millis(300));
    let mut log: Vec<String> = std::fs::read_to_string(&r.access_log)
        .unwrap_or_default()
        .lines()
        .map(|l| format!("log: {l}"))
        .collect();
    log.sort();
    log
}

/// `seen`, and the named counters of `r` as one more line.
fn and_stats(r: &Running, names: &[&str], mut seen: Vec<String>) -> Vec<String> {
    seen.push(format!(
        "{:?}",
        side_by_side::stat_values(r.admin, names, str::to_string)
    ));
    seen
}

/// Envoy and a fresh scratch directory for a side-by-side test (None when there is no Envoy,
/// which `envoy` has said).
fn side_by_side_setup(test: &str, tag: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let envoy = envoy(test)?;
    let dir = std::env::temp_dir().join(format!("pilotfish-envoy-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Some((envoy, dir))
}

/// `text` run by Envoy, then by pilotfish: what `look` sees of each.
fn in_both<T>(
    envoy: &Path,
    text: &str,
    dir: &Path,
    tag: &str,
    mut look: impl FnMut(&Running) -> T,
) -> [T; 2] {
    let pilotfish = Path::new(env!("CARGO_BIN_EXE_pilotfish"));
    [(envoy, true), (pilotfish, false)].map(|(bin, is_envoy)| {
        let r = side_by_side::start(bin, is_envoy, text, dir, &format!("{tag}-{is_envoy}"));
        look(&r)
    })
}

/// What an HTTP/2 client sees of a connection manager over h2c: the SETTINGS it sends
/// (max_concurrent_streams), and its stream timers, which reset a stream whose response had
/// begun instead of closing the connection.
async fn h2_client_sees(port: u16) -> Vec<String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (client, mut conn) = h2::client::handshake(tcp).await.unwrap();
    let mut seen = vec![];
    for path in ["/delay/1000", "/slow/1000", "/fine"] {
        let req = hyper::Request::get(format!("http://example.com{path}"))
            .body(())
            .unwrap();
        let (response, _) = client.clone().send_request(req, true).unwrap();
        let response = tokio::select! {
            r = response => r,
            _ = &mut conn => panic!("connection ended"),
        };
        let Ok(response) = response else {
            seen.push(format!("{path}: reset before headers"));
            continue;
        };
        let status = response.status();
        let mut body = response.into_body();
        let mut text = vec![];
        let end = loop {
            let frame = tokio::select! {
                d = body.data() => d,
                _ = &mut conn => break "connection ended".to_string(),
            };
            match frame {
                None => break "end".to_string(),
                Some(Ok(d)) => {
                    let _ = body.flow_control().release_capacity(d.len());
                    text.extend_from_slice(&d);
                }
                Some(Err(e)) => break format!("reset ({:?})", e.reason()),
            }
        };
        seen.push(normalize(
            &format!(
                "{path}: {status} {:?} {end}",
                String::from_utf8_lossy(&text)
            ),
            &[],
        ));
    }
    // A stream the client resets before its response.
    let req = hyper::Request::get("http://example.com/delay/800")
        .body(())
        .unwrap();
    let (reset, _) = client.clone().send_request(req, true).unwrap();
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        _ = &mut conn => {}
    }
    drop(reset);
    // Three streams at once to a cluster whose upstream connections carry one each, and three
    // to one whose connections carry any number.
    let mut waiting = vec![];
    for path in ["/up/delay/300", "/many/delay/300"] {
        for _ in 0..3 {
            let req = hyper::Request::get(format!("http://example.com{path}"))
                .body(())
                .unwrap();
            waiting.push(client.clone().send_request(req, true).unwrap().0);
        }
    }
    let all = async {
        let mut statuses = vec![];
        for w in waiting {
            statuses.push(w.await.map(|r| r.status().as_u16()).unwrap_or(0));
        }
        statuses
    };
    let statuses = tokio::select! {
        s = all => s,
        _ = &mut conn => vec![],
    };
    seen.push(format!("concurrent: {statuses:?}"));
    seen.push(format!(
        "max_concurrent_streams {}",
        conn.max_concurrent_send_streams()
    ));
    seen
}

#[test]
fn http2_settings_and_stream_resets_as_envoy() {
    let Some((envoy, dir)) = side_by_side_setup("envoy http2", "h2") else {
        return;
    };
    let u0 = http_upstream("u0");
    let h2 = h2c_upstream("h2");
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (name, options) in [
        ("defaults", ""),
        (
            "configured",
            "          http2_protocol_options: { max_concurrent_streams: 7, initial_stream_window_size: 131072, initial_connection_window_size: 1048576 }\n",
        ),
    ] {
        let text = format!(
            "{}{}{}",
            hcm(
                &format!("          stream_idle_timeout: 0.4s\n{options}{}", file_log("%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%")),
                &any_host(&format!("{{ match: {{ prefix: \"/up/\" }}, route: {{ cluster: h2, prefix_rewrite: \"/\" }} }}, {{ match: {{ prefix: \"/many/\" }}, route: {{ cluster: h2many, prefix_rewrite: \"/\" }} }}, {}", to("/", "c")))
            ),
            cluster("c", &["{U0}"], ""),
            cluster("h2", &["{H2}"], ", typed_extension_protocol_options: { envoy.extensions.upstreams.http.v3.HttpProtocolOptions: { \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, explicit_http_config: { http2_protocol_options: { max_concurrent_streams: 1 } } } }")
                + &cluster("h2many", &["{H2}"], ", typed_extension_protocol_options: { envoy.extensions.upstreams.http.v3.HttpProtocolOptions: { \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, explicit_http_config: { http2_protocol_options: {} } } }")
        )
        .replace("{U0}", &u0.to_string())
        .replace("{H2}", &h2.to_string());
        let results = in_both(&envoy, &text, &dir, name, |r| {
            let mut seen = rt.block_on(h2_client_sees(r.listen));
            seen.extend(log_lines(r));
            and_stats(r, &[
                    "cluster.h2.upstream_cx_http2_total",
                    "cluster.h2.upstream_rq_total",
                    "cluster.h2many.upstream_cx_http2_total",
                    "cluster.h2many.upstream_rq_total",
                    // Not upstream_rq_pending_total: how many of the concurrent streams find the
                    // connection still being made is scheduling (Envoy reads all three in one
                    // event, before its connect completes; pilotfish's tasks may run after).
                ], seen)
        });
        assert_eq!(results[0], results[1], "{name}: envoy, then pilotfish");
        assert!(results[1][1].contains("reset"), "{:?}", results[1]);
        // The stream the client reset is logged, as Envoy logs it.
        assert!(
            results[1].iter().any(|l| l.starts_with("log: /delay/800 0 ")),
            "{:?}",
            results[1]
        );
        // One stream per upstream connection: three at once took three connections.
        assert!(
            results[1]
                .last()
                .unwrap()
                .contains("\"cluster.h2.upstream_cx_http2_total\": \"3\""),
            "{:?}",
            results[1]
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A gRPC server over h2c: `/pkg.Echo/*` answers as many messages as it was sent plus one, then
/// the status the path's last segment names (`/pkg.Echo/Status5`: grpc-status 5, in the
/// trailers); `/pkg.Echo/Only*` answers trailers-only.
fn grpc_upstream() -> u16 {
    serve_on_loopback(|s| async move {
        let Ok(mut conn) = h2::server::handshake(s).await else {
            return;
        };
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            tokio::spawn(async move {
                let path = req.uri().path().to_string();
                let mut body = req.into_body();
                let mut bytes = vec![];
                while let Some(Ok(d)) = body.data().await {
                    let _ = body.flow_control().release_capacity(d.len());
                    bytes.extend_from_slice(&d);
                }
                let mut messages = 0;
                let mut at = 0;
                while at + 5 <= bytes.len() {
                    let n = u32::from_be_bytes(bytes[at + 1..at + 5].try_into().unwrap());
                    at += 5 + n as usize;
                    messages += 1;
                }
                let status = path
                    .rsplit('/')
                    .next()
                    .and_then(|m| m.trim_start_matches("Only").strip_prefix("Status"))
                    .unwrap_or("0")
                    .to_string();
                let head = hyper::Response::builder().header("content-type", "application/grpc");
                if path.contains("/Only") {
                    let r = head.header("grpc-status", status).body(()).unwrap();
                    let _ = respond.send_response(r, true);
                    return;
                }
                let r = head.body(()).unwrap();
                let Ok(mut send) = respond.send_response(r, false) else {
                    return;
                };
                for _ in 0..=messages {
                    let _ = send.send_data(bytes::Bytes::from_static(b"\0\0\0\0\x02hi"), false);
                }
                let mut trailers = hyper::HeaderMap::new();
                trailers.insert("grpc-status", status.parse().unwrap());
                let _ = send.send_trailers(trailers);
            });
        }
    })
}

/// gRPC calls over h2c: each (path, request messages); what came back of each.
async fn grpc_calls(port: u16, calls: &[(&str, usize)]) -> Vec<String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut seen = vec![];
    for (path, messages) in calls {
        let req = hyper::Request::post(format!("http://example.com{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (response, mut send) = client.clone().send_request(req, false).unwrap();
        for _ in 0..*messages {
            send.send_data(bytes::Bytes::from_static(b"\0\0\0\0\x03abc"), false)
                .unwrap();
        }
        send.send_data(bytes::Bytes::new(), true).unwrap();
        let Ok(response) = response.await else {
            seen.push(format!("{path}: reset"));
            continue;
        };
        let status = response.headers().get("grpc-status").cloned();
        let mut body = response.into_body();
        let mut n = 0;
        while let Some(Ok(d)) = body.data().await {
            let _ = body.flow_control().release_capacity(d.len());
            n += d.len();
        }
        let trailers = body.trailers().await.ok().flatten();
        let status = status.or_else(|| trailers.and_then(|t| t.get("grpc-status").cloned()));
        seen.push(format!("{path}: {n} bytes, grpc-status {status:?}"));
    }
    seen
}

#[test]
fn grpc_stats_as_envoy() {
    let Some((envoy, dir)) = side_by_side_setup("envoy grpc_stats", "grpc") else {
        return;
    };
    let upstream = grpc_upstream();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let calls = [
        ("/pkg.Echo/Hello", 2),
        ("/pkg.Echo/Status5", 1),
        ("/pkg.Echo/OnlyStatus14", 0),
        ("/other.Svc/Hello", 3),
        ("/pkg.Echo/Hello", 0),
    ];
    let mut failures = vec![];
    for (name, config) in [
        ("as Istio configures it", "emit_filter_state: true, stats_for_all_methods: false"),
        ("unset", ""),
        ("every method", "stats_for_all_methods: true"),
        ("an allowlist", "individual_method_stats_allowlist: { services: [{ name: pkg.Echo, method_names: [Hello] }] }"),
        ("an allowlist, dots replaced", "individual_method_stats_allowlist: { services: [{ name: pkg.Echo, method_names: [Hello, Status5] }] }, replace_dots_in_grpc_service_name: true"),
    ] {
        let text = format!(
            "{}{}",
            hcm(
                &file_log("%REQ(:PATH)% %RESPONSE_CODE% %GRPC_STATUS% %FILTER_STATE(envoy.filters.http.grpc_stats)% %FILTER_STATE(envoy.filters.http.grpc_stats:PLAIN)%"),
                &any_host(&to("/", "g"))
            )
            .replace(
                "          http_filters: [",
                &format!("          http_filters: [{{ name: envoy.filters.http.grpc_stats, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig, {config} }} }}, "),
            ),
            cluster("g", &["{G}"], ", typed_extension_protocol_options: { envoy.extensions.upstreams.http.v3.HttpProtocolOptions: { \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, explicit_http_config: { http2_protocol_options: {} } } }")
        )
        .replace("{G}", &upstream.to_string());
        let results = in_both(&envoy, &text, &dir, &name.replace(' ', "-"), |r| {
            let mut seen = rt.block_on(grpc_calls(r.listen, &calls));
            seen.extend(log_lines(r));
            let (_, stats) = admin_request(r.admin, "GET", "/stats");
            let mut grpc: Vec<String> = stats
                .lines()
                .filter(|l| l.starts_with("cluster.g.grpc") && !l.ends_with(": 0"))
                .map(str::to_string)
                .collect();
            grpc.sort();
            seen.extend(grpc);
            seen
        });
        if results[0] != results[1] {
            failures.push(format!(
                "{name}:\n  envoy {:#?}\n  pilotfish {:#?}",
                results[0], results[1]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn requests_wait_for_a_connection_at_max_connections_as_in_envoy() {
    let Some((envoy, dir)) = side_by_side_setup("envoy max_connections", "maxcx") else {
        return;
    };
    let u0 = http_upstream("u0");
    let text = format!(
        "{}{}",
        hcm("", &any_host(&to("/", "c"))),
        cluster(
            "c",
            &["{U0}"],
            ", circuit_breakers: { thresholds: [{ max_connections: 1 }] }"
        )
    )
    .replace("{U0}", &u0.to_string());
    let results = in_both(&envoy, &text, &dir, "maxcx", |r| {
        // Three requests at once, each on its own downstream connection; one upstream
        // connection may carry them, one after the other.
        let clients: Vec<_> = (0..3)
            .map(|i| {
                let port = r.listen;
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(i * 30));
                    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    write!(s, "GET /delay/300 HTTP/1.1\r\nhost: example.com\r\n\r\n").unwrap();
                    let mut r = BufReader::new(s);
                    read_response(&mut r, false)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string()
                })
            })
            .collect();
        let mut seen: Vec<String> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        seen.sort();
        and_stats(
            r,
            &[
                "cluster.c.upstream_cx_total",
                "cluster.c.upstream_cx_overflow",
                "cluster.c.upstream_rq_pending_total",
                "cluster.c.upstream_rq_total",
                "cluster.c.upstream_rq_pending_overflow",
            ],
            seen,
        )
    });
    assert_eq!(results[0], results[1], "envoy, then pilotfish");
    assert_eq!(results[1][..3], ["200", "200", "200"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An HTTP upstream over TLS offering `alpn`, speaking HTTP/1.1 or HTTP/2 as negotiated, and
/// answering with the protocol it saw.
fn tls_http_upstream(config: std::sync::Arc<rustls::ServerConfig>) -> u16 {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    serve_on_loopback(move |s| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(tls) = acceptor.accept(s).await else {
                return;
            };
            let svc = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let text = format!("saw {:?} {}\n", req.version(), req.uri().path());
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(text)),
                    ))
                },
            );
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
        }
    })
}

#[test]
fn auto_config_speaks_what_the_upstream_picks_as_envoy() {
    let Some((envoy, dir)) = side_by_side_setup("envoy auto_config", "auto") else {
        return;
    };
    let pki = common::tls::Pki::new("upstream ca");
    let leaf = pki.leaf(
        &["server.example"],
        "spiffe://cluster.local/ns/x/sa/upstream",
    );
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let h2 = tls_http_upstream(common::tls::server_config(&leaf, &["h2", "http/1.1"]));
    let h1 = tls_http_upstream(common::tls::server_config(&leaf, &["http/1.1"]));
    let auto = |name: &str, port: u16| {
        cluster(name, &[&port.to_string()], &format!(", transport_socket: {{ name: envoy.transport_sockets.tls, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, sni: server.example, common_tls_context: {{ validation_context: {{ trusted_ca: {{ filename: \"{}\" }} }} }} }} }}, typed_extension_protocol_options: {{ envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {{ \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, auto_config: {{}} }} }}", ca.display()))
    };
    let text = format!(
        "{}{}{}",
        hcm(
            "",
            &any_host(&format!("{}, {}", to("/h2", "a"), to("/h1", "b")))
        ),
        auto("a", h2),
        auto("b", h1)
    );
    let results = in_both(&envoy, &text, &dir, "auto", |r| {
        let seen: Vec<String> = ["/h2/x", "/h1/x", "/h2/y"]
            .iter()
            .map(|p| {
                let mut s = TcpStream::connect(("127.0.0.1", r.listen)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                write!(s, "GET {p} HTTP/1.1\r\nhost: example.com\r\n\r\n").unwrap();
                let response = read_response(&mut BufReader::new(s), false);
                response.lines().last().unwrap_or("").to_string()
            })
            .collect();
        and_stats(
            r,
            &[
                "cluster.a.upstream_cx_http2_total",
                "cluster.a.upstream_cx_total",
                "cluster.b.upstream_cx_http1_total",
                "cluster.b.upstream_cx_total",
            ],
            seen,
        )
    });
    assert_eq!(results[0], results[1], "envoy, then pilotfish");
    assert_eq!(
        results[1][..3],
        [
            "saw HTTP/2.0 /h2/x",
            "saw HTTP/1.1 /h1/x",
            "saw HTTP/2.0 /h2/y"
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
