//! Text to protobuf: YAML or JSON in the proto3 JSON mapping, streamed straight into a
//! `DynamicMessage` so that errors keep the parser's line and column and the path inside the
//! document (`static_resources.listeners[3].filter_chains[1]`).
//!
//! `typed_config` Anys resolve by type URL against [`pilotfish_api::descriptor_pool`]. A type URL
//! outside the namespaces Envoy itself owns that the pool does not know (a vendor's extension) is
//! kept opaque as [`pilotfish_api::OPAQUE_ANY_TYPE`] holding its JSON, and reported; an unknown
//! type in Envoy's own namespaces is an error, as it is for Envoy.

use crate::error::ConfigError;
use pilotfish_api::prost_reflect::{DeserializeOptions, DynamicMessage, Kind, MessageDescriptor};
use pilotfish_api::{descriptor_pool, type_url_message_name, OPAQUE_ANY_TYPE};
use regex::Regex;
use std::collections::BTreeSet;
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
}

impl Format {
    /// By extension as Envoy does; content decides when the extension says nothing.
    pub fn detect(file: &str, text: &str) -> Format {
        let lower = file.to_ascii_lowercase();
        if lower.ends_with(".json") {
            Format::Json
        } else if lower.ends_with(".yaml") || lower.ends_with(".yml") {
            Format::Yaml
        } else if text.trim_start().starts_with('{') {
            Format::Json
        } else {
            Format::Yaml
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentKind {
    /// `envoy.config.bootstrap.v3.Bootstrap`, what `envoy -c` reads.
    Bootstrap,
    /// `envoy.admin.v3.ConfigDump`, what `/config_dump` prints.
    ConfigDump,
}

impl DocumentKind {
    pub fn message_name(self) -> &'static str {
        match self {
            DocumentKind::Bootstrap => "envoy.config.bootstrap.v3.Bootstrap",
            DocumentKind::ConfigDump => "envoy.admin.v3.ConfigDump",
        }
    }

    /// A dump is recognised by its admin wrapper types; nothing in a bootstrap names them.
    pub fn detect(text: &str) -> DocumentKind {
        if text.contains("envoy.admin.v3.") && text.contains("configs") {
            DocumentKind::ConfigDump
        } else {
            DocumentKind::Bootstrap
        }
    }
}

/// A parsed document and what was kept opaque in it.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub message: DynamicMessage,
    /// Type URLs kept as opaque JSON because pilotfish has no schema for them.
    pub opaque_types: BTreeSet<String>,
}

/// Namespaces whose types Envoy's own API defines: an unknown type there is a typo or a type from
/// a newer API, and Envoy rejects it.
fn is_envoy_namespace(message_name: &str) -> bool {
    ["envoy.", "google.", "udpa.", "xds.", "validate."]
        .iter()
        .any(|p| message_name.starts_with(p))
}

fn type_url_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r#"["']?@type["']?\s*:\s*["']?([A-Za-z0-9_./-]+)"#).unwrap())
}

/// Parses `text` as the message named `message_name` (opaque types are an error here).
pub fn parse_as(
    file: &str,
    text: &str,
    format: Format,
    message_name: &str,
) -> Result<DynamicMessage, ConfigError> {
    let desc = descriptor_pool()
        .get_message_by_name(message_name)
        .expect("message in pool");
    parse_message(file, text, format, desc).map(|p| p.message)
}

pub fn parse(
    file: &str,
    text: &str,
    format: Format,
    kind: DocumentKind,
) -> Result<Parsed, ConfigError> {
    let desc = descriptor_pool()
        .get_message_by_name(kind.message_name())
        .expect("root message in pool");
    parse_message(file, text, format, desc)
}

