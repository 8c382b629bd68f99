//! The xDS client's stats, under Envoy's names: the ADS stream (`control_plane.*`) and each
//! subscription's updates — CDS (`cluster_manager.cds.*`), LDS (`listener_manager.lds.*`), each
//! route configuration (`http.<stat_prefix>.rds.<name>.*`), each EDS cluster
//! (`cluster.<name>.*`) and each SDS secret (`sds.<name>.*`), a subscription with a stream of
//! its own keeping that stream's `control_plane.*` under its prefix — counted as Envoy counts
//! them: a subscription's start and every update,
//! rejection or stream failure is an attempt; EDS and RDS subscriptions count only the responses
//! that carry their resource; a subscription that ends takes its stats with it.

use crate::stats::{Stat, Store};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What a subscription keeps beyond Envoy's common set.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Cds,
    Lds,
    Rds,
    Eds,
    Sds,
}

pub struct Subscription {
    prefix: String,
    attempt: Arc<Stat>,
    success: Arc<Stat>,
    rejected: Arc<Stat>,
    failure: Arc<Stat>,
    init_fetch_timeout: Arc<Stat>,
    version: Arc<Stat>,
    update_time: Arc<Stat>,
    /// CDS and RDS: updates that changed something, and when the last did.
    config_reload: Option<(Arc<Stat>, Arc<Stat>)>,
    /// EDS: updates that left the cluster's hosts as they were.
    no_rebuild: Option<Arc<Stat>>,
    /// A subscription with a stream of its own (SDS always; the others where their config
    /// source is not ADS): that stream's `<prefix>control_plane.connected_state`.
    connected_state: Option<Arc<Stat>>,
}

impl Subscription {
    /// An SDS secret's (`sds.<name>.*`), started.
    pub fn sds(store: &Store, name: &str) -> Subscription {
        Subscription::start(store, format!("sds.{name}."), Kind::Sds, true)
    }

    /// Its stats, and the start counted as the first attempt.
    fn start(store: &Store, prefix: String, kind: Kind, own_stream: bool) -> Subscription {
        let c = |n: &str| store.counter(&format!("{prefix}{n}"));
        let g = |n: &str| store.gauge(&format!("{prefix}{n}"));
        if matches!(kind, Kind::Rds | Kind::Eds) {
            // Never counted: a response that carries the resource is never empty.
            c("update_empty");
        }
        if kind == Kind::Sds {
            // Envoy counts a certificate file that cannot be watched: SDS over gRPC never.
            c("key_rotation_failed");
        }
        if own_stream {
            // The stream stats ADS has.
            c("control_plane.rate_limit_enforced");
            g("control_plane.pending_requests");
            store.set_text(&format!("{prefix}control_plane.identifier"), "");
        }
        let s = Subscription {
            attempt: c("update_attempt"),
            success: c("update_success"),
            rejected: c("update_rejected"),
            failure: c("update_failure"),
            init_fetch_timeout: c("init_fetch_timeout"),
            version: g("version"),
            update_time: g("update_time"),
            config_reload: matches!(kind, Kind::Cds | Kind::Rds)
                .then(|| (c("config_reload"), g("config_reload_time_ms"))),
            no_rebuild: (kind == Kind::Eds).then(|| c("update_no_rebuild")),
            connected_state: own_stream.then(|| g("control_plane.connected_state")),
            prefix,
        };
        store.set_text(&format!("{}version_text", s.prefix), "");
        s.attempt.inc();
        s
    }

    /// An accepted update of `version_info`; `changed`: it changed what this subscription holds.
    pub fn accepted(&self, store: &Store, version_info: &str, changed: bool) {
        self.attempt.inc();
        self.success.inc();
        // Envoy's version gauge is the version string's xxHash64.
        self.version
            .set(xxhash_rust::xxh64::xxh64(version_info.as_bytes(), 0));
        store.set_text(&format!("{}version_text", self.prefix), version_info);
        let now = now_ms();
        self.update_time.set(now);
        if let Some((reload, at)) = &self.config_reload {
            if changed {
                reload.inc();
                at.set(now);
            }
        }
        if let Some(no_rebuild) = &self.no_rebuild {
            if !changed {
                no_rebuild.inc();
            }
        }
    }

    /// A refused update. Over delta xDS Envoy counts it as two attempts (the update tried,
    /// then its failure), as observed against Envoy 1.40.
    pub fn rejected(&self, delta: bool) {
        self.attempt.add(1 + delta as u64);
        self.rejected.inc();
    }

    /// Its own stream is up.
    pub fn connected(&self) {
        if let Some(c) = &self.connected_state {
            c.set(1);
        }
    }

    fn own_stream(&self) -> bool {
        self.connected_state.is_some()
    }

    pub fn failed(&self) {
        self.attempt.inc();
        self.failure.inc();
        if let Some(c) = &self.connected_state {
            c.set(0);
        }
    }

