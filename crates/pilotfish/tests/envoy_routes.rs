//! Differential test of routing against real Envoy: generated route configurations (domains with
//! wildcards and ports, every path match kind, header and query matchers, grpc and runtime
//! matches, weighted clusters, cluster_header, rewrites, redirects, direct responses) are loaded
//! by a real Envoy whose clusters are upstreams that name themselves; generated requests go
//! through it, and what came back (which upstream, the path and host it saw, the redirect or the
//! direct response, and the virtual host and route names Envoy stamped on the response) must be
//! what pilotfish's router decides for the same request, and what `pilotfish route-check` passes.
//!
//! The generator is seeded (PILOTFISH_ROUTES_SEED overrides), so a failure reproduces.

mod common;
use common::*;
use pilotfish_decide::router::{Action, Request, RouteTable};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CLUSTERS: usize = 6;
const CONFIGS: usize = 4;
const REQUESTS_PER_CONFIG: usize = 100;

/// What the requests can be made of: values that make each matcher match, and some that do not.
#[derive(Default)]
struct Vocabulary {
    authorities: Vec<String>,
    paths: Vec<String>,
    header_values: Vec<(String, String)>,
    queries: Vec<String>,
    /// Requests aimed at one route: what its virtual host and match need.
    targets: Vec<Target>,
}

#[derive(Clone, Default)]
struct Target {
    authorities: Vec<String>,
    path: String,
    headers: Vec<(String, String)>,
    query: Option<String>,
    grpc: bool,
}

fn cluster(i: usize) -> String {
    format!("c{i}")
}

fn header_matcher(rng: &mut Rng, v: &mut Vocabulary, t: &mut Target) -> Value {
    let name = rng.pick(&["x-h1", "x-h2"]).to_string();
    let word = rng.pick(&["alpha", "Beta", "gamma-1", "delta"]).to_string();
    let (m, hit, miss) = match rng.below(11) {
        0 => (
            json!({"string_match": {"exact": word}}),
            word.clone(),
            "zzz".to_string(),
        ),
        1 => (
            json!({"string_match": {"prefix": &word[..3]}}),
            format!("{word}-x"),
            format!("x{word}"),
        ),
        2 => (
            json!({"string_match": {"suffix": &word[2..]}}),
            format!("x-{word}"),
            format!("{word}x"),
        ),
        3 => (
            json!({"string_match": {"contains": &word[1..4]}}),
            format!("[{word}]"),
            "nothing".into(),
        ),
        4 => (
            json!({"string_match": {"safe_regex": {"regex": "[a-z]+-[0-9]"}}}),
            "gamma-1".into(),
            "gamma".into(),
        ),
        5 => (
            json!({"string_match": {"exact": word.to_uppercase(), "ignore_case": true}}),
            word.clone(),
            "other".into(),
        ),
        6 => (
            json!({"present_match": true}),
            "anything".into(),
            String::new(),
        ),
        7 => (
            json!({"present_match": false}),
            String::new(),
            "anything".into(),
        ),
        8 => (
            json!({"range_match": {"start": 10, "end": 20}}),
            "15".into(),
            "20".into(),
        ),
        9 => (
            json!({"string_match": {"exact": word}, "invert_match": true}),
            "zzz".into(),
            word.clone(),
        ),
        _ => (
            json!({"string_match": {"exact": ""}, "treat_missing_header_as_empty": true}),
            String::new(),
            "x".into(),
        ),
    };
    let mut m = m;
    m["name"] = json!(name);
    if !hit.is_empty() && !t.headers.iter().any(|(k, _)| *k == name) {
        t.headers.push((name.clone(), hit.clone()));
    }
    for value in [hit, miss] {
        if !value.is_empty() {
            v.header_values.push((name.clone(), value));
        }
    }
    m
}

fn query_matcher(rng: &mut Rng, v: &mut Vocabulary, t: &mut Target) -> Value {
    let name = rng.pick(&["q", "debug"]).to_string();
    let (m, hit, miss) = match rng.below(5) {
        0 => (
            json!({"string_match": {"exact": "yes"}}),
            format!("{name}=yes"),
            format!("{name}=no"),
        ),
        1 => (
            json!({"string_match": {"prefix": "ab"}}),
            format!("{name}=abc"),
            format!("{name}=ba"),
        ),
        2 => (
            json!({"present_match": true}),
            name.to_string(),
            "other=1".to_string(),
        ),
        3 => (
            json!({"string_match": {"safe_regex": {"regex": "[0-9]+"}}}),
            format!("{name}=42"),
            format!("{name}=4x"),
        ),
        _ => (
            json!({"string_match": {"exact": "YES", "ignore_case": true}}),
            format!("{name}=yes"),
            format!("{name}=yes2"),
        ),
    };
    let mut m = m;
    m["name"] = json!(name);
    t.query = Some(hit.clone());
    v.queries.push(hit);
    v.queries.push(miss);
    m
}

