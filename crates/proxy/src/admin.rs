//! The admin API on the bootstrap's admin address, with Envoy's paths, methods, status codes and
//! shapes: `/`, `/ready`, `/server_info`, `/config_dump`, `/listeners`, `/clusters`, `/stats`,
//! `/stats/prometheus`, `/logging`, `/memory`, `/healthcheck/fail|ok`, `/drain_listeners`,
//! `/reset_counters`, `/quitquitquit`.

use crate::log;
use crate::server::Server;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;

type Reply = Response<Full<Bytes>>;

/// Paths that change state: Envoy refuses them on GET.
const MUTATING: &[&str] = &[
    "/logging",
    "/quitquitquit",
    "/healthcheck/fail",
    "/healthcheck/ok",
    "/drain_listeners",
    "/reset_counters",
];

/// Answers for the server `current` holds: the one start-up makes while it waits for the
/// control plane (`Server::initializing`), then the one that serves.
pub async fn serve(mut current: tokio::sync::watch::Receiver<Arc<Server>>, listener: TcpListener) {
    loop {
        let server = current.borrow_and_update().clone();
        let mut shutdown = server.shutdown.subscribe();
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
            changed = current.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let Ok((stream, _)) = accepted else { continue };
        let server = current.borrow().clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&server, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-cache, max-age=0")
        .header("x-content-type-options", "nosniff")
        .body(Full::new(body.into()))
        .unwrap()
}

fn text(body: impl Into<Bytes>) -> Reply {
    reply(StatusCode::OK, "text/plain; charset=UTF-8", body)
}

fn json_reply(v: &Value) -> Reply {
    reply(
        StatusCode::OK,
        "application/json",
        serde_json::to_string_pretty(v).unwrap(),
    )
}

fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(kv), String::new()),
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn handle(server: &Arc<Server>, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_string();
    let q = query(&req);
    let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    tracing::debug!(target: "admin", "request complete: path: {}", req.uri());
    if MUTATING.contains(&path.as_str()) && req.method() != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=UTF-8",
            format!("Method {} not allowed, POST required.", req.method()),
        );
    }
    match path.as_str() {
        "/" => reply(
            StatusCode::OK,
            "text/html; charset=UTF-8",
            format!(
                "<html><head><title>pilotfish admin</title></head><body><ul>{}</ul></body></html>",
                [
                    "clusters", "config_dump", "healthcheck/fail", "healthcheck/ok", "listeners",
                    "logging", "memory", "quitquitquit", "ready", "reset_counters", "server_info",
                    "stats", "stats/prometheus", "drain_listeners"
                ]
                .iter()
                .map(|p| format!("<li><a href=\"/{p}\">/{p}</a></li>"))
                .collect::<String>()
            ),
        ),
        "/ready" => {
            match state(server) {
                "LIVE" => text("LIVE\n"),
                s => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain; charset=UTF-8", format!("{s}\n")),
            }
        }
        "/server_info" => json_reply(&server_info(server)),
        "/config_dump" => config_dump(server, get("include_eds").is_some(), get("resource"), get("name_regex"), get("mask")),
        "/listeners" => {
            let bound = server.bound.lock().unwrap().clone();
            if get("format") == Some("json") {
                let statuses: Vec<Value> = bound
                    .iter()
                    .map(|(n, a)| json!({"name": n, "local_address": {"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}}}))
                    .collect();
                json_reply(&json!({ "listener_statuses": statuses }))
            } else {
                text(bound.iter().map(|(n, a)| format!("{n}::{a}\n")).collect::<String>())
            }
        }
        "/clusters" => clusters(server, get("format") == Some("json")),
        "/stats" => {
            let filter = match get("filter").map(regex::Regex::new) {
                Some(Ok(r)) => Some(r),
                Some(Err(e)) => {
                    return reply(StatusCode::BAD_REQUEST, "text/plain; charset=UTF-8", format!("Invalid re2 regex: {e}"))
                }
                None => None,
            };
            if get("format") == Some("json") {
                json_reply(&server.stats.json(filter.as_ref()))
            } else if get("format") == Some("prometheus") {
                text(server.stats.prometheus())
            } else {
                text(server.stats.text(filter.as_ref()))
            }
        }
        "/stats/prometheus" => reply(StatusCode::OK, "text/plain; charset=UTF-8", server.stats.prometheus()),
        "/logging" => logging(&q),
        "/memory" => json_reply(&memory()),
        "/healthcheck/fail" => {
            server.healthcheck_failed.store(true, Ordering::Relaxed);
            text("OK\n")
        }
        "/healthcheck/ok" => {
            server.healthcheck_failed.store(false, Ordering::Relaxed);
            text("OK\n")
        }
        "/drain_listeners" => {
            let _ = server.draining.send(true);
            text("OK\n")
        }
        "/reset_counters" => {
            server.stats.reset_counters();
            text("OK\n")
        }
        "/quitquitquit" => {
            let _ = server.shutdown.send(true);
            text("OK\n")
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=UTF-8",
            format!("invalid path. admin commands are:\n  /clusters\n  /config_dump\n  /listeners\n  /logging\n  /ready\n  /server_info\n  /stats\n  /stats/prometheus\n  /quitquitquit\n(pilotfish: {path} is not an admin path)\n"),
        ),
    }
}

/// Envoy's server states, as `/ready` and `/server_info` report them.
fn state(server: &Server) -> &'static str {
    if *server.draining.borrow() {
        "DRAINING"
    } else if server.live.load(Ordering::Relaxed) {
        "LIVE"
    } else {
        "PRE_INITIALIZING"
    }
}

fn server_info(server: &Server) -> Value {
    let o = &server.options;
    let up = format!("{}s", server.started.elapsed().as_secs());
    let active = server.active();
    let node = &active.set.bootstrap.node;
    json!({
        "version": format!("pilotfish/{}/envoy-v3-api", env!("CARGO_PKG_VERSION")),
        "state": state(server),
        "uptime_current_epoch": up,
        "uptime_all_epochs": up,
        "hot_restart_version": "disabled",
        "command_line_options": {
            "base_id": "0",
            "concurrency": o.concurrency,
            "config_path": o.config_path,
            "log_level": o.log_level,
            "component_log_level": o.component_log_level,
            "log_format": "[%Y-%m-%d %T.%e][%t][%l][%n] [%g:%#] %v",
            "log_path": o.log_path,
            "service_cluster": o.service_cluster,
            "service_node": o.service_node,
            "drain_time": format!("{}s", o.drain_time_s),
            "mode": "Serve",
            "disable_hot_restart": true,
        },
        "node": node.as_ref().map(|n| json!({"id": n.id, "cluster": n.cluster})).unwrap_or(json!({})),
    })
}

fn config_dump(
    server: &Server,
    include_eds: bool,
    resource: Option<&str>,
    name_regex: Option<&str>,
    mask: Option<&str>,
) -> Reply {
    let name_re = match name_regex.map(regex::Regex::new) {
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            return reply(
                StatusCode::BAD_REQUEST,
                "text/plain; charset=UTF-8",
                format!("Error while parsing name_regex: {e}"),
            )
        }
        None => None,
    };
    let text = pilotfish_config::output::config_dump_json(&server.active().set, include_eds);
    let mut dump: Value = serde_json::from_str(&text).unwrap();
    let named = |item: &Value| -> bool {
        let Some(re) = &name_re else { return true };
        // Each list item wraps its resource (`cluster`, `listener`, `route_config`, ...): match the
        // wrapped resource's name, or the item's own.
        let name = item
            .as_object()
            .and_then(|o| {
                o.values()
                    .find_map(|v| v.get("name").and_then(Value::as_str))
            })
            .or_else(|| item.get("name").and_then(Value::as_str))
            .unwrap_or("");
        re.is_match(name)
    };
    let configs = dump["configs"].as_array_mut().unwrap();
    if let Some(field) = resource {
        let mut items = vec![];
        for c in configs.iter() {
            if let Some(list) = c.get(field).and_then(Value::as_array) {
                items.extend(list.iter().filter(|i| named(i)).cloned());
            }
        }
        if items.is_empty() && !configs.iter().any(|c| c.get(field).is_some()) {
            return reply(
                StatusCode::NOT_FOUND,
                "text/plain; charset=UTF-8",
                format!("{field} not found in config dump"),
            );
        }
        if let Some(m) = mask {
            items.iter_mut().for_each(|i| apply_mask(i, m));
        }
        return json_reply(&json!({ "configs": items }));
    }
    if name_re.is_some() {
        for c in configs.iter_mut() {
            if let Some(o) = c.as_object_mut() {
                for v in o.values_mut() {
                    if let Some(list) = v.as_array_mut() {
                        list.retain(|i| named(i));
                    }
                }
            }
        }
    }
    if let Some(m) = mask {
        for c in configs.iter_mut() {
            apply_mask(c, m);
        }
        // A config the mask leaves empty is left out, as Envoy does.
        configs.retain(|c| c.as_object().is_some_and(|o| o.len() > 1));
    }
    json_reply(&dump)
}

/// Envoy's field mask on a dumped message: only the listed paths (`a,b.c`) are kept, with
/// `@type`; a path through a list applies to each element.
fn apply_mask(v: &mut Value, mask: &str) {
    let paths: Vec<Vec<&str>> = mask
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.split('.').collect())
        .collect();
    keep(v, &paths);
}

