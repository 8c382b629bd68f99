//! `pilotfish route-check`: Envoy's router_check_tool, on pilotfish's router. Same inputs (a route
//! configuration, and a tests file in the tool's schema, JSON or YAML), same assertions, same
//! output lines (`expected: [..], actual: [..], test type: ..`), same coverage report and exit
//! codes, so suites written for Envoy's tool run unchanged.

use pilotfish_api::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValueOption,
};
use pilotfish_api::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, route, HeaderMatcher, RouteConfiguration,
};
use pilotfish_api::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use pilotfish_decide::matcher::CompiledHeaderMatcher;
use pilotfish_decide::router::{Action, Request, RouteDecision, RouteTable, Runtime};
use serde_json::Value;
use std::collections::BTreeMap;

pub struct Options {
    pub details: bool,
    pub only_show_failures: bool,
    pub fail_under: f64,
    pub covall: bool,
    pub detailed_coverage: bool,
}

/// Runs the tests; returns the process exit code.
pub fn run(config_path: &str, tests_path: &str, opts: &Options) -> u8 {
    let text = match std::fs::read_to_string(config_path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {config_path}: {e}");
            return 1;
        }
    };
    let rc: RouteConfiguration = match pilotfish_config::load_message(config_path, &text) {
        Ok(rc) => rc,
        Err(errors) => {
            // Envoy's wording, so scripts that look for it keep working.
            for e in &errors.0 {
                eprintln!("Unable to parse JSON as proto (INVALID_ARGUMENT: {e}) for envoy.config.route.v3.RouteConfiguration");
            }
            return 1;
        }
    };
    let table = match RouteTable::new(&rc) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {config_path}: {e}");
            return 1;
        }
    };
    let tests = match read_tests(tests_path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {tests_path}: {e}");
            return 1;
        }
    };
    let mut coverage = Coverage::default();
    let mut all_passed = true;
    for test in &tests {
        let name = test["test_name"].as_str().unwrap_or("");
        let failures = run_test(&table, test, &mut coverage);
        all_passed &= failures.is_empty();
        if (opts.details && !opts.only_show_failures)
            || (opts.only_show_failures && !failures.is_empty())
        {
            println!("{name}");
            for f in &failures {
                eprintln!("{f}");
            }
        }
    }
    let mut code = if all_passed { 0 } else { 1 };
    if opts.fail_under > 0.0 || opts.covall || opts.detailed_coverage {
        let percent = coverage.report(
            &table,
            opts.covall || opts.detailed_coverage,
            opts.detailed_coverage,
        );
        println!("Current route coverage: {}%", cpp_double(percent));
        if opts.fail_under > 0.0 && percent < opts.fail_under {
            eprintln!(
                "Failed to meet coverage requirement: {}%",
                cpp_double(opts.fail_under)
            );
            code = 1;
        }
    }
    code
}

/// A double the way C++ streams print one by default (6 significant digits, no trailing zeros).
fn cpp_double(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e6 {
        return format!("{}", v as i64);
    }
    let digits = 6 - (v.abs().log10().floor() as i32 + 1);
    let s = format!("{:.*}", digits.max(0) as usize, v);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn read_tests(path: &str) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let doc: Value = if path.ends_with(".yaml") || path.ends_with(".yml") {
        serde_yaml_ng::from_str(&text).map_err(|e| e.to_string())?
    } else {
        serde_json::from_str(&text).map_err(|e| e.to_string())?
    };
    match doc.get("tests").and_then(Value::as_array) {
        Some(t) => Ok(t.clone()),
        None => Err(
            "no 'tests' list (router_check_tool's schema: {tests: [{test_name, input, validate}]})"
                .into(),
        ),
    }
}

