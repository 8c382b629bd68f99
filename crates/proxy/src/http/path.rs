//! What the connection manager does to a request's path before routing: `normalize_path`
//! (unreserved characters decoded, dot segments removed, as a URL canonicalizer does),
//! `merge_slashes`, and `path_with_escaped_slashes_action` (escaped `/` and `\` kept, unescaped,
//! redirected to the unescaped path, or refused). The query is never touched.

use pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::PathWithEscapedSlashesAction as Escaped, HttpConnectionManager,
};

/// The path routing and the upstream see, or what to answer instead.
#[derive(Debug, PartialEq, Eq)]
pub enum Normalized {
    Path(String),
    /// 307 to this location (UNESCAPE_AND_REDIRECT).
    Redirect(String),
    /// 400 (REJECT_REQUEST).
    Reject,
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// `%XX` of an unreserved character becomes the character; every other escape stays as written.
fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = h * 16 + l;
                if unreserved(c) {
                    out.push(c);
                    i += 3;
                    continue;
                }
            }
        }
        out.push(if b[i] == b'\\' { b'/' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 3986's remove_dot_segments, on a path starting with `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = vec![];
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, s) in segments.iter().enumerate() {
        match *s {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// Escaped `/` and `\` (either case) unescaped.
fn unescape_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let esc = rest.get(i + 1..i + 3).unwrap_or("");
        match esc.to_ascii_uppercase().as_str() {
            "2F" => out.push('/'),
            "5C" => out.push('\\'),
            _ => {
                out.push('%');
                rest = &rest[i + 1..];
                continue;
            }
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    out
}

fn has_escaped_slash(path: &str) -> bool {
    let p = path.to_ascii_uppercase();
    p.contains("%2F") || p.contains("%5C")
}

/// The request's path after the connection manager's normalization.
pub fn normalize(c: &HttpConnectionManager, path_and_query: &str) -> Normalized {
    let (path, query) = match path_and_query.find('?') {
        Some(i) => path_and_query.split_at(i),
        None => (path_and_query, ""),
    };
    let mut path = path.to_string();
    if c.normalize_path.as_ref().is_some_and(|v| v.value) && path.starts_with('/') {
        path = remove_dot_segments(&decode_unreserved(&path));
    }
    if c.merge_slashes {
        path = merge_slashes(&path);
    }
    if has_escaped_slash(&path) {
        match Escaped::try_from(c.path_with_escaped_slashes_action)
            .unwrap_or(Escaped::KeepUnchanged)
        {
            Escaped::RejectRequest => return Normalized::Reject,
            Escaped::UnescapeAndRedirect => {
                return Normalized::Redirect(format!("{}{query}", unescape_slashes(&path)))
            }
            Escaped::UnescapeAndForward => path = unescape_slashes(&path),
            _ => {}
        }
    }
    Normalized::Path(format!("{path}{query}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hcm(normalize: bool, merge: bool, escaped: Escaped) -> HttpConnectionManager {
        HttpConnectionManager {
            normalize_path: Some(pilotfish_api::pb::google::protobuf::BoolValue {
                value: normalize,
            }),
            merge_slashes: merge,
            path_with_escaped_slashes_action: escaped as i32,
            ..Default::default()
        }
    }

    #[test]
    fn paths_normalize_as_envoys_do() {
        let c = hcm(true, true, Escaped::KeepUnchanged);
        let p = |s: &str| normalize(&c, s);
        assert_eq!(
            p("/a/./x/../c?q=./.."),
            Normalized::Path("/a/c?q=./..".into())
        );
        assert_eq!(p("/a//b///c"), Normalized::Path("/a/b/c".into()));
        assert_eq!(
            p("/%7Euser/%2fx/%41"),
            Normalized::Path("/~user/%2fx/A".into())
        );
        assert_eq!(p("/a/%2E%2E/b"), Normalized::Path("/b".into()));
        assert_eq!(p("/../../etc"), Normalized::Path("/etc".into()));
        assert_eq!(p("/x/.."), Normalized::Path("/".into()));
        let c = hcm(false, false, Escaped::UnescapeAndRedirect);
        assert_eq!(
            normalize(&c, "/a%2Fb?x=1"),
            Normalized::Redirect("/a/b?x=1".into())
        );
        let c = hcm(false, false, Escaped::RejectRequest);
        assert_eq!(normalize(&c, "/a%5cb"), Normalized::Reject);
        assert_eq!(
            normalize(&c, "/a/b?x=%2F"),
            Normalized::Path("/a/b?x=%2F".into())
        );
    }
}
