//! The checks Envoy makes beyond the schema when it accepts a configuration: names unique, filter
//! chain matches unambiguous, addresses parse, regexes compile, terminal filters last, virtual host
//! domains unique, and references that must resolve do. Each finding names its path.

use crate::model::{effective_type_url, Model};
use crate::resources::ResourceSet;
use crate::walk::{walk, Node};
use pilotfish_api::pb::envoy::config::cluster::v3::Cluster;
use pilotfish_api::pb::envoy::config::core::v3::{address, CidrRange};
use pilotfish_api::pb::envoy::config::listener::v3::{filter, FilterChainMatch, Listener};
use pilotfish_api::pb::envoy::config::route::v3::RouteConfiguration;
use pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, http_filter, HttpConnectionManager,
};
use pilotfish_api::prost_reflect::{DynamicMessage, ReflectMessage};
use std::collections::{HashMap, HashSet};

pub type Finding = (String, String);

/// Schema constraints and regexes, over the whole document (Anys and TypedStructs looked into).
/// Returns the errors, and the deprecated fields used (Envoy warns about those at start-up).
pub fn check_document(root: &DynamicMessage) -> (Vec<Finding>, Vec<Finding>) {
    let mut out = vec![];
    let mut deprecated = vec![];
    let mut walk_errors = vec![];
    walk(
        root,
        "",
        &mut |node: &Node<'_>| {
            crate::pgv::check(node, &mut out);
            // A dump repeats its static resources inside the bootstrap; count them once.
            if !node.path.contains(".bootstrap.static_resources") {
                for (field, _) in node.message.fields() {
                    if crate::pgv::is_deprecated(&field) {
                        deprecated.push((
                            crate::walk::join(node.path, field.name()),
                            field.full_name().to_string(),
                        ));
                    }
                }
            }
            if node.message.descriptor().full_name() == "envoy.type.matcher.v3.RegexMatcher" {
                if let Some(re) = node.message.get_field_by_name("regex") {
                    if let Some(re) = re.as_str() {
                        if let Err(e) = regex::Regex::new(re) {
                            out.push((
                                crate::walk::join(node.path, "regex"),
                                format!("invalid regex '{re}': {}", first_line(&e.to_string())),
                            ));
                        }
                    }
                }
            }
            true
        },
        &mut walk_errors,
    );
    out.extend(walk_errors);
    (out, deprecated)
}

fn first_line(s: &str) -> String {
    s.lines().last().unwrap_or(s).trim().to_string()
}

/// Checks across resources, after the resource set and model are built.
pub fn check_resources(set: &ResourceSet, model: &Model) -> Vec<Finding> {
    let mut out = vec![];
    // Duplicate listener names are not an error for Envoy: it keeps the first definition (the
    // resource set already dropped the others, with a warning).
    let mut bound: HashMap<String, &str> = HashMap::new();
    for l in &set.listeners {
        check_listener(&l.value, &l.path, &mut out);
        let binds = l.value.bind_to_port.as_ref().is_none_or(|v| v.value);
        let tcp = l.value.address.as_ref().is_some_and(|a| match &a.address {
            Some(address::Address::SocketAddress(s)) => s.protocol == 0,
            _ => true,
        });
        if let (true, true, Some(addr)) = (
            binds,
            tcp,
            l.value
                .address
                .as_ref()
                .and_then(crate::model::format_address),
        ) {
            if let Some(first) = bound.insert(addr.clone(), &l.name) {
                out.push((
                    format!("{}.address", l.path),
                    format!("error adding listener '{addr}': listener '{}' has the same address as listener '{first}'", l.name),
                ));
            }
        }
    }
    let mut seen = HashMap::new();
    for c in &set.clusters {
        if let Some(first) = seen.insert(c.name.clone(), c.path.clone()) {
            out.push((
                c.path.clone(),
                format!(
                    "duplicate cluster name '{}' (first defined at {first})",
                    c.name
                ),
            ));
        }
        check_cluster(&c.value, &c.path, &mut out);
    }
    // Static route configurations are the inline ones, checked through their listener below.
    for r in set.route_configs.iter().filter(|r| !r.origin.is_static()) {
        check_route_config(&r.value, &r.path, &mut out);
    }
    for (li, l) in set.listeners.iter().enumerate() {
        for (ci, fc) in l.value.filter_chains.iter().enumerate() {
            for (fi, f) in fc.filters.iter().enumerate() {
                let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    continue;
                };
                if let Some(hcm) = crate::model::unpack::<HttpConnectionManager>(any) {
                    let at = format!(
                        "{}.filter_chains[{ci}].filters[{fi}].typed_config",
                        set.listeners[li].path
                    );
                    check_http_filters(&hcm, &at, &mut out);
                    if let Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) =
                        &hcm.route_specifier
                    {
                        check_route_config(rc, &format!("{at}.route_config"), &mut out);
                    }
                }
            }
            check_network_filters(
                &fc.filters,
                &format!("{}.filter_chains[{ci}]", l.path),
                &mut out,
            );
        }
    }
    for r in &model.references {
        if r.fatal {
            let what = match r.kind {
                crate::model::RefKind::Cluster => format!("route refers to unknown cluster '{}' (validate_clusters is on for this route configuration)", r.name),
                crate::model::RefKind::Secret => format!("unknown static secret '{}': no secret of that name and no sds_config to fetch it", r.name),
                k => format!("unknown {} '{}'", k.label(), r.name),
            };
            out.push((r.from.clone(), what));
        }
    }
    out
}

