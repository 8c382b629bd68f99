//! Active health checking, as Envoy's TCP and HTTP health checkers do it: one session per host
//! per configured check, the first check at start-up, then every `interval` (or
//! `no_traffic_interval`, 60 s by default, while the cluster has carried no traffic). A host of a
//! health-checked cluster starts failed and pending; its first success makes it healthy, after
//! that `healthy_threshold` successes are needed, and `unhealthy_threshold` failures (a refused
//! or timed-out connection, or a wrong answer) fail it.

use crate::cluster::{Cluster, Host};
use crate::stats::{Stat, Store};
use pilotfish_api::pb::envoy::config::core::v3::health_check::{
    payload, HealthChecker, HttpHealthCheck, Payload, TcpHealthCheck,
};
use pilotfish_api::pb::envoy::config::core::v3::HealthCheck;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct HcStats {
    attempt: Arc<Stat>,
    success: Arc<Stat>,
    failure: Arc<Stat>,
    network_failure: Arc<Stat>,
    /// Hosts that pass (a gauge).
    healthy: Arc<Stat>,
}

/// What the health checkers of this configuration cannot do, said at start-up.
pub fn unsupported(hc: &HealthCheck) -> Option<String> {
    match &hc.health_checker {
        Some(HealthChecker::TcpHealthCheck(_)) | Some(HealthChecker::HttpHealthCheck(_)) => None,
        Some(HealthChecker::GrpcHealthCheck(_)) => Some("gRPC health checks".into()),
        Some(HealthChecker::CustomHealthCheck(c)) => {
            Some(format!("custom health check '{}'", c.name))
        }
        None => Some("a health check without a checker".into()),
    }
}

/// Starts the sessions of every host of the cluster.
pub fn start(cluster: &Arc<Cluster>, stats: &Store) {
    for hc in &cluster.config.health_checks {
        if unsupported(hc).is_some() {
            continue;
        }
        let s = |n: &str| format!("cluster.{}.health_check.{n}", cluster.name);
        let st = Arc::new(HcStats {
            attempt: stats.counter(&s("attempt")),
            success: stats.counter(&s("success")),
            failure: stats.counter(&s("failure")),
            network_failure: stats.counter(&s("network_failure")),
            healthy: stats.gauge(&s("healthy")),
        });
        // Envoy's other health check counters, which pilotfish's checkers never move.
        for n in ["degraded", "passive_failure", "verify_cluster"] {
            stats.counter(&s(n));
        }
        for host in cluster.hosts.lock().unwrap().iter() {
            tokio::spawn(session(
                cluster.clone(),
                host.clone(),
                hc.clone(),
                st.clone(),
            ));
        }
    }
}

enum Outcome {
    Success,
    /// Connection refused, reset or timed out.
    Network,
    /// Connected, but the answer was not the expected one.
    Active,
}

async fn session(cluster: Arc<Cluster>, host: Arc<Host>, hc: HealthCheck, st: Arc<HcStats>) {
    let interval = crate::duration(hc.interval.as_ref(), Duration::from_secs(5));
    let timeout = crate::duration(hc.timeout.as_ref(), Duration::from_secs(1));
    let no_traffic = crate::duration(hc.no_traffic_interval.as_ref(), Duration::from_secs(60));
    let unhealthy_threshold = hc
        .unhealthy_threshold
        .as_ref()
        .map_or(1, |v| v.value.max(1));
    let healthy_threshold = hc.healthy_threshold.as_ref().map_or(1, |v| v.value.max(1));
    let (mut successes, mut failures, mut first) = (0u32, 0u32, true);
    while !cluster.retired() {
        st.attempt.inc();
        let outcome = check(&cluster, &host, &hc, timeout).await;
        let failed = host.active_hc_failed.load(Ordering::Relaxed);
        match outcome {
            Outcome::Success => {
                st.success.inc();
                failures = 0;
                successes += 1;
                if failed && (first || successes >= healthy_threshold) {
                    host.active_hc_failed.store(false, Ordering::Relaxed);
                    st.healthy.inc();
                    tracing::debug!(target: "hc", "health check for {} passed: host {} healthy", cluster.name, host.address);
                }
            }
            Outcome::Network | Outcome::Active => {
                if matches!(outcome, Outcome::Network) {
                    st.network_failure.inc();
                }
                st.failure.inc();
                successes = 0;
                failures += 1;
                if !failed && failures >= unhealthy_threshold {
                    host.active_hc_failed.store(true, Ordering::Relaxed);
                    st.healthy.dec();
                    tracing::debug!(target: "hc", "health check for {} failed: host {} unhealthy", cluster.name, host.address);
                }
            }
        }
        host.active_hc_pending.store(false, Ordering::Relaxed);
        first = false;
        let carried_traffic = cluster.stats.upstream_cx_total.get() > 0;
        tokio::time::sleep(if carried_traffic {
            interval
        } else {
            no_traffic
        })
        .await;
    }
}