/// One route: a path match with optional header, query, grpc and runtime conditions, and an action.
fn route(
    rng: &mut Rng,
    vi: usize,
    ri: usize,
    last: bool,
    v: &mut Vocabulary,
    t: &mut Target,
) -> Value {
    let k = rng.below(4);
    let before = v.paths.len();
    let mut m = match (last, rng.below(6)) {
        (true, _) => json!({"prefix": "/"}),
        (_, 0) => {
            v.paths
                .extend([format!("/p{k}"), format!("/p{k}/x"), format!("/p{k}x")]);
            json!({"prefix": format!("/p{k}")})
        }
        (_, 1) => {
            v.paths
                .extend([format!("/exact{k}"), format!("/exact{k}/")]);
            json!({"path": format!("/exact{k}")})
        }
        (_, 2) => {
            v.paths
                .extend([format!("/re{k}/123"), format!("/re{k}/abc")]);
            json!({"safe_regex": {"regex": format!("/re{k}/[0-9]+")}})
        }
        (_, 3) => {
            v.paths.extend([
                format!("/sep{k}"),
                format!("/sep{k}/a"),
                format!("/sep{k}x"),
            ]);
            json!({"path_separated_prefix": format!("/sep{k}")})
        }
        (_, 4) => {
            v.paths.extend([format!("/ci{k}/a"), format!("/CI{k}/A")]);
            json!({"prefix": format!("/Ci{k}"), "case_sensitive": false})
        }
        _ => {
            v.paths.extend([format!("/Mixed{k}"), format!("/mixed{k}")]);
            json!({"path": format!("/Mixed{k}")})
        }
    };
    t.path = v.paths.get(before).cloned().unwrap_or_else(|| "/".into());
    if !last && rng.chance(35) {
        let n = 1 + rng.below(2);
        m["headers"] = Value::Array((0..n).map(|_| header_matcher(rng, v, t)).collect());
    }
    if !last && rng.chance(25) {
        m["query_parameters"] = json!([query_matcher(rng, v, t)]);
    }
    if !last && rng.chance(10) {
        m["grpc"] = json!({});
        t.grpc = true;
    }
    if !last && rng.chance(10) {
        let n = if rng.chance(50) { 0 } else { 100 };
        m["runtime_fraction"] = json!({"default_value": {"numerator": n, "denominator": "HUNDRED"}, "runtime_key": format!("rt.{vi}.{ri}")});
    }
    let name = format!("r{vi}_{ri}");
    let mut r = json!({
        "name": name,
        "match": m,
        "response_headers_to_add": [{"header": {"key": "x-route", "value": name}}],
    });
    match rng.below(100) {
        0..=44 => {
            let mut a = json!({"cluster": cluster(rng.below(CLUSTERS))});
            rewrites(rng, &mut a);
            r["route"] = a;
        }
        45..=59 => {
            let n = 2 + rng.below(2);
            let clusters: Vec<Value> = (0..n)
                .map(|i| json!({"name": cluster((vi + ri + i) % CLUSTERS), "weight": 1 + rng.below(50)}))
                .collect();
            let mut a =
                json!({"weighted_clusters": {"clusters": clusters, "header_name": "x-random"}});
            rewrites(rng, &mut a);
            r["route"] = a;
        }
        60..=67 => r["route"] = json!({"cluster_header": "x-cluster-name"}),
        68..=83 => {
            let mut red = json!({});
            match rng.below(6) {
                0 => red["host_redirect"] = json!("elsewhere.example.net"),
                1 => red["path_redirect"] = json!("/moved"),
                2 => red["prefix_rewrite"] = json!("/new"),
                3 => red["https_redirect"] = json!(true),
                4 => {
                    red["port_redirect"] = json!(8443);
                    red["scheme_redirect"] = json!("https");
                }
                _ => {
                    red["path_redirect"] = json!("/gone?x=1");
                    red["strip_query"] = json!(true);
                }
            }
            if rng.chance(50) {
                red["response_code"] = json!(rng.pick(&[
                    "FOUND",
                    "SEE_OTHER",
                    "TEMPORARY_REDIRECT",
                    "PERMANENT_REDIRECT"
                ]));
            }
            r["redirect"] = red;
        }
        _ => {
            let status = *rng.pick(&[200u32, 403, 503]);
            r["direct_response"] =
                json!({"status": status, "body": {"inline_string": format!("direct {name}")}});
        }
    }
    r
}

