//! TLS transport sockets on rustls, built once per filter chain (downstream) and per
//! cluster transport socket (upstream) from Envoy's `DownstreamTlsContext` / `UpstreamTlsContext`:
//! certificates inline, from files or from SDS secrets in the loaded configuration; ALPN; the
//! validation context (trusted CA, `match_subject_alt_names` / `match_typed_subject_alt_names`,
//! URI SANs such as SPIFFE ids), `require_client_certificate`, TLS versions and cipher suites.
//! As in Envoy, an upstream without a validation context does not verify the server at all.

use pilotfish_api::pb::envoy::config::core::v3::{data_source, DataSource};
use pilotfish_api::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::ValidationContextType, secret, subject_alt_name_matcher::SanType,
    tls_parameters::TlsProtocol, CertificateValidationContext, CommonTlsContext,
    DownstreamTlsContext, SdsSecretConfig, TlsCertificate, TlsParameters, UpstreamTlsContext,
};
use pilotfish_api::pb::envoy::r#type::matcher::v3::StringMatcher;
use pilotfish_config::resources::ResourceSet;
use pilotfish_decide::matcher::CompiledStringMatcher;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::Arc;

/// A SAN the peer's certificate must carry (one of them).
pub struct SanMatcher {
    /// Unspecified (any type, as `match_subject_alt_names`), or one of DNS, URI, email, IP.
    kind: SanType,
    matcher: CompiledStringMatcher,
    shown: String,
}

pub struct DownstreamTls {
    pub config: Arc<rustls::ServerConfig>,
    /// The same without ALPN, for a client whose offer shares no protocol with `alpn_protocols`:
    /// Envoy (BoringSSL) then completes the handshake without ALPN, where rustls would refuse.
    pub without_alpn: Option<Arc<rustls::ServerConfig>>,
    pub san_matchers: Vec<SanMatcher>,
    /// The first URI SAN of this side's certificate (x-forwarded-client-cert's `By`).
    pub local_uri: Option<String>,
}

/// The identities on an upstream TLS connection (Istio's `upstream.uri_san_local_certificate`
/// and `upstream.uri_san_peer_certificate`): each certificate's first URI SAN.
#[derive(Debug, Default, Clone)]
pub struct UpstreamIdentity {
    pub local_uri: Option<String>,
    pub peer_uri: Option<String>,
}

/// What a downstream TLS handshake established, for the HTTP connection manager.
#[derive(Debug, Default)]
pub struct TlsInfo {
    pub local_uri: Option<String>,
    /// The client certificate's first URI SAN (its SPIFFE id).
    pub peer_uri: Option<String>,
    /// The client's certificate chain (DER), leaf first; empty when it presented none.
    pub peer_chain: Vec<Vec<u8>>,
    /// The protocol agreed by ALPN.
    pub alpn: Option<Vec<u8>>,
    /// This hop's x-forwarded-client-cert element: it depends only on the connection (and its
    /// one connection manager), so the certificate is parsed and hashed once, not per request.
    pub xfcc_element: std::sync::OnceLock<String>,
}

/// A certificate's subject (RFC 2253, as OpenSSL prints it) and its URI and DNS SANs.
pub struct CertFacts {
    pub subject: String,
    pub uris: Vec<String>,
    pub dns: Vec<String>,
}

/// A certificate's first URI SAN: the workload identity (SPIFFE id) it carries.
pub fn first_uri(der: &[u8]) -> Option<String> {
    cert_facts(der).uris.into_iter().next()
}

