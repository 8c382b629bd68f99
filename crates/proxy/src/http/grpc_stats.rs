//! The `grpc_stats` HTTP filter: per gRPC call, under the route's cluster,
//! `grpc.[<service>.<method>.]{total,success,failure,<status>,request_message_count,
//! response_message_count}` (service and method in the name for every method, or for those its
//! allowlist names), and, with `emit_filter_state`, the message counts as the filter state the
//! access log reads. Also the gRPC message counting both directions share.

use crate::stats::Store;
use pilotfish_api::pb::envoy::extensions::filters::http::grpc_stats::v3::{
    filter_config::PerMethodStatSpecifier, FilterConfig,
};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One chain's grpc_stats filter.
pub struct GrpcStats {
    all_methods: bool,
    /// service -> methods with stats of their own.
    allowlist: HashMap<String, HashSet<String>>,
    pub emit_filter_state: bool,
}

impl GrpcStats {
    pub fn new(c: &FilterConfig) -> GrpcStats {
        let mut allowlist: HashMap<String, HashSet<String>> = HashMap::new();
        let all_methods = match &c.per_method_stat_specifier {
            Some(PerMethodStatSpecifier::StatsForAllMethods(v)) => v.value,
            Some(PerMethodStatSpecifier::IndividualMethodStatsAllowlist(l)) => {
                for s in &l.services {
                    allowlist
                        .entry(s.name.clone())
                        .or_default()
                        .extend(s.method_names.iter().cloned());
                }
                false
            }
            None => false,
        };
        GrpcStats {
            all_methods,
            allowlist,
            emit_filter_state: c.emit_filter_state,
        }
    }

    /// Counts one finished call to `cluster` (its `:path`, its status when it had one).
    pub fn record(
        &self,
        stats: &Store,
        cluster: &str,
        path: &str,
        status: Option<u32>,
        messages: (u64, u64),
    ) {
        let call = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .filter(|(s, m)| !s.is_empty() && !m.is_empty() && !m.contains('/'));
        let own = call.filter(|(s, m)| {
            self.all_methods || self.allowlist.get(*s).is_some_and(|ms| ms.contains(*m))
        });
        let prefix = match own {
            Some((s, m)) => format!("cluster.{cluster}.grpc.{s}.{m}."),
            None => format!("cluster.{cluster}.grpc."),
        };
        let count = |n: &str, by: u64| stats.counter(&format!("{prefix}{n}")).add(by);
        if let Some(code) = status {
            count("total", 1);
            count(if code == 0 { "success" } else { "failure" }, 1);
            count(&code.to_string(), 1);
        }
        if messages.0 > 0 {
            count("request_message_count", messages.0);
        }
        if messages.1 > 0 {
            count("response_message_count", messages.1);
        }
    }
}

/// Counts the gRPC messages a body carries (each begins with a 5-byte prefix: a flag and its
/// length), across data frames however they split it.
pub struct Frames {
    /// Bytes of the current prefix still to come (5 at a message's start).
    prefix_left: u8,
    length: [u8; 4],
    body_left: u64,
    pub count: Arc<AtomicU64>,
}

impl Frames {
    pub fn new(count: Arc<AtomicU64>) -> Frames {
        Frames {
            prefix_left: 5,
            length: [0; 4],
            body_left: 0,
            count,
        }
    }

    pub fn feed(&mut self, mut d: &[u8]) {
        while !d.is_empty() {
            if self.body_left > 0 {
                let n = (self.body_left as usize).min(d.len());
                self.body_left -= n as u64;
                d = &d[n..];
                continue;
            }
            let at = 5 - self.prefix_left as usize;
            if at > 0 {
                self.length[at - 1] = d[0];
            }
            d = &d[1..];
            self.prefix_left -= 1;
            if self.prefix_left == 0 {
                self.count.fetch_add(1, Ordering::Relaxed);
                self.body_left = u32::from_be_bytes(self.length) as u64;
                self.prefix_left = 5;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_counted_however_frames_split_them() {
        let count = Arc::new(AtomicU64::new(0));
        let mut f = Frames::new(count.clone());
        let mut body = vec![];
        for m in [&b"abc"[..], b"", b"hello world"] {
            body.push(0);
            body.extend((m.len() as u32).to_be_bytes());
            body.extend(m);
        }
        for chunk in body.chunks(2) {
            f.feed(chunk);
        }
        assert_eq!(count.load(Ordering::Relaxed), 3);
        // A message whose prefix has come counts, its body still on the way.
        f.feed(&[0, 0, 0, 0, 9, b'x']);
        assert_eq!(count.load(Ordering::Relaxed), 4);
    }
}
