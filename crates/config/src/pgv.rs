//! Envoy's API constraints (protoc-gen-validate `validate.rules` annotations), checked the way
//! Envoy checks them on every resource and extension config: read from the descriptors
//! themselves, so every message of the API is covered without a hand-written rule.

use crate::walk::Node;
use pilotfish_api::descriptor_pool;
use pilotfish_api::prost_reflect::{
    DynamicMessage, ExtensionDescriptor, FieldDescriptor, Kind, ReflectMessage, Value,
};
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Clone)]
struct Exts {
    field_rules: ExtensionDescriptor,
    oneof_required: ExtensionDescriptor,
    message_disabled: ExtensionDescriptor,
}

/// What the checks read from the descriptors, looked up once per field: decoding options is not
/// free and the walk asks for the same fields over and over. It holds the descriptor pool, so it
/// goes with it ([`release`]).
struct Caches {
    exts: Exts,
    rules: HashMap<String, Option<DynamicMessage>>,
    deprecated: HashMap<String, bool>,
}

static CACHES: Mutex<Option<Caches>> = Mutex::new(None);

fn with_caches<R>(f: impl FnOnce(&mut Caches) -> R) -> R {
    let mut caches = CACHES.lock().unwrap_or_else(|e| e.into_inner());
    let caches = caches.get_or_insert_with(|| {
        let pool = descriptor_pool();
        let get = |n: &str| {
            pool.get_extension_by_name(n)
                .unwrap_or_else(|| panic!("{n} in pool"))
        };
        Caches {
            exts: Exts {
                field_rules: get("validate.rules"),
                oneof_required: get("validate.required"),
                message_disabled: get("validate.disabled"),
            },
            rules: HashMap::new(),
            deprecated: HashMap::new(),
        }
    });
    f(caches)
}

/// Drops the caches and, with them, their hold on the descriptor pool.
pub(crate) fn release() {
    CACHES.lock().unwrap_or_else(|e| e.into_inner()).take();
}

fn exts() -> Exts {
    with_caches(|c| c.exts.clone())
}

fn rules_for(field: &FieldDescriptor) -> Option<DynamicMessage> {
    with_caches(|c| {
        if let Some(r) = c.rules.get(field.full_name()) {
            return r.clone();
        }
        let opts = field.options();
        let ext = &c.exts.field_rules;
        let r = if opts.has_extension(ext) {
            opts.get_extension(ext).as_message().cloned()
        } else {
            None
        };
        c.rules.insert(field.full_name().to_string(), r.clone());
        r
    })
}

/// Whether the API marks a field deprecated (`[deprecated = true]`).
pub fn is_deprecated(field: &FieldDescriptor) -> bool {
    with_caches(|c| {
        *c.deprecated
            .entry(field.full_name().to_string())
            .or_insert_with(|| {
                field
                    .options()
                    .get_field_by_name("deprecated")
                    .and_then(|v| v.as_bool())
                    == Some(true)
            })
    })
}

/// Checks one message's own fields; the walk brings every message.
pub fn check(node: &Node<'_>, out: &mut Vec<(String, String)>) {
    let msg = node.message;
    let desc = msg.descriptor();
    let mopts = desc.options();
    let exts = exts();
    if mopts.has_extension(&exts.message_disabled)
        && mopts.get_extension(&exts.message_disabled).as_bool() == Some(true)
    {
        return;
    }
    for oneof in desc.oneofs() {
        let oopts = oneof.options();
        let required = oopts.has_extension(&exts.oneof_required)
            && oopts.get_extension(&exts.oneof_required).as_bool() == Some(true);
        if required && !oneof.fields().any(|f| msg.has_field(&f)) {
            let names: Vec<_> = oneof.fields().map(|f| f.name().to_string()).collect();
            out.push((
                node.path.to_string(),
                format!("one of {} is required", names.join(", ")),
            ));
        }
    }
    for field in desc.fields() {
        let Some(rules) = rules_for(&field) else {
            continue;
        };
        let path = crate::walk::join(node.path, field.name());
        let set = msg.has_field(&field);
        // A oneof member (or a proto3 `optional`) is only checked when it is the one set.
        if !set && field.containing_oneof().is_some() {
            continue;
        }
        let value = msg.get_field(&field);
        check_field(&field, &rules, set, &value, &path, out);
    }
}