fn rewrites(rng: &mut Rng, a: &mut Value) {
    match rng.below(10) {
        0 | 1 => a["prefix_rewrite"] = json!("/rewritten"),
        2 => a["regex_rewrite"] = json!({"pattern": {"regex": "[0-9]+"}, "substitution": "N"}),
        _ => {}
    }
    if rng.chance(20) {
        a["host_rewrite_literal"] = json!("upstream.internal");
    }
}

/// A route configuration: virtual hosts with unique domains of every form, routes of every kind.
fn route_config(rng: &mut Rng, n: usize, v: &mut Vocabulary) -> Value {
    let mut domains: Vec<(&str, Vec<String>)> = vec![
        (
            "api.example.com",
            vec![
                "api.example.com".into(),
                "API.Example.com".into(),
                "api.example.com:80".into(),
            ],
        ),
        ("api.example.com:8080", vec!["api.example.com:8080".into()]),
        (
            "*.example.com",
            vec![
                "www.example.com".into(),
                "a.b.example.com".into(),
                "www.example.com:8080".into(),
            ],
        ),
        ("*.b.example.com", vec!["x.b.example.com".into()]),
        (
            "*-svc.example.org",
            vec!["foo-svc.example.org".into(), "-svc.example.org".into()],
        ),
        (
            "shop.*",
            vec!["shop.example.net".into(), "shop.io:9000".into()],
        ),
        ("shop.example.*", vec!["shop.example.io".into()]),
        ("reviews", vec!["reviews".into(), "reviews:9080".into()]),
        (
            "reviews.default.svc.cluster.local:9080",
            vec![
                "reviews.default.svc.cluster.local:9080".into(),
                "reviews.default.svc.cluster.local".into(),
            ],
        ),
        (
            "*.svc.cluster.local",
            vec!["ratings.default.svc.cluster.local".into()],
        ),
    ];
    // Shuffle, then deal the domains out to the virtual hosts.
    for i in (1..domains.len()).rev() {
        domains.swap(i, rng.below(i + 1));
    }
    let vhosts_n = 3 + rng.below(3);
    let mut vhosts = vec![];
    let mut dealt = domains.into_iter();
    for vi in 0..vhosts_n {
        let mut ds = vec![];
        let mut vhost_authorities = vec![];
        for _ in 0..(1 + rng.below(2)) {
            if let Some((d, hosts)) = dealt.next() {
                ds.push(d.to_string());
                vhost_authorities.extend(hosts.iter().cloned());
                v.authorities.extend(hosts);
            }
        }
        let catch_all = vi == vhosts_n - 1 && n.is_multiple_of(2);
        if catch_all {
            ds.push("*".into());
        }
        if ds.is_empty() {
            continue;
        }
        let routes_n = 3 + rng.below(5);
        let mut routes = vec![];
        for ri in 0..routes_n {
            let last = ri == routes_n - 1 && rng.chance(50);
            let mut t = Target {
                authorities: vhost_authorities.clone(),
                ..Target::default()
            };
            if t.authorities.is_empty() {
                t.authorities.push("unknown.test".into());
            }
            routes.push(route(rng, vi, ri, last, v, &mut t));
            v.targets.push(t);
        }
        let name = format!("vh{vi}");
        vhosts.push(json!({
            "name": name,
            "domains": ds,
            "routes": routes,
            "response_headers_to_add": [{"header": {"key": "x-vhost", "value": name}}],
        }));
    }
    for (_, hosts) in dealt {
        v.authorities.extend(hosts);
    }
    v.authorities
        .extend(["unknown.test".to_string(), "example.com".to_string()]);
    v.paths
        .extend(["/".to_string(), "/nomatch".to_string(), "/p9".to_string()]);
    json!({"name": format!("generated-{n}"), "virtual_hosts": vhosts})
}

