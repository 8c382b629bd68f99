//! Envoy's value matchers, compiled once: string matchers, header matchers, query parameter
//! matchers and CIDR ranges. Regexes are RE2 in Envoy; the `regex` crate accepts the same syntax
//! for everything RE2 does (no backreferences, no lookaround) and, like RE2, runs in linear time.

use pilotfish_api::pb::envoy::config::core::v3::CidrRange;
use pilotfish_api::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, query_parameter_matcher, HeaderMatcher,
    QueryParameterMatcher,
};
use pilotfish_api::pb::envoy::r#type::matcher::v3::{
    string_matcher::MatchPattern, RegexMatcher, StringMatcher,
};
use regex::Regex;
use std::net::IpAddr;

/// A regex that must match the whole input, as RE2's FullMatch.
#[derive(Debug, Clone)]
pub struct FullRegex(Regex);

impl FullRegex {
    pub fn new(re: &str) -> Result<FullRegex, String> {
        Regex::new(&format!("^(?:{re})$"))
            .map(FullRegex)
            .map_err(|e| e.to_string())
    }
    pub fn from_matcher(m: &RegexMatcher) -> Result<FullRegex, String> {
        FullRegex::new(&m.regex)
    }
    pub fn is_match(&self, s: &str) -> bool {
        self.0.is_match(s)
    }
}

#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(FullRegex),
}

/// `envoy.type.matcher.v3.StringMatcher`.
#[derive(Debug, Clone)]
pub struct CompiledStringMatcher {
    pub pattern: StringMatch,
    pub ignore_case: bool,
}

impl CompiledStringMatcher {
    pub fn new(m: &StringMatcher) -> Result<CompiledStringMatcher, String> {
        let pattern = match &m.match_pattern {
            Some(MatchPattern::Exact(s)) => StringMatch::Exact(s.clone()),
            Some(MatchPattern::Prefix(s)) => StringMatch::Prefix(s.clone()),
            Some(MatchPattern::Suffix(s)) => StringMatch::Suffix(s.clone()),
            Some(MatchPattern::Contains(s)) => StringMatch::Contains(s.clone()),
            Some(MatchPattern::SafeRegex(r)) => StringMatch::Regex(FullRegex::from_matcher(r)?),
            Some(MatchPattern::Custom(c)) => {
                return Err(format!(
                    "custom string matcher '{}' is not implemented",
                    c.name
                ))
            }
            None => return Err("string matcher without a pattern".into()),
        };
        Ok(CompiledStringMatcher {
            pattern,
            ignore_case: m.ignore_case,
        })
    }

