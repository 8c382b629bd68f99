//! The listener filters as they run on a real socket: `original_dst` asks the kernel for the
//! destination before NAT (SO_ORIGINAL_DST, IP6T_SO_ORIGINAL_DST); `tls_inspector` and
//! `http_inspector` peek at the first bytes, consuming nothing, for the ClientHello's SNI and ALPN
//! or an HTTP/1.x request line or h2c preface. Which filters run (`filter_disabled`) is the shared
//! decision `pilotfish_decide::listener::predicate`.

use pilotfish_api::pb::envoy::config::listener::v3::Listener;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// What the listener filters found out about a connection.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// The destination filter chains match on (restored by original_dst).
    pub local: Option<SocketAddr>,
    pub tls: bool,
    pub server_name: Option<String>,
    pub application_protocols: Vec<String>,
    /// The client's address a PROXY protocol header gave (the downstream remote address from
    /// then on; the socket's peer stays the direct source).
    pub source: Option<SocketAddr>,
}

/// The biggest ClientHello tls_inspector waits for (Envoy's `max_client_hello_size` default).
const MAX_CLIENT_HELLO: usize = 64 * 1024;

#[derive(Debug)]
pub enum FilterError {
    /// The connection did not start with a valid PROXY protocol header.
    ProxyProtocol,
    /// `listener_filters_timeout` passed before a filter could decide.
    Timeout,
    /// The client closed before a filter could decide.
    Closed,
}

/// Runs the listener's filters on the socket, in order, each unless its `filter_disabled`
/// matches.
pub async fn run(
    l: &Listener,
    stream: &TcpStream,
    mut local: SocketAddr,
    conn: u64,
) -> Result<Found, FilterError> {
    let timeout = crate::duration(l.listener_filters_timeout.as_ref(), Duration::from_secs(15));
    // A zero timeout means none.
    let deadline = (!timeout.is_zero()).then(|| Instant::now() + timeout);
    let mut found = Found::default();
    // use_original_dst builds an original_dst filter of its own, ahead of the configured ones.
    if l.use_original_dst.as_ref().is_some_and(|v| v.value) {
        if let Some(dst) = original_dst(stream) {
            tracing::debug!(target: "filter", connection = conn, "original_dst: set destination to {dst}");
            local = dst;
            found.local = Some(dst);
        }
    }
    for f in &l.listener_filters {
        if let Some(p) = &f.filter_disabled {
            if pilotfish_decide::listener::predicate(p, local) {
                tracing::trace!(target: "filter", connection = conn, "{}: disabled by filter_disabled for destination port {}", f.name, local.port());
                continue;
            }
        }
        let kind = f
            .name
            .trim_start_matches("envoy.filters.listener.")
            .trim_start_matches("envoy.listener.");
        match kind {
            "original_dst" => {
                tracing::trace!(target: "filter", connection = conn, "original_dst: new connection accepted");
                if let Some(dst) = original_dst(stream) {
                    tracing::debug!(target: "filter", connection = conn, "original_dst: set destination to {dst}");
                    local = dst;
                    found.local = Some(dst);
                }
            }
            "tls_inspector" => {
                tracing::trace!(target: "filter", connection = conn, "tls inspector: new connection accepted");
                match peek_until(stream, deadline, parse_client_hello).await {
                    Ok(Some(hello)) => {
                        tracing::debug!(target: "filter", connection = conn, "tls:onServerName(), requestedServerName: {}", hello.server_name.as_deref().unwrap_or(""));
                        found.tls = true;
                        found.server_name = hello.server_name;
                        found.application_protocols = hello.alpn;
                    }
                    Ok(None) => {
                        tracing::debug!(target: "filter", connection = conn, "tls inspector: not a TLS ClientHello");
                    }
                    Err(e) if continue_on_timeout(l, &e) => {}
                    Err(e) => return Err(e),
                }
            }
            "proxy_protocol" => {
                tracing::trace!(target: "filter", connection = conn, "proxy_protocol: new connection accepted");
                match peek_until(stream, deadline, parse_proxy_header).await? {
                    Some(h) => {
                        // The header is the proxy's to consume; the rest is the client's.
                        let mut skip = vec![0u8; h.len];
                        stream_read_exact(stream, &mut skip).await?;
                        if let Some((src, dst)) = h.addresses {
                            tracing::debug!(target: "filter", connection = conn, "proxy_protocol: remote address {src}, local address {dst}");
                            found.source = Some(src);
                            local = dst;
                            found.local = Some(dst);
                        }
                    }
                    None => {
                        tracing::debug!(target: "filter", connection = conn, "proxy_protocol: no valid PROXY header: closing");
                        return Err(FilterError::ProxyProtocol);
                    }
                }
            }
            "http_inspector" => {
                tracing::trace!(target: "filter", connection = conn, "http inspector: new connection accepted");
                if found.tls {
                    continue;
                }
                match peek_until(stream, deadline, parse_http).await {
                    Ok(Some(p)) => {
                        tracing::debug!(target: "filter", connection = conn, "http inspector: set application protocol to {p}");
                        found.application_protocols = vec![p.to_string()];
                    }
                    Ok(None) => {}
                    Err(e) if continue_on_timeout(l, &e) => {}
                    Err(e) => return Err(e),
                }
            }
            // Named at start-up as not implemented; the connection goes on without it.
            _ => {}
        }
    }
    Ok(found)
}