/// A request made of the vocabulary: mostly things that match something.
fn request(rng: &mut Rng, v: &Vocabulary) -> Request {
    if rng.chance(50) {
        return aimed(rng, v);
    }
    let mut path = rng.pick(&v.paths).clone();
    if !v.queries.is_empty() && rng.chance(35) {
        path.push('?');
        let q = rng.pick(&v.queries).clone();
        path.push_str(&q);
    }
    let authority = rng.pick(&v.authorities).clone();
    let mut req = Request::new(&authority, &path);
    req.method = rng.pick(&["GET", "POST"]).to_string();
    for _ in 0..rng.below(3) {
        if v.header_values.is_empty() {
            break;
        }
        let (k, val) = rng.pick(&v.header_values).clone();
        if !req.headers.iter().any(|(h, _)| *h == k) {
            req.headers.push((k, val));
        }
    }
    if rng.chance(15) {
        req.headers
            .push(("content-type".into(), "application/grpc".into()));
    }
    // Always: without it Envoy picks a weighted cluster at random.
    req.headers
        .push(("x-random".into(), rng.below(1000).to_string()));
    if rng.chance(80) {
        req.headers
            .push(("x-cluster-name".into(), cluster(rng.below(CLUSTERS))));
    }
    req
}

/// A request aimed at one route: its virtual host, a path its match takes, its headers and query.
/// Earlier routes may still take it, which is as much the point.
fn aimed(rng: &mut Rng, v: &Vocabulary) -> Request {
    let t = rng.pick(&v.targets).clone();
    let mut path = t.path.clone();
    if let Some(q) = &t.query {
        path.push('?');
        path.push_str(q);
    }
    let authority = rng.pick(&t.authorities).clone();
    let mut req = Request::new(&authority, &path);
    req.method = rng.pick(&["GET", "POST"]).to_string();
    req.headers = t.headers.clone();
    if t.grpc {
        req.headers
            .push(("content-type".into(), "application/grpc".into()));
    }
    req.headers
        .push(("x-random".into(), rng.below(1000).to_string()));
    if rng.chance(80) {
        req.headers
            .push(("x-cluster-name".into(), cluster(rng.below(CLUSTERS))));
    }
    req
}

/// An upstream that answers every request with its own name and what it was sent.
fn upstream(name: String) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let name = name.clone();
            std::thread::spawn(move || serve_upstream(conn, &name));
        }
    });
    port
}

