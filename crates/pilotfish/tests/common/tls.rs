//! Test PKI and TLS peers: a CA issuing leaf certificates with DNS and URI (SPIFFE) SANs, a TLS
//! client with an optional client certificate, and upstreams in plaintext or TLS that say what
//! they saw.
#![allow(dead_code)]

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

pub struct Pki {
    pub ca_pem: String,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let ca_key = KeyPair::generate().unwrap();
        let ca = p.self_signed(&ca_key).unwrap();
        Pki {
            ca_pem: ca.pem(),
            ca,
            ca_key,
        }
    }

    pub fn leaf(&self, dns: &[&str], uri: &str) -> Leaf {
        let mut p =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.subject_alt_names
            .push(SanType::URI(uri.try_into().unwrap()));
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn roots(pem: &str) -> Arc<rustls::RootCertStore> {
    let mut r = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        r.add(c.unwrap()).unwrap();
    }
    Arc::new(r)
}

pub fn chain(l: &Leaf) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (
        CertificateDer::pem_slice_iter(l.cert.as_bytes())
            .map(|c| c.unwrap())
            .collect(),
        PrivateKeyDer::from_pem_slice(l.key.as_bytes()).unwrap(),
    )
}

/// A TLS client to `port`, trusting `ca` for `server.example`, with an optional certificate;
/// sends `msg` and returns what came back, or the error that ended it.
pub fn tls_client(
    port: u16,
    ca: &str,
    client: Option<&Leaf>,
    alpn: &[&str],
    msg: &str,
) -> Result<String, String> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca));
    let mut config = match client {
        Some(l) => {
            let (c, k) = chain(l);
            b.with_client_auth_cert(c, k).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let conn = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from("server.example").unwrap(),
    )
    .unwrap();
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    s.write_all(msg.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("closed".into());
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A server config for `leaf` offering `alpn`, without client certificates.
pub fn server_config(leaf: &Leaf, alpn: &[&str]) -> Arc<rustls::ServerConfig> {
    let (c, k) = chain(leaf);
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(c, k)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// A TLS upstream that requires a client certificate from `ca` and answers with the SNI, ALPN
/// and client certificate SAN it saw.
pub fn tls_upstream(leaf: &Leaf, ca: &str, expect_uri: &'static str) -> u16 {
    let (c, k) = chain(leaf);
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca), provider())
            .build()
            .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(c, k)
        .unwrap();
    config.alpn_protocols = vec![b"istio-peer-exchange".to_vec(), b"istio".to_vec()];
    let config = Arc::new(config);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for sock in l.incoming() {
            let Ok(sock) = sock else { continue };
            let config = config.clone();
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut s = rustls::StreamOwned::new(conn, sock);
                let mut buf = [0u8; 4096];
                let Ok(n) = s.read(&mut buf) else { return };
                let sni = s.conn.server_name().unwrap_or("").to_string();
                let alpn =
                    String::from_utf8_lossy(s.conn.alpn_protocol().unwrap_or(b"")).into_owned();
                let has_san = s
                    .conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .is_some_and(|c| {
                        c.as_ref()
                            .windows(expect_uri.len())
                            .any(|w| w == expect_uri.as_bytes())
                    });
                // One write, so the answer crosses the proxy in one piece.
                let answer = format!(
                    "tls upstream: sni={sni} alpn={alpn} client_san={has_san} got={}",
                    String::from_utf8_lossy(&buf[..n])
                );
                let _ = s.write_all(answer.as_bytes());
                s.conn.send_close_notify();
                let _ = s.flush();
                // Read to the end before closing: closing with unread bytes would reset the
                // connection and could discard the answer on its way.
                let mut rest = [0u8; 1024];
                while matches!(s.read(&mut rest), Ok(n) if n > 0) {}
            });
        }
    });
    port
}

/// A TLS client trusting `ca`, without a client certificate, offering only the named key
/// exchange groups (`X25519`, `P-256`, `P-384`; all when empty), with its own session cache:
/// connections made with the same config resume sessions when the server lets them.
#[allow(dead_code)]
pub fn tls_client_config(ca: &str, groups: &[&str]) -> Arc<rustls::ClientConfig> {
    use rustls::crypto::ring::kx_group;
    let mut p = rustls::crypto::ring::default_provider();
    if !groups.is_empty() {
        p.kx_groups = groups
            .iter()
            .map(|g| match *g {
                "X25519" => kx_group::X25519,
                "P-256" => kx_group::SECP256R1,
                _ => kx_group::SECP384R1,
            })
            .collect();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(p))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(ca))
            .with_no_client_auth(),
    )
}

/// A TLS handshake with the listener on `port`, then one exchange: whether it was a full or a
/// resumed handshake, or why it failed.
#[allow(dead_code)]
pub fn tls_handshake(
    port: u16,
    config: &Arc<rustls::ClientConfig>,
) -> Result<rustls::HandshakeKind, String> {
    let mut conn = rustls::ClientConnection::new(
        config.clone(),
        ServerName::try_from("server.example").unwrap(),
    )
    .unwrap();
    let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
    }
    let mut s = rustls::Stream::new(&mut conn, &mut sock);
    s.write_all(b"ping").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("closed".into());
    }
    // Session tickets may follow the answer: give them a moment to arrive.
    s.sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let _ = s.read(&mut buf);
    conn.handshake_kind().ok_or_else(|| "no handshake".into())
}
