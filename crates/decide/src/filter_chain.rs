//! Filter chain selection with Envoy's FilterChainManager semantics: the match criteria are tried
//! in a fixed order (destination port, destination IP, server name, transport protocol,
//! application protocols, direct source IP, source type, source IP, source port); at each one the
//! most specific value that fits wins and the chains without it are dropped, with no backtracking;
//! a chain that leaves a criterion empty is the fallback for that criterion.

use crate::matcher::Cidr;
use crate::{Reason, Verdict};
use pilotfish_api::pb::envoy::config::listener::v3::{
    filter_chain_match::ConnectionSourceType, FilterChain, FilterChainMatch, Listener,
};
use std::net::SocketAddr;

/// What filter chain matching looks at.
#[derive(Debug, Clone)]
pub struct ChainInput {
    pub local: SocketAddr,
    pub source: SocketAddr,
    /// The address the connection came from before any proxy protocol header (the same here).
    pub direct_source: SocketAddr,
    pub server_name: Option<String>,
    pub transport_protocol: String,
    pub application_protocols: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selected {
    Chain(usize),
    Default,
    /// Nothing matched and there is no default: Envoy closes the connection.
    None,
}

pub fn chain_label(l: &Listener, i: usize) -> String {
    match l.filter_chains[i].name.as_str() {
        "" => format!("filter_chains[{i}]"),
        n => format!("filter_chains[{i}] '{n}'"),
    }
}

pub fn chain<'a>(l: &'a Listener, s: &Selected) -> Option<&'a FilterChain> {
    match s {
        Selected::Chain(i) => l.filter_chains.get(*i),
        Selected::Default => l.default_filter_chain.as_ref(),
        Selected::None => None,
    }
}

type Level<'a> = (
    &'static str,
    Box<dyn Fn(&FilterChainMatch) -> Option<Specificity> + 'a>,
);

/// How well a chain's criterion fits: None when it excludes the connection, `Some(0)` when the
/// chain leaves the criterion empty, higher for more specific fits.
type Specificity = u32;

