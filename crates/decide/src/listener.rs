//! Which listener takes a connection, and what its listener filters find: the accepting listener
//! (by name, by port, or by the destination), the `use_original_dst` hand-off to the listener that
//! owns the original destination (exact IP:port before the wildcard address), and each listener
//! filter run or disabled by its `filter_disabled` predicate.

use crate::{Reason, Verdict};
use pilotfish_api::pb::envoy::config::core::v3::{address, Address};
use pilotfish_api::pb::envoy::config::listener::v3::{
    listener_filter_chain_match_predicate::Rule, Listener, ListenerFilterChainMatchPredicate,
};
use pilotfish_config::resources::{Resource, ResourceSet};
use std::net::{IpAddr, SocketAddr};

/// A connection as it arrives, before the proxy has looked at it.
#[derive(Debug, Clone)]
pub struct Connection {
    /// Where the client connected to (the original destination, before any interception).
    pub destination: SocketAddr,
    pub source: SocketAddr,
    /// Whether it opens with a TLS ClientHello.
    pub tls: bool,
    pub sni: Option<String>,
    pub alpn: Vec<String>,
    /// For plaintext: what http_inspector would recognise (`http/1.1`, `http/1.0`, `h2c`), None
    /// for a protocol that is not HTTP.
    pub http: Option<String>,
}

/// How the connection reaches the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// Through the listener with this name.
    Listener(String),
    /// Through whatever listener binds this port (Istio's iptables send inbound traffic to 15006
    /// and outbound traffic to 15001).
    Port(u16),
    /// Straight to the destination: the listener bound there.
    Direct,
}

pub fn socket_addr(a: &Address) -> Option<SocketAddr> {
    match a.address.as_ref()? {
        address::Address::SocketAddress(s) => {
            let ip: IpAddr = s.address.parse().ok()?;
            let port = match s.port_specifier {
                Some(pilotfish_api::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => p as u16,
                _ => 0,
            };
            Some(SocketAddr::new(ip, port))
        }
        _ => None,
    }
}

fn binds(l: &Listener) -> bool {
    l.bind_to_port.as_ref().is_none_or(|v| v.value)
}

/// The listener owning `dst`: exact address first, then the wildcard address of its family.
fn owner<'a>(
    listeners: impl Iterator<Item = &'a Resource<Listener>> + Clone,
    dst: SocketAddr,
) -> Option<&'a Resource<Listener>> {
    let addr = |r: &Resource<Listener>| r.value.address.as_ref().and_then(socket_addr);
    listeners
        .clone()
        .find(|r| addr(r) == Some(dst))
        .or_else(|| {
            listeners.clone().find(|r| {
                addr(r).is_some_and(|a| {
                    a.port() == dst.port()
                        && a.ip().is_unspecified()
                        && a.is_ipv4() == dst.is_ipv4()
                })
            })
        })
}

#[derive(Debug, Clone)]
pub struct ListenerDecision<'a> {
    /// The listener whose socket accepted the connection.
    pub accepted_by: &'a Resource<Listener>,
    /// The listener that serves it: the accepting one, or the one it was handed to.
    pub serves: &'a Resource<Listener>,
    /// The local address the connection has when it reaches `serves`'s filters.
    pub local: SocketAddr,
    pub reasons: Vec<Reason>,
}