fn continue_on_timeout(l: &Listener, e: &FilterError) -> bool {
    matches!(e, FilterError::Timeout) && l.continue_on_listener_filters_timeout
}

/// Peeks at the socket until `decide` has an answer (Some(answer) or a definite None); the
/// bytes stay in the socket for whoever reads next.
async fn peek_until<T>(
    stream: &TcpStream,
    deadline: Option<Instant>,
    decide: impl Fn(&[u8]) -> Decision<T>,
) -> Result<Option<T>, FilterError> {
    let mut buf = vec![0u8; 1024];
    let mut seen = 0;
    let mut wait = Duration::from_micros(200);
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(FilterError::Timeout);
        }
        // Envoy's listener filter buffer closes the connection when the peer has closed its
        // side, whatever it sent before (real Envoy shows it): so does pilotfish.
        if peer_closed(stream) {
            return Err(FilterError::Closed);
        }
        let n = match deadline {
            Some(d) => tokio::time::timeout_at(d, stream.peek(&mut buf))
                .await
                .map_err(|_| FilterError::Timeout)?,
            None => stream.peek(&mut buf).await,
        }
        .map_err(|_| FilterError::Closed)?;
        if n == 0 {
            return Err(FilterError::Closed);
        }
        match decide(&buf[..n]) {
            Decision::Done(v) => return Ok(Some(v)),
            Decision::No => return Ok(None),
            Decision::NeedMore => {
                if n == buf.len() && buf.len() < MAX_CLIENT_HELLO {
                    buf.resize((buf.len() * 2).min(MAX_CLIENT_HELLO), 0);
                } else if n == buf.len() {
                    return Ok(None);
                }
                // peek does not wait for bytes beyond those already there: back off a little,
                // unless the client has closed its side, which ends the connection (Envoy's
                // downstream_listener_filter_remote_close).
                if n == seen {
                    if peer_closed(stream) {
                        return Err(FilterError::Closed);
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(20));
                } else {
                    wait = Duration::from_micros(200);
                }
                seen = n;
            }
        }
    }
}

/// Whether the peer has shut down its sending side (POLLRDHUP), without reading.
fn peer_closed(stream: &TcpStream) -> bool {
    let mut p = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd we own, zero timeout.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0
}

/// Reads exactly `buf.len()` bytes already known to be there (peeked).
async fn stream_read_exact(stream: &TcpStream, buf: &mut [u8]) -> Result<(), FilterError> {
    let mut got = 0;
    while got < buf.len() {
        stream.readable().await.map_err(|_| FilterError::Closed)?;
        match stream.try_read(&mut buf[got..]) {
            Ok(0) => return Err(FilterError::Closed),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(FilterError::Closed),
        }
    }
    Ok(())
}

/// A PROXY protocol header (v1 text or v2 binary): its length, and the addresses it carries
/// (None for UNKNOWN / LOCAL, where the socket's own addresses stand).
#[derive(Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    pub len: usize,
    pub addresses: Option<(SocketAddr, SocketAddr)>,
}

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

