//! Load balancers: which host of a cluster takes the next connection.
//!
//! As in Envoy, the priority level comes first (each level's health overprovisioned by 1.4,
//! spilling what it lacks to the next; the panic threshold decides whether unhealthy hosts are
//! used), then the policy picks within it: ROUND_ROBIN (weighted when host weights differ),
//! LEAST_REQUEST (power of two choices, or weights divided by active requests), RANDOM, and the
//! consistent-hash tables RING_HASH (ketama) and MAGLEV. The hash tables are built the way
//! Envoy builds them (same keys, same xxHash64, same ordering), so a given hash lands on the
//! same host in both. Under `locality_weighted_lb_config` a locality is picked first by its
//! weight scaled by its health.

use crate::cluster::Host;
use pilotfish_api::pb::envoy::config::cluster::v3::{cluster, Cluster as ClusterConfig};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Envoy's default overprovisioning factor, in percent.
const OVERPROVISIONING: u64 = 140;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    RoundRobin,
    LeastRequest { choices: u32, bias: f64 },
    Random,
    RingHash { min: u64, max: u64, murmur: bool },
    Maglev { table_size: u64 },
}

impl Policy {
    pub fn hashing(self) -> bool {
        matches!(self, Policy::RingHash { .. } | Policy::Maglev { .. })
    }
}

pub struct LoadBalancer {
    pub policy: Policy,
    locality_weighted: bool,
    /// Percent of healthy hosts under which a level is in panic (all its hosts used); 0 never.
    panic_threshold: u64,
    use_hostname: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    rr: usize,
    /// Smooth weighted round robin: each host's (and locality's) running credit.
    credit: HashMap<String, f64>,
    locality_credit: HashMap<String, f64>,
    /// The hash table of each priority level, with the hosts it was built from.
    tables: HashMap<u32, (Vec<usize>, Table)>,
}

enum Table {
    Ring(Vec<(u64, Arc<Host>)>),
    Maglev {
        hosts: Vec<Arc<Host>>,
        slots: Vec<u32>,
    },
}