pub fn select<'a>(
    set: &'a ResourceSet,
    conn: &Connection,
    entry: &Entry,
) -> Result<ListenerDecision<'a>, Vec<Reason>> {
    let mut reasons = vec![];
    let bound = set.listeners.iter().filter(|r| binds(&r.value));
    let accepted = match entry {
        Entry::Listener(name) => set.listener(name).ok_or_else(|| vec![Reason::new(format!("listener '{name}'"), Verdict::Rejected, "no listener of that name")])?,
        Entry::Port(port) => bound
            .clone()
            .find(|r| r.value.address.as_ref().and_then(socket_addr).is_some_and(|a| a.port() == *port))
            .ok_or_else(|| vec![Reason::new(format!("port {port}"), Verdict::Rejected, "no listener binds this port")])?,
        Entry::Direct => owner(bound, conn.destination).ok_or_else(|| vec![Reason::new(format!("{}", conn.destination), Verdict::Rejected, "no listener binds this address (try --inbound or --outbound for intercepted traffic)")])?,
    };
    let accept_addr = accepted
        .value
        .address
        .as_ref()
        .and_then(socket_addr)
        .unwrap_or(conn.destination);
    let why = match entry {
        Entry::Listener(_) => "named".to_string(),
        Entry::Port(p) => format!("binds port {p}, where the connection was redirected"),
        Entry::Direct => format!("binds {accept_addr}, the connection's destination"),
    };
    reasons.push(Reason::new(
        format!("listener '{}'", accepted.name),
        Verdict::Chosen,
        format!("accepts the connection: {why}"),
    ));
    let mut serves = accepted;
    // The address the socket sees: what the client dialled if it came straight here, the
    // interception port otherwise (until original_dst or use_original_dst restore it).
    let mut local = if *entry == Entry::Direct {
        conn.destination
    } else {
        SocketAddr::new(conn.destination.ip(), accept_addr.port())
    };
    if accepted
        .value
        .use_original_dst
        .as_ref()
        .is_some_and(|v| v.value)
    {
        local = conn.destination;
        match owner(set.listeners.iter(), conn.destination) {
            Some(target) if target.name != accepted.name => {
                let exact = target.value.address.as_ref().and_then(socket_addr) == Some(conn.destination);
                reasons.push(Reason::new(
                    format!("listener '{}'", target.name),
                    Verdict::Chosen,
                    format!(
                        "use_original_dst hands the connection over: it owns the original destination {} ({})",
                        conn.destination,
                        if exact { "exact address" } else { "wildcard address, no listener has the exact one" }
                    ),
                ));
                serves = target;
            }
            _ => reasons.push(Reason::new(
                format!("listener '{}'", accepted.name),
                Verdict::Note,
                format!("use_original_dst: no other listener owns {}, so this listener's own filter chains serve it", conn.destination),
            )),
        }
    }
    Ok(ListenerDecision {
        accepted_by: accepted,
        serves,
        local,
        reasons,
    })
}

/// What the listener filters found out about the connection.
#[derive(Debug, Clone)]
pub struct Detected {
    /// The local (destination) address filter chains match on.
    pub local: SocketAddr,
    pub transport_protocol: String,
    pub server_name: Option<String>,
    pub application_protocols: Vec<String>,
    /// One entry per listener filter, in order.
    pub filters: Vec<Reason>,
}

/// Runs the listener's filters over the connection, in order. A filter whose `filter_disabled`
/// matches is skipped; pilotfish knows original_dst, tls_inspector and http_inspector.
pub fn run_listener_filters(listener: &Listener, conn: &Connection, local: SocketAddr) -> Detected {
    let mut d = Detected {
        local,
        transport_protocol: String::new(),
        server_name: None,
        application_protocols: vec![],
        filters: vec![],
    };
    for f in &listener.listener_filters {
        if let Some(p) = &f.filter_disabled {
            if predicate(p, d.local) {
                d.filters.push(Reason::new(
                    &f.name,
                    Verdict::Skipped,
                    format!(
                        "filter_disabled matches ({}) for destination port {}",
                        describe(p),
                        d.local.port()
                    ),
                ));
                continue;
            }
        }
        let kind = f
            .name
            .trim_start_matches("envoy.filters.listener.")
            .trim_start_matches("envoy.listener.");
        let note = match kind {
            "original_dst" => {
                d.local = conn.destination;
                format!("restores the original destination {} (SO_ORIGINAL_DST)", conn.destination)
            }
            "tls_inspector" => {
                if conn.tls {
                    d.transport_protocol = "tls".into();
                    d.server_name = conn.sni.clone();
                    d.application_protocols = conn.alpn.clone();
                    format!(
                        "ClientHello: transport tls, SNI {}, ALPN [{}]",
                        conn.sni.as_deref().unwrap_or("(none)"),
                        conn.alpn.join(", ")
                    )
                } else {
                    "no TLS ClientHello: nothing detected".into()
                }
            }
            "http_inspector" => match (&conn.http, conn.tls) {
                (_, true) => "TLS: nothing to inspect".into(),
                (Some(p), false) => {
                    d.application_protocols = vec![p.clone()];
                    format!("plaintext HTTP: application protocol {p}")
                }
                (None, false) => "not HTTP: nothing detected".into(),
            },
            other => format!("pilotfish does not evaluate the {other} listener filter yet; its findings are not known"),
        };
        d.filters.push(Reason::new(&f.name, Verdict::Note, note));
    }
    if d.transport_protocol.is_empty() {
        d.transport_protocol = "raw_buffer".into();
    }
    d
}

