//! tcp_proxy access logs: the file, stdout and stderr loggers, with Envoy's substitution format
//! strings (`text_format`, `text_format_source`, `json_format`, and the deprecated `format` /
//! `json_format` of the file logger) and the command operators a TCP connection has values for.
//! An operator pilotfish does not know is named at start-up and printed as `-`.

pub(crate) mod filter;

use crate::log::timestamp;
use pilotfish_api::pb::envoy::config::accesslog::v3::{access_log, AccessLog as AccessLogConfig};
use pilotfish_api::pb::envoy::config::core::v3::{
    data_source, substitution_format_string, SubstitutionFormatString,
};
use pilotfish_api::pb::envoy::extensions::access_loggers::file::v3::{
    file_access_log, FileAccessLog,
};
use pilotfish_api::pb::envoy::extensions::access_loggers::stream::v3::{
    stderr_access_log, stdout_access_log, StderrAccessLog, StdoutAccessLog,
};
use pilotfish_api::pb::google::protobuf::{value::Kind, Struct};
use pilotfish_config::model::unpack;
use serde_json::Value;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// What one connection leaves for its access log.
#[derive(Debug, Clone)]
pub struct Entry {
    pub start: SystemTime,
    pub duration: Duration,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub downstream_remote: SocketAddr,
    pub downstream_local: SocketAddr,
    pub upstream_host: Option<String>,
    pub upstream_local: Option<SocketAddr>,
    pub upstream_cluster: String,
    /// Envoy's response flags: UF, UO, UH, NR; empty for none.
    pub flags: Vec<&'static str>,
    pub server_name: Option<String>,
    pub connection_id: u64,
    /// The HTTP response code; 0 for a TCP connection.
    pub response_code: u32,
    /// Envoy's AccessLogType of this entry (TcpConnectionEnd for tcp_proxy's log).
    pub log_type: i32,
    /// What an HTTP stream adds; None for a TCP connection.
    pub http: Option<Box<HttpEntry>>,
}

impl Entry {
    /// An entry for a connection (downstream remote and local address) or one of its streams,
    /// before anything happened to it.
    pub fn new(
        start: SystemTime,
        (downstream_remote, downstream_local): (SocketAddr, SocketAddr),
        server_name: Option<String>,
        connection_id: u64,
        log_type: pilotfish_api::pb::envoy::data::accesslog::v3::AccessLogType,
    ) -> Entry {
        Entry {
            start,
            duration: Duration::ZERO,
            bytes_received: 0,
            bytes_sent: 0,
            downstream_remote,
            downstream_local,
            upstream_host: None,
            upstream_local: None,
            upstream_cluster: String::new(),
            flags: vec![],
            server_name,
            connection_id,
            response_code: 0,
            log_type: log_type as i32,
            http: None,
        }
    }
}

/// An HTTP stream's part of an access log entry.
#[derive(Debug, Clone, Default)]
pub struct HttpEntry {
    pub method: String,
    /// The request's path: as received, then as forwarded (rewritten).
    pub path: String,
    pub authority: String,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: String,
    /// Request headers as the connection manager and the router left them (lower-case names),
    /// response headers as sent.
    pub request_headers: Vec<(String, String)>,
    pub response_headers: Vec<(String, String)>,
    /// The headers' names and values in bytes (Envoy's header byte size), kept also when the
    /// lists above are not (nothing reads them).
    pub request_header_bytes: u64,
    pub response_header_bytes: u64,
    /// RESPONSE_CODE_DETAILS (`via_upstream`, `route_not_found`, ...).
    pub details: String,
    pub route_name: String,
    pub upstream_transport_failure: Option<String>,
    /// A gRPC request (`content-type: application/grpc...`): its local replies are gRPC.
    pub grpc: bool,
    pub response_trailers: Vec<(String, String)>,
    /// A gRPC stream's status: its grpc-status (trailers, else headers), else the one its
    /// HTTP status stands for.
    pub grpc_status: Option<u32>,
    /// The grpc_stats filter's filter state (emit_filter_state): messages (request, response).
    pub grpc_messages: Option<(u64, u64)>,
    /// A local reply's body, before local_reply_config formats it (LOCAL_REPLY_BODY).
    pub local_reply_body: Option<String>,
    /// What Istio's stats filter reports: the peers' metadata headers (base64) as the metadata
    /// exchange took them, and the TLS identities of the two connections.
    pub downstream_peer: Option<String>,
    pub upstream_peer: Option<String>,
    pub downstream_tls: Option<std::sync::Arc<crate::transport_socket::TlsInfo>>,
    pub upstream_identity: Option<std::sync::Arc<crate::transport_socket::UpstreamIdentity>>,
}