    pub fn timed_out(&self) {
        self.init_fetch_timeout.inc();
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = [
            "update_attempt",
            "update_success",
            "update_rejected",
            "update_failure",
            "update_empty",
            "init_fetch_timeout",
            "version",
            "version_text",
            "update_time",
            "config_reload",
            "config_reload_time_ms",
            "update_no_rebuild",
            "control_plane.connected_state",
            "control_plane.pending_requests",
            "control_plane.rate_limit_enforced",
            "control_plane.identifier",
        ]
        .iter()
        .map(|n| format!("{}{n}", self.prefix))
        .collect();
        names.sort();
        names
    }
}

/// The ADS stream's stats and every subscription's.
pub struct XdsStats {
    pub store: Arc<Store>,
    /// The ADS stream's, when the bootstrap has one.
    connected_state: Option<Arc<Stat>>,
    pub cds: Option<Subscription>,
    pub lds: Option<Subscription>,
    /// By cluster name.
    pub eds: BTreeMap<String, Subscription>,
    /// By route configuration name.
    pub rds: BTreeMap<String, Subscription>,
}

impl XdsStats {
    pub fn new(store: Arc<Store>, ads: bool) -> XdsStats {
        let connected_state = ads.then(|| {
            store.counter("control_plane.rate_limit_enforced");
            store.gauge("control_plane.pending_requests");
            store.set_text("control_plane.identifier", "");
            store.gauge("control_plane.connected_state")
        });
        XdsStats {
            connected_state,
            store,
            cds: None,
            lds: None,
            eds: BTreeMap::new(),
            rds: BTreeMap::new(),
        }
    }

    /// `own_stream`: its config source is not ADS.
    pub fn start_cds(&mut self, own_stream: bool) {
        self.cds = Some(Subscription::start(
            &self.store,
            "cluster_manager.cds.".into(),
            Kind::Cds,
            own_stream,
        ));
    }

    pub fn start_lds(&mut self, own_stream: bool) {
        self.lds = Some(Subscription::start(
            &self.store,
            "listener_manager.lds.".into(),
            Kind::Lds,
            own_stream,
        ));
    }

    /// EDS subscriptions become `clusters` (name, whether it has a stream of its own); those
    /// gone take their stats along.
    pub fn follow_eds<'a>(&mut self, clusters: impl IntoIterator<Item = (&'a str, bool)>) {
        let want: Vec<(&str, bool)> = clusters.into_iter().collect();
        let store = self.store.clone();
        follow(
            &store,
            &mut self.eds,
            want.iter()
                .map(|(c, own)| (c.to_string(), format!("cluster.{c}."), Kind::Eds, *own)),
        );
    }

    /// RDS subscriptions become `routes` (stat prefix of the connection manager that first
    /// names it, route configuration name); `own_stream` says which have a stream of their own.
    pub fn follow_rds(&mut self, routes: &[(String, String)], own_stream: impl Fn(&str) -> bool) {
        let store = self.store.clone();
        follow(
            &store,
            &mut self.rds,
            routes.iter().map(|(prefix, name)| {
                (
                    name.clone(),
                    format!("http.{prefix}.rds.{name}."),
                    Kind::Rds,
                    own_stream(name),
                )
            }),
        );
    }

    /// The subscription a stream of its own serves.
    fn own(&self, channel: &super::Channel) -> Option<&Subscription> {
        match channel {
            super::Channel::Ads => None,
            super::Channel::Own(super::CLUSTER, _) => self.cds.as_ref(),
            super::Channel::Own(super::LISTENER, _) => self.lds.as_ref(),
            super::Channel::Own(super::ENDPOINT, cluster) => self.eds.get(cluster),
            super::Channel::Own(_, name) => self.rds.get(name),
        }
    }

    pub fn connected(&self, channel: &super::Channel, up: bool) {
        match channel {
            super::Channel::Ads => {
                if let Some(c) = &self.connected_state {
                    c.set(up as u64);
                }
            }
            _ if up => self
                .own(channel)
                .into_iter()
                .for_each(Subscription::connected),
            _ => {}
        }
    }

    /// A stream failed (closed, or no connection): each subscription it serves counts a
    /// failure (the ADS stream's: every one without a stream of its own).
    pub fn stream_failed(&self, channel: &super::Channel) {
        if *channel == super::Channel::Ads {
            self.connected(channel, false);
            self.all()
                .filter(|s| !s.own_stream())
                .for_each(Subscription::failed);
        } else {
            self.own(channel).into_iter().for_each(Subscription::failed);
        }
    }

    fn all(&self) -> impl Iterator<Item = &Subscription> {
        self.cds
            .iter()
            .chain(self.lds.iter())
            .chain(self.eds.values())
            .chain(self.rds.values())
    }
}

fn follow(
    store: &Store,
    subs: &mut BTreeMap<String, Subscription>,
    want: impl Iterator<Item = (String, String, Kind, bool)>,
) {
    let mut old = std::mem::take(subs);
    for (key, prefix, kind, own_stream) in want {
        if subs.contains_key(&key) {
            continue;
        }
        let s = old
            .remove(&key)
            .unwrap_or_else(|| Subscription::start(store, prefix, kind, own_stream));
        subs.insert(key, s);
    }
    for gone in old.values() {
        store.remove(&gone.names());
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}