    pub fn matches(&self, value: &str) -> bool {
        let fold = |s: &str| {
            if self.ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        match &self.pattern {
            StringMatch::Exact(e) => fold(value) == fold(e),
            StringMatch::Prefix(p) => fold(value).starts_with(&fold(p)),
            StringMatch::Suffix(p) => fold(value).ends_with(&fold(p)),
            StringMatch::Contains(p) => fold(value).contains(&fold(p)),
            // Envoy ignores ignore_case for regexes.
            StringMatch::Regex(r) => r.is_match(value),
        }
    }

    pub fn describe(&self) -> String {
        let ic = if self.ignore_case {
            " (ignoring case)"
        } else {
            ""
        };
        match &self.pattern {
            StringMatch::Exact(s) => format!("== '{s}'{ic}"),
            StringMatch::Prefix(s) => format!("starts with '{s}'{ic}"),
            StringMatch::Suffix(s) => format!("ends with '{s}'{ic}"),
            StringMatch::Contains(s) => format!("contains '{s}'{ic}"),
            StringMatch::Regex(r) => {
                format!("matches /{}/", &r.0.as_str()[4..r.0.as_str().len() - 2])
            }
        }
    }
}

#[derive(Debug, Clone)]
enum HeaderTest {
    String(CompiledStringMatcher),
    Range(i64, i64),
    Present(bool),
}

/// `envoy.config.route.v3.HeaderMatcher`.
#[derive(Debug, Clone)]
pub struct CompiledHeaderMatcher {
    pub name: String,
    test: HeaderTest,
    invert: bool,
    treat_missing_as_empty: bool,
}

impl CompiledHeaderMatcher {
    #[allow(deprecated)]
    pub fn new(h: &HeaderMatcher) -> Result<CompiledHeaderMatcher, String> {
        let s = |p: MatchPattern| {
            CompiledStringMatcher::new(&StringMatcher {
                match_pattern: Some(p),
                ignore_case: false,
            })
        };
        let test = match &h.header_match_specifier {
            Some(HeaderMatchSpecifier::ExactMatch(v)) => {
                HeaderTest::String(s(MatchPattern::Exact(v.clone()))?)
            }
            Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => {
                HeaderTest::String(s(MatchPattern::SafeRegex(r.clone()))?)
            }
            Some(HeaderMatchSpecifier::PrefixMatch(v)) => {
                HeaderTest::String(s(MatchPattern::Prefix(v.clone()))?)
            }
            Some(HeaderMatchSpecifier::SuffixMatch(v)) => {
                HeaderTest::String(s(MatchPattern::Suffix(v.clone()))?)
            }
            Some(HeaderMatchSpecifier::ContainsMatch(v)) => {
                HeaderTest::String(s(MatchPattern::Contains(v.clone()))?)
            }
            Some(HeaderMatchSpecifier::StringMatch(m)) => {
                HeaderTest::String(CompiledStringMatcher::new(m)?)
            }
            Some(HeaderMatchSpecifier::RangeMatch(r)) => HeaderTest::Range(r.start, r.end),
            Some(HeaderMatchSpecifier::PresentMatch(p)) => HeaderTest::Present(*p),
            // No specifier: the header must be present.
            None => HeaderTest::Present(true),
        };
        Ok(CompiledHeaderMatcher {
            name: h.name.to_ascii_lowercase(),
            test,
            invert: h.invert_match,
            treat_missing_as_empty: h.treat_missing_header_as_empty,
        })
    }

    /// `value` is every value of the header joined with ',' (as Envoy joins them), None when absent.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let value = match (value, self.treat_missing_as_empty) {
            (Some(v), _) => v,
            (None, true) => "",
            (None, false) => {
                // An absent header matches only a presence test asking for absence (or an
                // inverted presence test); every other matcher fails whatever invert says.
                return match self.test {
                    HeaderTest::Present(p) => p == self.invert,
                    _ => false,
                };
            }
        };
        let r = match &self.test {
            HeaderTest::String(m) => m.matches(value),
            HeaderTest::Range(start, end) => {
                value.parse::<i64>().is_ok_and(|v| v >= *start && v < *end)
            }
            HeaderTest::Present(p) => *p,
        };
        r != self.invert
    }

    pub fn describe(&self) -> String {
        let what = match &self.test {
            HeaderTest::String(m) => m.describe(),
            HeaderTest::Range(s, e) => format!("in [{s}, {e})"),
            HeaderTest::Present(true) => "present".into(),
            HeaderTest::Present(false) => "absent".into(),
        };
        let not = if self.invert { "not " } else { "" };
        format!("header {} {not}{what}", self.name)
    }
}

/// `envoy.config.route.v3.QueryParameterMatcher`.
#[derive(Debug, Clone)]
pub struct CompiledQueryMatcher {
    pub name: String,
    test: Option<CompiledStringMatcher>,
    present: Option<bool>,
}

impl CompiledQueryMatcher {
    pub fn new(q: &QueryParameterMatcher) -> Result<CompiledQueryMatcher, String> {
        use query_parameter_matcher::QueryParameterMatchSpecifier as S;
        let (test, present) = match &q.query_parameter_match_specifier {
            Some(S::StringMatch(m)) => (Some(CompiledStringMatcher::new(m)?), None),
            Some(S::PresentMatch(p)) => (None, Some(*p)),
            None => (None, None),
        };
        Ok(CompiledQueryMatcher {
            name: q.name.clone(),
            test,
            present,
        })
    }