fn header_pairs(v: &Value) -> Vec<(String, String)> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            (
                h["key"]
                    .as_str()
                    .or(h["field"].as_str())
                    .unwrap_or("")
                    .to_string(),
                h["value"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn request_of(input: &Value) -> Request {
    let mut req = Request::new(
        input["authority"].as_str().unwrap_or(""),
        input["path"].as_str().unwrap_or(""),
    );
    req.method = input["method"].as_str().unwrap_or("GET").to_string();
    req.scheme = if input["ssl"].as_bool().unwrap_or(false) {
        "https"
    } else {
        "http"
    }
    .to_string();
    req.internal = input["internal"].as_bool().unwrap_or(false);
    req.random_value = input["random_value"].as_u64().unwrap_or(0);
    req.runtime = Runtime::EnabledKeys(
        input["runtime"]
            .as_str()
            .map(|k| vec![k.to_string()])
            .unwrap_or_default(),
    );
    req.headers
        .push(("x-forwarded-proto".into(), req.scheme.clone()));
    if req.internal {
        req.headers.push(("x-envoy-internal".into(), "true".into()));
    }
    for key in ["additional_request_headers", "additional_headers"] {
        for (k, v) in header_pairs(&input[key]) {
            req.headers.push((k.to_ascii_lowercase(), v));
        }
    }
    req
}

/// Headers after Envoy's header mutations for a route: route configuration, then virtual host,
/// then route (the most specific level applied last), then removals.
fn mutate(headers: &mut Vec<(String, String)>, levels: &[(&[HeaderValueOption], &[String])]) {
    for (adds, _) in levels {
        for add in adds.iter() {
            let Some(h) = &add.header else { continue };
            let key = h.key.to_ascii_lowercase();
            let value = h
                .value
                .replace("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "127.0.0.1")
                .replace("%DOWNSTREAM_REMOTE_ADDRESS%", "127.0.0.1:0");
            #[allow(deprecated)]
            let overwrite = add.append.as_ref().is_some_and(|a| !a.value)
                || add.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32
                || (add.append_action == HeaderAppendAction::AddIfAbsent as i32
                    && headers.iter().any(|(k, _)| *k == key));
            if add.append_action == HeaderAppendAction::AddIfAbsent as i32
                && headers.iter().any(|(k, _)| *k == key)
            {
                continue;
            }
            if overwrite {
                headers.retain(|(k, _)| *k != key);
            }
            headers.push((key, value));
        }
    }
    for (_, removes) in levels {
        for r in removes.iter() {
            headers.retain(|(k, _)| !k.eq_ignore_ascii_case(r));
        }
    }
}

fn get(headers: &[(String, String)], name: &str) -> Option<String> {
    let vals: Vec<&str> = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect();
    (!vals.is_empty()).then(|| vals.join(","))
}

struct Outcome<'a> {
    table: &'a RouteTable,
    d: RouteDecision,
    req: Request,
    failures: Vec<String>,
}

impl Outcome<'_> {
    fn compare(&mut self, actual: &str, expected: &str, test_type: &str) -> bool {
        if actual == expected {
            return true;
        }
        self.failures.push(format!(
            "expected: [{expected}], actual: [{actual}], test type: {test_type}"
        ));
        false
    }

    fn forwarding(&self) -> bool {
        matches!(self.d.action, Action::Forward { .. }) && self.d.route_index.is_some()
    }

    /// The request headers as the upstream would get them (empty when the route does not forward).
    fn request_headers(&self) -> Vec<(String, String)> {
        let Action::Forward { path, host, .. } = &self.d.action else {
            return vec![];
        };
        let mut h = vec![
            (":authority".to_string(), host.clone()),
            (":path".to_string(), path.clone()),
            (":method".to_string(), self.req.method.clone()),
        ];
        h.extend(self.req.headers.iter().cloned());
        let rc = &self.table.config;
        let vh = &rc.virtual_hosts[self.d.virtual_host_index.unwrap()];
        let r = &vh.routes[self.d.route_index.unwrap()];
        mutate(
            &mut h,
            &[
                (&rc.request_headers_to_add, &rc.request_headers_to_remove),
                (&vh.request_headers_to_add, &vh.request_headers_to_remove),
                (&r.request_headers_to_add, &r.request_headers_to_remove),
            ],
        );
        h
    }

    fn response_headers(&self, input: &Value) -> Vec<(String, String)> {
        let mut h: Vec<(String, String)> = header_pairs(&input["additional_response_headers"])
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        // A direct response with a body carries it as text/plain, before any header mutation.
        if let Action::DirectResponse { body, .. } = &self.d.action {
            if !body.is_empty() {
                h.push(("content-type".into(), "text/plain".into()));
                h.push(("content-length".into(), body.len().to_string()));
            }
        }
        if let (Some(vi), Some(ri)) = (self.d.virtual_host_index, self.d.route_index) {
            let rc = &self.table.config;
            let vh = &rc.virtual_hosts[vi];
            let r = &vh.routes[ri];
            mutate(
                &mut h,
                &[
                    (&rc.response_headers_to_add, &rc.response_headers_to_remove),
                    (&vh.response_headers_to_add, &vh.response_headers_to_remove),
                    (&r.response_headers_to_add, &r.response_headers_to_remove),
                ],
            );
        }
        h
    }

    #[allow(deprecated)]
    fn header_matches(
        &mut self,
        matchers: &Value,
        headers: &[(String, String)],
        kind: &str,
    ) -> bool {
        let mut ok = true;
        for m in matchers.as_array().into_iter().flatten() {
            let hm: HeaderMatcher =
                match pilotfish_config::load_message("header matcher.json", &m.to_string()) {
                    Ok(h) => h,
                    Err(e) => {
                        self.failures.push(format!("invalid {kind} entry: {e}"));
                        ok = false;
                        continue;
                    }
                };
            let Ok(compiled) = CompiledHeaderMatcher::new(&hm) else {
                continue;
            };
            let actual = get(headers, &hm.name);
            if compiled.matches(actual.as_deref()) {
                continue;
            }
            ok = false;
            let name = &hm.name;
            let not = if hm.invert_match { "NOT " } else { "" };
            let shown = actual.clone().unwrap_or_default();
            self.failures.push(match &hm.header_match_specifier {
                Some(HeaderMatchSpecifier::PresentMatch(p)) => {
                    let want = *p != hm.invert_match;
                    format!("expected: [has({name}):{want}], actual: [has({name}):{}], test type: {kind}.present_match", actual.is_some())
                }
                Some(HeaderMatchSpecifier::RangeMatch(_)) => format!("actual: [{name}: {shown}], test type: {kind}.range_match"),
                Some(HeaderMatchSpecifier::ExactMatch(e)) => string_failure(name, e, not, &actual, kind, "exact"),
                Some(HeaderMatchSpecifier::StringMatch(sm)) => {
                    let (what, v) = match &sm.match_pattern {
                        Some(MatchPattern::Exact(v)) => ("exact", v.clone()),
                        Some(MatchPattern::Prefix(v)) => ("prefix", v.clone()),
                        Some(MatchPattern::Suffix(v)) => ("suffix", v.clone()),
                        Some(MatchPattern::Contains(v)) => ("contains", v.clone()),
                        Some(MatchPattern::SafeRegex(r)) => ("safe_regex", r.regex.clone()),
                        _ => ("custom", String::new()),
                    };
                    string_failure(name, &v, not, &actual, kind, what)
                }
                _ => format!("expected: [{name}: {}], actual: [{name}: {shown}], test type: {kind}", compiled.describe()),
            });
        }
        ok
    }
}

fn string_failure(
    name: &str,
    expected: &str,
    not: &str,
    actual: &Option<String>,
    kind: &str,
    what: &str,
) -> String {
    // An inverted matcher failed because the value is exactly what it must not be.
    if !not.is_empty() {
        return format!("expected: [{name}: {expected}], actual: NOT [{name}: {expected}], test type: {kind}.string_match.{what}");
    }
    format!("expected: [{name}: {expected}], actual: [{name}: {}], test type: {kind}.string_match.{what}", actual.clone().unwrap_or_default())
}

fn run_test(table: &RouteTable, test: &Value, coverage: &mut Coverage) -> Vec<String> {
    let req = request_of(&test["input"]);
    let d = table.route(&req);
    let mut o = Outcome {
        table,
        d,
        req,
        failures: vec![],
    };
    let v = &test["validate"];
    let expected = |k: &str| {
        v.get(k).and_then(|x| {
            x.as_str()
                .map(str::to_string)
                .or_else(|| x.get("value").and_then(Value::as_str).map(str::to_string))
        })
    };
    let entry =
        o.d.virtual_host_index
            .zip(o.d.route_index)
            .map(|(vi, ri)| (vi, ri, o.d.weighted_index.unwrap_or(0)));
    let forwarding = o.forwarding();
    let mut mark = |field: usize, o: &Outcome| {
        if let Some(e) = entry {
            coverage.mark(e, field, o.forwarding());
        }
    };
    if let Some(want) = expected("cluster_name") {
        let actual = match &o.d.action {
            Action::Forward { cluster, .. } if forwarding => cluster.clone(),
            _ => String::new(),
        };
        if o.compare(&actual, &want, "cluster_name") {
            mark(0, &o);
        }
    }
    if let Some(want) = expected("virtual_cluster_name") {
        let actual = if forwarding {
            o.d.virtual_cluster.clone().unwrap_or_default()
        } else {
            String::new()
        };
        if o.compare(&actual, &want, "virtual_cluster_name") {
            mark(1, &o);
        }
    }
    if let Some(want) = expected("virtual_host_name") {
        let actual = if forwarding {
            o.d.virtual_host.clone().unwrap_or_default()
        } else {
            String::new()
        };
        if o.compare(&actual, &want, "virtual_host_name") {
            mark(2, &o);
        }
    }
    if let Some(want) = expected("path_rewrite") {
        let actual = match &o.d.action {
            Action::Forward { path, .. } if forwarding => {
                get(&o.request_headers(), ":path").unwrap_or(path.clone())
            }
            _ => String::new(),
        };
        if o.compare(&actual, &want, "path_rewrite") {
            mark(3, &o);
        }
    }
    if let Some(want) = expected("host_rewrite") {
        let actual = match &o.d.action {
            Action::Forward { host, .. } if forwarding => {
                get(&o.request_headers(), ":authority").unwrap_or(host.clone())
            }
            _ => String::new(),
        };
        if o.compare(&actual, &want, "host_rewrite") {
            mark(4, &o);
        }
    }
    if let Some(want) = expected("path_redirect") {
        let actual = match &o.d.action {
            Action::Redirect { location, .. } => location.clone(),
            // Envoy's tool asks a direct response for its "new path": the request's own URL.
            Action::DirectResponse { .. } => {
                format!("{}://{}{}", o.req.scheme, o.req.authority, o.req.path)
            }
            _ => String::new(),
        };
        if o.compare(&actual, &want, "path_redirect") {
            mark(0, &o);
        }
    }
    if let Some(want) = v
        .get("code_redirect")
        .and_then(|c| c.as_u64().or_else(|| c.get("value")?.as_u64()))
    {
        let actual = match &o.d.action {
            Action::Redirect { code, .. } => code.to_string(),
            _ => "0".into(),
        };
        o.compare(&actual, &want.to_string(), "code_redirect");
    }
    for (k, want) in header_pairs(&v["header_fields"]) {
        let actual = get(&o.request_headers(), &k).unwrap_or_default();
        o.compare(&actual, &want, "check_header");
    }
    for (k, want) in header_pairs(&v["custom_header_fields"]) {
        let actual = if forwarding {
            get(&o.request_headers(), &k).unwrap_or_default()
        } else {
            String::new()
        };
        o.compare(&actual, &want, "custom_header");
    }
    if v.get("request_header_matches").is_some() {
        let headers = o.request_headers();
        o.header_matches(
            &v["request_header_matches"],
            &headers,
            "request_header_matches",
        );
    }
    if v.get("response_header_matches").is_some() {
        let headers = o.response_headers(&test["input"]);
        o.header_matches(
            &v["response_header_matches"],
            &headers,
            "response_header_matches",
        );
    }
    o.failures
}

/// Which fields of which route entries some test asserted and passed, as Envoy's tool counts
/// them: a forwarding entry has five (cluster, virtual cluster, virtual host, path rewrite, host
/// rewrite), a redirect or direct response one; each weighted cluster is an entry of its own.
#[derive(Default)]
struct Coverage {
    entries: BTreeMap<(usize, usize, usize), (bool, [bool; 5])>,
}

impl Coverage {
    fn mark(&mut self, entry: (usize, usize, usize), field: usize, forwarding: bool) {
        let e = self
            .entries
            .entry(entry)
            .or_insert((forwarding, [false; 5]));
        e.1[field] = true;
    }

    fn report(&self, table: &RouteTable, comprehensive: bool, by_name: bool) -> f64 {
        let mut total = 0usize;
        for vh in &table.config.virtual_hosts {
            for r in &vh.routes {
                total += match &r.action {
                    Some(route::Action::Route(ra)) => match &ra.cluster_specifier {
                        Some(pilotfish_api::pb::envoy::config::route::v3::route_action::ClusterSpecifier::WeightedClusters(w)) => w.clusters.len(),
                        _ => 1,
                    },
                    _ => 1,
                };
            }
        }
        let total = total.max(1) as f64;
        if !comprehensive {
            return 100.0 * self.entries.len() as f64 / total;
        }
        let mut sum = 0.0;
        for (forwarding, fields) in self.entries.values() {
            let n = if *forwarding { 5 } else { 1 };
            sum += fields[..n].iter().filter(|f| **f).count() as f64 / n as f64;
        }
        for (vi, vh) in table.config.virtual_hosts.iter().enumerate() {
            for (ri, r) in vh.routes.iter().enumerate() {
                if self.entries.keys().any(|(v, rr, _)| *v == vi && *rr == ri) {
                    continue;
                }
                if by_name {
                    // Envoy's tool gives every route a unique name (name-uuid) before it runs.
                    println!(
                        "Missing test for host: {}, route name: {}-{vi}.{ri}",
                        vh.name, r.name
                    );
                } else {
                    println!(
                        "Missing test for host: {}, route: {}",
                        vh.name,
                        match_text(r)
                    );
                }
            }
        }
        100.0 * sum / total
    }
}

/// The route's match in protobuf text format, as Envoy's tool prints it (`prefix: "/"`).
fn match_text(r: &pilotfish_api::pb::envoy::config::route::v3::Route) -> String {
    use pilotfish_api::prost_reflect::DynamicMessage;
    use prost::Message;
    let m = r.r#match.clone().unwrap_or_default();
    let desc = pilotfish_api::descriptor_pool()
        .get_message_by_name("envoy.config.route.v3.RouteMatch")
        .expect("RouteMatch");
    let dm = DynamicMessage::decode(desc, m.encode_to_vec().as_slice()).expect("re-decode");
    let mut out = String::new();
    text_format(&dm, 0, &mut out);
    out.trim_end().to_string()
}

fn text_format(m: &pilotfish_api::prost_reflect::DynamicMessage, indent: usize, out: &mut String) {
    use pilotfish_api::prost_reflect::Value as V;
    let pad = " ".repeat(indent);
    let mut fields: Vec<_> = m.fields().collect();
    fields.sort_by_key(|(f, _)| f.number());
    for (f, v) in fields {
        let items: Vec<&V> = match v {
            V::List(l) => l.iter().collect(),
            other => vec![other],
        };
        for item in items {
            match item {
                V::Message(inner) => {
                    out.push_str(&format!("{pad}{} {{\n", f.name()));
                    text_format(inner, indent + 2, out);
                    out.push_str(&format!("{pad}}}\n"));
                }
                V::String(s) => {
                    out.push_str(&format!("{pad}{}: \"{}\"\n", f.name(), s.escape_default()))
                }
                V::EnumNumber(n) => {
                    let name = match f.kind() {
                        pilotfish_api::prost_reflect::Kind::Enum(e) => e
                            .get_value(*n)
                            .map_or(n.to_string(), |v| v.name().to_string()),
                        _ => n.to_string(),
                    };
                    out.push_str(&format!("{pad}{}: {name}\n", f.name()));
                }
                V::Bool(b) => out.push_str(&format!("{pad}{}: {b}\n", f.name())),
                V::I32(n) => out.push_str(&format!("{pad}{}: {n}\n", f.name())),
                V::I64(n) => out.push_str(&format!("{pad}{}: {n}\n", f.name())),
                V::U32(n) => out.push_str(&format!("{pad}{}: {n}\n", f.name())),
                V::U64(n) => out.push_str(&format!("{pad}{}: {n}\n", f.name())),
                other => out.push_str(&format!("{pad}{}: {other:?}\n", f.name())),
            }
        }
    }
}