fn parse_message(
    file: &str,
    text: &str,
    format: Format,
    desc: MessageDescriptor,
) -> Result<Parsed, ConfigError> {
    let pool = descriptor_pool();
    let opaque: BTreeSet<String> = type_url_regex()
        .captures_iter(text)
        .map(|c| c[1].to_string())
        .filter(|url| {
            let name = type_url_message_name(url);
            pool.get_message_by_name(name).is_none() && !is_envoy_namespace(name)
        })
        .collect();
    let streamed = if opaque.is_empty() {
        match format {
            Format::Json => stream_json(file, text, desc.clone()),
            Format::Yaml => stream_yaml(file, text, desc.clone()),
        }
    } else {
        Err(ConfigError::new(file, "", "opaque types present"))
    };
    let message = match streamed {
        Ok(m) => m,
        Err(stream_error) => {
            // The slower path: a JSON tree, brought into the canonical mapping first (opaque Anys
            // wrapped; the forms Envoy accepts beyond proto3 JSON rewritten). Line numbers are lost
            // here, so when this fails too the streaming error is the one reported.
            let tree = match format {
                Format::Json => serde_json::from_str(text).map_err(|e| json_error(file, "", e)),
                Format::Yaml => serde_yaml_ng::from_str(text).map_err(|e| yaml_error(file, "", e)),
            };
            let mut value: serde_json::Value = match tree {
                Ok(v) => v,
                // A syntax error: the streaming parser said it, with the path it had reached.
                Err(_) if opaque.is_empty() => return Err(stream_error),
                Err(e) => return Err(e),
            };
            normalize(&mut value, &desc, &opaque);
            let mut track = serde_path_to_error::Track::new();
            let de = serde_path_to_error::Deserializer::new(&value, &mut track);
            match DynamicMessage::deserialize_with_options(desc, de, &options()) {
                Ok(m) => m,
                Err(_) if opaque.is_empty() => return Err(stream_error),
                Err(e) => {
                    let path = path_string(track.path());
                    return Err(ConfigError::new(file, "", e.to_string()).with_path_from(path));
                }
            }
        }
    };
    Ok(Parsed {
        message,
        opaque_types: opaque,
    })
}

fn options() -> DeserializeOptions {
    DeserializeOptions::new().deny_unknown_fields(true)
}

fn path_string(path: serde_path_to_error::Path) -> String {
    // `?` marks where the parser stopped before it knew the key; the path up to it is what we know.
    let mut s = path.to_string();
    while let Some(stripped) = s.strip_suffix(".?").or_else(|| s.strip_suffix('?')) {
        s = stripped.to_string();
    }
    if s == "." {
        String::new()
    } else {
        s
    }
}

impl ConfigError {
    /// Sets the path, making the offending key part of it when the message names one (the
    /// deserializer rejects an unknown key before descending into it).
    fn with_path_from(mut self, mut path: String) -> Self {
        if let Some(key) = self
            .message
            .strip_prefix("unrecognized field name '")
            .and_then(|r| r.split('\'').next())
        {
            let key = key.to_string();
            if !path.ends_with(&format!(".{key}")) && path != key {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&key);
            }
            self.message = format!("unknown field '{key}'");
        }
        self.path = path;
        self
    }
}

fn stream_json(
    file: &str,
    text: &str,
    desc: MessageDescriptor,
) -> Result<DynamicMessage, ConfigError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let mut track = serde_path_to_error::Track::new();
    let result = DynamicMessage::deserialize_with_options(
        desc,
        serde_path_to_error::Deserializer::new(&mut de, &mut track),
        &options(),
    );
    match result {
        Ok(m) => {
            de.end().map_err(|e| json_error(file, "", e))?;
            Ok(m)
        }
        Err(e) => Err(json_error(file, "", e).with_path_from(path_string(track.path()))),
    }
}

fn stream_yaml(
    file: &str,
    text: &str,
    desc: MessageDescriptor,
) -> Result<DynamicMessage, ConfigError> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let mut track = serde_path_to_error::Track::new();
    let result = DynamicMessage::deserialize_with_options(
        desc,
        serde_path_to_error::Deserializer::new(de, &mut track),
        &options(),
    );
    result.map_err(|e| yaml_error(file, "", e).with_path_from(path_string(track.path())))
}

/// serde_json appends " at line L column C"; we report those as fields instead.
fn json_error(file: &str, path: &str, e: serde_json::Error) -> ConfigError {
    let mut msg = e.to_string();
    if let Some(i) = msg.rfind(" at line ") {
        msg.truncate(i);
    }
    let mut err = ConfigError::new(file, path, msg);
    if e.line() > 0 {
        err.line = Some((e.line(), e.column()));
    }
    err
}