fn check_listener(l: &Listener, path: &str, out: &mut Vec<Finding>) {
    match &l.address {
        None if l.listener_specifier.is_none() => out.push((
            format!("{path}.address"),
            format!("listener '{}' has no address", l.name),
        )),
        Some(a) => check_ip(a, &format!("{path}.address"), out),
        None => {}
    }
    // Envoy's FilterChainManager files every chain under each combination of its match fields;
    // two chains landing on the same leaf make the listener ambiguous and Envoy refuses it.
    let mut leaves: HashMap<Vec<String>, usize> = HashMap::new();
    for (i, fc) in l.filter_chains.iter().enumerate() {
        let m = fc.filter_chain_match.clone().unwrap_or_default();
        for (j, r) in m
            .prefix_ranges
            .iter()
            .chain(&m.source_prefix_ranges)
            .chain(&m.direct_source_prefix_ranges)
            .enumerate()
        {
            check_cidr(
                r,
                &format!("{path}.filter_chains[{i}].filter_chain_match"),
                j,
                out,
            );
        }
        // With filter_chain_matcher the chains are picked by name and their filter_chain_match
        // is not read, so Envoy does not build (or check) the match tree.
        if l.filter_chain_matcher.is_some() {
            continue;
        }
        let mut reported = false;
        for leaf in match_leaves(&m) {
            if let Some(&first) = leaves.get(&leaf) {
                if !reported {
                    out.push((
                        format!("{path}.filter_chains[{i}].filter_chain_match"),
                        format!("multiple filter chains with the same matching rules are defined: filter_chains[{i}] and filter_chains[{first}] of listener '{}'", l.name),
                    ));
                    reported = true;
                }
            } else {
                leaves.insert(leaf, i);
            }
        }
    }
}

fn cidr_key(r: &CidrRange) -> String {
    let len = r.prefix_len.as_ref().map_or(0, |v| v.value);
    match r.address_prefix.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - len.min(32))
            };
            format!("{}/{len}", std::net::Ipv4Addr::from(u32::from(a) & mask))
        }
        Ok(std::net::IpAddr::V6(a)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len.min(128))
            };
            format!("{}/{len}", std::net::Ipv6Addr::from(u128::from(a) & mask))
        }
        Err(_) => format!("{}/{len}", r.address_prefix),
    }
}

fn check_cidr(r: &CidrRange, at: &str, _j: usize, out: &mut Vec<Finding>) {
    match r.address_prefix.parse::<std::net::IpAddr>() {
        Ok(_) => {}
        Err(_) => out.push((
            at.into(),
            format!("malformed IP address: {}", r.address_prefix),
        )),
    }
}

