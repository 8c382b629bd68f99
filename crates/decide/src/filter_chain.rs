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

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(yaml: &str) -> Listener {
        pilotfish_config::load_message("l.yaml", yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    fn input(local: &str, sni: Option<&str>, transport: &str, alpn: &[&str]) -> ChainInput {
        ChainInput {
            local: local.parse().unwrap(),
            source: "10.0.0.9:40000".parse().unwrap(),
            direct_source: "10.0.0.9:40000".parse().unwrap(),
            server_name: sni.map(str::to_string),
            transport_protocol: transport.into(),
            application_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn pick(l: &Listener, i: &ChainInput) -> Selected {
        select(l, i).0
    }

    // Istio's inbound listener in miniature: per-port chains split by transport and ALPN, and
    // catch-all chains without a port.
    const INBOUND: &str = r#"
name: virtualInbound
address: { socket_address: { address: 0.0.0.0, port_value: 15006 } }
filter_chains:
- name: blackhole
  filter_chain_match: { destination_port: 15006 }
- name: catchall-tls
  filter_chain_match: { transport_protocol: tls }
- name: catchall-plain
  filter_chain_match: { transport_protocol: raw_buffer }
- name: 8080-mtls
  filter_chain_match: { destination_port: 8080, transport_protocol: tls, application_protocols: [istio-http/1.1, istio-h2] }
- name: 8080-tls-other
  filter_chain_match: { destination_port: 8080, transport_protocol: tls }
- name: 8080-plain
  filter_chain_match: { destination_port: 8080, transport_protocol: raw_buffer }
"#;

    #[test]
    fn istio_inbound_chains() {
        let l = listener(INBOUND);
        assert_eq!(
            pick(
                &l,
                &input(
                    "10.1.1.1:8080",
                    Some("outbound_.8080_._.x"),
                    "tls",
                    &["istio-http/1.1"]
                )
            ),
            Selected::Chain(3)
        );
        // TLS without an Istio ALPN: the port's TLS chain without ALPN.
        assert_eq!(
            pick(&l, &input("10.1.1.1:8080", None, "tls", &["h2"])),
            Selected::Chain(4)
        );
        assert_eq!(
            pick(
                &l,
                &input("10.1.1.1:8080", None, "raw_buffer", &["http/1.1"])
            ),
            Selected::Chain(5)
        );
        // Other ports fall to the port-less chains, by transport.
        assert_eq!(
            pick(&l, &input("10.1.1.1:9000", None, "tls", &[])),
            Selected::Chain(1)
        );
        assert_eq!(
            pick(&l, &input("10.1.1.1:9000", None, "raw_buffer", &[])),
            Selected::Chain(2)
        );
        assert_eq!(
            pick(&l, &input("10.1.1.1:15006", None, "raw_buffer", &[])),
            Selected::Chain(0)
        );
        // The ALPN order of the connection decides between protocols a chain lists.
        assert_eq!(
            pick(
                &l,
                &input("10.1.1.1:8080", None, "tls", &["foo", "istio-h2"])
            ),
            Selected::Chain(3)
        );
    }

    #[test]
    fn no_backtracking_once_a_criterion_picked_the_most_specific_chains() {
        // The port-8080 chain wins on port even though only the port-less chain would match the
        // transport: Envoy does not go back, and nothing matches.
        let l = listener(
            r#"
name: l
filter_chains:
- { name: p8080-tls, filter_chain_match: { destination_port: 8080, transport_protocol: tls } }
- { name: any-plain, filter_chain_match: { transport_protocol: raw_buffer } }
"#,
        );
        let (s, reasons) = select(&l, &input("1.2.3.4:8080", None, "raw_buffer", &[]));
        assert_eq!(s, Selected::None);
        assert!(reasons
            .iter()
            .any(|r| r.subject.contains("any-plain") && r.verdict == Verdict::Skipped));
        assert!(reasons
            .last()
            .unwrap()
            .detail
            .contains("closes the connection"));
        let mut with_default = l.clone();
        with_default.default_filter_chain = Some(FilterChain {
            name: "dflt".into(),
            ..Default::default()
        });
        assert_eq!(
            pick(
                &with_default,
                &input("1.2.3.4:8080", None, "raw_buffer", &[])
            ),
            Selected::Default
        );
    }

    #[test]
    fn server_names_exact_then_longest_wildcard_then_none() {
        let l = listener(
            r#"
name: l
filter_chains:
- { name: exact, filter_chain_match: { server_names: [api.example.com] } }
- { name: wild, filter_chain_match: { server_names: ["*.example.com"] } }
- { name: wilder, filter_chain_match: { server_names: ["*.api.example.com"] } }
- { name: none }
"#,
        );
        assert_eq!(
            pick(
                &l,
                &input("1.1.1.1:443", Some("api.example.com"), "tls", &[])
            ),
            Selected::Chain(0)
        );
        assert_eq!(
            pick(
                &l,
                &input("1.1.1.1:443", Some("API.example.com"), "tls", &[])
            ),
            Selected::Chain(0)
        );
        assert_eq!(
            pick(
                &l,
                &input("1.1.1.1:443", Some("v1.api.example.com"), "tls", &[])
            ),
            Selected::Chain(2)
        );
        assert_eq!(
            pick(
                &l,
                &input("1.1.1.1:443", Some("www.example.com"), "tls", &[])
            ),
            Selected::Chain(1)
        );
        assert_eq!(
            pick(&l, &input("1.1.1.1:443", Some("example.com"), "tls", &[])),
            Selected::Chain(3)
        );
        assert_eq!(
            pick(&l, &input("1.1.1.1:443", None, "tls", &[])),
            Selected::Chain(3)
        );
    }

    #[test]
    fn destination_and_source_prefixes_longest_first() {
        let l = listener(
            r#"
name: l
filter_chains:
- { name: ten, filter_chain_match: { prefix_ranges: [{ address_prefix: 10.0.0.0, prefix_len: 8 }] } }
- { name: ten-one, filter_chain_match: { prefix_ranges: [{ address_prefix: 10.1.0.0, prefix_len: 16 }] } }
- { name: host, filter_chain_match: { prefix_ranges: [{ address_prefix: 10.1.2.3, prefix_len: 32 }] } }
- { name: rest }
"#,
        );
        assert_eq!(
            pick(&l, &input("10.1.2.3:80", None, "raw_buffer", &[])),
            Selected::Chain(2)
        );
        assert_eq!(
            pick(&l, &input("10.1.9.9:80", None, "raw_buffer", &[])),
            Selected::Chain(1)
        );
        assert_eq!(
            pick(&l, &input("10.9.9.9:80", None, "raw_buffer", &[])),
            Selected::Chain(0)
        );
        assert_eq!(
            pick(&l, &input("192.168.0.1:80", None, "raw_buffer", &[])),
            Selected::Chain(3)
        );
        let src = listener(
            r#"
name: l
filter_chains:
- { name: local, filter_chain_match: { source_type: SAME_IP_OR_LOOPBACK } }
- { name: external, filter_chain_match: { source_type: EXTERNAL, source_prefix_ranges: [{ address_prefix: 10.0.0.0, prefix_len: 8 }] } }
- { name: external-port, filter_chain_match: { source_type: EXTERNAL, source_prefix_ranges: [{ address_prefix: 10.0.0.0, prefix_len: 8 }], source_ports: [40000] } }
- { name: any }
"#,
        );
        let mut i = input("10.1.1.1:80", None, "raw_buffer", &[]);
        assert_eq!(pick(&src, &i), Selected::Chain(2));
        i.source = "10.0.0.9:40001".parse().unwrap();
        assert_eq!(pick(&src, &i), Selected::Chain(1));
        i.source = "127.0.0.1:5".parse().unwrap();
        assert_eq!(pick(&src, &i), Selected::Chain(0));
        // External, so the EXTERNAL chains win the source type criterion; neither takes this
        // source IP, and there is no going back to the `any` chain.
        i.source = "192.168.1.1:5".parse().unwrap();
        assert_eq!(pick(&src, &i), Selected::None);
    }
}
