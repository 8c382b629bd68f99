//! Outlier detection for connections, as Envoy's detector sees tcp_proxy: a refused or timed-out
//! upstream connection is a local-origin failure. Unless `split_external_local_origin_errors`,
//! it counts as a 503, so toward `consecutive_5xx` and `consecutive_gateway_failure`; with the
//! split, toward `consecutive_local_origin_failure`. A successful connection resets the counts.
//! A host reaching a threshold is ejected (when the enforcing percentage and
//! `max_ejection_percent` allow) for `base_ejection_time` times its number of ejections, capped
//! by `max_ejection_time`, and comes back at the first `interval` tick after that.

use crate::cluster::{Cluster, Host};
use crate::stats::{Stat, Store};
use pilotfish_api::pb::envoy::config::cluster::v3::OutlierDetection;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A host's standing with the detector.
#[derive(Debug, Default)]
pub struct HostOutlier {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

pub struct Detector {
    cfg: OutlierDetection,
    stats: DetectorStats,
}

struct DetectorStats {
    ejections_active: Arc<Stat>,
    ejections_enforced_total: Arc<Stat>,
    ejections_enforced_consecutive_5xx: Arc<Stat>,
    ejections_detected_consecutive_5xx: Arc<Stat>,
    ejections_enforced_consecutive_gateway_failure: Arc<Stat>,
    ejections_detected_consecutive_gateway_failure: Arc<Stat>,
    ejections_enforced_consecutive_local_origin_failure: Arc<Stat>,
    ejections_detected_consecutive_local_origin_failure: Arc<Stat>,
    ejections_overflow: Arc<Stat>,
}

impl Detector {
    pub fn new(cluster: &str, cfg: &OutlierDetection, stats: &Store) -> Detector {
        let s = |n: &str| format!("cluster.{cluster}.outlier_detection.{n}");
        Detector {
            cfg: cfg.clone(),
            stats: DetectorStats {
                ejections_active: stats.gauge(&s("ejections_active")),
                ejections_enforced_total: stats.counter(&s("ejections_enforced_total")),
                ejections_enforced_consecutive_5xx: stats
                    .counter(&s("ejections_enforced_consecutive_5xx")),
                ejections_detected_consecutive_5xx: stats
                    .counter(&s("ejections_detected_consecutive_5xx")),
                ejections_enforced_consecutive_gateway_failure: stats
                    .counter(&s("ejections_enforced_consecutive_gateway_failure")),
                ejections_detected_consecutive_gateway_failure: stats
                    .counter(&s("ejections_detected_consecutive_gateway_failure")),
                ejections_enforced_consecutive_local_origin_failure: stats
                    .counter(&s("ejections_enforced_consecutive_local_origin_failure")),
                ejections_detected_consecutive_local_origin_failure: stats
                    .counter(&s("ejections_detected_consecutive_local_origin_failure")),
                ejections_overflow: stats.counter(&s("ejections_overflow")),
            },
        }
    }

    fn threshold(
        v: Option<&pilotfish_api::pb::google::protobuf::UInt32Value>,
        default: u32,
    ) -> u32 {
        v.map_or(default, |v| v.value)
    }

    /// An upstream connection to `host` succeeded.
    pub fn success(&self, host: &Host) {
        let mut o = host.outlier.lock().unwrap();
        o.consecutive_5xx = 0;
        o.consecutive_gateway = 0;
        o.consecutive_local = 0;
    }

