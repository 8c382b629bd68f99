//! Access log filters (`AccessLog.filter`): which entries a log writes. Each evaluates as Envoy's
//! does for what a stream has: a TCP connection has no response code (compared as 0) and no
//! request headers, and ends with the TcpConnectionEnd log type; nothing is traced and no
//! dynamic metadata is set.

use super::Entry;
use pilotfish_api::pb::envoy::config::accesslog::v3::{
    access_log_filter::FilterSpecifier, comparison_filter::Op, AccessLogFilter, ComparisonFilter,
};
use pilotfish_api::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
use pilotfish_decide::matcher::CompiledHeaderMatcher;

pub enum Filter {
    StatusCode(Op, u64),
    Duration(Op, u64),
    NotHealthCheck,
    Traceable,
    /// Sampled: a random value modulo the denominator under the numerator.
    Runtime {
        numerator: u64,
        denominator: u64,
    },
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Header(CompiledHeaderMatcher),
    /// Any of these flags (any flag at all when empty).
    ResponseFlags(Vec<String>),
    /// No dynamic metadata is ever set: the key is never found.
    Metadata {
        if_not_found: bool,
    },
    LogType {
        types: Vec<i32>,
        exclude: bool,
    },
    /// A filter pilotfish does not evaluate (named at start-up): it lets every entry through.
    Pass,
}

fn comparison(c: Option<&ComparisonFilter>) -> (Op, u64) {
    (
        c.and_then(|c| Op::try_from(c.op).ok()).unwrap_or(Op::Eq),
        c.and_then(|c| c.value.as_ref())
            .map_or(0, |v| v.default_value as u64),
    )
}

fn compare(op: Op, value: u64, against: u64) -> bool {
    match op {
        Op::Eq => value == against,
        Op::Ge => value >= against,
        Op::Le => value <= against,
        Op::Ne => value != against,
    }
}

impl Filter {
    /// The filter, and what of it pilotfish does not evaluate.
    pub fn new(f: &AccessLogFilter, at: &str, unsupported: &mut Vec<String>) -> Filter {
        let Some(spec) = &f.filter_specifier else {
            return Filter::Pass;
        };
        match spec {
            FilterSpecifier::StatusCodeFilter(s) => {
                let (op, v) = comparison(s.comparison.as_ref());
                Filter::StatusCode(op, v)
            }
            FilterSpecifier::DurationFilter(d) => {
                let (op, v) = comparison(d.comparison.as_ref());
                Filter::Duration(op, v)
            }
            FilterSpecifier::NotHealthCheckFilter(_) => Filter::NotHealthCheck,
            FilterSpecifier::TraceableFilter(_) => Filter::Traceable,
            FilterSpecifier::RuntimeFilter(r) => {
                let p = r.percent_sampled.as_ref();
                Filter::Runtime {
                    numerator: p.map_or(0, |p| p.numerator as u64),
                    denominator: match p.and_then(|p| DenominatorType::try_from(p.denominator).ok())
                    {
                        Some(DenominatorType::TenThousand) => 10_000,
                        Some(DenominatorType::Million) => 1_000_000,
                        _ => 100,
                    },
                }
            }
            FilterSpecifier::AndFilter(a) => Filter::And(
                a.filters
                    .iter()
                    .enumerate()
                    .map(|(i, f)| {
                        Filter::new(f, &format!("{at}.and_filter.filters[{i}]"), unsupported)
                    })
                    .collect(),
            ),
            FilterSpecifier::OrFilter(o) => Filter::Or(
                o.filters
                    .iter()
                    .enumerate()
                    .map(|(i, f)| {
                        Filter::new(f, &format!("{at}.or_filter.filters[{i}]"), unsupported)
                    })
                    .collect(),
            ),
            FilterSpecifier::HeaderFilter(h) => {
                match h.header.as_ref().map(CompiledHeaderMatcher::new) {
                    Some(Ok(m)) => Filter::Header(m),
                    Some(Err(e)) => {
                        unsupported.push(format!("{at}.header_filter: {e}"));
                        Filter::Pass
                    }
                    None => Filter::Pass,
                }
            }
            FilterSpecifier::ResponseFlagFilter(r) => Filter::ResponseFlags(r.flags.clone()),
            FilterSpecifier::MetadataFilter(m) => Filter::Metadata {
                if_not_found: m.matcher.is_none()
                    || m.match_if_key_not_found.as_ref().is_none_or(|v| v.value),
            },
            FilterSpecifier::LogTypeFilter(l) => Filter::LogType {
                types: l.types.clone(),
                exclude: l.exclude,
            },
            FilterSpecifier::GrpcStatusFilter(_) => {
                unsupported.push(format!("{at}.grpc_status_filter"));
                Filter::Pass
            }
            FilterSpecifier::ExtensionFilter(e) => {
                unsupported.push(format!("{at}.extension_filter '{}'", e.name));
                Filter::Pass
            }
        }
    }

    pub fn evaluate(&self, e: &Entry) -> bool {
        match self {
            Filter::StatusCode(op, v) => compare(*op, e.response_code as u64, *v),
            Filter::Duration(op, v) => compare(*op, e.duration.as_millis() as u64, *v),
            Filter::NotHealthCheck => true,
            Filter::Traceable => false,
            Filter::Runtime {
                numerator,
                denominator,
            } => crate::random(e.connection_id) % denominator < *numerator,
            Filter::And(fs) => fs.iter().all(|f| f.evaluate(e)),
            Filter::Or(fs) => fs.iter().any(|f| f.evaluate(e)),
            Filter::Header(m) => m.matches(
                e.http
                    .as_ref()
                    .and_then(|h| h.request(m.name.as_str()))
                    .as_deref(),
            ),
            Filter::ResponseFlags(want) => {
                if want.is_empty() {
                    !e.flags.is_empty()
                } else {
                    e.flags.iter().any(|f| want.iter().any(|w| w == f))
                }
            }
            Filter::Metadata { if_not_found } => *if_not_found,
            Filter::LogType { types, exclude } => types.contains(&e.log_type) != *exclude,
            Filter::Pass => true,
        }
    }
}