/// `ListenerFilterChainMatchPredicate`, evaluated on the connection's destination port.
pub fn predicate(p: &ListenerFilterChainMatchPredicate, local: SocketAddr) -> bool {
    match &p.rule {
        Some(Rule::OrMatch(set)) => set.rules.iter().any(|r| predicate(r, local)),
        Some(Rule::AndMatch(set)) => set.rules.iter().all(|r| predicate(r, local)),
        Some(Rule::NotMatch(inner)) => !predicate(inner, local),
        Some(Rule::AnyMatch(b)) => *b,
        Some(Rule::DestinationPortRange(r)) => {
            let port = local.port() as i32;
            port >= r.start && port < r.end
        }
        None => false,
    }
}

fn describe(p: &ListenerFilterChainMatchPredicate) -> String {
    match &p.rule {
        Some(Rule::OrMatch(set)) => set
            .rules
            .iter()
            .map(describe)
            .collect::<Vec<_>>()
            .join(" or "),
        Some(Rule::AndMatch(set)) => set
            .rules
            .iter()
            .map(describe)
            .collect::<Vec<_>>()
            .join(" and "),
        Some(Rule::NotMatch(inner)) => format!("not ({})", describe(inner)),
        Some(Rule::AnyMatch(b)) => format!("any_match {b}"),
        Some(Rule::DestinationPortRange(r)) if r.end == r.start + 1 => format!("port {}", r.start),
        Some(Rule::DestinationPortRange(r)) => format!("ports [{}, {})", r.start, r.end),
        None => "no rule".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(yaml: &str) -> ResourceSet {
        pilotfish_config::load_str("t.yaml", yaml, None)
            .unwrap_or_else(|e| panic!("{e}"))
            .resources
    }

    const LISTENERS: &str = r#"
static_resources:
  listeners:
  - name: virtualOutbound
    address: { socket_address: { address: 0.0.0.0, port_value: 15001 } }
    use_original_dst: true
    filter_chains: [{ name: passthrough }]
  - name: wildcard_8080
    address: { socket_address: { address: 0.0.0.0, port_value: 8080 } }
    bind_to_port: false
    filter_chains: [{}]
  - name: exact_8080
    address: { socket_address: { address: 10.0.0.5, port_value: 8080 } }
    bind_to_port: false
    filter_chains: [{}]
  - name: public
    address: { socket_address: { address: 127.0.0.1, port_value: 9000 } }
    filter_chains: [{}]
"#;

    fn conn(dst: &str) -> Connection {
        Connection {
            destination: dst.parse().unwrap(),
            source: "10.0.0.1:5000".parse().unwrap(),
            tls: false,
            sni: None,
            alpn: vec![],
            http: Some("http/1.1".into()),
        }
    }

    #[test]
    fn use_original_dst_hands_over_exact_before_wildcard() {
        let s = set(LISTENERS);
        let d = select(&s, &conn("10.0.0.5:8080"), &Entry::Port(15001)).unwrap();
        assert_eq!(
            (d.accepted_by.name.as_str(), d.serves.name.as_str()),
            ("virtualOutbound", "exact_8080")
        );
        let d = select(&s, &conn("10.0.0.6:8080"), &Entry::Port(15001)).unwrap();
        assert_eq!(d.serves.name, "wildcard_8080");
        assert_eq!(d.local, "10.0.0.6:8080".parse().unwrap());
        // Nobody owns it: the accepting listener keeps it.
        let d = select(&s, &conn("10.0.0.6:7777"), &Entry::Port(15001)).unwrap();
        assert_eq!(d.serves.name, "virtualOutbound");
        // Listeners that do not bind are never reached directly.
        assert!(select(&s, &conn("10.0.0.5:8080"), &Entry::Direct).is_err());
        assert_eq!(
            select(&s, &conn("127.0.0.1:9000"), &Entry::Direct)
                .unwrap()
                .serves
                .name,
            "public"
        );
        assert_eq!(
            select(&s, &conn("1.2.3.4:1"), &Entry::Listener("public".into()))
                .unwrap()
                .serves
                .name,
            "public"
        );
        assert!(select(&s, &conn("1.2.3.4:1"), &Entry::Port(1)).is_err());
    }

    fn pred(yaml: &str) -> ListenerFilterChainMatchPredicate {
        pilotfish_config::load_message("p.yaml", yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn filter_disabled_predicates() {
        let at = |p: u16| -> SocketAddr { SocketAddr::new("10.0.0.1".parse().unwrap(), p) };
        let port = pred("destination_port_range: { start: 8080, end: 8081 }");
        assert!(predicate(&port, at(8080)));
        assert!(!predicate(&port, at(8081)));
        let or = pred("or_match: { rules: [{ destination_port_range: { start: 80, end: 81 } }, { destination_port_range: { start: 443, end: 444 } }] }");
        assert!(predicate(&or, at(443)));
        assert!(!predicate(&or, at(8443)));
        let and = pred("and_match: { rules: [{ destination_port_range: { start: 1, end: 100 } }, { not_match: { destination_port_range: { start: 50, end: 51 } } }] }");
        assert!(predicate(&and, at(49)));
        assert!(!predicate(&and, at(50)));
        assert!(predicate(&pred("any_match: true"), at(1)));
        assert!(!predicate(&pred("not_match: { any_match: true }"), at(1)));
    }

    #[test]
    fn listener_filters_find_what_the_connection_shows() {
        let l: Listener = pilotfish_config::load_message(
            "l.yaml",
            r#"
name: l
listener_filters:
- { name: envoy.filters.listener.original_dst, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst } }
- { name: envoy.filters.listener.tls_inspector, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector } }
- name: envoy.filters.listener.http_inspector
  typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector }
  filter_disabled: { destination_port_range: { start: 8080, end: 8081 } }
"#,
        )
        .unwrap();
        let accepted: SocketAddr = "10.0.0.1:15006".parse().unwrap();
        let mut c = conn("10.0.0.1:9090");
        let d = run_listener_filters(&l, &c, accepted);
        assert_eq!(d.local, "10.0.0.1:9090".parse().unwrap());
        assert_eq!(d.transport_protocol, "raw_buffer");
        assert_eq!(d.application_protocols, vec!["http/1.1"]);
        // The predicate sees the destination original_dst restored.
        c.destination = "10.0.0.1:8080".parse().unwrap();
        let d = run_listener_filters(&l, &c, accepted);
        assert_eq!(d.filters[2].verdict, Verdict::Skipped);
        assert!(d.application_protocols.is_empty());
        c.tls = true;
        c.sni = Some("a.example".into());
        c.alpn = vec!["h2".into()];
        let d = run_listener_filters(&l, &c, accepted);
        assert_eq!(
            (d.transport_protocol.as_str(), d.server_name.as_deref()),
            ("tls", Some("a.example"))
        );
        assert_eq!(d.application_protocols, vec!["h2"]);
    }
}