/// gRPC status names, as GRPC_STATUS writes them (CAMEL_STRING).
const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// `DeadlineExceeded` -> `DEADLINE_EXCEEDED` (SNAKE_STRING).
fn snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

impl HttpEntry {
    /// A request header (`:method`, `:path`, `:authority` and `:scheme` included) for REQ().
    fn request(&self, name: &str) -> Option<String> {
        // A stream refused before its headers were read has none of these.
        let given = |v: &String| (!v.is_empty()).then(|| v.clone());
        match name {
            ":method" => given(&self.method),
            ":path" => given(&self.path),
            ":authority" | "host" => given(&self.authority),
            n => self
                .request_headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone()),
        }
    }
}

/// A header value template (`%DOWNSTREAM_REMOTE_ADDRESS%`, `%REQ(x-foo)%`, plain text), as
/// route header mutations use them.
pub struct Template(Vec<Piece>);

impl Template {
    pub fn new(text: &str) -> Template {
        Template(parse(text, &mut vec![]))
    }

    pub fn render(&self, e: &Entry) -> String {
        render(&self.0, e).0
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    /// An operator, with its argument and the length to truncate to.
    Op(String, Option<String>, Option<usize>),
}

enum Format {
    Text(Vec<Piece>),
    Json(Vec<(String, Vec<Piece>)>),
}

enum Sink {
    File(Mutex<std::fs::File>),
    Stdout,
    Stderr,
}

pub struct AccessLog {
    sink: Sink,
    format: Format,
    filter: Option<filter::Filter>,
}

/// Envoy's default format (the HTTP one: a TCP connection has `-` for the request parts).
const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

const KNOWN: &[&str] = &[
    "START_TIME",
    "DURATION",
    "BYTES_RECEIVED",
    "BYTES_SENT",
    "DOWNSTREAM_REMOTE_ADDRESS",
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_LOCAL_ADDRESS",
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_LOCAL_PORT",
    "DOWNSTREAM_REMOTE_PORT",
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS",
    "UPSTREAM_HOST",
    "UPSTREAM_CLUSTER",
    "UPSTREAM_LOCAL_ADDRESS",
    "RESPONSE_FLAGS",
    "RESPONSE_CODE",
    "REQUESTED_SERVER_NAME",
    "CONNECTION_ID",
    "PROTOCOL",
    "REQ",
    "RESP",
    "TRAILER",
    "ROUTE_NAME",
    "UPSTREAM_TRANSPORT_FAILURE_REASON",
    "HOSTNAME",
    "GRPC_STATUS",
    "GRPC_STATUS_NUMBER",
    "FILTER_STATE",
    "LOCAL_REPLY_BODY",
];

fn parse(format: &str, unknown: &mut Vec<String>) -> Vec<Piece> {
    let mut out = vec![];
    let mut text = String::new();
    let mut rest = format;
    while let Some(i) = rest.find('%') {
        text.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        // `%%` is a literal percent sign.
        if let Some(stripped) = after.strip_prefix('%') {
            text.push('%');
            rest = stripped;
            continue;
        }
        let Some(end) = after.find('%') else {
            text.push_str(&rest[i..]);
            rest = "";
            break;
        };
        let mut op = &after[..end];
        rest = &after[end + 1..];
        // A length after the closing parenthesis (or after the name): `OP(arg):N`.
        let mut max = None;
        if let Some((head, n)) = op.rsplit_once(':') {
            if let Ok(n) = n.parse::<usize>() {
                if !head.contains('(') || head.ends_with(')') {
                    max = Some(n);
                    op = head;
                }
            }
        }
        let (name, arg) = match op.split_once('(') {
            Some((n, a)) => (n, Some(a.trim_end_matches(')').to_string())),
            None => (op, None),
        };
        if !text.is_empty() {
            out.push(Piece::Text(std::mem::take(&mut text)));
        }
        // Of filter states, pilotfish keeps the grpc_stats filter's only.
        let known = KNOWN.contains(&name)
            && (name != "FILTER_STATE"
                || arg
                    .as_deref()
                    .is_some_and(|a| a.split(':').next() == Some("envoy.filters.http.grpc_stats")));
        let shown = match &arg {
            Some(a) if name == "FILTER_STATE" => format!("{name}({a})"),
            _ => name.to_string(),
        };
        if !known && !unknown.contains(&shown) {
            unknown.push(shown);
        }
        out.push(Piece::Op(name.to_string(), arg, max));
    }
    text.push_str(rest);
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    out
}

fn json_format(
    s: &Struct,
    prefix: &str,
    unknown: &mut Vec<String>,
    out: &mut Vec<(String, Vec<Piece>)>,
) {
    let mut keys: Vec<&String> = s.fields.keys().collect();
    keys.sort();
    for k in keys {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match &s.fields[k].kind {
            Some(Kind::StringValue(v)) => out.push((path, parse(v, unknown))),
            Some(Kind::StructValue(inner)) => json_format(inner, &path, unknown, out),
            Some(other) => out.push((path, vec![Piece::Text(pb_scalar(other))])),
            None => {}
        }
    }
}

fn pb_scalar(k: &Kind) -> String {
    match k {
        Kind::NumberValue(n) => n.to_string(),
        Kind::BoolValue(b) => b.to_string(),
        _ => String::new(),
    }
}

fn substitution(f: &SubstitutionFormatString, unknown: &mut Vec<String>) -> Result<Format, String> {
    // text_format is deprecated in favour of text_format_source, and still read, as Envoy does.
    #[allow(deprecated)]
    Ok(match &f.format {
        Some(substitution_format_string::Format::TextFormat(t)) => Format::Text(parse(t, unknown)),
        Some(substitution_format_string::Format::TextFormatSource(ds)) => {
            let text = match &ds.specifier {
                Some(data_source::Specifier::InlineString(s)) => s.clone(),
                Some(data_source::Specifier::InlineBytes(b)) => {
                    String::from_utf8_lossy(b).into_owned()
                }
                Some(data_source::Specifier::Filename(p)) => std::fs::read_to_string(p)
                    .map_err(|e| format!("text_format_source {p}: {e}"))?,
                _ => return Err("text_format_source: only inline or file sources".into()),
            };
            Format::Text(parse(&text, unknown))
        }
        Some(substitution_format_string::Format::JsonFormat(s)) => {
            let mut fields = vec![];
            json_format(s, "", unknown, &mut fields);
            Format::Json(fields)
        }
        None => Format::Text(parse(DEFAULT_FORMAT, unknown)),
    })
}

/// Builds a connection's access logs; what they use that pilotfish lacks comes back as warnings.
pub fn build(configs: &[AccessLogConfig]) -> (Vec<AccessLog>, Vec<String>) {
    let mut logs = vec![];
    let mut warnings = vec![];
    for c in configs {
        let mut unsupported = vec![];
        let filter = c
            .filter
            .as_ref()
            .map(|f| filter::Filter::new(f, "filter", &mut unsupported));
        for u in unsupported {
            warnings.push(format!(
                "access log '{}': {u} is not implemented (lets every entry through)",
                c.name
            ));
        }
        let Some(access_log::ConfigType::TypedConfig(any)) = &c.config_type else {
            continue;
        };
        let mut unknown = vec![];
        let built = if let Some(f) = unpack::<FileAccessLog>(any) {
            #[allow(deprecated)]
            let format = match &f.access_log_format {
                Some(file_access_log::AccessLogFormat::Format(t)) => {
                    Ok(Format::Text(parse(t, &mut unknown)))
                }
                Some(file_access_log::AccessLogFormat::JsonFormat(s))
                | Some(file_access_log::AccessLogFormat::TypedJsonFormat(s)) => {
                    let mut fields = vec![];
                    json_format(s, "", &mut unknown, &mut fields);
                    Ok(Format::Json(fields))
                }
                Some(file_access_log::AccessLogFormat::LogFormat(l)) => {
                    substitution(l, &mut unknown)
                }
                None => Ok(Format::Text(parse(DEFAULT_FORMAT, &mut unknown))),
            };
            let sink = match f.path.as_str() {
                "/dev/stdout" => Ok(Sink::Stdout),
                "/dev/stderr" => Ok(Sink::Stderr),
                p => std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map(|f| Sink::File(Mutex::new(f)))
                    .map_err(|e| format!("access log {p}: {e}")),
            };
            format.and_then(|format| {
                sink.map(|sink| AccessLog {
                    sink,
                    format,
                    filter: None,
                })
            })
        } else if let Some(s) = unpack::<StdoutAccessLog>(any) {
            match &s.access_log_format {
                Some(stdout_access_log::AccessLogFormat::LogFormat(l)) => {
                    substitution(l, &mut unknown)
                }
                None => Ok(Format::Text(parse(DEFAULT_FORMAT, &mut unknown))),
            }
            .map(|format| AccessLog {
                sink: Sink::Stdout,
                format,
                filter: None,
            })
        } else if let Some(s) = unpack::<StderrAccessLog>(any) {
            match &s.access_log_format {
                Some(stderr_access_log::AccessLogFormat::LogFormat(l)) => {
                    substitution(l, &mut unknown)
                }
                None => Ok(Format::Text(parse(DEFAULT_FORMAT, &mut unknown))),
            }
            .map(|format| AccessLog {
                sink: Sink::Stderr,
                format,
                filter: None,
            })
        } else {
            Err(format!(
                "access log '{}': this logger is not implemented",
                c.name
            ))
        };
        for u in unknown {
            warnings.push(format!(
                "access log '{}': command operator %{u}% is not implemented (printed as -)",
                c.name
            ));
        }
        match built {
            Ok(l) => logs.push(AccessLog { filter, ..l }),
            Err(e) => warnings.push(e),
        }
    }
    (logs, warnings)
}

/// An operator's value for the entry: None prints as `-` (and `null` in JSON).
fn value(e: &Entry, name: &str, arg: Option<&str>) -> Option<Value> {
    let without_port = |a: SocketAddr| a.ip().to_string();
    Some(match name {
        "START_TIME" => {
            let t = timestamp(e.start);
            match arg {
                // Envoy's default: ISO 8601 in UTC with milliseconds.
                None | Some("") => Value::from(format!("{}Z", t.replacen(' ', "T", 1))),
                Some(f) => Value::from(strftime(f, &t)),
            }
        }
        "DURATION" => Value::from(e.duration.as_millis() as u64),
        "BYTES_RECEIVED" => Value::from(e.bytes_received),
        "BYTES_SENT" => Value::from(e.bytes_sent),
        "DOWNSTREAM_REMOTE_ADDRESS" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => {
            Value::from(e.downstream_remote.to_string())
        }
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Value::from(without_port(e.downstream_remote)),
        "DOWNSTREAM_REMOTE_PORT" => Value::from(e.downstream_remote.port()),
        "DOWNSTREAM_LOCAL_ADDRESS" => Value::from(e.downstream_local.to_string()),
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => Value::from(without_port(e.downstream_local)),
        "DOWNSTREAM_LOCAL_PORT" => Value::from(e.downstream_local.port()),
        "UPSTREAM_HOST" => Value::from(e.upstream_host.clone()?),
        "UPSTREAM_CLUSTER" => Value::from(e.upstream_cluster.clone())
            .as_str()
            .filter(|s| !s.is_empty())
            .map(Value::from)?,
        "UPSTREAM_LOCAL_ADDRESS" => Value::from(e.upstream_local?.to_string()),
        // No flag is `-`, in text and JSON alike.
        "RESPONSE_FLAGS" if e.flags.is_empty() => Value::from("-"),
        "RESPONSE_FLAGS" => Value::from(e.flags.join(",")),
        "RESPONSE_CODE" => Value::from(e.response_code),
        "RESPONSE_CODE_DETAILS" => Value::from(e.http.as_ref()?.details.clone()),
        "PROTOCOL" => Value::from(e.http.as_ref()?.protocol.clone()),
        "ROUTE_NAME" => Value::from(e.http.as_ref()?.route_name.clone())
            .as_str()
            .filter(|s| !s.is_empty())
            .map(Value::from)?,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => {
            Value::from(e.http.as_ref()?.upstream_transport_failure.clone()?)
        }
        // `REQ(A?B)`: header A, else header B; RESP and TRAILER likewise on the response's
        // headers and trailers.
        "REQ" | "RESP" | "TRAILER" => {
            let h = e.http.as_ref()?;
            let arg = arg?.to_ascii_lowercase();
            let find = |list: &[(String, String)], n: &str| {
                list.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
            };
            let v = arg.split('?').find_map(|n| match name {
                "REQ" => h.request(n),
                "RESP" => find(&h.response_headers, n),
                _ => find(&h.response_trailers, n),
            });
            Value::from(v?)
        }
        // Empty outside a local reply's body format, as in Envoy's access logs.
        "LOCAL_REPLY_BODY" => Value::from(
            e.http
                .as_ref()
                .and_then(|h| h.local_reply_body.clone())
                .unwrap_or_default(),
        ),
        "GRPC_STATUS" | "GRPC_STATUS_NUMBER" => {
            let code = e.http.as_ref()?.grpc_status?;
            let camel = GRPC_STATUS_NAMES.get(code as usize).copied();
            match (name, arg, camel) {
                ("GRPC_STATUS_NUMBER", ..) | (_, Some("NUMBER"), _) | (_, _, None) => {
                    Value::from(code)
                }
                (_, Some("SNAKE_STRING"), Some(c)) => Value::from(snake(c)),
                (_, _, Some(c)) => Value::from(c),
            }
        }
        // The one filter state pilotfish keeps: the grpc_stats filter's message counts, as
        // JSON (zero counts left out, as protobuf's JSON does) or PLAIN (`request,response`).
        "FILTER_STATE" => {
            let arg = arg?;
            let (key, form) = arg.split_once(':').unwrap_or((arg, ""));
            if key != "envoy.filters.http.grpc_stats" {
                return None;
            }
            let (request, response) = e.http.as_ref()?.grpc_messages?;
            if form == "PLAIN" {
                Value::from(format!("{request},{response}"))
            } else {
                let mut o = serde_json::Map::new();
                if request > 0 {
                    o.insert(
                        "requestMessageCount".into(),
                        Value::from(request.to_string()),
                    );
                }
                if response > 0 {
                    o.insert(
                        "responseMessageCount".into(),
                        Value::from(response.to_string()),
                    );
                }
                Value::Object(o)
            }
        }
        "REQUESTED_SERVER_NAME" => Value::from(e.server_name.clone()?),
        "CONNECTION_ID" => Value::from(e.connection_id),
        "HOSTNAME" => Value::from(
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()?
                .trim()
                .to_string(),
        ),
        _ => return None,
    })
}

/// The `%Y-%m-%dT%H:%M:%S.%3f%z` style formats of START_TIME, from `YYYY-mm-dd HH:MM:SS.mmm`.
fn strftime(f: &str, t: &str) -> String {
    let (date, time) = t.split_once(' ').unwrap_or((t, ""));
    let d: Vec<&str> = date.split('-').collect();
    let (hms, ms) = time.split_once('.').unwrap_or((time, "000"));
    let h: Vec<&str> = hms.split(':').collect();
    let get = |v: &Vec<&str>, i: usize| v.get(i).copied().unwrap_or("").to_string();
    f.replace("%Y", &get(&d, 0))
        .replace("%m", &get(&d, 1))
        .replace("%d", &get(&d, 2))
        .replace("%H", &get(&h, 0))
        .replace("%M", &get(&h, 1))
        .replace("%S", &get(&h, 2))
        .replace("%3f", ms)
        .replace("%z", "+0000")
}

fn render(pieces: &[Piece], e: &Entry) -> (String, Option<Value>) {
    // A JSON value that is a single operator keeps its type (numbers stay numbers).
    if let [Piece::Op(name, arg, None)] = pieces {
        let v = value(e, name, arg.as_deref());
        let text = match &v {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => "-".into(),
        };
        return (text, Some(v.unwrap_or(Value::Null)));
    }
    let mut out = String::new();
    for p in pieces {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Op(name, arg, max) => {
                let mut s = match value(e, name, arg.as_deref()) {
                    Some(Value::String(s)) => s,
                    Some(v) => v.to_string(),
                    None => "-".into(),
                };
                if let Some(m) = max {
                    s = s.chars().take(*m).collect();
                }
                out.push_str(&s);
            }
        }
    }
    (out, None)
}

