//! STRICT_DNS and LOGICAL_DNS clusters: each configured endpoint's name is resolved before the
//! listeners start and again every `dns_refresh_rate` (5 s by default). STRICT_DNS makes one host
//! per address the name resolves to (`dns_lookup_family` picks which), LOGICAL_DNS one host, the
//! first address. A host that stays keeps its counters; `/clusters` names it with its hostname.

use crate::cluster::{Cluster, Host};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the cluster's hosts come from DNS.
pub fn is_dns(cluster: &Cluster) -> bool {
    matches!(cluster.kind.as_str(), "STRICT_DNS" | "LOGICAL_DNS")
}

fn family(cluster: &Cluster, addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let (v4, v6): (Vec<SocketAddr>, Vec<SocketAddr>) = addrs.into_iter().partition(|a| a.is_ipv4());
    // Envoy's DnsLookupFamily: AUTO, V4_ONLY, V6_ONLY, V4_PREFERRED, ALL.
    match cluster.config.dns_lookup_family {
        1 => v4,
        2 => v6,
        3 => {
            if v4.is_empty() {
                v6
            } else {
                v4
            }
        }
        4 => v4.into_iter().chain(v6).collect(),
        _ => {
            if v6.is_empty() {
                v4
            } else {
                v6
            }
        }
    }
}

/// Resolves every endpoint now and replaces the cluster's hosts.
pub async fn resolve(cluster: &Cluster) {
    let mut next: Vec<Arc<Host>> = vec![];
    for t in &cluster.dns_templates {
        let Some((name, port)) = t.address.rsplit_once(':') else {
            continue;
        };
        let port: u16 = port.parse().unwrap_or(0);
        // `localhost` is both loopback addresses (RFC 6761), as Envoy's c-ares resolver answers,
        // whatever /etc/hosts lists.
        let lookup = if name == "localhost" || name.ends_with(".localhost") {
            Ok(vec![
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
                SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)),
            ])
        } else {
            // Envoy's resolver gives up after a few seconds too; a name that does not resolve
            // leaves the cluster without hosts until the next refresh.
            match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, port))).await
            {
                Ok(r) => r.map(|a| a.collect()),
                Err(_) => Err(std::io::Error::other("timed out")),
            }
        };
        let addrs: Vec<SocketAddr> = match lookup {
            Ok(a) => family(cluster, a),
            Err(e) => {
                tracing::debug!(target: "upstream", "DNS resolution of {name} for cluster {} failed: {e}", cluster.name);
                continue;
            }
        };
        let take = if cluster.kind == "LOGICAL_DNS" {
            1
        } else {
            addrs.len()
        };
        let current = cluster.hosts.lock().unwrap().clone();
        for a in addrs.into_iter().take(take) {
            let address = a.to_string();
            if next.iter().any(|h| h.address == address) {
                continue;
            }
            let host = current
                .iter()
                .find(|h| h.address == address && h.hostname == name)
                .cloned()
                .unwrap_or_else(|| Arc::new(t.resolved_as(address.clone(), name)));
            next.push(host);
        }
    }
    tracing::debug!(target: "upstream", "DNS hosts of cluster {}: {}", cluster.name, next.iter().map(|h| h.address.as_str()).collect::<Vec<_>>().join(", "));
    *cluster.hosts.lock().unwrap() = next;
}

/// Resolves now, then keeps resolving every `dns_refresh_rate`.
pub async fn start(cluster: &Arc<Cluster>) {
    if !is_dns(cluster) {
        return;
    }
    resolve(cluster).await;
    // Deprecated in favour of the DNS cluster extension's own field, and still what Envoy reads
    // for a STRICT_DNS or LOGICAL_DNS cluster.
    #[allow(deprecated)]
    let rate = crate::duration(
        cluster.config.dns_refresh_rate.as_ref(),
        Duration::from_secs(5),
    )
    .max(Duration::from_millis(1));
    let cluster = cluster.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(rate).await;
            if cluster.retired() {
                return;
            }
            resolve(&cluster).await;
        }
    });
}