pub fn cert_facts(der: &[u8]) -> CertFacts {
    let cert = CertificateDer::from(der.to_vec());
    let sans = sans(&cert);
    let pick = |t: SanType| -> Vec<String> {
        sans.iter()
            .filter(|(k, _)| *k == t)
            .map(|(_, v)| v.clone())
            .collect()
    };
    let subject = match x509_parser::parse_x509_certificate(der) {
        Ok((_, c)) => {
            let mut parts: Vec<String> = c
                .subject()
                .iter_rdn()
                .flat_map(|rdn| rdn.iter())
                .map(|a| {
                    let oid = a.attr_type().to_id_string();
                    // OpenSSL's short names for the attributes certificates use.
                    let name = match oid.as_str() {
                        "2.5.4.3" => "CN",
                        "2.5.4.6" => "C",
                        "2.5.4.7" => "L",
                        "2.5.4.8" => "ST",
                        "2.5.4.9" => "street",
                        "2.5.4.10" => "O",
                        "2.5.4.11" => "OU",
                        "2.5.4.5" => "serialNumber",
                        "1.2.840.113549.1.9.1" => "emailAddress",
                        "0.9.2342.19200300.100.1.25" => "DC",
                        "0.9.2342.19200300.100.1.1" => "UID",
                        other => other,
                    };
                    format!("{name}={}", a.as_str().unwrap_or(""))
                })
                .collect();
            // RFC 2253 lists the most specific part first.
            parts.reverse();
            parts.join(",")
        }
        Err(_) => String::new(),
    };
    CertFacts {
        subject,
        uris: pick(SanType::Uri),
        dns: pick(SanType::Dns),
    }
}

pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    /// The first URI SAN of this side's (client) certificate: the workload's own identity.
    pub local_uri: Option<String>,
    /// The SNI sent; when empty none is (the name below only satisfies rustls).
    pub server_name: ServerName<'static>,
}

fn data(ds: Option<&DataSource>, what: &str) -> Result<Vec<u8>, String> {
    match ds.and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::Filename(f)) => {
            std::fs::read(f).map_err(|e| format!("{what}: cannot read {f}: {e}"))
        }
        Some(data_source::Specifier::InlineBytes(b)) => Ok(b.clone()),
        Some(data_source::Specifier::InlineString(s)) => Ok(s.clone().into_bytes()),
        Some(data_source::Specifier::EnvironmentVariable(v)) => std::env::var(v)
            .map(String::into_bytes)
            .map_err(|_| format!("{what}: environment variable {v} is not set")),
        None => Err(format!("{what}: not set")),
    }
}

fn sds<'a>(set: &'a ResourceSet, c: &SdsSecretConfig) -> Result<&'a secret::Type, String> {
    set.secret(&c.name)
        .and_then(|s| s.value.r#type.as_ref())
        .ok_or_else(|| format!("SDS secret '{}' is not in the configuration", c.name))
}

/// An SDS secret that could not be used is refused when it arrives (Envoy NACKs it when its
/// TLS contexts fail to build, and keeps the previous one): its certificate and key, or trusted
/// CA, must read as PEM.
pub fn check_secret(
    s: &pilotfish_api::pb::envoy::extensions::transport_sockets::tls::v3::Secret,
) -> Result<(), String> {
    match &s.r#type {
        Some(secret::Type::TlsCertificate(c)) => {
            let common = CommonTlsContext {
                tls_certificates: vec![c.clone()],
                ..Default::default()
            };
            let chain = certificate(&ResourceSet::default(), &common)?.map(|(chain, _)| chain);
            chain
                .unwrap_or_default()
                .iter()
                .try_for_each(|c| x509(c, "certificate_chain"))
        }
        Some(secret::Type::ValidationContext(v)) => {
            if let Some(ca) = &v.trusted_ca {
                let pem = data(Some(ca), "trusted_ca")?;
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("trusted_ca: {e}"))?;
                if certs.is_empty() {
                    return Err("trusted_ca: no PEM certificate".into());
                }
                certs.iter().try_for_each(|c| x509(c, "trusted_ca"))?;
            }
            Ok(())
        }
        Some(_) => Err(format!(
            "secret '{}': only TLS certificates and validation contexts are implemented",
            s.name
        )),
        None => Err(format!("secret '{}': no secret in it", s.name)),
    }
}

fn x509(c: &CertificateDer<'_>, what: &str) -> Result<(), String> {
    x509_parser::parse_x509_certificate(c)
        .map(|_| ())
        .map_err(|e| format!("{what}: not an X.509 certificate: {e}"))
}

