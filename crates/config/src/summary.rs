//! What `pilotfish validate` reports about a loaded configuration, as a person reads it and as
//! JSON for scripts.

use crate::coverage::{gaps, Gap, GapKind};
use crate::model::Direction;
use crate::Config;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write;

pub fn to_json(cfg: &Config) -> Value {
    let r = &cfg.resources;
    let m = &cfg.model;
    let count_static = |v: Vec<bool>| v.iter().filter(|s| **s).count();
    let listeners: Vec<Value> = m
        .listeners
        .iter()
        .zip(&r.listeners)
        .map(|(l, res)| {
            json!({
                "name": l.name,
                "origin": res.origin.label(),
                "address": l.address,
                "direction": direction(l.direction),
                "use_original_dst": l.use_original_dst,
                "bind_to_port": l.bind_to_port,
                "listener_filters": l.listener_filters,
                "filter_chains": l.filter_chains.len(),
                "default_filter_chain": l.default_filter_chain.is_some(),
            })
        })
        .collect();
    let mut by_type: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &m.clusters {
        *by_type.entry(c.discovery.as_str()).or_default() += 1;
    }
    let route_configs: Vec<Value> = m
        .route_configs
        .iter()
        .map(|rc| {
            json!({
                "name": rc.name,
                "source": match &rc.source { crate::model::RouteConfigSource::Rds => "rds".to_string(), crate::model::RouteConfigSource::Inline { listener } => format!("inline in {listener}") },
                "virtual_hosts": rc.virtual_hosts,
                "routes": rc.routes,
            })
        })
        .collect();
    let hosts: usize = r
        .endpoints
        .iter()
        .map(|e| {
            e.value
                .endpoints
                .iter()
                .map(|l| l.lb_endpoints.len())
                .sum::<usize>()
        })
        .sum();
    let gaps: Vec<Value> = gaps(r)
        .into_iter()
        .map(|g| json!({"kind": gap_kind(&g), "key": g.key, "names": g.names, "count": g.count, "example": g.example}))
        .collect();
    let dangling: Vec<Value> = m
        .references
        .iter()
        .filter(|x| !x.resolved)
        .map(|x| json!({"kind": x.kind.label(), "name": x.name, "from": x.from}))
        .collect();
    json!({
        "file": cfg.file,
        "kind": match cfg.kind { crate::DocumentKind::Bootstrap => "bootstrap", crate::DocumentKind::ConfigDump => "config_dump" },
        "listeners": {
            "total": r.listeners.len(),
            "static": count_static(r.listeners.iter().map(|l| l.origin.is_static()).collect()),
            "dynamic": r.listeners.iter().filter(|l| !l.origin.is_static()).count(),
            "items": listeners,
        },
        "clusters": {
            "total": r.clusters.len(),
            "static": count_static(r.clusters.iter().map(|l| l.origin.is_static()).collect()),
            "dynamic": r.clusters.iter().filter(|l| !l.origin.is_static()).count(),
            "by_type": by_type,
        },
        "route_configs": {
            "total": m.route_configs.len(),
            "rds": m.route_configs.iter().filter(|x| x.source == crate::model::RouteConfigSource::Rds).count(),
            "inline": m.route_configs.iter().filter(|x| x.source != crate::model::RouteConfigSource::Rds).count(),
            "items": route_configs,
        },
        "endpoints": { "assignments": r.endpoints.len(), "hosts": hosts },
        "secrets": { "total": r.secrets.len(), "names": r.secrets.iter().map(|s| s.name.clone()).collect::<Vec<_>>() },
        "references": { "total": m.references.len(), "dangling": dangling },
        "warnings": cfg.warnings(),
        "deprecated": cfg.deprecated.iter().map(|d| json!({"field": d.field, "count": d.count, "example": d.example})).collect::<Vec<_>>(),
        "not_implemented": gaps,
    })
}

fn direction(d: Direction) -> &'static str {
    match d {
        Direction::Inbound => "INBOUND",
        Direction::Outbound => "OUTBOUND",
        Direction::Unspecified => "-",
    }
}

fn gap_kind(g: &Gap) -> &'static str {
    match g.kind {
        GapKind::Extension => "extension",
        GapKind::Opaque => "opaque",
        GapKind::Field => "field",
    }
}