/// Every leaf a chain occupies in Envoy's match tree. Products can grow large; beyond a bound the
/// chain is compared by its whole match instead.
fn match_leaves(m: &FilterChainMatch) -> Vec<Vec<String>> {
    fn or_any(v: Vec<String>) -> Vec<String> {
        if v.is_empty() {
            vec![String::new()]
        } else {
            v
        }
    }
    let dims: Vec<Vec<String>> = vec![
        vec![m
            .destination_port
            .as_ref()
            .map_or(String::new(), |p| p.value.to_string())],
        or_any(m.prefix_ranges.iter().map(cidr_key).collect()),
        or_any(m.server_names.clone()),
        vec![m.transport_protocol.clone()],
        or_any(m.application_protocols.clone()),
        or_any(m.direct_source_prefix_ranges.iter().map(cidr_key).collect()),
        vec![m.source_type.to_string()],
        or_any(m.source_prefix_ranges.iter().map(cidr_key).collect()),
        or_any(m.source_ports.iter().map(|p| p.to_string()).collect()),
    ];
    let total: usize = dims.iter().map(Vec::len).product();
    if total > 100_000 {
        return vec![dims.iter().map(|d| d.join(",")).collect()];
    }
    let mut leaves = vec![vec![]];
    for d in &dims {
        let mut next = Vec::with_capacity(leaves.len() * d.len());
        for l in &leaves {
            for v in d {
                let mut n: Vec<String> = l.clone();
                n.push(v.clone());
                next.push(n);
            }
        }
        leaves = next;
    }
    leaves
}

fn check_ip(
    a: &pilotfish_api::pb::envoy::config::core::v3::Address,
    at: &str,
    out: &mut Vec<Finding>,
) {
    if let Some(address::Address::SocketAddress(s)) = &a.address {
        if s.resolver_name.is_empty() && s.address.parse::<std::net::IpAddr>().is_err() {
            out.push((
                format!("{at}.socket_address.address"),
                format!("malformed IP address: {}", s.address),
            ));
        }
    }
}

fn check_cluster(c: &Cluster, path: &str, out: &mut Vec<Finding>) {
    use pilotfish_api::pb::envoy::config::cluster::v3::cluster::LbConfig;
    match &c.lb_config {
        Some(LbConfig::MaglevLbConfig(m)) => {
            if let Some(size) = m.table_size.as_ref().map(|v| v.value) {
                if size < 2 || (2..).take_while(|d| d * d <= size).any(|d| size % d == 0) {
                    out.push((
                        format!("{path}.maglev_lb_config.table_size"),
                        format!("the table size of maglev must be prime number (got {size})"),
                    ));
                }
            }
        }
        Some(LbConfig::RingHashLbConfig(r)) => {
            let min = r.minimum_ring_size.as_ref().map_or(1024, |v| v.value);
            let max = r
                .maximum_ring_size
                .as_ref()
                .map_or(8 * 1024 * 1024, |v| v.value);
            if min > max {
                out.push((
                    format!("{path}.ring_hash_lb_config"),
                    format!("ring hash: minimum_ring_size ({min}) > maximum_ring_size ({max})"),
                ));
            }
        }
        _ => {}
    }
    // DNS clusters take host names; every other kind needs IP addresses.
    let kind = crate::model::discovery_name(c);
    if kind == "STRICT_DNS" || kind == "LOGICAL_DNS" {
        return;
    }
    if let Some(la) = &c.load_assignment {
        for (i, le) in la.endpoints.iter().enumerate() {
            for (j, lb) in le.lb_endpoints.iter().enumerate() {
                use pilotfish_api::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
                if let Some(HostIdentifier::Endpoint(e)) = &lb.host_identifier {
                    if let Some(a) = &e.address {
                        check_ip(a, &format!("{path}.load_assignment.endpoints[{i}].lb_endpoints[{j}].endpoint.address"), out);
                    }
                }
            }
        }
    }
}

fn check_route_config(rc: &RouteConfiguration, path: &str, out: &mut Vec<Finding>) {
    let mut domains: HashMap<String, usize> = HashMap::new();
    let mut names: HashSet<&str> = HashSet::new();
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        if !names.insert(vh.name.as_str()) {
            out.push((
                format!("{path}.virtual_hosts[{i}].name"),
                format!(
                    "duplicate virtual host name '{}' in route configuration '{}'",
                    vh.name, rc.name
                ),
            ));
        }
        for (j, d) in vh.domains.iter().enumerate() {
            let key = d.to_ascii_lowercase();
            if domains.insert(key, i).is_some() {
                out.push((
                    format!("{path}.virtual_hosts[{i}].domains[{j}]"),
                    format!("Only unique values for domains are permitted. Duplicate entry of domain {d} in route {}", rc.name),
                ));
            }
        }
    }
}