fn certificate(
    set: &ResourceSet,
    common: &CommonTlsContext,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, String> {
    let cert: TlsCertificate = if let Some(c) = common.tls_certificates.first() {
        c.clone()
    } else if let Some(s) = common.tls_certificate_sds_secret_configs.first() {
        match sds(set, s)? {
            secret::Type::TlsCertificate(c) => c.clone(),
            _ => return Err(format!("SDS secret '{}' is not a certificate", s.name)),
        }
    } else {
        return Ok(None);
    };
    let chain_pem = data(cert.certificate_chain.as_ref(), "certificate_chain")?;
    let key_pem = data(cert.private_key.as_ref(), "private_key")?;
    if key_pem.starts_with(b"[redacted]") {
        return Err("the private key was redacted in the config dump; supply the real key".into());
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate_chain: {e}"))?;
    if chain.is_empty() {
        return Err("certificate_chain: no PEM certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| format!("private_key: {e}"))?;
    Ok(Some((chain, key)))
}

/// The certificate's `ocsp_staple` (a DER OCSP response) sent to clients that ask for one;
/// empty for none.
fn ocsp_staple(set: &ResourceSet, common: &CommonTlsContext) -> Result<Vec<u8>, String> {
    let cert = match (
        common.tls_certificates.first(),
        common.tls_certificate_sds_secret_configs.first(),
    ) {
        (Some(c), _) => c.clone(),
        (None, Some(s)) => match sds(set, s)? {
            secret::Type::TlsCertificate(c) => c.clone(),
            _ => return Ok(vec![]),
        },
        _ => return Ok(vec![]),
    };
    match &cert.ocsp_staple {
        Some(ds) => data(Some(ds), "ocsp_staple"),
        None => Ok(vec![]),
    }
}

/// The validation context in effect: inline, from SDS, or Istio's combined form (the default
/// context's SAN matchers with the SDS secret's trusted CA).
fn validation(
    set: &ResourceSet,
    common: &CommonTlsContext,
) -> Result<Option<CertificateValidationContext>, String> {
    let from_sds = |c: &SdsSecretConfig| -> Result<CertificateValidationContext, String> {
        match sds(set, c)? {
            secret::Type::ValidationContext(v) => Ok(v.clone()),
            _ => Err(format!(
                "SDS secret '{}' is not a validation context",
                c.name
            )),
        }
    };
    Ok(match &common.validation_context_type {
        Some(ValidationContextType::ValidationContext(v)) => Some(v.clone()),
        Some(ValidationContextType::ValidationContextSdsSecretConfig(c)) => Some(from_sds(c)?),
        Some(ValidationContextType::CombinedValidationContext(c)) => {
            let mut v = c.default_validation_context.clone().unwrap_or_default();
            if let Some(s) = &c.validation_context_sds_secret_config {
                let dynamic = from_sds(s)?;
                if dynamic.trusted_ca.is_some() {
                    v.trusted_ca = dynamic.trusted_ca;
                }
                v.match_typed_subject_alt_names
                    .extend(dynamic.match_typed_subject_alt_names);
                #[allow(deprecated)]
                v.match_subject_alt_names
                    .extend(dynamic.match_subject_alt_names);
            }
            Some(v)
        }
        Some(_) => {
            return Err("certificate provider validation contexts are not implemented".into())
        }
        None => None,
    })
}

fn roots(v: &CertificateValidationContext) -> Result<Option<RootCertStore>, String> {
    if v.trusted_ca.is_none() {
        return Ok(None);
    }
    let pem = data(v.trusted_ca.as_ref(), "trusted_ca")?;
    let mut store = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| format!("trusted_ca: {e}"))?;
        store.add(c).map_err(|e| format!("trusted_ca: {e}"))?;
    }
    Ok(Some(store))
}

fn san_matchers(v: &CertificateValidationContext) -> Result<Vec<SanMatcher>, String> {
    let mut out = vec![];
    let mut add = |kind: SanType, m: &StringMatcher| -> Result<(), String> {
        out.push(SanMatcher {
            kind,
            matcher: CompiledStringMatcher::new(m)?,
            shown: format!("{m:?}"),
        });
        Ok(())
    };
    for t in &v.match_typed_subject_alt_names {
        let kind = SanType::try_from(t.san_type).unwrap_or(SanType::Unspecified);
        if let Some(m) = &t.matcher {
            add(kind, m)?;
        }
    }
    #[allow(deprecated)]
    for m in &v.match_subject_alt_names {
        add(SanType::Unspecified, m)?;
    }
    Ok(out)
}

/// The leaf certificate's SANs, with their types.
fn sans(cert: &CertificateDer<'_>) -> Vec<(SanType, String)> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return vec![];
    };
    let Ok(Some(ext)) = parsed.subject_alternative_name() else {
        return vec![];
    };
    ext.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((SanType::Dns, d.to_string())),
            GeneralName::URI(u) => Some((SanType::Uri, u.to_string())),
            GeneralName::RFC822Name(e) => Some((SanType::Email, e.to_string())),
            GeneralName::IPAddress(b) => match b.len() {
                4 => Some((
                    SanType::IpAddress,
                    std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string(),
                )),
                16 => {
                    let a: [u8; 16] = (*b).try_into().ok()?;
                    Some((SanType::IpAddress, std::net::Ipv6Addr::from(a).to_string()))
                }
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Whether the peer's leaf certificate carries a SAN one of the matchers takes (no matchers, or
/// no certificate where none was required: nothing to check).
pub fn check_sans(
    matchers: &[SanMatcher],
    leaf: Option<&CertificateDer<'_>>,
) -> Result<(), String> {
    if matchers.is_empty() {
        return Ok(());
    }
    let Some(leaf) = leaf else {
        return Ok(());
    };
    let seen = sans(leaf);
    let ok = matchers.iter().any(|m| {
        seen.iter().any(|(kind, value)| {
            (m.kind == SanType::Unspecified || m.kind == *kind) && m.matcher.matches(value)
        })
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "verify cert failed: SAN matcher: the certificate's SANs {:?} match none of {}",
            seen.iter().map(|(_, v)| v).collect::<Vec<_>>(),
            matchers
                .iter()
                .map(|m| m.shown.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

/// rustls' TLS versions for Envoy's tls_params; rustls has no TLS 1.0 or 1.1.
fn versions(
    params: Option<&TlsParameters>,
    default_max: TlsProtocol,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, String> {
    let p = params.cloned().unwrap_or_default();
    let min = match TlsProtocol::try_from(p.tls_minimum_protocol_version)
        .unwrap_or(TlsProtocol::TlsAuto)
    {
        TlsProtocol::TlsAuto | TlsProtocol::TlSv10 | TlsProtocol::TlSv11 | TlsProtocol::TlSv12 => {
            12
        }
        TlsProtocol::TlSv13 => 13,
    };
    let max = match TlsProtocol::try_from(p.tls_maximum_protocol_version)
        .unwrap_or(TlsProtocol::TlsAuto)
    {
        TlsProtocol::TlsAuto => {
            if default_max == TlsProtocol::TlSv13 {
                13
            } else {
                12
            }
        }
        TlsProtocol::TlSv13 => 13,
        TlsProtocol::TlSv12 => 12,
        TlsProtocol::TlSv10 | TlsProtocol::TlSv11 => {
            return Err(
                "TLS 1.0 and 1.1 are not available (rustls implements TLS 1.2 and 1.3)".into(),
            )
        }
    };
    let mut v = vec![];
    if min <= 13 && max >= 13 {
        v.push(&rustls::version::TLS13);
    }
    if min <= 12 && max >= 12 {
        v.push(&rustls::version::TLS12);
    }
    if v.is_empty() {
        return Err("tls_minimum_protocol_version is above tls_maximum_protocol_version".into());
    }
    Ok(v)
}

/// Envoy's (BoringSSL's) cipher suite names mapped to rustls' TLS 1.2 suites; TLS 1.3 suites are
/// not configurable in Envoy and always on.
fn provider(params: Option<&TlsParameters>) -> Result<Arc<CryptoProvider>, String> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    let names = params.map(|p| p.cipher_suites.clone()).unwrap_or_default();
    if !names.is_empty() {
        let mut suites = vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ];
        for n in &names {
            // `[A|B]` is BoringSSL's equal-preference group: take each member.
            for name in n.trim_start_matches('[').trim_end_matches(']').split('|') {
                let s = match name {
                    "ECDHE-ECDSA-AES128-GCM-SHA256" => cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                    "ECDHE-RSA-AES128-GCM-SHA256" => cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                    "ECDHE-ECDSA-AES256-GCM-SHA384" => cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                    "ECDHE-RSA-AES256-GCM-SHA384" => cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                    "ECDHE-ECDSA-CHACHA20-POLY1305" => {
                        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                    }
                    "ECDHE-RSA-CHACHA20-POLY1305" => {
                        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
                    }
                    other => {
                        tracing::warn!(target: "config", "cipher suite '{other}' has no rustls equivalent; left out");
                        continue;
                    }
                };
                suites.push(s);
            }
        }
        p.cipher_suites = suites;
    }
    let curves = params.map(|p| p.ecdh_curves.clone()).unwrap_or_default();
    if !curves.is_empty() {
        use rustls::crypto::ring::kx_group;
        let mut groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup> = vec![];
        for c in &curves {
            for name in c.split(':') {
                match name {
                    "X25519" => groups.push(kx_group::X25519),
                    "P-256" | "prime256v1" => groups.push(kx_group::SECP256R1),
                    "P-384" | "secp384r1" => groups.push(kx_group::SECP384R1),
                    other => {
                        tracing::warn!(target: "config", "ECDH curve '{other}' has no rustls equivalent; left out");
                    }
                }
            }
        }
        if groups.is_empty() {
            return Err(format!(
                "ecdh_curves {curves:?}: none is available (rustls offers X25519, P-256, P-384)"
            ));
        }
        p.kx_groups = groups;
    }
    Ok(Arc::new(p))
}

pub fn downstream(set: &ResourceSet, ctx: &DownstreamTlsContext) -> Result<DownstreamTls, String> {
    let common = ctx.common_tls_context.clone().unwrap_or_default();
    let (chain, key) = certificate(set, &common)?
        .ok_or("a downstream TLS context needs a certificate (tls_certificates or tls_certificate_sds_secret_configs)")?;
    let local_uri = first_uri(chain[0].as_ref());
    let provider = provider(common.tls_params.as_ref())?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions(common.tls_params.as_ref(), TlsProtocol::TlSv13)?)
        .map_err(|e| e.to_string())?;
    let v = validation(set, &common)?;
    let mut require = ctx
        .require_client_certificate
        .as_ref()
        .is_some_and(|b| b.value);
    let mut san_matchers = vec![];
    let builder = match &v {
        Some(v) => {
            san_matchers = self::san_matchers(v)?;
            // Envoy requires a client certificate whenever it has SANs to check in it, whatever
            // require_client_certificate says.
            require |= !san_matchers.is_empty();
            match roots(v)? {
                Some(store) => {
                    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                        Arc::new(store),
                        provider.clone(),
                    );
                    let verifier = if require {
                        verifier
                    } else {
                        verifier.allow_unauthenticated()
                    };
                    builder.with_client_cert_verifier(verifier.build().map_err(|e| e.to_string())?)
                }
                None if require => {
                    return Err(
                        "require_client_certificate needs a trusted_ca in the validation context"
                            .into(),
                    )
                }
                None => builder.with_no_client_auth(),
            }
        }
        None if require => {
            return Err("require_client_certificate needs a validation context".into())
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert_with_ocsp(chain, key, ocsp_staple(set, &common)?)
        .map_err(|e| format!("certificate and key: {e}"))?;
    // Envoy resumes sessions both ways unless told not to: tickets (stateless) and its
    // session cache (stateful).
    use pilotfish_api::pb::envoy::extensions::transport_sockets::tls::v3::downstream_tls_context::SessionTicketKeysType;
    if !matches!(
        ctx.session_ticket_keys_type,
        Some(SessionTicketKeysType::DisableStatelessSessionResumption(
            true
        ))
    ) {
        config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
    }
    if ctx.disable_stateful_session_resumption {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    }
    config.alpn_protocols = common
        .alpn_protocols
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    let without_alpn = (!config.alpn_protocols.is_empty()).then(|| {
        let mut c = config.clone();
        c.alpn_protocols.clear();
        Arc::new(c)
    });
    Ok(DownstreamTls {
        config: Arc::new(config),
        without_alpn,
        san_matchers,
        local_uri,
    })
}

/// Envoy's upstream verification: the chain against the trusted CA when there is one (not the
/// SNI: Envoy checks only the SANs it is told to), then the SAN matchers; nothing at all
/// without a validation context.
#[derive(Debug)]
struct EnvoyServerVerifier {
    roots: Option<Arc<RootCertStore>>,
    matchers: Arc<Vec<SanMatcher>>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for SanMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl ServerCertVerifier for EnvoyServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        check_sans(&self.matchers, Some(end_entity)).map_err(rustls::Error::General)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Upstream TLS built once per distinct context: clusters whose contexts differ only by SNI
/// (Istio's thousands of `outbound|...` clusters) share one client configuration (and its
/// session cache, keyed by server name); each keeps its own SNI.
#[derive(Default)]
pub struct UpstreamTlsCache(std::collections::HashMap<Vec<u8>, UpstreamTls>);

impl UpstreamTlsCache {
    /// `auto`: the cluster speaks what the host picks, so a context naming no ALPN offers h2
    /// and http/1.1.
    pub fn get(
        &mut self,
        set: &ResourceSet,
        ctx: &UpstreamTlsContext,
        auto: bool,
    ) -> Result<UpstreamTls, String> {
        let mut key_ctx = ctx.clone();
        key_ctx.sni.clear();
        let mut key = prost::Message::encode_to_vec(&key_ctx);
        key.extend([u8::from(ctx.sni.is_empty()), u8::from(auto)]);
        if let Some(shared) = self.0.get(&key) {
            return Ok(UpstreamTls {
                config: shared.config.clone(),
                local_uri: shared.local_uri.clone(),
                server_name: server_name(ctx)?,
            });
        }
        let mut t = upstream(set, ctx)?;
        if auto && t.config.alpn_protocols.is_empty() {
            let mut config = (*t.config).clone();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            t.config = Arc::new(config);
        }
        self.0.insert(
            key,
            UpstreamTls {
                config: t.config.clone(),
                local_uri: t.local_uri.clone(),
                server_name: t.server_name.clone(),
            },
        );
        Ok(t)
    }
}

/// The name the handshake is made for: the SNI, or (without one, when none is sent) a
/// placeholder that only satisfies rustls.
fn server_name(ctx: &UpstreamTlsContext) -> Result<ServerName<'static>, String> {
    if ctx.sni.is_empty() {
        return Ok(ServerName::IpAddress(
            std::net::Ipv4Addr::UNSPECIFIED.into(),
        ));
    }
    ServerName::try_from(ctx.sni.clone()).map_err(|e| format!("sni '{}': {e}", ctx.sni))
}

pub fn upstream(set: &ResourceSet, ctx: &UpstreamTlsContext) -> Result<UpstreamTls, String> {
    let common = ctx.common_tls_context.clone().unwrap_or_default();
    let provider = provider(common.tls_params.as_ref())?;
    // Envoy's client default tops out at TLS 1.2 unless told otherwise.
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions(common.tls_params.as_ref(), TlsProtocol::TlSv12)?)
        .map_err(|e| e.to_string())?;
    let v = validation(set, &common)?;
    let (roots, matchers) = match &v {
        Some(v) => (roots(v)?.map(Arc::new), san_matchers(v)?),
        None => (None, vec![]),
    };
    let verifier = EnvoyServerVerifier {
        roots,
        matchers: Arc::new(matchers),
        provider: provider.clone(),
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut local_uri = None;
    let mut config = match certificate(set, &common)? {
        Some((chain, key)) => {
            local_uri = chain.first().and_then(|c| first_uri(c.as_ref()));
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate and key: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = common
        .alpn_protocols
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    if ctx.sni.is_empty() {
        config.enable_sni = false;
    }
    let server_name = server_name(ctx)?;
    Ok(UpstreamTls {
        config: Arc::new(config),
        local_uri,
        server_name,
    })
}