impl LoadBalancer {
    pub fn of(c: &ClusterConfig) -> LoadBalancer {
        use cluster::LbPolicy as P;
        let policy = match P::try_from(c.lb_policy).unwrap_or(P::RoundRobin) {
            P::LeastRequest => {
                let cfg = match &c.lb_config {
                    Some(cluster::LbConfig::LeastRequestLbConfig(l)) => Some(l),
                    _ => None,
                };
                Policy::LeastRequest {
                    choices: cfg
                        .and_then(|l| l.choice_count.as_ref())
                        .map_or(2, |v| v.value.max(2)),
                    bias: cfg
                        .and_then(|l| l.active_request_bias.as_ref())
                        .map_or(1.0, |b| b.default_value),
                }
            }
            P::Random => Policy::Random,
            P::RingHash => {
                let cfg = match &c.lb_config {
                    Some(cluster::LbConfig::RingHashLbConfig(r)) => Some(r),
                    _ => None,
                };
                Policy::RingHash {
                    min: cfg
                        .and_then(|r| r.minimum_ring_size.as_ref())
                        .map_or(1024, |v| v.value),
                    max: cfg
                        .and_then(|r| r.maximum_ring_size.as_ref())
                        .map_or(8 * 1024 * 1024, |v| v.value),
                    murmur: cfg.is_some_and(|r| {
                        r.hash_function
                            == cluster::ring_hash_lb_config::HashFunction::MurmurHash2 as i32
                    }),
                }
            }
            P::Maglev => Policy::Maglev {
                table_size: match &c.lb_config {
                    Some(cluster::LbConfig::MaglevLbConfig(m)) => m.table_size.as_ref(),
                    _ => None,
                }
                .map_or(65537, |v| v.value),
            },
            _ => Policy::RoundRobin,
        };
        let common = c.common_lb_config.as_ref();
        LoadBalancer {
            policy,
            locality_weighted: common.is_some_and(|c| {
                matches!(
                    c.locality_config_specifier,
                    Some(cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
                )
            }),
            panic_threshold: common
                .and_then(|c| c.healthy_panic_threshold.as_ref())
                .map_or(50, |p| p.value.clamp(0.0, 100.0).round() as u64),
            use_hostname: common
                .and_then(|c| c.consistent_hashing_lb_config.as_ref())
                .is_some_and(|c| c.use_hostname_for_hashing),
            state: Mutex::new(State::default()),
        }
    }

    /// The host for a connection among `hosts`: `hash` is the request's hash (hash policies),
    /// `random` a fresh random number for everything else.
    pub fn choose(&self, hosts: &[Arc<Host>], hash: Option<u64>, random: u64) -> Option<Arc<Host>> {
        // A hashing balancer without a hash behaves as random, as Envoy's does.
        let h = if self.policy.hashing() {
            hash.unwrap_or(random)
        } else {
            random
        };
        let (priority, level, panic) = priority_level(hosts, h, self.panic_threshold)?;
        let usable: Vec<&Arc<Host>> = if panic {
            level.clone()
        } else {
            level.iter().copied().filter(|h| h.healthy()).collect()
        };
        if usable.is_empty() {
            return None;
        }
        let mut st = self.state.lock().unwrap();
        if self.policy.hashing() {
            let key: Vec<usize> = usable.iter().map(|h| Arc::as_ptr(h) as usize).collect();
            if st.tables.get(&priority).is_none_or(|(k, _)| *k != key) {
                let table = self.build(&level, &usable);
                st.tables.insert(priority, (key, table));
            }
            return st.tables[&priority].1.lookup(h);
        }
        let from = if self.locality_weighted && !panic {
            choose_locality(&level, &mut st.locality_credit).unwrap_or(usable)
        } else {
            usable
        };
        let n = from.len();
        let weighted = from.iter().any(|h| h.weight != from[0].weight);
        let i = match self.policy {
            Policy::Random => (random % n as u64) as usize,
            Policy::RoundRobin if !weighted => {
                let i = st.rr % n;
                st.rr = st.rr.wrapping_add(1);
                i
            }
            Policy::RoundRobin => smooth(&mut st.credit, &from, |h| h.weight as f64),
            Policy::LeastRequest { choices, .. } if !weighted => {
                // Power of `choices` choices: the least loaded of random picks.
                let mut best: Option<usize> = None;
                for k in 0..choices as u64 {
                    let i =
                        (crate::random(random.rotate_left(13 * k as u32) ^ k) % n as u64) as usize;
                    if best.is_none_or(|b| active(from[i]) < active(from[b])) {
                        best = Some(i);
                    }
                }
                best.unwrap_or(0)
            }
            Policy::LeastRequest { bias, .. } => smooth(&mut st.credit, &from, |h| {
                h.weight as f64 / ((active(h) + 1) as f64).powf(bias)
            }),
            Policy::RingHash { .. } | Policy::Maglev { .. } => unreachable!(),
        };
        Some(from[i].clone())
    }

    fn build(&self, level: &[&Arc<Host>], usable: &[&Arc<Host>]) -> Table {
        let weights = normalized_weights(level, usable, self.locality_weighted);
        let key = |h: &Host| -> String {
            match &h.hash_key {
                Some(k) => k.clone(),
                None if self.use_hostname => h.hostname.clone(),
                None => h.address.clone(),
            }
        };
        match self.policy {
            Policy::RingHash { min, max, murmur } => {
                let min_weight = weights.iter().map(|w| w.1).fold(1.0, f64::min);
                Table::Ring(ring(&weights, min_weight, min, max, murmur, key))
            }
            Policy::Maglev { table_size } => {
                let max_weight = weights.iter().map(|w| w.1).fold(0.0, f64::max);
                let (hosts, slots) = maglev(&weights, max_weight, table_size, key);
                Table::Maglev { hosts, slots }
            }
            _ => unreachable!(),
        }
    }
}

fn active(h: &Host) -> u64 {
    h.stats.cx_active.load(Ordering::Relaxed)
}

/// The priority level a connection goes to, its hosts, and whether it is in panic.
pub fn priority_level(
    hosts: &[Arc<Host>],
    h: u64,
    panic_threshold: u64,
) -> Option<(u32, Vec<&Arc<Host>>, bool)> {
    let mut levels: std::collections::BTreeMap<u32, Vec<&Arc<Host>>> = Default::default();
    for host in hosts {
        levels.entry(host.priority).or_default().push(host);
    }
    let (&first, _) = levels.iter().next()?;
    let health: Vec<(u32, u64)> = levels
        .iter()
        .map(|(p, hs)| {
            let healthy = hs.iter().filter(|h| h.healthy()).count() as u64;
            (*p, (OVERPROVISIONING * healthy / hs.len() as u64).min(100))
        })
        .collect();
    let total: u64 = health.iter().map(|(_, h)| h).sum::<u64>().min(100);
    // No healthy host anywhere: everything goes to the first level.
    let level = if let Some(total) = std::num::NonZeroU64::new(total) {
        let mut remaining = 100u64;
        let mut loads = vec![];
        for (p, h) in &health {
            let load = (h * 100 / total).min(remaining);
            remaining -= load;
            loads.push((*p, load));
        }
        // Rounding leftovers go to the first level with load.
        if remaining > 0 {
            if let Some(l) = loads.iter_mut().find(|(_, l)| *l > 0) {
                l.1 += remaining;
            }
        }
        let mut pick = h % 100;
        loads
            .iter()
            .find(|(_, l)| {
                if pick < *l {
                    true
                } else {
                    pick -= l;
                    false
                }
            })
            .map_or(first, |(p, _)| *p)
    } else {
        first
    };
    let hs = levels.remove(&level)?;
    let healthy = hs.iter().filter(|h| h.healthy()).count() as u64;
    let panic =
        panic_threshold > 0 && (total == 0 || healthy * 100 < panic_threshold * hs.len() as u64);
    Some((level, hs, panic))
}

fn locality_of(h: &Host) -> String {
    format!("{}/{}/{}", h.region, h.zone, h.sub_zone)
}

/// The localities of a level in order of first appearance, with their weight and hosts.
fn localities<'a>(level: &[&'a Arc<Host>]) -> Vec<(String, u32, Vec<&'a Arc<Host>>)> {
    let mut out: Vec<(String, u32, Vec<&Arc<Host>>)> = vec![];
    for h in level {
        let l = locality_of(h);
        match out.iter_mut().find(|(k, _, _)| *k == l) {
            Some(e) => e.2.push(h),
            // Under locality weighting, a locality without a weight gets no traffic.
            None => out.push((l, h.locality_weight.unwrap_or(0), vec![h])),
        }
    }
    out
}

