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
use pilotfish_api::pb::envoy::extensions::matching::input_matchers::ip::v3::Ip as IpInputMatcher;
use pilotfish_api::pb::google::protobuf::StringValue;
use pilotfish_api::pb::xds::core::v3::TypedExtensionConfig;
use pilotfish_api::pb::xds::r#type::matcher::v3::matcher::{
    self,
    matcher_list::{predicate, predicate::single_predicate, Predicate},
    matcher_tree, on_match,
};
use pilotfish_api::pb::xds::r#type::matcher::v3::Matcher as XdsMatcher;
use pilotfish_config::model::unpack;
use prost::Message;
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

/// A chain's match criteria in Envoy's field names, for people: `destination_port 8080`,
/// `server_names [a.example.com]`.
pub fn match_parts(m: &FilterChainMatch) -> Vec<String> {
    let mut parts = vec![];
    if let Some(p) = &m.destination_port {
        parts.push(format!("destination_port {}", p.value));
    }
    let cidrs = |rs: &[pilotfish_api::pb::envoy::config::core::v3::CidrRange]| {
        rs.iter()
            .map(|r| {
                format!(
                    "{}/{}",
                    r.address_prefix,
                    r.prefix_len.as_ref().map_or(0, |v| v.value)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !m.prefix_ranges.is_empty() {
        parts.push(format!("prefix_ranges [{}]", cidrs(&m.prefix_ranges)));
    }
    if !m.server_names.is_empty() {
        parts.push(format!("server_names [{}]", m.server_names.join(", ")));
    }
    if !m.transport_protocol.is_empty() {
        parts.push(format!("transport_protocol {}", m.transport_protocol));
    }
    if !m.application_protocols.is_empty() {
        parts.push(format!(
            "application_protocols [{}]",
            m.application_protocols.join(", ")
        ));
    }
    if !m.direct_source_prefix_ranges.is_empty() {
        parts.push(format!(
            "direct_source_prefix_ranges [{}]",
            cidrs(&m.direct_source_prefix_ranges)
        ));
    }
    if m.source_type != 0 {
        let t = ConnectionSourceType::try_from(m.source_type).map_or("?", |t| t.as_str_name());
        parts.push(format!("source_type {t}"));
    }
    if !m.source_prefix_ranges.is_empty() {
        parts.push(format!(
            "source_prefix_ranges [{}]",
            cidrs(&m.source_prefix_ranges)
        ));
    }
    if !m.source_ports.is_empty() {
        parts.push(format!(
            "source_ports [{}]",
            m.source_ports
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    parts
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
    if let Some(m) = &l.filter_chain_matcher {
        return select_by_matcher(l, m, input);
    }
    let mut candidates: Vec<usize> = (0..l.filter_chains.len()).collect();
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
                let local = same_ip_or_loopback(input);
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

/// `filter_chain_matcher`: the unified matcher picks a chain by name, and the chains'
/// `filter_chain_match` is not read. No action (nothing matched, no `on_no_match`) means the
/// default filter chain.
fn select_by_matcher(l: &Listener, m: &XdsMatcher, input: &ChainInput) -> (Selected, Vec<Reason>) {
    let mut reasons = vec![];
    let name = match evaluate(m, input, "filter_chain_matcher", &mut reasons) {
        Ok(n) => n,
        Err(e) => {
            reasons.push(Reason::new("filter_chain_matcher", Verdict::Rejected, e));
            None
        }
    };
    if let Some(name) = name {
        match l.filter_chains.iter().position(|c| c.name == name) {
            Some(i) => {
                reasons.push(Reason::new(
                    chain_label(l, i),
                    Verdict::Chosen,
                    "named by filter_chain_matcher",
                ));
                return (Selected::Chain(i), reasons);
            }
            None => reasons.push(Reason::new(
                format!("filter chain '{name}'"),
                Verdict::Rejected,
                "named by filter_chain_matcher, but the listener has no chain of that name",
            )),
        }
    }
    if l.default_filter_chain.is_some() {
        reasons.push(Reason::new(
            "default_filter_chain",
            Verdict::Chosen,
            "filter_chain_matcher names no chain",
        ));
        return (Selected::Default, reasons);
    }
    reasons.push(Reason::new(
        format!("listener '{}'", l.name),
        Verdict::Rejected,
        "filter_chain_matcher names no chain and there is no default_filter_chain: Envoy closes the connection",
    ));
    (Selected::None, reasons)
}

/// The chain name a matcher's action gives, or None when it gives none. A nested matcher that
/// gives none lets the evaluation go on (the next field matcher, then `on_no_match`).
fn evaluate(
    m: &XdsMatcher,
    input: &ChainInput,
    at: &str,
    reasons: &mut Vec<Reason>,
) -> Result<Option<String>, String> {
    match &m.matcher_type {
        Some(matcher::MatcherType::MatcherList(list)) => {
            for (i, fm) in list.matchers.iter().enumerate() {
                let here = format!("{at}.matcher_list.matchers[{i}]");
                let Some(p) = &fm.predicate else { continue };
                let (hit, why) = predicate(p, input)?;
                reasons.push(Reason::new(
                    &here,
                    if hit {
                        Verdict::Note
                    } else {
                        Verdict::Rejected
                    },
                    why,
                ));
                if hit {
                    if let Some(on_match) = &fm.on_match {
                        if let Some(name) = on_match_action(on_match, input, &here, reasons)? {
                            return Ok(Some(name));
                        }
                    }
                }
            }
        }
        Some(matcher::MatcherType::MatcherTree(tree)) => {
            let here = format!("{at}.matcher_tree");
            let (value, what) = input_of(tree.input.as_ref(), input)?;
            let found = match (&tree.tree_type, &value) {
                (Some(matcher_tree::TreeType::ExactMatchMap(map)), Some(v)) => {
                    map.map.get(v).map(|o| (v.clone(), o))
                }
                (Some(matcher_tree::TreeType::PrefixMatchMap(map)), Some(v)) => map
                    .map
                    .iter()
                    .filter(|(k, _)| v.starts_with(k.as_str()))
                    .max_by_key(|(k, _)| k.len())
                    .map(|(k, o)| (k.clone(), o)),
                (Some(matcher_tree::TreeType::CustomMatch(c)), _) => {
                    return Err(format!(
                        "{here}: custom match tree '{}' is not implemented",
                        c.name
                    ))
                }
                _ => None,
            };
            let shown = value.as_deref().unwrap_or("(no value)");
            match found {
                Some((key, on_match)) => {
                    reasons.push(Reason::new(
                        &here,
                        Verdict::Note,
                        format!("{what} {shown} finds entry '{key}'"),
                    ));
                    if let Some(name) = on_match_action(on_match, input, &here, reasons)? {
                        return Ok(Some(name));
                    }
                }
                None => reasons.push(Reason::new(
                    &here,
                    Verdict::Rejected,
                    format!("{what} {shown} is not in the map"),
                )),
            }
        }
        None => {}
    }
    match &m.on_no_match {
        Some(on_match) => on_match_action(on_match, input, &format!("{at}.on_no_match"), reasons),
        None => Ok(None),
    }
}

fn on_match_action(
    o: &matcher::OnMatch,
    input: &ChainInput,
    at: &str,
    reasons: &mut Vec<Reason>,
) -> Result<Option<String>, String> {
    match &o.on_match {
        Some(on_match::OnMatch::Matcher(inner)) => evaluate(inner, input, at, reasons),
        Some(on_match::OnMatch::Action(action)) => {
            let any = action
                .typed_config
                .as_ref()
                .ok_or_else(|| format!("{at}: action '{}' has no typed_config", action.name))?;
            let name = unpack::<StringValue>(any).ok_or_else(|| {
                format!(
                    "{at}: action '{}' is not a google.protobuf.StringValue naming a filter chain",
                    action.name
                )
            })?;
            reasons.push(Reason::new(
                at,
                Verdict::Note,
                format!("action: filter chain '{}'", name.value),
            ));
            Ok(Some(name.value))
        }
        None => Ok(None),
    }
}

/// A predicate's verdict, and why.
fn predicate(p: &Predicate, input: &ChainInput) -> Result<(bool, String), String> {
    match &p.match_type {
        Some(predicate::MatchType::SinglePredicate(sp)) => {
            let (value, what) = input_of(sp.input.as_ref(), input)?;
            let shown = value.clone().unwrap_or_else(|| "(no value)".into());
            let hit = match &sp.matcher {
                Some(single_predicate::Matcher::ValueMatch(sm)) => {
                    // xds.type.matcher.v3.StringMatcher and Envoy's StringMatcher share their
                    // wire format, so Envoy's compiled matcher serves both.
                    let envoy_sm =
                        pilotfish_api::pb::envoy::r#type::matcher::v3::StringMatcher::decode(
                            sm.encode_to_vec().as_slice(),
                        )
                        .map_err(|e| e.to_string())?;
                    let compiled = crate::matcher::CompiledStringMatcher::new(&envoy_sm)?;
                    value.as_deref().is_some_and(|v| compiled.matches(v))
                }
                Some(single_predicate::Matcher::CustomMatch(c)) => {
                    let ip = c
                        .typed_config
                        .as_ref()
                        .and_then(unpack::<IpInputMatcher>)
                        .ok_or_else(|| format!("custom matcher '{}' is not implemented", c.name))?;
                    let addr = value
                        .as_deref()
                        .and_then(|v| v.parse::<std::net::IpAddr>().ok());
                    addr.is_some_and(|a| {
                        ip.cidr_ranges
                            .iter()
                            .filter_map(Cidr::new)
                            .any(|c| c.contains(a))
                    })
                }
                None => false,
            };
            Ok((
                hit,
                format!(
                    "{what} {shown} {}",
                    if hit { "matches" } else { "does not match" }
                ),
            ))
        }
        Some(predicate::MatchType::OrMatcher(list)) => {
            let mut whys = vec![];
            for p in &list.predicate {
                let (hit, why) = predicate(p, input)?;
                whys.push(why);
                if hit {
                    return Ok((true, format!("or: {}", whys.join("; "))));
                }
            }
            Ok((false, format!("or: {}", whys.join("; "))))
        }
        Some(predicate::MatchType::AndMatcher(list)) => {
            let mut whys = vec![];
            for p in &list.predicate {
                let (hit, why) = predicate(p, input)?;
                whys.push(why);
                if !hit {
                    return Ok((false, format!("and: {}", whys.join("; "))));
                }
            }
            Ok((true, format!("and: {}", whys.join("; "))))
        }
        Some(predicate::MatchType::NotMatcher(inner)) => {
            let (hit, why) = predicate(inner, input)?;
            Ok((!hit, format!("not ({why})")))
        }
        None => Ok((false, "empty predicate".into())),
    }
}

/// What a network matching input reads from the connection (None: no value, which no value
/// matcher matches), and how to name it.
fn input_of(
    tec: Option<&TypedExtensionConfig>,
    i: &ChainInput,
) -> Result<(Option<String>, &'static str), String> {
    let tec = tec.ok_or("a matcher without an input")?;
    let ty = tec
        .typed_config
        .as_ref()
        .map(pilotfish_config::model::effective_type_url)
        .unwrap_or_default();
    let name = pilotfish_api::type_url_message_name(&ty);
    let short = name.rsplit('.').next().unwrap_or(name);
    let local = same_ip_or_loopback(i);
    Ok(match short {
        "DestinationIPInput" => (Some(i.local.ip().to_string()), "destination IP"),
        "DestinationPortInput" => (Some(i.local.port().to_string()), "destination port"),
        "SourceIPInput" => (Some(i.source.ip().to_string()), "source IP"),
        "SourcePortInput" => (Some(i.source.port().to_string()), "source port"),
        "DirectSourceIPInput" => (Some(i.direct_source.ip().to_string()), "direct source IP"),
        "SourceTypeInput" => (local.then(|| "local".to_string()), "source type"),
        "ServerNameInput" => (
            i.server_name.clone().filter(|s| !s.is_empty()),
            "server name",
        ),
        "TransportProtocolInput" => (
            Some(i.transport_protocol.clone()).filter(|t| !t.is_empty()),
            "transport protocol",
        ),
        "ApplicationProtocolInput" => (
            (!i.application_protocols.is_empty()).then(|| {
                i.application_protocols
                    .iter()
                    .map(|p| format!("'{p}'"))
                    .collect::<Vec<_>>()
                    .join(",")
            }),
            "application protocols",
        ),
        _ => {
            return Err(format!(
                "matching input '{}' ({name}) is not implemented",
                tec.name
            ))
        }
    })
}

/// Envoy's `isSameIpOrLoopback`: the source is the local IP itself, or exactly the loopback
/// address (127.0.0.1 or ::1; the rest of 127.0.0.0/8 is external, as real Envoy shows).
fn same_ip_or_loopback(i: &ChainInput) -> bool {
    let loopback = match i.source.ip() {
        std::net::IpAddr::V4(a) => a == std::net::Ipv4Addr::LOCALHOST,
        std::net::IpAddr::V6(a) => a == std::net::Ipv6Addr::LOCALHOST,
    };
    loopback || i.source.ip() == i.local.ip()
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
        // The rest of 127.0.0.0/8 is external to Envoy (unless it is the local address itself).
        i.source = "127.0.0.2:5".parse().unwrap();
        assert_eq!(pick(&src, &i), Selected::None);
        i.local = "127.0.0.2:80".parse().unwrap();
        assert_eq!(pick(&src, &i), Selected::Chain(0));
        i.local = "10.1.1.1:80".parse().unwrap();
        // External, so the EXTERNAL chains win the source type criterion; neither takes this
        // source IP, and there is no going back to the `any` chain.
        i.source = "192.168.1.1:5".parse().unwrap();
        assert_eq!(pick(&src, &i), Selected::None);
    }

    const MATCHER: &str = r#"
name: unified
address: { socket_address: { address: 0.0.0.0, port_value: 15006 } }
filter_chains:
- { name: https, filter_chain_match: { destination_port: 1 } }
- { name: internal-https }
- { name: http }
- { name: office }
- { name: fallback }
default_filter_chain: { name: default }
filter_chain_matcher:
  matcher_tree:
    input: { name: port, typed_config: { "@type": type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput } }
    exact_match_map:
      map:
        "443":
          matcher:
            matcher_list:
              matchers:
              - predicate:
                  and_matcher:
                    predicate:
                    - single_predicate:
                        input: { name: sni, typed_config: { "@type": type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.ServerNameInput } }
                        value_match: { suffix: .internal }
                    - single_predicate:
                        input: { name: src, typed_config: { "@type": type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.SourceIPInput } }
                        custom_match:
                          name: ip
                          typed_config: { "@type": type.googleapis.com/envoy.extensions.matching.input_matchers.ip.v3.Ip, stat_prefix: ip, cidr_ranges: [{ address_prefix: 10.0.0.0, prefix_len: 8 }] }
                on_match: { action: { name: a, typed_config: { "@type": type.googleapis.com/google.protobuf.StringValue, value: internal-https } } }
              - predicate:
                  single_predicate:
                    input: { name: tp, typed_config: { "@type": type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.TransportProtocolInput } }
                    value_match: { exact: tls }
                on_match: { action: { name: a, typed_config: { "@type": type.googleapis.com/google.protobuf.StringValue, value: https } } }
        "80":
          matcher:
            matcher_list:
              matchers:
              - predicate:
                  not_matcher:
                    single_predicate:
                      input: { name: alpn, typed_config: { "@type": type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.ApplicationProtocolInput } }
                      value_match: { contains: "'h2c'" }
                on_match: { action: { name: a, typed_config: { "@type": type.googleapis.com/google.protobuf.StringValue, value: http } } }
    prefix_match_map: null
  on_no_match:
    matcher:
      matcher_tree:
        input: { name: dst, typed_config: { "@type": type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DestinationIPInput } }
        prefix_match_map:
          map:
            "192.168.": { action: { name: a, typed_config: { "@type": type.googleapis.com/google.protobuf.StringValue, value: office } } }
            "192.168.7.": { action: { name: a, typed_config: { "@type": type.googleapis.com/google.protobuf.StringValue, value: fallback } } }
"#;

    fn with_source(mut i: ChainInput, src: &str) -> ChainInput {
        i.source = src.parse().unwrap();
        i.direct_source = i.source;
        i
    }

    #[test]
    fn filter_chain_matcher_names_the_chain_and_ignores_filter_chain_match() {
        let l = listener(MATCHER);
        let named = |i: &ChainInput| match select(&l, i).0 {
            Selected::Chain(n) => l.filter_chains[n].name.clone(),
            Selected::Default => "default".into(),
            Selected::None => "none".into(),
        };
        // Port 443: SNI suffix and source CIDR together, else TLS.
        let tls = input("10.1.1.1:443", Some("api.internal"), "tls", &["h2"]);
        assert_eq!(named(&tls), "internal-https");
        assert_eq!(named(&with_source(tls.clone(), "172.16.0.1:5000")), "https");
        assert_eq!(
            named(&input("10.1.1.1:443", Some("api.example"), "tls", &[])),
            "https"
        );
        // The chain's own filter_chain_match (destination_port 1) is not read.
        // Port 443 in plaintext: the nested list matches nothing and has no on_no_match, so
        // the map entry counts as not matched and the outer on_no_match decides.
        assert_eq!(
            named(&input("10.1.1.1:443", None, "raw_buffer", &[])),
            "default"
        );
        assert_eq!(
            named(&input("192.168.1.1:443", None, "raw_buffer", &[])),
            "office"
        );
        // Port 80: not h2c.
        assert_eq!(
            named(&input("10.1.1.1:80", None, "raw_buffer", &["http/1.1"])),
            "http"
        );
        assert_eq!(
            named(&input("10.1.1.1:80", None, "raw_buffer", &[])),
            "http"
        );
        assert_eq!(
            named(&input("10.1.1.1:80", None, "raw_buffer", &["h2c"])),
            "default"
        );
        // Other ports: on_no_match, the longest destination IP prefix.
        assert_eq!(
            named(&input("192.168.1.1:22", None, "raw_buffer", &[])),
            "office"
        );
        assert_eq!(
            named(&input("192.168.7.9:22", None, "raw_buffer", &[])),
            "fallback"
        );
        assert_eq!(
            named(&input("10.9.9.9:22", None, "raw_buffer", &[])),
            "default"
        );
        // The reasons say what each step read.
        let (_, reasons) = select(&l, &tls);
        let text: Vec<String> = reasons
            .iter()
            .map(|r| format!("{} {}", r.subject, r.detail))
            .collect();
        assert!(
            text.iter()
                .any(|t| t.contains("destination port 443 finds entry '443'")),
            "{text:#?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("server name api.internal matches")),
            "{text:#?}"
        );
    }

    #[test]
    fn filter_chain_matcher_without_a_default_closes_and_unknown_inputs_are_said() {
        let mut l = listener(MATCHER);
        l.default_filter_chain = None;
        assert_eq!(
            select(&l, &input("10.9.9.9:22", None, "raw_buffer", &[])).0,
            Selected::None
        );
        let l = listener(&MATCHER.replace("ServerNameInput", "FilterStateInput, key: k"));
        let (s, reasons) = select(&l, &input("10.1.1.1:443", Some("a.internal"), "tls", &[]));
        assert_eq!(s, Selected::Default);
        assert!(
            reasons
                .iter()
                .any(|r| r.detail.contains("FilterStateInput")
                    && r.detail.contains("not implemented")),
            "{reasons:#?}"
        );
    }
}
