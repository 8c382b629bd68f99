//! Counters and gauges with Envoy's names (`listener.<address>.downstream_cx_total`,
//! `cluster.<name>.upstream_cx_active`, `tcp.<stat_prefix>.downstream_cx_total`), and their
//! renderings for `/stats` (text, JSON) and `/stats/prometheus`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

#[derive(Debug)]
pub struct Stat {
    pub kind: Kind,
    value: AtomicU64,
}

impl Stat {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.value.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
    pub fn set(&self, v: u64) {
        self.value.store(v, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
pub struct Store {
    stats: Mutex<BTreeMap<String, Arc<Stat>>>,
    /// Envoy's text readouts (`cluster_manager.cds.version_text: "3"`).
    texts: Mutex<BTreeMap<String, String>>,
    /// Istio's standard metrics (`istio.stats`), with their labels.
    pub istio: Arc<crate::istio_stats::Registry>,
}

impl Store {
    fn get(&self, name: &str, kind: Kind) -> Arc<Stat> {
        let mut m = self.stats.lock().unwrap();
        m.entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Stat {
                    kind,
                    value: AtomicU64::new(0),
                })
            })
            .clone()
    }
    pub fn counter(&self, name: &str) -> Arc<Stat> {
        self.get(name, Kind::Counter)
    }
    pub fn gauge(&self, name: &str) -> Arc<Stat> {
        self.get(name, Kind::Gauge)
    }
    pub fn set_text(&self, name: &str, value: &str) {
        let mut m = self.texts.lock().unwrap();
        match m.get_mut(name) {
            Some(v) => value.clone_into(v),
            None => {
                m.insert(name.to_string(), value.to_string());
            }
        }
    }
    /// Forgets stats whose owner is gone (a removed cluster's subscription): a later one of
    /// the same name starts from zero, as in Envoy.
    pub fn remove(&self, names: &[String]) {
        let mut m = self.stats.lock().unwrap();
        let mut t = self.texts.lock().unwrap();
        for n in names {
            m.remove(n);
            t.remove(n);
        }
    }
    /// Forgets every stat under `prefix` (a removed cluster's `cluster.<name>.`) except those
    /// under one of `keep` (a cluster whose name extends the removed one's, `a.b` beside `a`).
    pub fn remove_prefix(&self, prefix: &str, keep: &[String]) {
        let gone = |n: &String| n.starts_with(prefix) && !keep.iter().any(|k| n.starts_with(k));
        self.stats.lock().unwrap().retain(|n, _| !gone(n));
        self.texts.lock().unwrap().retain(|n, _| !gone(n));
    }
    fn texts(&self, filter: Option<&regex::Regex>) -> Vec<(String, String)> {
        let t = self.texts.lock().unwrap();
        t.iter()
            .filter(|(n, _)| filter.is_none_or(|f| f.is_match(n)))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    }
    /// Every counter and gauge by name, Istio's counters by their flattened names among them.
    pub fn snapshot(&self) -> Vec<(String, Kind, u64)> {
        let mut all: Vec<(String, Kind, u64)> = {
            let m = self.stats.lock().unwrap();
            m.iter()
                .map(|(k, s)| (k.clone(), s.kind, s.get()))
                .collect()
        };
        all.extend(
            self.istio
                .text()
                .into_iter()
                .map(|(n, v)| (n, Kind::Counter, v)),
        );
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
    /// `/reset_counters`: counters to zero, gauges kept.
    pub fn reset_counters(&self) {
        for s in self.stats.lock().unwrap().values() {
            if s.kind == Kind::Counter {
                s.value.store(0, Ordering::Relaxed);
            }
        }
        self.istio.reset_counters();
    }

    pub fn text(&self, filter: Option<&regex::Regex>) -> String {
        let mut out = String::new();
        // Text readouts first, quoted, as Envoy lists them.
        for (name, v) in self.texts(filter) {
            out.push_str(&format!("{name}: {v:?}\n"));
        }
        for (name, _, v) in self.snapshot() {
            if filter.is_none_or(|f| f.is_match(&name)) {
                out.push_str(&format!("{name}: {v}\n"));
            }
        }
        out
    }

    pub fn json(&self, filter: Option<&regex::Regex>) -> serde_json::Value {
        let stats: Vec<serde_json::Value> = self
            .texts(filter)
            .into_iter()
            .map(|(n, v)| serde_json::json!({"name": n, "value": v}))
            .chain(
                self.snapshot()
                    .into_iter()
                    .filter(|(n, _, _)| filter.is_none_or(|f| f.is_match(n)))
                    .map(|(n, _, v)| serde_json::json!({"name": n, "value": v})),
            )
            .collect();
        serde_json::json!({ "stats": stats })
    }

    /// Prometheus text, with the tags Envoy extracts from the names it knows
    /// (`envoy_cluster_upstream_cx_total{envoy_cluster_name="c1"}`).
    pub fn prometheus(&self) -> String {
        let mut families: BTreeMap<String, (Kind, Vec<(String, u64)>)> = BTreeMap::new();
        let own: Vec<(String, Kind, u64)> = {
            let m = self.stats.lock().unwrap();
            m.iter()
                .map(|(k, s)| (k.clone(), s.kind, s.get()))
                .collect()
        };
        for (name, kind, v) in own {
            let (family, labels) = prometheus_name(&name);
            families
                .entry(family)
                .or_insert_with(|| (kind, vec![]))
                .1
                .push((labels, v));
        }
        let mut out = String::new();
        for (family, (kind, samples)) in families {
            let ty = if kind == Kind::Counter {
                "counter"
            } else {
                "gauge"
            };
            out.push_str(&format!("# TYPE {family} {ty}\n"));
            for (labels, v) in samples {
                out.push_str(&format!("{family}{labels} {v}\n"));
            }
        }
        out.push_str(&self.istio.prometheus());
        out
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn prometheus_name(name: &str) -> (String, String) {
    for (prefix, tag) in [
        ("cluster.", "envoy_cluster_name"),
        ("listener.", "envoy_listener_address"),
        ("tcp.", "envoy_tcp_prefix"),
    ] {
        if let Some(rest) = name.strip_prefix(prefix) {
            // The value is everything up to the stat's own name (which has no dots here).
            if let Some((value, stat)) = rest.rsplit_once('.') {
                return (
                    format!("envoy_{}{}", sanitize(prefix), sanitize(stat)),
                    format!("{{{tag}=\"{value}\"}}"),
                );
            }
        }
    }
    (format!("envoy_{}", sanitize(name)), String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_envoys_shapes() {
        let s = Store::default();
        s.counter("cluster.outbound|80||a.b.svc.upstream_cx_total")
            .add(3);
        s.gauge("listener.127.0.0.1_15001.downstream_cx_active")
            .inc();
        s.counter("server.x").inc();
        assert!(s
            .text(None)
            .contains("cluster.outbound|80||a.b.svc.upstream_cx_total: 3\n"));
        let p = s.prometheus();
        assert!(p.contains("# TYPE envoy_cluster_upstream_cx_total counter\n"));
        assert!(p.contains(
            "envoy_cluster_upstream_cx_total{envoy_cluster_name=\"outbound|80||a.b.svc\"} 3\n"
        ));
        assert!(p.contains(
            "envoy_listener_downstream_cx_active{envoy_listener_address=\"127.0.0.1_15001\"} 1\n"
        ));
        s.reset_counters();
        assert_eq!(s.counter("server.x").get(), 0);
        assert_eq!(
            s.gauge("listener.127.0.0.1_15001.downstream_cx_active")
                .get(),
            1
        );
    }
}