/// A locality by its weight scaled by its health (overprovisioned), and its healthy hosts; None
/// when no locality has any weight left.
fn choose_locality<'a>(
    level: &[&'a Arc<Host>],
    credit: &mut HashMap<String, f64>,
) -> Option<Vec<&'a Arc<Host>>> {
    let locs: Vec<(String, f64, Vec<&Arc<Host>>)> = localities(level)
        .into_iter()
        .map(|(k, w, hs)| {
            let healthy: Vec<&Arc<Host>> = hs.iter().copied().filter(|h| h.healthy()).collect();
            let availability =
                (OVERPROVISIONING as f64 / 100.0 * healthy.len() as f64 / hs.len() as f64).min(1.0);
            (k, w as f64 * availability, healthy)
        })
        .collect();
    if locs.iter().all(|l| l.1 <= 0.0) {
        return None;
    }
    let keys: Vec<(&String, f64)> = locs.iter().map(|l| (&l.0, l.1)).collect();
    let i = smooth_by(credit, keys.iter().map(|(k, w)| ((*k).clone(), *w)));
    locs.into_iter().nth(i).map(|l| l.2)
}

/// Smooth weighted round robin over hosts: each pick credits every host its weight and charges
/// the chosen one the total, so picks follow the weights exactly over a cycle.
fn smooth(
    credit: &mut HashMap<String, f64>,
    hosts: &[&Arc<Host>],
    weight: impl Fn(&Host) -> f64,
) -> usize {
    smooth_by(credit, hosts.iter().map(|h| (h.address.clone(), weight(h))))
}

fn smooth_by(
    credit: &mut HashMap<String, f64>,
    items: impl Iterator<Item = (String, f64)>,
) -> usize {
    let items: Vec<(String, f64)> = items.collect();
    // Hosts that left keep no credit forever.
    if credit.len() > 4 * items.len() + 16 {
        credit.clear();
    }
    let total: f64 = items.iter().map(|i| i.1).sum();
    let mut best = (0, f64::MIN);
    for (i, (k, w)) in items.iter().enumerate() {
        let c = credit.entry(k.clone()).or_default();
        *c += w;
        if *c > best.1 {
            best = (i, *c);
        }
    }
    if let Some(c) = credit.get_mut(&items[best.0].0) {
        *c -= total;
    }
    best.0
}