pub fn parse_proxy_header(b: &[u8]) -> Decision<ProxyHeader> {
    let n = b.len().min(V2_SIGNATURE.len());
    if b[..n] == V2_SIGNATURE[..n] {
        if b.len() < 16 {
            return Decision::NeedMore;
        }
        let (ver_cmd, fam) = (b[12], b[13]);
        let len = 16 + u16::from_be_bytes([b[14], b[15]]) as usize;
        if ver_cmd >> 4 != 2 {
            return Decision::No;
        }
        if b.len() < len {
            return Decision::NeedMore;
        }
        let a = &b[16..len];
        let addresses = match (ver_cmd & 0xf, fam >> 4) {
            (1, 1) if a.len() >= 12 => Some((
                SocketAddr::from(([a[0], a[1], a[2], a[3]], u16::from_be_bytes([a[8], a[9]]))),
                SocketAddr::from(([a[4], a[5], a[6], a[7]], u16::from_be_bytes([a[10], a[11]]))),
            )),
            (1, 2) if a.len() >= 36 => {
                let ip = |o: usize| {
                    std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&a[o..o + 16]).unwrap())
                };
                Some((
                    SocketAddr::from((ip(0), u16::from_be_bytes([a[32], a[33]]))),
                    SocketAddr::from((ip(16), u16::from_be_bytes([a[34], a[35]]))),
                ))
            }
            (0, _) | (1, 0) => None,
            _ => return Decision::No,
        };
        return Decision::Done(ProxyHeader { len, addresses });
    }
    let prefix = b"PROXY ";
    let m = b.len().min(prefix.len());
    if b[..m] != prefix[..m] {
        return Decision::No;
    }
    let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
        // A v1 header is at most 107 bytes.
        return if b.len() > 107 {
            Decision::No
        } else {
            Decision::NeedMore
        };
    };
    let line = String::from_utf8_lossy(&b[..end]);
    let parts: Vec<&str> = line.split(' ').collect();
    let addresses = match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", "TCP4" | "TCP6", src, dst, sport, dport] => {
            let addr = |ip: &str, port: &str| -> Option<SocketAddr> {
                Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
            };
            match (addr(src, sport), addr(dst, dport)) {
                (Some(s), Some(d)) => Some((s, d)),
                _ => return Decision::No,
            }
        }
        _ => return Decision::No,
    };
    Decision::Done(ProxyHeader {
        len: end + 2,
        addresses,
    })
}

pub enum Decision<T> {
    Done(T),
    No,
    NeedMore,
}

#[derive(Debug, PartialEq, Eq)]
pub struct ClientHello {
    pub server_name: Option<String>,
    pub alpn: Vec<String>,
}

/// The SNI and ALPN of a TLS ClientHello, read without a TLS library: the record and handshake
/// headers, then the extensions. A first byte other than a handshake record means not TLS.
pub fn parse_client_hello(b: &[u8]) -> Decision<ClientHello> {
    if b.is_empty() {
        return Decision::NeedMore;
    }
    if b[0] != 0x16 || (b.len() > 1 && b[1] != 3) {
        return Decision::No;
    }
    if b.len() < 9 {
        return Decision::NeedMore;
    }
    if b[5] != 1 {
        return Decision::No;
    }
    let hs_len = u32::from_be_bytes([0, b[6], b[7], b[8]]) as usize;
    // The handshake message may span records; gather the record payloads.
    let mut hs = vec![];
    let mut at = 0;
    while hs.len() < 4 + hs_len {
        if b.len() < at + 5 {
            return Decision::NeedMore;
        }
        if b[at] != 0x16 {
            return Decision::No;
        }
        let len = u16::from_be_bytes([b[at + 3], b[at + 4]]) as usize;
        if b.len() < at + 5 + len {
            return Decision::NeedMore;
        }
        hs.extend_from_slice(&b[at + 5..at + 5 + len]);
        at += 5 + len;
    }
    match client_hello_body(&hs[4..4 + hs_len]) {
        Some(h) => Decision::Done(h),
        None => Decision::No,
    }
}