/// Terminal filters Envoy knows (and so does pilotfish): they must come last, and the last
/// filter must be one. Filters whose type pilotfish does not know are not judged.
fn terminal(type_url: &str) -> Option<bool> {
    let name = pilotfish_api::type_url_message_name(type_url);
    const TERMINAL: &[&str] = &[
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "envoy.extensions.filters.network.direct_response.v3.Config",
        "envoy.extensions.filters.network.echo.v3.Echo",
        "envoy.extensions.filters.network.redis_proxy.v3.RedisProxy",
        "envoy.extensions.filters.network.thrift_proxy.v3.ThriftProxy",
        "envoy.extensions.filters.network.dubbo_proxy.v3.DubboProxy",
        "envoy.extensions.filters.network.generic_proxy.v3.GenericProxy",
        "envoy.extensions.filters.http.router.v3.Router",
    ];
    if TERMINAL.contains(&name) {
        Some(true)
    } else if name.starts_with("envoy.extensions.filters.")
        && pilotfish_api::descriptor_pool()
            .get_message_by_name(name)
            .is_some()
    {
        Some(false)
    } else {
        None
    }
}

fn check_terminal(items: &[(String, String)], at: &str, what: &str, out: &mut Vec<Finding>) {
    for (i, (name, type_url)) in items.iter().enumerate() {
        let last = i + 1 == items.len();
        match terminal(type_url) {
            Some(true) if !last => out.push((
                format!("{at}[{i}]"),
                format!(
                    "terminal filter named {name} must be the last filter in a {what} filter chain"
                ),
            )),
            Some(false) if last => out.push((
                format!("{at}[{i}]"),
                format!(
                    "non-terminal filter named {name} is the last filter in a {what} filter chain"
                ),
            )),
            _ => {}
        }
    }
}

fn check_http_filters(hcm: &HttpConnectionManager, at: &str, out: &mut Vec<Finding>) {
    let items: Vec<(String, String)> = hcm
        .http_filters
        .iter()
        .map(|f| {
            let t = match &f.config_type {
                Some(http_filter::ConfigType::TypedConfig(a)) => effective_type_url(a),
                _ => String::new(),
            };
            (f.name.clone(), t)
        })
        .collect();
    check_terminal(&items, &format!("{at}.http_filters"), "http", out);
}