/// Each usable host's share of the level: its weight over its locality's (or the level's) total,
/// times its locality's share under locality weighting, as Envoy normalizes them.
fn normalized_weights(
    level: &[&Arc<Host>],
    usable: &[&Arc<Host>],
    locality_weighted: bool,
) -> Vec<(Arc<Host>, f64)> {
    let share = |hosts: &[&Arc<Host>], of: f64, out: &mut Vec<(Arc<Host>, f64)>| {
        let sum: u64 = hosts.iter().map(|h| h.weight as u64).sum();
        for h in hosts {
            out.push(((*h).clone(), h.weight as f64 * of / sum as f64));
        }
    };
    let mut out = vec![];
    let locs = localities(level);
    if !locality_weighted {
        share(usable, 1.0, &mut out);
        return out;
    }
    let sum: u64 = locs.iter().map(|l| l.1 as u64).sum();
    if sum == 0 {
        return out;
    }
    for (k, w, _) in &locs {
        if *w == 0 {
            continue;
        }
        let hosts: Vec<&Arc<Host>> = usable
            .iter()
            .copied()
            .filter(|h| locality_of(h) == *k)
            .collect();
        share(&hosts, *w as f64 / sum as f64, &mut out);
    }
    out
}

impl Table {
    fn lookup(&self, h: u64) -> Option<Arc<Host>> {
        match self {
            Table::Ring(ring) => {
                if ring.is_empty() {
                    return None;
                }
                // Ketama's search, signed bounds included: the first point at or after the
                // hash, wrapping to the start.
                let len = ring.len() as i64;
                let (mut low, mut high) = (0i64, len);
                let i = loop {
                    let mid = (low + high) / 2;
                    if mid == len {
                        break 0;
                    }
                    let val = ring[mid as usize].0;
                    let before = if mid == 0 {
                        0
                    } else {
                        ring[mid as usize - 1].0
                    };
                    if h <= val && h > before {
                        break mid;
                    }
                    if val < h {
                        low = mid + 1;
                    } else {
                        high = mid - 1;
                    }
                    if low > high {
                        break 0;
                    }
                };
                Some(ring[i as usize].1.clone())
            }
            Table::Maglev { hosts, slots } => {
                let slot = *slots.get((h % slots.len() as u64) as usize)?;
                hosts.get(slot as usize).cloned()
            }
        }
    }
}

fn ring(
    weights: &[(Arc<Host>, f64)],
    min_weight: f64,
    min_size: u64,
    max_size: u64,
    murmur: bool,
    key: impl Fn(&Host) -> String,
) -> Vec<(u64, Arc<Host>)> {
    if weights.is_empty() {
        return vec![];
    }
    // The least-weighted host gets a whole number of points; the ring is capped at max_size.
    let scale = ((min_weight * min_size as f64).ceil() / min_weight).min(max_size as f64);
    let mut ring = Vec::with_capacity(scale.ceil() as usize);
    let (mut current, mut target) = (0.0f64, 0.0f64);
    for (host, w) in weights {
        let k = key(host);
        target += scale * w;
        let mut i = 0u64;
        while current < target {
            let point = format!("{k}_{i}");
            let hash = if murmur {
                murmur_hash2(point.as_bytes())
            } else {
                xxhash_rust::xxh64::xxh64(point.as_bytes(), 0)
            };
            ring.push((hash, host.clone()));
            i += 1;
            current += 1.0;
        }
    }
    ring.sort_by_key(|e| e.0);
    ring
}

/// Maglev's lookup table: hosts in key order take turns (as often as their weight allows)
/// claiming the next free slot of their own permutation.
fn maglev(
    weights: &[(Arc<Host>, f64)],
    max_weight: f64,
    size: u64,
    key: impl Fn(&Host) -> String,
) -> (Vec<Arc<Host>>, Vec<u32>) {
    if weights.is_empty() || size < 2 {
        return (vec![], vec![]);
    }
    let mut entries: Vec<(String, Arc<Host>, f64)> = weights
        .iter()
        .map(|(h, w)| (key(h), h.clone(), *w))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    struct Entry {
        offset: u64,
        skip: u64,
        weight: f64,
        target: f64,
        next: u64,
    }
    let mut build: Vec<Entry> = entries
        .iter()
        .map(|(k, _, w)| Entry {
            offset: xxhash_rust::xxh64::xxh64(k.as_bytes(), 0) % size,
            skip: xxhash_rust::xxh64::xxh64(k.as_bytes(), 1) % (size - 1) + 1,
            weight: *w,
            target: 0.0,
            next: 0,
        })
        .collect();
    let mut slots = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    let mut iteration = 1u64;
    while filled < size {
        for (i, e) in build.iter_mut().enumerate() {
            if filled >= size {
                break;
            }
            if (iteration as f64) * e.weight < e.target {
                continue;
            }
            e.target += max_weight;
            let mut c = (e.offset + e.skip * e.next) % size;
            while slots[c as usize] != u32::MAX {
                e.next += 1;
                c = (e.offset + e.skip * e.next) % size;
            }
            slots[c as usize] = i as u32;
            e.next += 1;
            filled += 1;
        }
        iteration += 1;
    }
    (entries.into_iter().map(|e| e.1).collect(), slots)
}