fn client_hello_body(b: &[u8]) -> Option<ClientHello> {
    let mut r = Reader(b);
    r.take(2 + 32)?; // version, random
    let sid = r.u8()? as usize;
    r.take(sid)?;
    let suites = r.u16()? as usize;
    r.take(suites)?;
    let comp = r.u8()? as usize;
    r.take(comp)?;
    let mut hello = ClientHello {
        server_name: None,
        alpn: vec![],
    };
    if r.0.is_empty() {
        return Some(hello);
    }
    let ext_len = r.u16()? as usize;
    let mut exts = Reader(r.take(ext_len)?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let len = exts.u16()? as usize;
        let mut body = Reader(exts.take(len)?);
        match ty {
            0 => {
                let list_len = body.u16()? as usize;
                let mut list = Reader(body.take(list_len)?);
                while !list.0.is_empty() {
                    let kind = list.u8()?;
                    let n = list.u16()? as usize;
                    let name = list.take(n)?;
                    if kind == 0 {
                        hello.server_name =
                            Some(String::from_utf8_lossy(name).to_ascii_lowercase());
                    }
                }
            }
            16 => {
                let list_len = body.u16()? as usize;
                let mut list = Reader(body.take(list_len)?);
                while !list.0.is_empty() {
                    let n = list.u8()? as usize;
                    hello
                        .alpn
                        .push(String::from_utf8_lossy(list.take(n)?).into_owned());
                }
            }
            _ => {}
        }
    }
    Some(hello)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The methods Envoy's HTTP/1 parser accepts on a request line.
const METHODS: &[&str] = &[
    "DELETE",
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "COPY",
    "LOCK",
    "MKCOL",
    "MOVE",
    "PROPFIND",
    "PROPPATCH",
    "SEARCH",
    "UNLOCK",
    "BIND",
    "REBIND",
    "UNBIND",
    "ACL",
    "REPORT",
    "MKACTIVITY",
    "CHECKOUT",
    "MERGE",
    "M-SEARCH",
    "NOTIFY",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "PATCH",
    "PURGE",
    "MKCALENDAR",
    "LINK",
    "UNLINK",
    "SOURCE",
    "QUERY",
];

/// `http/1.1`, `http/1.0` from a request line, `h2c` from the HTTP/2 preface.
pub fn parse_http(b: &[u8]) -> Decision<&'static str> {
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Decision::Done("h2c")
        } else {
            Decision::NeedMore
        };
    }
    let line_end = b.windows(2).position(|w| w == b"\r\n");
    let line = match line_end {
        Some(e) => &b[..e],
        None if b.len() > 8192 => return Decision::No,
        None => b,
    };
    // A method the HTTP/1 parser knows, then a space: anything else is not HTTP, at once.
    let method_len = line.iter().position(|c| *c == b' ').unwrap_or(line.len());
    let method = &line[..method_len];
    let known = |m: &&[u8]| {
        if method_len < line.len() {
            *m == method
        } else {
            m.starts_with(method)
        }
    };
    if method.is_empty() || !METHODS.iter().map(|m| m.as_bytes()).any(|m| known(&m)) {
        return Decision::No;
    }
    let Some(e) = line_end else {
        return Decision::NeedMore;
    };
    let line = &b[..e];
    if line.ends_with(b" HTTP/1.1") {
        Decision::Done("http/1.1")
    } else if line.ends_with(b" HTTP/1.0") {
        Decision::Done("http/1.0")
    } else {
        Decision::No
    }
}