fn check_network_filters(
    filters: &[pilotfish_api::pb::envoy::config::listener::v3::Filter],
    at: &str,
    out: &mut Vec<Finding>,
) {
    let items: Vec<(String, String)> = filters
        .iter()
        .map(|f| {
            let t = match &f.config_type {
                Some(filter::ConfigType::TypedConfig(a)) => effective_type_url(a),
                _ => String::new(),
            };
            (f.name.clone(), t)
        })
        .collect();
    check_terminal(&items, &format!("{at}.filters"), "network", out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use pilotfish_api::pb::google::protobuf::UInt32Value;

    fn cidr(a: &str, len: u32) -> CidrRange {
        CidrRange {
            address_prefix: a.into(),
            prefix_len: Some(UInt32Value { value: len }),
        }
    }

    fn conflicts(a: FilterChainMatch, b: FilterChainMatch) -> bool {
        let la: HashSet<Vec<String>> = match_leaves(&a).into_iter().collect();
        match_leaves(&b).into_iter().any(|l| la.contains(&l))
    }

    #[test]
    fn cidr_keys_mask_host_bits() {
        assert_eq!(cidr_key(&cidr("10.1.2.3", 8)), "10.0.0.0/8");
        assert_eq!(cidr_key(&cidr("10.1.2.3", 32)), "10.1.2.3/32");
        assert_eq!(cidr_key(&cidr("192.168.1.1", 0)), "0.0.0.0/0");
        assert_eq!(cidr_key(&cidr("2001:db8::1", 32)), "2001:db8::/32");
    }

    #[test]
    fn filter_chain_matches_conflict_only_on_a_shared_leaf() {
        let m = |f: fn(&mut FilterChainMatch)| {
            let mut x = FilterChainMatch::default();
            f(&mut x);
            x
        };
        // Identical and empty matches collide.
        assert!(conflicts(m(|_| {}), m(|_| {})));
        // Different ports do not.
        assert!(!conflicts(
            m(|x| x.destination_port = Some(UInt32Value { value: 80 })),
            m(|x| x.destination_port = Some(UInt32Value { value: 81 }))
        ));
        // A port and no port are different leaves (the port is more specific).
        assert!(!conflicts(
            m(|x| x.destination_port = Some(UInt32Value { value: 80 })),
            m(|_| {})
        ));
        // One shared server name is enough.
        assert!(conflicts(
            m(|x| x.server_names = vec!["a.com".into(), "b.com".into()]),
            m(|x| x.server_names = vec!["b.com".into(), "c.com".into()])
        ));
        assert!(!conflicts(
            m(|x| x.server_names = vec!["a.com".into()]),
            m(|x| x.server_names = vec!["*.a.com".into()])
        ));
        // Prefixes that mask to the same network collide.
        assert!(conflicts(
            m(|x| x.prefix_ranges = vec![cidr("10.1.0.0", 8)]),
            m(|x| x.prefix_ranges = vec![cidr("10.2.0.0", 8)])
        ));
        assert!(!conflicts(
            m(|x| x.prefix_ranges = vec![cidr("10.0.0.0", 8)]),
            m(|x| x.prefix_ranges = vec![cidr("10.0.0.0", 16)])
        ));
        // Transport protocol and ALPN tell chains apart (Istio's inbound tls/raw_buffer pairs).
        assert!(!conflicts(
            m(|x| x.transport_protocol = "tls".into()),
            m(|x| x.transport_protocol = "raw_buffer".into())
        ));
        assert!(!conflicts(
            m(|x| x.application_protocols = vec!["istio-http/1.1".into()]),
            m(|x| x.application_protocols = vec!["h2c".into()])
        ));
        assert!(conflicts(
            m(|x| x.application_protocols = vec!["h2".into(), "http/1.1".into()]),
            m(|x| x.application_protocols = vec!["http/1.1".into()])
        ));
        // Source type, source ports and source prefixes are dimensions of their own.
        assert!(!conflicts(
            m(|x| x.source_type = 1),
            m(|x| x.source_type = 2)
        ));
        assert!(!conflicts(
            m(|x| x.source_ports = vec![1000]),
            m(|x| x.source_ports = vec![1001])
        ));
        assert!(conflicts(
            m(|x| x.source_ports = vec![1000, 1001]),
            m(|x| x.source_ports = vec![1001])
        ));
        assert!(!conflicts(
            m(|x| x.direct_source_prefix_ranges = vec![cidr("1.1.1.1", 32)]),
            m(|x| x.source_prefix_ranges = vec![cidr("1.1.1.1", 32)])
        ));
    }

    #[test]
    fn terminal_filters_are_known_by_type() {
        assert_eq!(
            terminal("type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"),
            Some(true)
        );
        assert_eq!(
            terminal("type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"),
            Some(true)
        );
        assert_eq!(
            terminal("type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"),
            Some(false)
        );
        // Types pilotfish has no schema for are not judged.
        assert_eq!(terminal("type.googleapis.com/acme.Magic"), None);
        assert_eq!(
            terminal(
                "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig"
            ),
            None
        );
    }

    #[test]
    fn duplicate_domains_are_found_case_insensitively() {
        use pilotfish_api::pb::envoy::config::route::v3::VirtualHost;
        let vh = |n: &str, d: &[&str]| VirtualHost {
            name: n.into(),
            domains: d.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let rc = RouteConfiguration {
            name: "r".into(),
            virtual_hosts: vec![vh("a", &["Foo.com", "bar.com"]), vh("b", &["foo.com"])],
            ..Default::default()
        };
        let mut out = vec![];
        check_route_config(&rc, "rc", &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, "rc.virtual_hosts[1].domains[0]");
        let rc = RouteConfiguration {
            name: "r".into(),
            virtual_hosts: vec![vh("a", &["foo.com"]), vh("b", &["foo.com:80"])],
            ..Default::default()
        };
        let mut out = vec![];
        check_route_config(&rc, "rc", &mut out);
        assert!(out.is_empty());
    }
}
