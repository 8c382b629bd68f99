//! Istio's stats plugin (`istio.stats`, the null-VM Wasm plugin `envoy.wasm.stats`): the JSON
//! configuration istiod gives it, read into what pilotfish implements, with every part it does
//! not implement named.

use pilotfish_api::pb::google::protobuf::Any;

/// The code name Istio's stats plugin is configured with.
pub const STATS_CODE: &str = "envoy.wasm.stats";

/// Istio's standard metrics, by the names `metrics[].name` uses.
pub const METRICS: &[&str] = &[
    "requests_total",
    "request_duration_milliseconds",
    "request_bytes",
    "response_bytes",
    "tcp_sent_bytes_total",
    "tcp_received_bytes_total",
    "tcp_connections_opened_total",
    "tcp_connections_closed_total",
];

/// A dimension's value, from the expressions istiod writes for its standard overrides.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// `node.metadata['KEY']`: this proxy's node metadata.
    NodeMetadata(String),
    /// `downstream_peer.<field>` / `upstream_peer.<field>`: the peer's metadata, by Istio's
    /// FlatNode field (`cluster_id`, `workload_name`, `namespace`, ...) or `labels['KEY']`.
    Peer { downstream: bool, field: PeerField },
    /// `request.host`.
    RequestHost,
    /// `'text'` or `"text"`.
    Literal(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum PeerField {
    /// A FlatNode field, by its metadata key (`CLUSTER_ID`).
    Key(String),
    Label(String),
}

/// What the stats plugin is told.
#[derive(Debug, Clone, Default)]
pub struct StatsConfig {
    pub stat_prefix: String,
    pub disable_host_header_fallback: bool,
    /// `metrics[]`, applied in order as Istio applies them.
    pub metrics: Vec<MetricConfig>,
}

/// One `metrics[]` entry: for one metric (or all), tags left out, then dimensions set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricConfig {
    pub name: Option<String>,
    pub tags_to_remove: Vec<String>,
    pub dimensions: Vec<(String, Expr)>,
}

/// The plugin's configuration string, when `any` is Istio's stats plugin (HTTP or network).
pub fn stats_configuration(any: &Any) -> Option<String> {
    let (code, configuration) = crate::model::null_vm_plugin_configuration(any)?;
    (code == STATS_CODE).then_some(configuration)
}

fn parse_expr(text: &str) -> Option<Expr> {
    let t = text.trim();
    let quoted = |s: &str| -> Option<String> {
        let inner = s
            .strip_prefix('\'')
            .and_then(|s| s.strip_suffix('\''))
            .or_else(|| s.strip_prefix('"').and_then(|s| s.strip_suffix('"')))?;
        Some(inner.to_string())
    };
    if let Some(key) = t
        .strip_prefix("node.metadata[")
        .and_then(|s| s.strip_suffix(']'))
    {
        return quoted(key).map(Expr::NodeMetadata);
    }
    for (prefix, downstream) in [("downstream_peer.", true), ("upstream_peer.", false)] {
        if let Some(field) = t.strip_prefix(prefix) {
            let field = match field
                .strip_prefix("labels[")
                .and_then(|s| s.strip_suffix(']'))
            {
                Some(k) => PeerField::Label(quoted(k)?),
                None if field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
                    PeerField::Key(field.to_ascii_uppercase())
                }
                None => return None,
            };
            return Some(Expr::Peer { downstream, field });
        }
    }
    if t == "request.host" {
        return Some(Expr::RequestHost);
    }
    quoted(t).map(Expr::Literal)
}

/// Reads the plugin's JSON configuration: what pilotfish runs, and each part it does not
/// implement (`metrics[0].dimensions.request_host: expression 'x' ...`).
pub fn parse_stats(json: &str) -> Result<(StatsConfig, Vec<String>), String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("istio.stats configuration: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("istio.stats configuration: not a JSON object")?;
    let mut c = StatsConfig {
        stat_prefix: "istio".into(),
        ..Default::default()
    };
    let mut unsupported = vec![];
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for (key, value) in obj {
        match key.as_str() {
            // Only the plugin's own log level.
            "debug" => {}
            "stat_prefix" => c.stat_prefix = text(value),
            "disable_host_header_fallback" => {
                c.disable_host_header_fallback =
                    value.as_bool().unwrap_or_else(|| text(value) == "true")
            }
            "metrics" => {
                for (i, m) in value.as_array().into_iter().flatten().enumerate() {
                    let at = format!("metrics[{i}]");
                    let name = m.get("name").map(text).filter(|n| !n.is_empty());
                    let mut metric = MetricConfig {
                        name: name.clone(),
                        ..Default::default()
                    };
                    if let Some(n) = &name {
                        if !METRICS.contains(&n.as_str()) {
                            unsupported.push(format!(
                                "{at}.name: metric '{n}' (only Istio's standard metrics)"
                            ));
                            continue;
                        }
                    }
                    for (k, _) in m.as_object().into_iter().flatten() {
                        if !matches!(k.as_str(), "name" | "dimensions" | "tags_to_remove") {
                            unsupported.push(format!("{at}.{k}"));
                        }
                    }
                    for (dim, expr) in m
                        .get("dimensions")
                        .and_then(|d| d.as_object())
                        .into_iter()
                        .flatten()
                    {
                        match parse_expr(&text(expr)) {
                            Some(e) => metric.dimensions.push((dim.clone(), e)),
                            None => unsupported.push(format!(
                                "{at}.dimensions.{dim}: expression '{}' (pilotfish reads node.metadata['K'], downstream_peer.F, upstream_peer.F, request.host and quoted text)",
                                text(expr)
                            )),
                        }
                    }
                    for t in m
                        .get("tags_to_remove")
                        .and_then(|t| t.as_array())
                        .into_iter()
                        .flatten()
                    {
                        metric.tags_to_remove.push(text(t));
                    }
                    c.metrics.push(metric);
                }
            }
            other => unsupported.push(other.to_string()),
        }
    }
    Ok((c, unsupported))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_istiods_inbound_configuration() {
        let (c, gaps) = parse_stats(
            r#"{"debug": "false", "stat_prefix": "istio", "disable_host_header_fallback": true,
                "metrics": [{"dimensions": {"destination_cluster": "node.metadata['CLUSTER_ID']",
                "source_cluster": "downstream_peer.cluster_id"}}]}"#,
        )
        .unwrap();
        assert!(gaps.is_empty(), "{gaps:?}");
        assert!(c.disable_host_header_fallback);
        assert_eq!(
            c.metrics,
            vec![MetricConfig {
                name: None,
                tags_to_remove: vec![],
                dimensions: vec![
                    (
                        "destination_cluster".into(),
                        Expr::NodeMetadata("CLUSTER_ID".into())
                    ),
                    (
                        "source_cluster".into(),
                        Expr::Peer {
                            downstream: true,
                            field: PeerField::Key("CLUSTER_ID".into())
                        }
                    ),
                ]
            }]
        );
    }

    #[test]
    fn names_what_it_does_not_run() {
        let (_, gaps) = parse_stats(
            r#"{"field_separator": ";", "metrics": [{"name": "requests_total",
                "dimensions": {"x": "request.headers['a'] + 'b'"}}, {"name": "my_metric"}]}"#,
        )
        .unwrap();
        assert_eq!(gaps.len(), 3, "{gaps:?}");
        assert!(gaps[0].starts_with("field_separator"));
        assert!(gaps[1].starts_with("metrics[0].dimensions.x: expression"));
        assert!(gaps[2].starts_with("metrics[1].name: metric 'my_metric'"));
    }
}