    /// An upstream connection to `host` failed (refused, reset or timed out).
    pub fn connect_failure(&self, host: &Host, hosts: &[Arc<Host>], conn: u64) {
        let c = &self.cfg;
        let mut o = host.outlier.lock().unwrap();
        if o.ejected_until.is_some() {
            return;
        }
        // (name, count reached, threshold, enforcing %)
        let mut reached: Vec<(&str, u32)> = vec![];
        if c.split_external_local_origin_errors {
            o.consecutive_local += 1;
            if o.consecutive_local
                == Self::threshold(c.consecutive_local_origin_failure.as_ref(), 5)
            {
                reached.push((
                    "consecutive_local_origin_failure",
                    Self::threshold(c.enforcing_consecutive_local_origin_failure.as_ref(), 100),
                ));
            }
        } else {
            o.consecutive_5xx += 1;
            o.consecutive_gateway += 1;
            if o.consecutive_5xx == Self::threshold(c.consecutive_5xx.as_ref(), 5) {
                reached.push((
                    "consecutive_5xx",
                    Self::threshold(c.enforcing_consecutive_5xx.as_ref(), 100),
                ));
            }
            if o.consecutive_gateway == Self::threshold(c.consecutive_gateway_failure.as_ref(), 5) {
                reached.push((
                    "consecutive_gateway_failure",
                    Self::threshold(c.enforcing_consecutive_gateway_failure.as_ref(), 0),
                ));
            }
        }
        for (kind, enforcing) in reached {
            let (detected, enforced) = match kind {
                "consecutive_5xx" => (
                    &self.stats.ejections_detected_consecutive_5xx,
                    &self.stats.ejections_enforced_consecutive_5xx,
                ),
                "consecutive_gateway_failure" => (
                    &self.stats.ejections_detected_consecutive_gateway_failure,
                    &self.stats.ejections_enforced_consecutive_gateway_failure,
                ),
                _ => (
                    &self
                        .stats
                        .ejections_detected_consecutive_local_origin_failure,
                    &self
                        .stats
                        .ejections_enforced_consecutive_local_origin_failure,
                ),
            };
            detected.inc();
            if crate::random(conn ^ 0x0e7) % 100 >= enforcing as u64 {
                continue;
            }
            // max_ejection_percent (10 by default) bounds how much of the cluster is out.
            let max = Self::threshold(c.max_ejection_percent.as_ref(), 10) as u64;
            let ejected = hosts.iter().filter(|h| h.ejected()).count() as u64 + 1;
            if ejected * 100 > max * hosts.len() as u64 {
                self.stats.ejections_overflow.inc();
                continue;
            }
            o.ejections += 1;
            let base = crate::duration(c.base_ejection_time.as_ref(), Duration::from_secs(30));
            let cap = crate::duration(c.max_ejection_time.as_ref(), Duration::from_secs(300));
            let time = (base * o.ejections).min(cap.max(base));
            o.ejected_until = Some(Instant::now() + time);
            host.ejected.store(true, Ordering::Relaxed);
            enforced.inc();
            self.stats.ejections_enforced_total.inc();
            self.stats.ejections_active.inc();
            tracing::debug!(target: "upstream", connection = conn, "outlier detection: ejecting {} ({kind}) for {}ms", host.address, time.as_millis());
            break;
        }
    }

    /// The `interval` tick: hosts whose ejection time is over come back.
    fn tick(&self, hosts: &[Arc<Host>]) {
        let now = Instant::now();
        for h in hosts {
            let mut o = h.outlier.lock().unwrap();
            if o.ejected_until.is_some_and(|t| t <= now) {
                o.ejected_until = None;
                o.consecutive_5xx = 0;
                o.consecutive_gateway = 0;
                o.consecutive_local = 0;
                h.ejected.store(false, Ordering::Relaxed);
                self.stats.ejections_active.dec();
                tracing::debug!(target: "upstream", "outlier detection: {} back in", h.address);
            }
        }
    }
}

/// Runs the detector's `interval` timer for a cluster.
pub fn start(cluster: &Arc<Cluster>) {
    let Some(d) = &cluster.outlier else { return };
    let interval = crate::duration(d.cfg.interval.as_ref(), Duration::from_secs(10));
    let cluster = cluster.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(interval);
        t.tick().await;
        loop {
            t.tick().await;
            if cluster.retired() {
                return;
            }
            let hosts = cluster.hosts.lock().unwrap().clone();
            if let Some(d) = &cluster.outlier {
                d.tick(&hosts);
            }
        }
    });
}

pub type Standing = Mutex<HostOutlier>;