    /// `value`: the parameter's first value (decoded), None when the query does not have it.
    pub fn matches(&self, value: Option<&str>) -> bool {
        match (value, &self.test, self.present) {
            (None, _, Some(false)) => true,
            (None, _, _) => false,
            (Some(_), _, Some(p)) => p,
            (Some(v), Some(m), None) => m.matches(v),
            (Some(_), None, None) => true,
        }
    }

    pub fn describe(&self) -> String {
        match (&self.test, self.present) {
            (Some(m), _) => format!("query parameter {} {}", self.name, m.describe()),
            (None, Some(false)) => format!("query parameter {} absent", self.name),
            _ => format!("query parameter {} present", self.name),
        }
    }
}

/// The first value of each query parameter in `path`, percent-decoded.
pub fn query_param(path: &str, name: &str) -> Option<String> {
    let query = path.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or("");
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k) == name {
            return Some(percent_decode(v));
        }
    }
    None
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A CIDR range, host bits ignored, as Envoy compares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u32,
}

impl Cidr {
    pub fn new(r: &CidrRange) -> Option<Cidr> {
        Some(Cidr {
            addr: r.address_prefix.parse().ok()?,
            len: r.prefix_len.as_ref().map_or(0, |v| v.value),
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let len = self.len.min(32);
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let len = self.len.min(128);
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            // An IPv4-mapped IPv6 address is matched as IPv4.
            (IpAddr::V4(_), IpAddr::V6(ip)) => ip
                .to_ipv4_mapped()
                .is_some_and(|v4| self.contains(IpAddr::V4(v4))),
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pilotfish_api::pb::envoy::r#type::v3::Int64Range;

    fn sm(p: MatchPattern, ignore_case: bool) -> CompiledStringMatcher {
        CompiledStringMatcher::new(&StringMatcher {
            match_pattern: Some(p),
            ignore_case,
        })
        .unwrap()
    }

    #[test]
    fn string_matchers() {
        assert!(sm(MatchPattern::Exact("abc".into()), false).matches("abc"));
        assert!(!sm(MatchPattern::Exact("abc".into()), false).matches("ABC"));
        assert!(sm(MatchPattern::Exact("abc".into()), true).matches("ABC"));
        assert!(sm(MatchPattern::Prefix("/api".into()), false).matches("/api/v1"));
        assert!(!sm(MatchPattern::Prefix("/api".into()), false).matches("/API/v1"));
        assert!(sm(MatchPattern::Prefix("/api".into()), true).matches("/API/v1"));
        assert!(sm(MatchPattern::Suffix(".jpg".into()), false).matches("a.jpg"));
        assert!(sm(MatchPattern::Contains("mid".into()), false).matches("amidb"));
        let re = |r: &str| {
            sm(
                MatchPattern::SafeRegex(RegexMatcher {
                    regex: r.into(),
                    ..Default::default()
                }),
                false,
            )
        };
        // Full match, as RE2's FullMatch: a regex matching part of the value is not enough.
        assert!(re("v[0-9]+").matches("v12"));
        assert!(!re("v[0-9]+").matches("xv12"));
        assert!(re("a|b").matches("b"));
        assert!(!re("a|b").matches("ab"));
        assert!(re(r"^/test/\d+$").matches("/test/7"));
    }

    fn hm(
        spec: Option<HeaderMatchSpecifier>,
        invert: bool,
        missing_empty: bool,
    ) -> CompiledHeaderMatcher {
        CompiledHeaderMatcher::new(&HeaderMatcher {
            name: "X-H".into(),
            header_match_specifier: spec,
            invert_match: invert,
            treat_missing_header_as_empty: missing_empty,
        })
        .unwrap()
    }

    #[test]
    fn header_matchers_follow_envoy_on_absent_headers_and_inversion() {
        let exact = |v: &str| {
            Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
                match_pattern: Some(MatchPattern::Exact(v.into())),
                ignore_case: false,
            }))
        };
        assert_eq!(hm(None, false, false).name, "x-h");
        assert!(hm(exact("a"), false, false).matches(Some("a")));
        assert!(!hm(exact("a"), false, false).matches(Some("b")));
        assert!(hm(exact("a"), true, false).matches(Some("b")));
        // Absent: no match, inverted or not, unless treated as empty.
        assert!(!hm(exact("a"), false, false).matches(None));
        assert!(!hm(exact("a"), true, false).matches(None));
        assert!(hm(exact(""), false, true).matches(None));
        assert!(hm(exact("a"), true, true).matches(None));
        // Presence.
        assert!(hm(Some(HeaderMatchSpecifier::PresentMatch(true)), false, false).matches(Some("")));
        assert!(!hm(Some(HeaderMatchSpecifier::PresentMatch(true)), false, false).matches(None));
        assert!(hm(Some(HeaderMatchSpecifier::PresentMatch(true)), true, false).matches(None));
        assert!(hm(
            Some(HeaderMatchSpecifier::PresentMatch(false)),
            false,
            false
        )
        .matches(None));
        assert!(!hm(
            Some(HeaderMatchSpecifier::PresentMatch(false)),
            false,
            false
        )
        .matches(Some("x")));
        assert!(hm(None, false, false).matches(Some("x")));
        // Ranges are half open and need an integer.
        let range = Some(HeaderMatchSpecifier::RangeMatch(Int64Range {
            start: -10,
            end: 0,
        }));
        assert!(hm(range.clone(), false, false).matches(Some("-1")));
        assert!(!hm(range.clone(), false, false).matches(Some("0")));
        assert!(!hm(range.clone(), false, false).matches(Some("abc")));
        assert!(hm(range, true, false).matches(Some("0")));
    }