/// MurmurHash2, 64-bit (libstdc++'s `_Hash_bytes`, Envoy's MURMUR_HASH_2) with Envoy's seed.
pub fn murmur_hash2(bytes: &[u8]) -> u64 {
    const MUL: u64 = (0xc6a4_a793u64 << 32) + 0x5bd1_e995;
    const SEED: u64 = 0xc70f_6907;
    let shift_mix = |v: u64| v ^ (v >> 47);
    let mut hash = SEED ^ (bytes.len() as u64).wrapping_mul(MUL);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let data = shift_mix(u64::from_le_bytes(c.try_into().unwrap()).wrapping_mul(MUL))
            .wrapping_mul(MUL);
        hash ^= data;
        hash = hash.wrapping_mul(MUL);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let data = rest
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) + *b as u64);
        hash ^= data;
        hash = hash.wrapping_mul(MUL);
    }
    shift_mix(shift_mix(hash).wrapping_mul(MUL))
}

/// The hash of a downstream address for `hash_policy: source_ip`: xxHash64 of the IP as text.
pub fn source_ip_hash(ip: std::net::IpAddr) -> u64 {
    xxhash_rust::xxh64::xxh64(ip.to_string().as_bytes(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::HostStats;
    use pilotfish_decide::cluster::UpstreamTransport;
    use std::sync::atomic::AtomicBool;

    /// The hosts a pick chooses among, at the default panic threshold.
    fn eligible(hs: &[Arc<Host>], r: u64) -> Vec<Arc<Host>> {
        let Some((_, level, panic)) = priority_level(hs, r, 50) else {
            return vec![];
        };
        level
            .into_iter()
            .filter(|h| panic || h.healthy())
            .cloned()
            .collect()
    }

    fn host(port: u16, priority: u32, health: &str) -> Arc<Host> {
        Arc::new(Host {
            address: format!("127.0.0.1:{port}"),
            hostname: String::new(),
            priority,
            region: String::new(),
            zone: String::new(),
            sub_zone: String::new(),
            health: health.into(),
            weight: 1,
            locality_weight: None,
            hash_key: None,
            transport: UpstreamTransport {
                matched: "default".into(),
                socket: "envoy.transport_sockets.raw_buffer".into(),
                sni: None,
                alpn: vec![],
            },
            stats: HostStats::default(),
            active_hc_failed: AtomicBool::new(false),
            active_hc_pending: AtomicBool::new(false),
            ejected: AtomicBool::new(false),
            outlier: Default::default(),
            used: AtomicBool::new(false),
        })
    }

    fn ports(hs: &[Arc<Host>]) -> Vec<String> {
        hs.iter().map(|h| h.address.clone()).collect()
    }

    #[test]
    fn priority_load_spills_over_and_panics_like_envoy() {
        // P0 fully healthy takes everything.
        let hs = vec![host(1, 0, "HEALTHY"), host(2, 1, "HEALTHY")];
        for r in 0..100 {
            assert_eq!(ports(&eligible(&hs, r)), ["127.0.0.1:1"]);
        }
        // P0 half healthy: 70% (0.5 x 1.4) stays in P0, 30% spills to P1; no panic at 50%.
        let hs = vec![
            host(1, 0, "HEALTHY"),
            host(2, 0, "UNHEALTHY"),
            host(3, 1, "HEALTHY"),
        ];
        let to_p0 = (0..100)
            .filter(|r| eligible(&hs, *r)[0].priority == 0)
            .count();
        assert_eq!(to_p0, 70);
        assert_eq!(ports(&eligible(&hs, 0)), ["127.0.0.1:1"]);
        // One of three healthy: under the 50% panic threshold, all three are used.
        let hs = vec![
            host(1, 0, "HEALTHY"),
            host(2, 0, "UNHEALTHY"),
            host(3, 0, "DRAINING"),
        ];
        assert_eq!(eligible(&hs, 0).len(), 3);
        // Nothing healthy anywhere: P0 in panic.
        let hs = vec![host(1, 0, "UNHEALTHY"), host(2, 1, "UNHEALTHY")];
        assert_eq!(ports(&eligible(&hs, 0)), ["127.0.0.1:1"]);
        assert!(eligible(&[], 0).is_empty());
    }
}