fn keep(v: &mut Value, paths: &[Vec<&str>]) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(|i| keep(i, paths)),
        Value::Object(o) => {
            let mut kept = serde_json::Map::new();
            if let Some(t) = o.remove("@type") {
                kept.insert("@type".into(), t);
            }
            for p in paths {
                let Some((first, rest)) = p.split_first() else {
                    continue;
                };
                let Some(mut child) = o.get(*first).cloned() else {
                    continue;
                };
                if !rest.is_empty() {
                    let sub: Vec<Vec<&str>> = paths
                        .iter()
                        .filter(|q| q.first() == Some(first) && q.len() > 1)
                        .map(|q| q[1..].to_vec())
                        .collect();
                    // A whole-field path and a sub-path together keep the whole field.
                    if !paths.iter().any(|q| q.len() == 1 && q[0] == *first) {
                        keep(&mut child, &sub);
                    }
                }
                kept.insert(first.to_string(), child);
            }
            *o = kept;
        }
        _ => {}
    }
}

fn clusters(server: &Server, as_json: bool) -> Reply {
    let active = server.active();
    if as_json {
        let statuses: Vec<Value> = active
            .clusters
            .clusters
            .iter()
            .map(|c| {
                let hosts: Vec<Value> = c
                    .hosts
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|h| {
                        let (ip, port) = h.address.rsplit_once(':').unwrap_or((&h.address, "0"));
                        json!({
                            "address": {"socket_address": {"address": ip, "port_value": port.parse::<u32>().unwrap_or(0)}},
                            "stats": [
                                {"name": "cx_connect_fail", "value": h.stats.cx_connect_fail.load(Ordering::Relaxed).to_string()},
                                {"name": "cx_total", "value": h.stats.cx_total.load(Ordering::Relaxed).to_string()},
                                {"name": "rq_total", "value": h.stats.rq_total.load(Ordering::Relaxed).to_string()},
                                {"type": "GAUGE", "name": "cx_active", "value": h.stats.cx_active.load(Ordering::Relaxed).to_string()},
                                {"type": "GAUGE", "name": "rq_active", "value": h.stats.rq_active.load(Ordering::Relaxed).to_string()},
                            ],
                            "health_status": {"eds_health_status": if h.health == "UNKNOWN" { "HEALTHY" } else { h.health.as_str() }},
                            "weight": h.weight,
                            "locality": {"region": h.region, "zone": h.zone, "sub_zone": h.sub_zone},
                            "priority": h.priority,
                        })
                    })
                    .collect();
                json!({"name": c.name, "observability_name": c.name, "host_statuses": hosts})
            })
            .collect();
        return json_reply(&json!({ "cluster_statuses": statuses }));
    }
    let mut out = String::new();
    for c in &active.clusters.clusters {
        let n = &c.name;
        out.push_str(&format!("{n}::observability_name::{n}\n"));
        for (p, t) in ["default_priority", "high_priority"]
            .iter()
            .zip(&c.thresholds)
        {
            out.push_str(&format!(
                "{n}::{p}::max_connections::{}\n",
                t.max_connections
            ));
            out.push_str(&format!(
                "{n}::{p}::max_pending_requests::{}\n",
                t.max_pending_requests
            ));
            out.push_str(&format!("{n}::{p}::max_requests::{}\n", t.max_requests));
            out.push_str(&format!("{n}::{p}::max_retries::{}\n", t.max_retries));
        }
        out.push_str(&format!(
            "{n}::added_via_api::{}\n",
            active
                .set
                .clusters
                .iter()
                .any(|r| r.name == *n && !r.origin.is_static())
        ));
        for h in c.hosts.lock().unwrap().iter() {
            let a = &h.address;
            let s = &h.stats;
            for (k, v) in [
                ("cx_active", s.cx_active.load(Ordering::Relaxed)),
                ("cx_connect_fail", s.cx_connect_fail.load(Ordering::Relaxed)),
                ("cx_total", s.cx_total.load(Ordering::Relaxed)),
                ("rq_active", s.rq_active.load(Ordering::Relaxed)),
                ("rq_error", 0),
                ("rq_pending_active", 0),
                ("rq_success", 0),
                ("rq_timeout", 0),
                ("rq_total", s.rq_total.load(Ordering::Relaxed)),
            ] {
                out.push_str(&format!("{n}::{a}::{k}::{v}\n"));
            }
            let health = h.health_flags();
            out.push_str(&format!("{n}::{a}::hostname::{}\n", h.hostname));
            out.push_str(&format!("{n}::{a}::health_flags::{health}\n"));
            out.push_str(&format!("{n}::{a}::weight::{}\n", h.weight));
            out.push_str(&format!("{n}::{a}::region::{}\n", h.region));
            out.push_str(&format!("{n}::{a}::zone::{}\n", h.zone));
            out.push_str(&format!("{n}::{a}::sub_zone::{}\n", h.sub_zone));
            out.push_str(&format!("{n}::{a}::canary::false\n"));
            out.push_str(&format!("{n}::{a}::priority::{}\n", h.priority));
            out.push_str(&format!("{n}::{a}::success_rate::-1\n"));
            out.push_str(&format!("{n}::{a}::local_origin_success_rate::-1\n"));
        }
    }
    text(out)
}