pub fn select(l: &Listener, input: &ChainInput) -> (Selected, Vec<Reason>) {
    let mut reasons = vec![];
    let mut candidates: Vec<usize> = (0..l.filter_chains.len()).collect();
    if l.filter_chain_matcher.is_some() {
        reasons.push(Reason::new("filter_chain_matcher", Verdict::Note, "pilotfish does not evaluate the filter_chain_matcher API yet; chains are matched by filter_chain_match"));
    }
    let sni = input
        .server_name
        .clone()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let levels: Vec<Level> = vec![
        (
            "destination port",
            Box::new(move |m: &FilterChainMatch| match &m.destination_port {
                None => Some(0),
                Some(p) if p.value == input.local.port() as u32 => Some(1),
                Some(_) => None,
            }),
        ),
        (
            "destination IP",
            Box::new(|m: &FilterChainMatch| longest_prefix(&m.prefix_ranges, input.local)),
        ),
        (
            "server name",
            Box::new(|m: &FilterChainMatch| {
                if m.server_names.is_empty() {
                    return Some(0);
                }
                if sni.is_empty() {
                    return None;
                }
                // Exact names beat wildcards; longer wildcard suffixes beat shorter ones.
                m.server_names
                    .iter()
                    .filter_map(|n| {
                        let n = n.to_ascii_lowercase();
                        if n == sni {
                            Some(u32::MAX)
                        } else if let Some(suffix) = n.strip_prefix('*') {
                            (sni.len() > suffix.len() && sni.ends_with(suffix))
                                .then_some(suffix.len() as u32 + 1)
                        } else {
                            None
                        }
                    })
                    .max()
            }),
        ),
        (
            "transport protocol",
            Box::new(|m: &FilterChainMatch| match m.transport_protocol.as_str() {
                "" => Some(0),
                t if t == input.transport_protocol => Some(1),
                _ => None,
            }),
        ),
        (
            "application protocols",
            Box::new(|m: &FilterChainMatch| {
                if m.application_protocols.is_empty() {
                    return Some(0);
                }
                // The connection's protocols in its own order: the first one some chain takes wins.
                let n = input.application_protocols.len() as u32;
                input
                    .application_protocols
                    .iter()
                    .enumerate()
                    .find(|(_, p)| m.application_protocols.contains(p))
                    .map(|(i, _)| n - i as u32)
            }),
        ),
        (
            "direct source IP",
            Box::new(|m: &FilterChainMatch| {
                longest_prefix(&m.direct_source_prefix_ranges, input.direct_source)
            }),
        ),
        (
            "source type",
            Box::new(|m: &FilterChainMatch| {
                let local =
                    input.source.ip().is_loopback() || input.source.ip() == input.local.ip();
                match ConnectionSourceType::try_from(m.source_type)
                    .unwrap_or(ConnectionSourceType::Any)
                {
                    ConnectionSourceType::Any => Some(0),
                    ConnectionSourceType::SameIpOrLoopback if local => Some(1),
                    ConnectionSourceType::External if !local => Some(1),
                    _ => None,
                }
            }),
        ),
        (
            "source IP",
            Box::new(|m: &FilterChainMatch| longest_prefix(&m.source_prefix_ranges, input.source)),
        ),
        (
            "source port",
            Box::new(|m: &FilterChainMatch| {
                if m.source_ports.is_empty() {
                    Some(0)
                } else {
                    m.source_ports
                        .contains(&(input.source.port() as u32))
                        .then_some(1)
                }
            }),
        ),
    ];
    let default_match = FilterChainMatch::default();
    for (what, fit) in &levels {
        let scored: Vec<(usize, Option<Specificity>)> = candidates
            .iter()
            .map(|&i| {
                (
                    i,
                    fit(l.filter_chains[i]
                        .filter_chain_match
                        .as_ref()
                        .unwrap_or(&default_match)),
                )
            })
            .collect();
        let best = scored.iter().filter_map(|(_, s)| *s).max();
        let Some(best) = best else {
            for (i, _) in &scored {
                reasons.push(Reason::new(
                    chain_label(l, *i),
                    Verdict::Rejected,
                    format!("{what} does not match {}", input_value(what, input)),
                ));
            }
            candidates.clear();
            break;
        };
        let mut kept = vec![];
        for (i, s) in scored {
            match s {
                Some(s) if s == best => kept.push(i),
                Some(_) => reasons.push(Reason::new(
                    chain_label(l, i),
                    Verdict::Skipped,
                    format!("a chain with a more specific {what} match wins"),
                )),
                None => reasons.push(Reason::new(
                    chain_label(l, i),
                    Verdict::Rejected,
                    format!("{what} does not match {}", input_value(what, input)),
                )),
            }
        }
        candidates = kept;
    }
    match candidates.first() {
        Some(&i) => {
            reasons.push(Reason::new(
                chain_label(l, i),
                Verdict::Chosen,
                "matches every criterion most specifically",
            ));
            (Selected::Chain(i), reasons)
        }
        None if l.default_filter_chain.is_some() => {
            reasons.push(Reason::new(
                "default_filter_chain",
                Verdict::Chosen,
                "no filter chain matches",
            ));
            (Selected::Default, reasons)
        }
        None => {
            reasons.push(Reason::new(format!("listener '{}'", l.name), Verdict::Rejected, "no filter chain matches and there is no default_filter_chain: Envoy closes the connection"));
            (Selected::None, reasons)
        }
    }
}

fn input_value(what: &str, i: &ChainInput) -> String {
    match what {
        "destination port" => i.local.port().to_string(),
        "destination IP" => i.local.ip().to_string(),
        "server name" => i.server_name.clone().unwrap_or_else(|| "(no SNI)".into()),
        "transport protocol" => i.transport_protocol.clone(),
        "application protocols" => format!("[{}]", i.application_protocols.join(", ")),
        "direct source IP" => i.direct_source.ip().to_string(),
        "source IP" | "source type" => i.source.ip().to_string(),
        "source port" => i.source.port().to_string(),
        _ => String::new(),
    }
}

fn longest_prefix(
    ranges: &[pilotfish_api::pb::envoy::config::core::v3::CidrRange],
    addr: SocketAddr,
) -> Option<Specificity> {
    if ranges.is_empty() {
        return Some(0);
    }
    ranges
        .iter()
        .filter_map(Cidr::new)
        .filter(|c| c.contains(addr.ip()))
        .map(|c| c.len + 1)
        .max()
}