async fn check(cluster: &Cluster, host: &Host, hc: &HealthCheck, timeout: Duration) -> Outcome {
    let Ok(addr) = host.address.parse::<SocketAddr>() else {
        // DNS hosts: resolve each time.
        return match tokio::net::lookup_host(host.address.as_str())
            .await
            .ok()
            .and_then(|mut a| a.next())
        {
            Some(a) => probe(cluster, a, hc, timeout).await,
            None => Outcome::Network,
        };
    };
    probe(cluster, addr, hc, timeout).await
}

async fn probe(
    cluster: &Cluster,
    addr: SocketAddr,
    hc: &HealthCheck,
    timeout: Duration,
) -> Outcome {
    let run = async {
        let mut s = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(_) => return Outcome::Network,
        };
        match &hc.health_checker {
            Some(HealthChecker::TcpHealthCheck(t)) => tcp(&mut s, t).await,
            Some(HealthChecker::HttpHealthCheck(h)) => http(&mut s, h, &cluster.name).await,
            _ => Outcome::Active,
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or(Outcome::Network)
}

fn bytes(p: &Payload) -> Vec<u8> {
    match &p.payload {
        Some(payload::Payload::Text(hex)) => (0..hex.len() / 2)
            .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
            .collect(),
        Some(payload::Payload::Binary(b)) => b.clone(),
        None => vec![],
    }
}

/// Connect-only, or send and expect each receive block in order (not necessarily adjacent).
async fn tcp(s: &mut TcpStream, t: &TcpHealthCheck) -> Outcome {
    if let Some(send) = &t.send {
        if s.write_all(&bytes(send)).await.is_err() {
            return Outcome::Network;
        }
    }
    let want: Vec<Vec<u8>> = t.receive.iter().map(bytes).collect();
    if want.is_empty() {
        return Outcome::Success;
    }
    let mut got = vec![];
    let mut buf = [0u8; 4096];
    loop {
        let mut at = 0;
        let found = want.iter().all(|w| {
            match got[at..]
                .windows(w.len().max(1))
                .position(|x| x == w.as_slice())
            {
                Some(i) => {
                    at += i + w.len();
                    true
                }
                None => false,
            }
        });
        if found {
            return Outcome::Success;
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return Outcome::Active,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// An HTTP/1.1 GET of the path; healthy when the status is expected (200 by default).
async fn http(s: &mut TcpStream, h: &HttpHealthCheck, cluster: &str) -> Outcome {
    let host = if h.host.is_empty() {
        cluster
    } else {
        h.host.as_str()
    };
    let req = format!(
        "GET {} HTTP/1.1\r\nhost: {host}\r\nuser-agent: Envoy/HC\r\nconnection: close\r\n\r\n",
        h.path
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return Outcome::Network;
    }
    let mut head = vec![];
    let mut buf = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return Outcome::Active,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let Some(status) = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<i64>().ok())
    else {
        return Outcome::Active;
    };
    let ok = if h.expected_statuses.is_empty() {
        status == 200
    } else {
        h.expected_statuses
            .iter()
            .any(|r| status >= r.start && status < r.end)
    };
    if ok {
        Outcome::Success
    } else {
        Outcome::Active
    }
}
