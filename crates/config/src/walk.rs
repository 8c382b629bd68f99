//! A walk over every message of a configuration with its path, looking through `Any` and
//! `TypedStruct` wrappers into the typed extension configuration they carry (as Envoy does when it
//! builds an extension from them).

use pilotfish_api::prost_reflect::{DynamicMessage, Kind, MapKey, ReflectMessage, Value};
use pilotfish_api::{descriptor_pool, type_url_message_name};

/// One message reached by the walk.
pub struct Node<'a> {
    pub path: &'a str,
    pub message: &'a DynamicMessage,
}

/// Errors found while looking into wrappers (a TypedStruct whose value does not fit its type).
pub type WalkErrors = Vec<(String, String)>;

/// Calls `visit` for `message` and every message below it, depth first, in field order. `visit`
/// returns false to skip what is below a message.
pub fn walk(
    message: &DynamicMessage,
    path: &str,
    visit: &mut dyn FnMut(&Node<'_>) -> bool,
    errors: &mut WalkErrors,
) {
    if !visit(&Node { path, message }) {
        return;
    }
    for (field, value) in message.fields() {
        let Kind::Message(_) = field.kind() else {
            continue;
        };
        let fpath = join(path, field.name());
        match value {
            Value::Message(m) => descend(m, &fpath, visit, errors),
            Value::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Value::Message(m) = item {
                        descend(m, &format!("{fpath}[{i}]"), visit, errors);
                    }
                }
            }
            Value::Map(map) => {
                for (k, v) in map {
                    if let Value::Message(m) = v {
                        descend(m, &format!("{fpath}[{}]", map_key(k)), visit, errors);
                    }
                }
            }
            _ => {}
        }
    }
}

fn descend(
    m: &DynamicMessage,
    path: &str,
    visit: &mut dyn FnMut(&Node<'_>) -> bool,
    errors: &mut WalkErrors,
) {
    match m.descriptor().full_name() {
        "google.protobuf.Any" => {
            // The Any itself is visited (so rules about it apply), then what it carries, at the
            // same path: in JSON the payload's fields sit beside `@type`.
            if !visit(&Node { path, message: m }) {
                return;
            }
            if let Some(inner) = unpack_any(m, path, errors) {
                walk(&inner, path, visit, errors);
            }
        }
        // Free-form JSON (metadata, TypedStruct values): nothing typed below.
        "google.protobuf.Struct" | "google.protobuf.Value" | "google.protobuf.ListValue" => {
            visit(&Node { path, message: m });
        }
        _ => walk(m, path, visit, errors),
    }
}

/// The message an Any carries, TypedStruct wrappers looked through. None for opaque types.
pub fn unpack_any(
    any: &DynamicMessage,
    path: &str,
    errors: &mut WalkErrors,
) -> Option<DynamicMessage> {
    let type_url = any.get_field_by_name("type_url")?.as_str()?.to_string();
    let bytes = any.get_field_by_name("value")?.as_bytes()?.clone();
    let desc = descriptor_pool().get_message_by_name(type_url_message_name(&type_url))?;
    let message = match DynamicMessage::decode(desc, bytes) {
        Ok(m) => m,
        Err(e) => {
            errors.push((path.to_string(), format!("cannot decode {type_url}: {e}")));
            return None;
        }
    };
    match message.descriptor().full_name() {
        "udpa.type.v1.TypedStruct" | "xds.type.v3.TypedStruct" => {
            unpack_typed_struct(&message, &join(path, "value"), errors)
        }
        _ => Some(message),
    }
}

/// Envoy converts a TypedStruct to its `type_url` type through JSON; so do we. Unknown inner
/// types stay unexpanded (reported by the model), a value that does not fit is an error.
pub fn unpack_typed_struct(
    ts: &DynamicMessage,
    path: &str,
    errors: &mut WalkErrors,
) -> Option<DynamicMessage> {
    let type_url = ts.get_field_by_name("type_url")?.as_str()?.to_string();
    let desc = descriptor_pool().get_message_by_name(type_url_message_name(&type_url))?;
    let value = ts.get_field_by_name("value")?;
    let json = match value.as_message() {
        Some(s) => serde_json::to_value(s).ok()?,
        None => serde_json::Value::Object(Default::default()),
    };
    let opts = pilotfish_api::prost_reflect::DeserializeOptions::new().deny_unknown_fields(true);
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(&json, &mut track);
    match DynamicMessage::deserialize_with_options(desc, de, &opts) {
        Ok(m) => Some(m),
        Err(e) => {
            let inner = track.path().to_string();
            let at = if inner == "." {
                path.to_string()
            } else {
                join(path, &inner)
            };
            errors.push((
                at,
                format!("TypedStruct value is not a valid {type_url}: {e}"),
            ));
            None
        }
    }
}

pub fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn map_key(k: &MapKey) -> String {
    match k {
        MapKey::String(s) => s.clone(),
        MapKey::Bool(b) => b.to_string(),
        MapKey::I32(n) => n.to_string(),
        MapKey::I64(n) => n.to_string(),
        MapKey::U32(n) => n.to_string(),
        MapKey::U64(n) => n.to_string(),
    }
}