fn check_field(
    field: &FieldDescriptor,
    rules: &DynamicMessage,
    set: bool,
    value: &Value,
    path: &str,
    out: &mut Vec<(String, String)>,
) {
    if let Some(m) = sub(rules, "message") {
        if flag(&m, "required") && !set {
            out.push((path.to_string(), "value is required".into()));
            return;
        }
    }
    let Some((kind, r)) = type_rules(rules) else {
        return;
    };
    match (kind.as_str(), value) {
        ("repeated", Value::List(items)) => {
            if flag(&r, "ignore_empty") && items.is_empty() {
                return;
            }
            if let Some(n) = uint(&r, "min_items") {
                if (items.len() as u64) < n {
                    out.push((
                        path.into(),
                        format!("value must contain at least {n} item(s)"),
                    ));
                }
            }
            if let Some(n) = uint(&r, "max_items") {
                if items.len() as u64 > n {
                    out.push((
                        path.into(),
                        format!("value must contain no more than {n} item(s)"),
                    ));
                }
            }
            if flag(&r, "unique") {
                for (i, a) in items.iter().enumerate() {
                    if items[..i].contains(a) {
                        out.push((
                            format!("{path}[{i}]"),
                            "repeated value must contain unique items".into(),
                        ));
                    }
                }
            }
            if let Some(item_rules) = sub(&r, "items") {
                for (i, item) in items.iter().enumerate() {
                    check_field(field, &item_rules, true, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        ("map", Value::Map(map)) => {
            if flag(&r, "ignore_empty") && map.is_empty() {
                return;
            }
            if let Some(n) = uint(&r, "min_pairs") {
                if (map.len() as u64) < n {
                    out.push((
                        path.into(),
                        format!("value must contain at least {n} pair(s)"),
                    ));
                }
            }
        }
        ("string", Value::String(s)) => check_string(&r, s, path, out),
        ("bytes", Value::Bytes(b)) => {
            if let Some(n) = uint(&r, "min_len") {
                if (b.len() as u64) < n {
                    out.push((
                        path.into(),
                        format!("value length must be at least {n} bytes"),
                    ));
                }
            }
        }
        ("enum", Value::EnumNumber(n)) => {
            if flag(&r, "defined_only") {
                if let Kind::Enum(e) = field.kind() {
                    if e.get_value(*n).is_none() {
                        out.push((
                            path.into(),
                            format!("value must be one of the defined enum values (got {n})"),
                        ));
                    }
                }
            }
            if let Some(Value::List(not_in)) = r.get_field_by_name("not_in").as_deref() {
                if not_in.contains(&Value::I32(*n)) {
                    out.push((path.into(), format!("value must not be in list {not_in:?}")));
                }
            }
        }
        ("duration", Value::Message(d)) => {
            if flag(&r, "required") && !set {
                out.push((path.into(), "value is required".into()));
                return;
            }
            if set {
                check_bounds(&r, duration_secs(d), path, out, format_duration);
            }
        }
        ("duration", _) => {}
        ("any", _) => {
            if flag(&r, "required") && !set {
                out.push((path.into(), "value is required".into()));
            }
        }
        ("timestamp", _) => {}
        (_, Value::Message(wrapper)) => {
            // Scalar rules on a wrapper (UInt32Value, ...) apply to the wrapped value when set.
            if set {
                if let Some(inner) = wrapper.get_field_by_name("value") {
                    if let Some(n) = number(&inner) {
                        check_bounds(&r, n, path, out, fmt_num);
                    } else if let Value::String(s) = inner.as_ref() {
                        if kind == "string" {
                            check_string(&r, s, path, out);
                        }
                    }
                }
            }
        }
        (_, v) => {
            if let Some(n) = number(v) {
                check_bounds(&r, n, path, out, fmt_num);
            }
        }
    }
}

fn check_string(r: &DynamicMessage, s: &str, path: &str, out: &mut Vec<(String, String)>) {
    if flag(r, "ignore_empty") && s.is_empty() {
        return;
    }
    let chars = s.chars().count() as u64;
    if let Some(n) = uint(r, "min_len") {
        if chars < n {
            out.push((
                path.into(),
                format!("value length must be at least {n} characters"),
            ));
        }
    }
    if let Some(n) = uint(r, "max_len") {
        if chars > n {
            out.push((
                path.into(),
                format!("value length must be at most {n} characters"),
            ));
        }
    }
    if let Some(n) = uint(r, "min_bytes") {
        if (s.len() as u64) < n {
            out.push((
                path.into(),
                format!("value length must be at least {n} bytes"),
            ));
        }
    }
    if let Some(n) = uint(r, "max_bytes") {
        if s.len() as u64 > n {
            out.push((
                path.into(),
                format!("value length must be at most {n} bytes"),
            ));
        }
    }
    if r.has_field_by_name("prefix") {
        if let Some(p) = r
            .get_field_by_name("prefix")
            .and_then(|v| v.as_str().map(str::to_string))
        {
            if !s.starts_with(&p) {
                out.push((path.into(), format!("value does not have prefix \"{p}\"")));
            }
        }
    }
    if let Some(Value::List(not_in)) = r.get_field_by_name("not_in").as_deref() {
        if not_in.iter().any(|v| v.as_str() == Some(s)) {
            out.push((path.into(), format!("value must not be in list {not_in:?}")));
        }
    }
    if r.has_field_by_name("well_known_regex") {
        let strict = !r.has_field_by_name("strict") || flag(r, "strict");
        let which = r
            .get_field_by_name("well_known_regex")
            .and_then(|v| v.as_enum_number());
        let bad = match which {
            // RFC 7230 token, optionally with the ':' of a pseudo-header.
            Some(1) if strict => !valid_header_name(s),
            Some(2) if strict => s.bytes().any(|b| b == 0 || b == b'\r' || b == b'\n'),
            Some(1) | Some(2) => s.bytes().any(|b| b == 0 || b == b'\r' || b == b'\n'),
            _ => false,
        };
        if bad {
            out.push((
                path.into(),
                "value does not match regex pattern for HTTP headers".into(),
            ));
        }
    }
    if flag(r, "address") && s.parse::<std::net::IpAddr>().is_err() && !valid_hostname(s) {
        out.push((
            path.into(),
            "value must be a valid hostname, or ip address".into(),
        ));
    }
    if flag(r, "ip") && s.parse::<std::net::IpAddr>().is_err() {
        out.push((path.into(), "value must be a valid IP address".into()));
    }
}

fn valid_header_name(s: &str) -> bool {
    let body = s.strip_prefix(':').unwrap_or(s);
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn valid_hostname(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn check_bounds(
    r: &DynamicMessage,
    v: f64,
    path: &str,
    out: &mut Vec<(String, String)>,
    show: impl Fn(f64) -> String,
) {
    let bound = |name: &str| -> Option<f64> {
        if !r.has_field_by_name(name) {
            return None;
        }
        let b = r.get_field_by_name(name)?;
        match b.as_ref() {
            Value::Message(d) => Some(duration_secs(d)),
            other => number(other),
        }
    };
    let (gt, gte, lt, lte) = (bound("gt"), bound("gte"), bound("lt"), bound("lte"));
    let lower_ok = gt.is_none_or(|b| v > b) && gte.is_none_or(|b| v >= b);
    let upper_ok = lt.is_none_or(|b| v < b) && lte.is_none_or(|b| v <= b);
    if lower_ok && upper_ok {
        return;
    }
    let mut parts = vec![];
    if let Some(b) = gt {
        parts.push(format!("greater than {}", show(b)));
    }
    if let Some(b) = gte {
        parts.push(format!("greater than or equal to {}", show(b)));
    }
    if let Some(b) = lt {
        parts.push(format!("less than {}", show(b)));
    }
    if let Some(b) = lte {
        parts.push(format!("less than or equal to {}", show(b)));
    }
    out.push((
        path.into(),
        format!("value must be {} (got {})", parts.join(" and "), show(v)),
    ));
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn format_duration(v: f64) -> String {
    format!("{}s", fmt_num(v))
}

fn duration_secs(d: &DynamicMessage) -> f64 {
    let s = d
        .get_field_by_name("seconds")
        .and_then(|v| v.as_i64())
        .unwrap_or(0);
    let n = d
        .get_field_by_name("nanos")
        .and_then(|v| v.as_i32())
        .unwrap_or(0);
    s as f64 + n as f64 / 1e9
}

fn number(v: &Value) -> Option<f64> {
    Some(match v {
        Value::I32(n) => *n as f64,
        Value::I64(n) => *n as f64,
        Value::U32(n) => *n as f64,
        Value::U64(n) => *n as f64,
        Value::F32(n) => *n as f64,
        Value::F64(n) => *n,
        _ => return None,
    })
}

fn sub(m: &DynamicMessage, name: &str) -> Option<DynamicMessage> {
    if m.has_field_by_name(name) {
        m.get_field_by_name(name)?.as_message().cloned()
    } else {
        None
    }
}

fn flag(m: &DynamicMessage, name: &str) -> bool {
    m.has_field_by_name(name) && m.get_field_by_name(name).and_then(|v| v.as_bool()) == Some(true)
}

fn uint(m: &DynamicMessage, name: &str) -> Option<u64> {
    if m.has_field_by_name(name) {
        m.get_field_by_name(name)?.as_u64()
    } else {
        None
    }
}

/// The one `type` rule set (string, uint32, repeated, ...) a FieldRules carries.
fn type_rules(rules: &DynamicMessage) -> Option<(String, DynamicMessage)> {
    let oneof = rules.descriptor().oneofs().find(|o| o.name() == "type")?;
    for f in oneof.fields() {
        if rules.has_field(&f) {
            return Some((
                f.name().to_string(),
                rules.get_field(&f).as_message()?.clone(),
            ));
        }
    }
    None
}