    #[test]
    fn query_parameters() {
        assert_eq!(query_param("/a?x=1&y=2&x=3", "x").as_deref(), Some("1"));
        assert_eq!(query_param("/a?flag&y=2", "flag").as_deref(), Some(""));
        assert_eq!(
            query_param("/a?na%6De=v%20w", "name").as_deref(),
            Some("v w")
        );
        assert_eq!(query_param("/a", "x"), None);
        let q = |s: Option<query_parameter_matcher::QueryParameterMatchSpecifier>| {
            CompiledQueryMatcher::new(&QueryParameterMatcher {
                name: "x".into(),
                query_parameter_match_specifier: s,
            })
            .unwrap()
        };
        use query_parameter_matcher::QueryParameterMatchSpecifier as S;
        assert!(q(None).matches(Some("")));
        assert!(!q(None).matches(None));
        assert!(q(Some(S::PresentMatch(true))).matches(Some("v")));
        let exact = S::StringMatch(StringMatcher {
            match_pattern: Some(MatchPattern::Exact("v".into())),
            ignore_case: false,
        });
        assert!(q(Some(exact.clone())).matches(Some("v")));
        assert!(!q(Some(exact.clone())).matches(Some("w")));
        assert!(!q(Some(exact)).matches(None));
    }

    #[test]
    fn cidr_ranges() {
        let c = |a: &str, l: u32| Cidr {
            addr: a.parse().unwrap(),
            len: l,
        };
        assert!(c("10.0.0.0", 8).contains("10.1.2.3".parse().unwrap()));
        assert!(!c("10.0.0.0", 8).contains("11.1.2.3".parse().unwrap()));
        assert!(c("0.0.0.0", 0).contains("1.2.3.4".parse().unwrap()));
        assert!(c("172.21.206.230", 32).contains("172.21.206.230".parse().unwrap()));
        assert!(c("2001:db8::", 32).contains("2001:db8::1".parse().unwrap()));
        assert!(!c("2001:db8::", 32).contains("10.0.0.1".parse().unwrap()));
        assert!(c("10.0.0.0", 8).contains("::ffff:10.0.0.1".parse().unwrap()));
    }
}