/// A SubstitutionFormatString as a local reply's body uses it (local_reply_config): the body
/// it renders, and its content type.
pub struct BodyFormat {
    format: Format,
    content_type: String,
}

impl BodyFormat {
    /// The format, and the operators in it pilotfish does not know.
    pub fn new(f: &SubstitutionFormatString) -> Result<(BodyFormat, Vec<String>), String> {
        let mut unknown = vec![];
        let format = substitution(f, &mut unknown)?;
        let content_type = match (&format, f.content_type.as_str()) {
            (_, t) if !t.is_empty() => t.to_string(),
            (Format::Json(_), _) => "application/json".into(),
            (Format::Text(_), _) => "text/plain".into(),
        };
        Ok((
            BodyFormat {
                format,
                content_type,
            },
            unknown,
        ))
    }

    pub fn render(&self, e: &Entry) -> String {
        line(&self.format, e)
    }

    pub fn content_type(&self) -> &str {
        &self.content_type
    }
}

/// An entry written in `format` (a JSON one as one line).
fn line(format: &Format, e: &Entry) -> String {
    match format {
        Format::Text(p) => render(p, e).0,
        Format::Json(fields) => {
            let mut obj = serde_json::Map::new();
            for (k, p) in fields {
                let (text, typed) = render(p, e);
                let v = typed.unwrap_or(Value::String(text));
                // Nested keys (a.b) become nested objects.
                let mut target = &mut obj;
                let parts: Vec<&str> = k.split('.').collect();
                for part in &parts[..parts.len() - 1] {
                    target = target
                        .entry(part.to_string())
                        .or_insert_with(|| Value::Object(Default::default()))
                        .as_object_mut()
                        .unwrap();
                }
                target.insert(parts[parts.len() - 1].to_string(), v);
            }
            format!("{}\n", Value::Object(obj))
        }
    }
}

impl AccessLog {
    pub fn write(&self, e: &Entry) {
        if self.filter.as_ref().is_some_and(|f| !f.evaluate(e)) {
            return;
        }
        let line = line(&self.format, e);
        match &self.sink {
            Sink::File(f) => {
                if let Ok(mut f) = f.lock() {
                    let _ = f.write_all(line.as_bytes());
                }
            }
            Sink::Stdout => {
                let _ = std::io::stdout().write_all(line.as_bytes());
            }
            Sink::Stderr => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_strings_parse_like_envoys() {
        let mut unknown = vec![];
        let p = parse(
            "[%START_TIME%] %REQ(:PATH):10% 100%% %NOPE% end\n",
            &mut unknown,
        );
        assert_eq!(
            p,
            vec![
                Piece::Text("[".into()),
                Piece::Op("START_TIME".into(), None, None),
                Piece::Text("] ".into()),
                Piece::Op("REQ".into(), Some(":PATH".into()), Some(10)),
                Piece::Text(" 100% ".into()),
                Piece::Op("NOPE".into(), None, None),
                Piece::Text(" end\n".into()),
            ]
        );
        assert_eq!(unknown, ["NOPE"]);
    }
}