/// SO_ORIGINAL_DST (and its IPv6 form): where the client connected before iptables redirected
/// it; None when the connection was not redirected.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;
    let fd = stream.as_raw_fd();
    let local = stream.local_addr().ok()?;
    // SAFETY: getsockopt writes at most `len` bytes into the sockaddr storage we own.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let (level, opt) = if local.is_ipv4() {
            (libc::SOL_IP, SO_ORIGINAL_DST)
        } else {
            (libc::SOL_IPV6, IP6T_SO_ORIGINAL_DST)
        };
        if libc::getsockopt(
            fd,
            level,
            opt,
            &mut storage as *mut _ as *mut libc::c_void,
            &mut len,
        ) != 0
        {
            return None;
        }
        match storage.ss_family as libc::c_int {
            libc::AF_INET => {
                let a = &*(&storage as *const _ as *const libc::sockaddr_in);
                Some(SocketAddr::V4(SocketAddrV4::new(
                    u32::from_be(a.sin_addr.s_addr).into(),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let a = &*(&storage as *const _ as *const libc::sockaddr_in6);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    a.sin6_addr.s6_addr.into(),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as a TLS client sends it: SNI and ALPN among other extensions.
    fn hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let mut ext = vec![];
        let mut sn = vec![0u8];
        sn.extend((sni.len() as u16).to_be_bytes());
        sn.extend(sni.as_bytes());
        ext.extend([0, 0]);
        ext.extend(((sn.len() + 2) as u16).to_be_bytes());
        ext.extend((sn.len() as u16).to_be_bytes());
        ext.extend(sn);
        ext.extend([0, 10, 0, 4, 0, 2, 0, 29]); // supported_groups
        let mut al = vec![];
        for p in alpn {
            al.push(p.len() as u8);
            al.extend(p.as_bytes());
        }
        ext.extend([0, 16]);
        ext.extend(((al.len() + 2) as u16).to_be_bytes());
        ext.extend((al.len() as u16).to_be_bytes());
        ext.extend(al);
        let mut body = vec![3, 3];
        body.extend([1u8; 32]);
        body.extend([32]);
        body.extend([2u8; 32]);
        body.extend([0, 2, 0x13, 0x01, 1, 0]);
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![1, 0];
        hs.extend((body.len() as u16).to_be_bytes());
        hs.extend(body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn client_hello_gives_sni_and_alpn_and_waits_for_the_whole_message() {
        let h = hello("Outbound_.8080_._.Fortio.svc", &["istio-http/1.1", "istio"]);
        match parse_client_hello(&h) {
            Decision::Done(c) => {
                assert_eq!(
                    c.server_name.as_deref(),
                    Some("outbound_.8080_._.fortio.svc")
                );
                assert_eq!(c.alpn, ["istio-http/1.1", "istio"]);
            }
            _ => panic!("not parsed"),
        }
        for cut in [1, 5, 9, h.len() - 1] {
            assert!(
                matches!(parse_client_hello(&h[..cut]), Decision::NeedMore),
                "cut {cut}"
            );
        }
        assert!(matches!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            Decision::No
        ));
        // A ClientHello split over two records.
        let body = &h[5..];
        let mut split = vec![0x16, 3, 1, 0, 10];
        split.extend(&body[..10]);
        split.extend([0x16, 3, 1]);
        split.extend(((body.len() - 10) as u16).to_be_bytes());
        split.extend(&body[10..]);
        assert!(matches!(parse_client_hello(&split), Decision::Done(_)));
    }

    #[test]
    fn proxy_protocol_headers_v1_and_v2() {
        let v1 = b"PROXY TCP4 10.1.2.3 127.0.0.1 5555 8080\r\nhello";
        match parse_proxy_header(v1) {
            Decision::Done(h) => {
                assert_eq!(h.len, 41);
                assert_eq!(
                    h.addresses,
                    Some((
                        "10.1.2.3:5555".parse().unwrap(),
                        "127.0.0.1:8080".parse().unwrap()
                    ))
                );
            }
            _ => panic!("v1 not parsed"),
        }
        assert!(matches!(
            parse_proxy_header(b"PROXY TCP4 10.1"),
            Decision::NeedMore
        ));
        assert!(matches!(
            parse_proxy_header(b"PROXY UNKNOWN\r\n"),
            Decision::Done(ProxyHeader {
                len: 15,
                addresses: None
            })
        ));
        assert!(matches!(
            parse_proxy_header(b"GET / HTTP/1.1\r\n"),
            Decision::No
        ));
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend([
            0x21, 0x11, 0, 12, 10, 1, 2, 3, 127, 0, 0, 1, 0x15, 0xb3, 0x1f, 0x90,
        ]);
        v2.extend(b"data");
        match parse_proxy_header(&v2) {
            Decision::Done(h) => {
                assert_eq!(h.len, 28);
                assert_eq!(
                    h.addresses,
                    Some((
                        "10.1.2.3:5555".parse().unwrap(),
                        "127.0.0.1:8080".parse().unwrap()
                    ))
                );
            }
            _ => panic!("v2 not parsed"),
        }
        assert!(matches!(parse_proxy_header(&v2[..20]), Decision::NeedMore));
    }

    #[test]
    fn http_inspector_knows_http1_and_the_h2c_preface() {
        assert!(matches!(
            parse_http(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            Decision::Done("http/1.1")
        ));
        assert!(matches!(
            parse_http(b"POST /x HTTP/1.0\r\n"),
            Decision::Done("http/1.0")
        ));
        assert!(matches!(parse_http(H2_PREFACE), Decision::Done("h2c")));
        assert!(matches!(
            parse_http(b"PRI * HTTP/2.0\r\n"),
            Decision::NeedMore
        ));
        assert!(matches!(parse_http(b"GET / HT"), Decision::NeedMore));
        assert!(matches!(parse_http(b"\x16\x03\x01"), Decision::No));
        assert!(matches!(parse_http(b"SSH-2.0-OpenSSH\r\n"), Decision::No));
        assert!(matches!(parse_http(b"hello world\r\n"), Decision::No));
        // Unknown or lower-case methods are refused at once, a known prefix waits.
        assert!(matches!(parse_http(b"ping"), Decision::No));
        assert!(matches!(parse_http(b"get / HTTP/1.1\r\n"), Decision::No));
        assert!(matches!(parse_http(b"PO"), Decision::NeedMore));
        assert!(matches!(
            parse_http(b"PROPFIND /x HTTP/1.1\r\n"),
            Decision::Done("http/1.1")
        ));
    }
}