fn serve_upstream(conn: TcpStream, name: &str) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let (mut host, mut length) = (String::new(), 0usize);
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, val)) = h.split_once(':') {
                match k.to_ascii_lowercase().as_str() {
                    "host" => host = val.trim().to_string(),
                    "content-length" => length = val.trim().parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\nx-cluster: {name}\r\nx-seen-path: {path}\r\nx-seen-host: {host}\r\ncontent-length: 0\r\n\r\n"
        );
        if conn.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

struct Envoy(Child);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_envoy(envoy: &Path, dir: &Path, rc: &Value, upstreams: &[u16]) -> (Envoy, u16) {
    let port = free_port();
    let clusters: Vec<Value> = upstreams
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({
                "name": cluster(i),
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {"cluster_name": cluster(i), "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                ]}]}
            })
        })
        .collect();
    let bootstrap = json!({
        "static_resources": {
            "listeners": [{
                "name": "routes",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "routes",
                        "route_config": rc,
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                        }}]
                    }
                }]}]
            }],
            "clusters": clusters
        }
    });
    let file = dir.join(format!("{}.json", rc["name"].as_str().unwrap()));
    std::fs::write(&file, serde_json::to_string_pretty(&bootstrap).unwrap()).unwrap();
    let log =
        std::fs::File::create(dir.join(format!("{}.log", rc["name"].as_str().unwrap()))).unwrap();
    let child = Command::new(envoy)
        .args([
            "--disable-hot-restart",
            "-l",
            "warning",
            "--concurrency",
            "1",
            "-c",
        ])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start envoy");
    let mut envoy = Envoy(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = envoy.0.try_wait() {
            panic!("envoy exited ({status}) on {}", file.display());
        }
        assert!(Instant::now() < deadline, "envoy did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    (envoy, port)
}

/// What Envoy did with a request, read from the response.
#[derive(Debug)]
struct Seen {
    status: u32,
    headers: Vec<(String, String)>,
    body: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn send(port: u16, req: &Request) -> Seen {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut text = format!(
        "{} {} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n",
        req.method, req.path, req.authority
    );
    for (k, v) in &req.headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    if req.method == "POST" {
        text.push_str("content-length: 0\r\n");
    }
    text.push_str("\r\n");
    conn.write_all(text.as_bytes()).unwrap();
    // Read by content-length, not to EOF: Envoy waits (delayed_close_timeout) for the client to
    // close first.
    let mut reader = BufReader::new(conn);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap();
    let mut headers = vec![];
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let body = String::from_utf8_lossy(&body).into_owned();
    Seen {
        status,
        headers,
        body,
    }
}

/// The status Envoy answers with: for a gRPC request a local reply is HTTP 200 carrying the
/// grpc-status its HTTP status maps to, and that is compared instead.
fn status_of(seen: &Seen) -> String {
    match seen.header("grpc-status") {
        Some(g) => format!("grpc-status {g}"),
        None => seen.status.to_string(),
    }
}

fn expected_status(http: u32, seen: &Seen) -> String {
    if seen.header("grpc-status").is_none() {
        return http.to_string();
    }
    // Envoy's Grpc::Utility::httpToGrpcStatus.
    let g = match http {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    };
    format!("grpc-status {g}")
}

/// The differences between Envoy's answer and pilotfish's decision, as sentences.
fn compare(table: &RouteTable, req: &Request, seen: &Seen) -> Vec<String> {
    let d = table.route(req);
    let mut diffs = vec![];
    let mut check = |what: &str, envoy: Option<&str>, ours: Option<&str>| {
        if envoy != ours {
            diffs.push(format!("{what}: envoy {envoy:?}, pilotfish {ours:?}"));
        }
    };
    let vhost_stamped = seen.header("x-vhost");
    let route_stamped = seen.header("x-route");
    if route_stamped.is_some() {
        check("virtual host", vhost_stamped, d.virtual_host.as_deref());
    }
    check("route", route_stamped, d.route_name.as_deref());
    match &d.action {
        Action::Forward {
            cluster,
            path,
            host,
            ..
        } => {
            if seen.header("x-cluster").is_some() {
                check("cluster", seen.header("x-cluster"), Some(cluster));
                check("upstream path", seen.header("x-seen-path"), Some(path));
                check("upstream host", seen.header("x-seen-host"), Some(host));
            } else if !cluster.is_empty() {
                diffs.push(format!(
                    "envoy answered {} without an upstream; pilotfish forwards to '{cluster}'",
                    seen.status
                ));
            } else {
                // cluster_header named a header the request lacks: no cluster, 503 (NC).
                check(
                    "status",
                    Some(&status_of(seen)),
                    Some(&expected_status(503, seen)),
                );
            }
        }
        Action::Redirect { location, code } => {
            check(
                "status",
                Some(&status_of(seen)),
                Some(&expected_status(*code, seen)),
            );
            check("location", seen.header("location"), Some(location));
        }
        Action::DirectResponse { status, body } => {
            check(
                "status",
                Some(&status_of(seen)),
                Some(&expected_status(*status, seen)),
            );
            if seen.header("grpc-status").is_none() {
                check("body", Some(&seen.body), Some(body));
            }
        }
        Action::NoRoute => check(
            "status",
            Some(&status_of(seen)),
            Some(&expected_status(404, seen)),
        ),
    }
    diffs
}

/// router_check_tool tests asserting what Envoy did, for `pilotfish route-check` to pass.
fn route_check_test(i: usize, req: &Request, seen: &Seen, rc: &Value) -> Value {
    let mut validate = json!({});
    if let Some(c) = seen.header("x-cluster") {
        validate["cluster_name"] = json!(c);
        validate["path_rewrite"] = json!(seen.header("x-seen-path"));
        validate["host_rewrite"] = json!(seen.header("x-seen-host"));
        // The tool names a virtual host only for a route that forwards.
        validate["virtual_host_name"] = json!(seen.header("x-vhost"));
    } else if let Some(l) = seen.header("location") {
        validate["path_redirect"] = json!(l);
        // A gRPC request gets its redirect as HTTP 200 with a grpc-status: the code is not seen.
        if seen.header("grpc-status").is_none() {
            validate["code_redirect"] = json!(seen.status);
        }
        validate["cluster_name"] = json!("");
    } else if seen.header("x-route").is_none() {
        validate["cluster_name"] = json!("");
    }
    let random: u64 = req
        .headers
        .iter()
        .find(|(k, _)| k == "x-random")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let headers: Vec<Value> = req
        .headers
        .iter()
        .map(|(k, v)| json!({"key": k, "value": v}))
        .collect();
    let mut input = json!({"authority": req.authority, "path": req.path, "method": req.method, "random_value": random, "additional_request_headers": headers});
    // router_check_tool enables a runtime_fraction only for the key the test names: name the one
    // of the route Envoy took (the ones before it did not match, or were at 0%).
    if let Some(route) = seen.header("x-route") {
        let key = rc["virtual_hosts"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|vh| vh["routes"].as_array().unwrap())
            .find(|r| r["name"] == route)
            .and_then(|r| r["match"]["runtime_fraction"]["runtime_key"].as_str());
        if let Some(key) = key {
            input["runtime"] = json!(key);
        }
    }
    json!({
        "test_name": format!("request {i}: {} {}{}", req.method, req.authority, req.path),
        "input": input,
        "validate": validate,
    })
}

#[test]
fn pilotfish_routes_as_envoy_does() {
    let Some(envoy) = envoy("envoy routes") else {
        return;
    };
    let seed: u64 = std::env::var("PILOTFISH_ROUTES_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    eprintln!("seed {seed} (PILOTFISH_ROUTES_SEED reproduces a run)");
    let mut rng = Rng(seed);
    let dir = std::env::temp_dir().join(format!("pilotfish-envoy-routes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let upstreams: Vec<u16> = (0..CLUSTERS).map(|i| upstream(cluster(i))).collect();

    let mut failures = vec![];
    let mut outcomes = std::collections::BTreeMap::<&str, usize>::new();
    let mut total = 0;
    for n in 0..CONFIGS {
        let mut vocab = Vocabulary::default();
        let rc = route_config(&mut rng, n, &mut vocab);
        let rc_file = dir.join(format!("generated-{n}.yaml"));
        std::fs::write(&rc_file, serde_json::to_string_pretty(&rc).unwrap()).unwrap();
        let parsed = pilotfish_config::load_message(
            rc_file.to_str().unwrap(),
            &std::fs::read_to_string(&rc_file).unwrap(),
        )
        .unwrap_or_else(|e| panic!("pilotfish rejects {}: {e:?}", rc_file.display()));
        let table = RouteTable::new(&parsed).unwrap();
        let (_envoy, port) = start_envoy(&envoy, &dir, &rc, &upstreams);
        let mut tests = vec![];
        for i in 0..REQUESTS_PER_CONFIG {
            let req = request(&mut rng, &vocab);
            let seen = send(port, &req);
            total += 1;
            let kind = if seen.header("x-cluster").is_some() {
                "forwarded"
            } else if seen.header("location").is_some() {
                "redirected"
            } else if seen.header("x-route").is_some() {
                "direct response"
            } else {
                "no route"
            };
            *outcomes.entry(kind).or_default() += 1;
            let diffs = compare(&table, &req, &seen);
            if !diffs.is_empty() {
                failures.push(format!(
                    "{} request {i}: {} {} host {} headers {:?}\n    {}",
                    rc_file.display(),
                    req.method,
                    req.path,
                    req.authority,
                    req.headers,
                    diffs.join("\n    ")
                ));
            }
            tests.push(route_check_test(i, &req, &seen, &rc));
        }
        // The same observations, as a router_check_tool tests file for `pilotfish route-check`.
        let tests_file = dir.join(format!("generated-{n}.tests.json"));
        std::fs::write(
            &tests_file,
            serde_json::to_string_pretty(&json!({"tests": tests})).unwrap(),
        )
        .unwrap();
        let out = pilotfish(&[
            "route-check",
            "-c",
            rc_file.to_str().unwrap(),
            "-t",
            tests_file.to_str().unwrap(),
            "--only-show-failures",
        ]);
        if !out.status.success() {
            failures.push(format!(
                "route-check on {}:\n{}{}",
                tests_file.display(),
                stdout(&out),
                stderr(&out)
            ));
        }
    }
    eprintln!("{total} requests through real Envoy: {outcomes:?}");
    assert!(
        failures.is_empty(),
        "{} disagreements (files kept in {}):\n{}",
        failures.len(),
        dir.display(),
        failures.join("\n")
    );
    assert!(total >= 300);
    // Every kind of outcome was exercised, so agreement means something.
    for kind in ["forwarded", "redirected", "direct response", "no route"] {
        assert!(
            outcomes.get(kind).copied().unwrap_or(0) >= 10,
            "too few '{kind}' outcomes: {outcomes:?}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