/// serde_yaml_ng writes "PATH: message at line L column C"; path and position become fields.
fn yaml_error(file: &str, path: &str, e: serde_yaml_ng::Error) -> ConfigError {
    let mut msg = e.to_string();
    if let Some(i) = msg.rfind(" at line ") {
        msg.truncate(i);
    }
    // Its own path prefix duplicates ours (and is missing inside Anys); drop it.
    if let Some((head, rest)) = msg.split_once(": ") {
        if !head.contains(' ') && (head.contains('.') || head.contains('[')) {
            msg = rest.to_string();
        }
    }
    let mut err = ConfigError::new(file, path, msg);
    if let Some(loc) = e.location() {
        err.line = Some((loc.line(), loc.column()));
    }
    err
}

/// Walks a JSON tree alongside the schema, bringing it to what the proto3 JSON reader takes:
/// every Any whose type is in `opaque` becomes a `pilotfish.config.v1.OpaqueAny` holding the
/// original type URL and JSON; and the forms Envoy's own loader accepts beyond the canonical
/// mapping are rewritten: a Duration written as `{seconds, nanos}`, and a single
/// value where a list is expected.
fn normalize(value: &mut serde_json::Value, desc: &MessageDescriptor, opaque: &BTreeSet<String>) {
    let pool = descriptor_pool();
    match desc.full_name() {
        "google.protobuf.Any" => {
            let Some(obj) = value.as_object_mut() else {
                return;
            };
            let Some(url) = obj
                .get("@type")
                .and_then(|t| t.as_str())
                .map(str::to_string)
            else {
                return;
            };
            if opaque.contains(&url) {
                let mut inner = std::mem::take(obj);
                inner.remove("@type");
                obj.insert("@type".into(), OPAQUE_ANY_TYPE.into());
                obj.insert("typeUrl".into(), url.into());
                obj.insert("json".into(), serde_json::Value::Object(inner));
            } else if let Some(inner) = pool.get_message_by_name(type_url_message_name(&url)) {
                if is_wkt_with_value(inner.full_name()) {
                    if let Some(v) = obj.get_mut("value") {
                        normalize(v, &inner, opaque);
                    }
                    return;
                }
                normalize(value, &inner, opaque);
            }
        }
        "google.protobuf.Duration" => {
            let Some(obj) = value.as_object() else { return };
            let seconds = obj.get("seconds").and_then(json_i64).unwrap_or(0);
            let nanos = obj.get("nanos").and_then(json_i64).unwrap_or(0);
            if obj.keys().all(|k| k == "seconds" || k == "nanos") {
                *value = format_duration(seconds, nanos).into();
            }
        }
        "google.protobuf.Struct" | "google.protobuf.Value" | "google.protobuf.ListValue" => {}
        _ => {
            let Some(obj) = value.as_object_mut() else {
                return;
            };
            for (key, v) in obj.iter_mut() {
                let field = desc
                    .get_field_by_name(key)
                    .or_else(|| desc.get_field_by_json_name(key));
                let Some(field) = field else { continue };
                if field.is_list() && !v.is_array() && !v.is_null() {
                    *v = serde_json::Value::Array(vec![std::mem::take(v)]);
                }
                let Kind::Message(m) = field.kind() else {
                    continue;
                };
                if field.is_map() {
                    let value_desc = m.map_entry_value_field();
                    if let Kind::Message(vm) = value_desc.kind() {
                        if let Some(map) = v.as_object_mut() {
                            for item in map.values_mut() {
                                normalize(item, &vm, opaque);
                            }
                        }
                    }
                } else if let Some(items) = v.as_array_mut() {
                    for item in items {
                        normalize(item, &m, opaque);
                    }
                } else {
                    normalize(v, &m, opaque);
                }
            }
        }
    }
}

fn json_i64(v: &serde_json::Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.parse().ok())
}

fn format_duration(seconds: i64, nanos: i64) -> String {
    let total = seconds as i128 * 1_000_000_000 + nanos as i128;
    let sign = if total < 0 { "-" } else { "" };
    let total = total.unsigned_abs();
    let (s, n) = (total / 1_000_000_000, total % 1_000_000_000);
    if n == 0 {
        format!("{sign}{s}s")
    } else {
        format!("{sign}{s}.{n:09}s")
    }
}

/// Well-known types whose JSON form inside an Any is `{"@type": ..., "value": ...}`.
fn is_wkt_with_value(name: &str) -> bool {
    name.starts_with("google.protobuf.")
}