fn logging(q: &[(String, String)]) -> Reply {
    for (k, v) in q {
        let ok = match (k.as_str(), log::level_index(v)) {
            ("level", Some(l)) => {
                log::set_all(l);
                true
            }
            (component, Some(l)) => log::set(component, l),
            _ => false,
        };
        if !ok {
            return reply(
                StatusCode::NOT_FOUND,
                "text/plain; charset=UTF-8",
                format!(
                    "error: unknown logger or level in '{k}={v}'\nusage: /logging?<name>=<level> (change single level)\n       /logging?level=<level> (change all levels)\nlevels: {}\n",
                    log::LEVELS.join(", ")
                ),
            );
        }
    }
    let mut out = String::from("active loggers:\n");
    for (c, l) in log::levels() {
        out.push_str(&format!("  {c}: {l}\n"));
    }
    text(out)
}

/// Memory as Envoy reports it, from the kernel's view of this process (pilotfish uses the
/// system allocator, so the tcmalloc-specific figures are zero).
fn memory() -> Value {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
            * 1024
    };
    let rss = kb("VmRSS:");
    let heap = kb("VmData:");
    let mut m = HashMap::new();
    m.insert("allocated", rss.to_string());
    m.insert("heap_size", heap.to_string());
    m.insert("pageheap_unmapped", "0".into());
    m.insert("pageheap_free", "0".into());
    m.insert("total_thread_cache", "0".into());
    m.insert("total_physical_bytes", rss.to_string());
    json!(m)
}