pub fn to_text(cfg: &Config) -> String {
    let j = to_json(cfg);
    let mut s = String::new();
    let kind = if cfg.kind == crate::DocumentKind::Bootstrap {
        "bootstrap"
    } else {
        "config dump"
    };
    let _ = writeln!(s, "{}: {kind}, loaded OK", cfg.file);
    let l = &j["listeners"];
    let _ = writeln!(
        s,
        "\nListeners: {} ({} static, {} dynamic)",
        l["total"], l["static"], l["dynamic"]
    );
    let _ = writeln!(
        s,
        "  {:<22} {:<31} {:<9} {:>6}  LISTENER FILTERS",
        "NAME", "ADDRESS", "DIRECTION", "CHAINS"
    );
    for (lm, item) in cfg
        .model
        .listeners
        .iter()
        .zip(l["items"].as_array().unwrap())
    {
        let mut addr = lm.address.clone().unwrap_or_else(|| "-".into());
        if !lm.bind_to_port {
            addr.push_str(" (no bind)");
        }
        let mut chains = lm.filter_chains.len().to_string();
        if lm.default_filter_chain.is_some() {
            chains.push_str("+d");
        }
        let mut filters = lm.listener_filters.join(", ");
        if lm.use_original_dst {
            filters = format!("use_original_dst; {filters}");
        }
        let name = if lm.name.is_empty() {
            "(unnamed)"
        } else {
            lm.name.as_str()
        };
        let _ = writeln!(
            s,
            "  {:<22} {:<31} {:<9} {:>6}  {}",
            name,
            addr,
            item["direction"].as_str().unwrap(),
            chains,
            filters
        );
    }
    let c = &j["clusters"];
    let types: Vec<String> = c["by_type"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(
        s,
        "\nClusters: {} ({} static, {} dynamic): {}",
        c["total"],
        c["static"],
        c["dynamic"],
        types.join(", ")
    );
    let rc = &j["route_configs"];
    let _ = writeln!(
        s,
        "\nRoute configurations: {} ({} by name (RDS), {} inline in listeners)",
        rc["total"], rc["rds"], rc["inline"]
    );
    let _ = writeln!(
        s,
        "  {:<60} {:>13} {:>7}  SOURCE",
        "NAME", "VIRTUAL HOSTS", "ROUTES"
    );
    for item in rc["items"].as_array().unwrap() {
        let name = item["name"].as_str().unwrap();
        let _ = writeln!(
            s,
            "  {:<60} {:>13} {:>7}  {}",
            if name.is_empty() { "(unnamed)" } else { name },
            item["virtual_hosts"].as_u64().unwrap(),
            item["routes"].as_u64().unwrap(),
            item["source"].as_str().unwrap()
        );
    }
    let e = &j["endpoints"];
    let _ = writeln!(
        s,
        "\nEndpoints: {} assignments (EDS), {} hosts",
        e["assignments"], e["hosts"]
    );
    let names: Vec<&str> = j["secrets"]["names"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let _ = writeln!(
        s,
        "Secrets: {} ({})",
        j["secrets"]["total"],
        names.join(", ")
    );
    let refs = &j["references"];
    let dangling = refs["dangling"].as_array().unwrap().len();
    let _ = writeln!(
        s,
        "References: {} ({} resolved, {dangling} not in this configuration)",
        refs["total"],
        refs["total"].as_u64().unwrap() as usize - dangling
    );
    let warnings = j["warnings"].as_array().unwrap();
    if !warnings.is_empty() {
        let _ = writeln!(s, "\nWarnings ({}):", warnings.len());
        for w in warnings {
            let _ = writeln!(s, "  {}", w.as_str().unwrap());
        }
    }
    let gaps = j["not_implemented"].as_array().unwrap();
    let _ = writeln!(
        s,
        "\nNot implemented by pilotfish yet ({} kinds; pilotfish loads, checks and explains these, but does not carry traffic yet):",
        gaps.len()
    );
    let mut last = "";
    for g in gaps {
        let kind = g["kind"].as_str().unwrap();
        if kind != last {
            let _ = writeln!(
                s,
                "  {}:",
                match kind {
                    "extension" => "extensions",
                    "opaque" => "types without a schema (kept opaque)",
                    _ => "fields",
                }
            );
            last = kind;
        }
        let names: Vec<&str> = g["names"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        let named = if names.is_empty() {
            String::new()
        } else {
            format!(" ({})", names.join(", "))
        };
        let _ = writeln!(
            s,
            "    {:>4}x {}{named}\n          e.g. {}",
            g["count"],
            g["key"].as_str().unwrap(),
            g["example"].as_str().unwrap()
        );
    }
    s
}
