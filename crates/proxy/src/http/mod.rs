//! The `http_connection_manager` network filter: HTTP/1.1 and HTTP/2 (hyper) on a downstream
//! connection, the request headers Envoy's connection manager sets (x-forwarded-for,
//! x-forwarded-proto, x-request-id, x-envoy-internal, ...), routing by the shared decision
//! (`pilotfish_decide::router`), the route's header mutations, local replies with Envoy's status,
//! body and response flag, the router's forwarding (see `upstream`), its counters and its access
//! log.

pub mod cors;
pub mod fault;
pub mod grpc_stats;
pub mod istio;
pub mod path;
pub mod timeouts;
pub mod trace;
pub mod upstream;

use crate::access_log::{AccessLog, Entry, HttpEntry, Template};
use crate::server::Server;
use crate::stats::{Stat, Store};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use pilotfish_api::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValueOption,
};
use pilotfish_api::pb::envoy::config::route::v3::{route, RouteAction};
use pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{CodecType, RouteSpecifier, ServerHeaderTransformation},
    HttpConnectionManager,
};
use pilotfish_config::resources::ResourceSet;
use pilotfish_decide::router::{Action, RouteTable};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// A body of `bytes` (local replies, direct responses).
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// The connection a stream arrived on.
pub struct Downstream {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    /// What its TLS handshake established; None in plaintext.
    pub tls: Option<Arc<crate::transport_socket::TlsInfo>>,
    pub server_name: Option<String>,
    /// The filter chain's drain (an update removed or replaced it).
    pub drain: Option<crate::server::Drain>,
    /// A response found the drain telling the connection to close: an HTTP/2 connection sends
    /// GOAWAY.
    pub goaway: tokio::sync::Notify,
}

/// A listener's connection manager: replaced whole when an update changes the route
/// configuration it uses, so each new stream, also on a connection already open, routes by
/// the latest routes (as Envoy's RDS does).
pub type HcmSlot = arc_swap::ArcSwap<HttpConnectionManagerFilter>;

/// `http.<stat_prefix>.*`
struct HcmStats {
    downstream_cx_total: Arc<Stat>,
    downstream_cx_active: Arc<Stat>,
    downstream_cx_http1_total: Arc<Stat>,
    downstream_cx_http2_total: Arc<Stat>,
    downstream_rq_total: Arc<Stat>,
    downstream_rq_active: Arc<Stat>,
    downstream_rq_http1_total: Arc<Stat>,
    downstream_rq_http2_total: Arc<Stat>,
    downstream_rq_completed: Arc<Stat>,
    /// 1xx..5xx
    downstream_rq_xx: [Arc<Stat>; 5],
    no_route: Arc<Stat>,
    no_cluster: Arc<Stat>,
    rq_direct_response: Arc<Stat>,
    rq_total: Arc<Stat>,
    downstream_rq_idle_timeout: Arc<Stat>,
    downstream_rq_max_duration_reached: Arc<Stat>,
    downstream_rq_timeout: Arc<Stat>,
    downstream_rq_header_timeout: Arc<Stat>,
    downstream_rq_too_many_headers: Arc<Stat>,
    downstream_cx_idle_timeout: Arc<Stat>,
    downstream_cx_max_duration_reached: Arc<Stat>,
    downstream_cx_max_requests_reached: Arc<Stat>,
}

impl HcmStats {
    fn new(prefix: &str, stats: &Store) -> HcmStats {
        let c = |n: &str| stats.counter(&format!("http.{prefix}.{n}"));
        let g = |n: &str| stats.gauge(&format!("http.{prefix}.{n}"));
        HcmStats {
            downstream_cx_total: c("downstream_cx_total"),
            downstream_cx_active: g("downstream_cx_active"),
            downstream_cx_http1_total: c("downstream_cx_http1_total"),
            downstream_cx_http2_total: c("downstream_cx_http2_total"),
            downstream_rq_total: c("downstream_rq_total"),
            downstream_rq_active: g("downstream_rq_active"),
            downstream_rq_http1_total: c("downstream_rq_http1_total"),
            downstream_rq_http2_total: c("downstream_rq_http2_total"),
            downstream_rq_completed: c("downstream_rq_completed"),
            downstream_rq_xx: [1, 2, 3, 4, 5].map(|i| c(&format!("downstream_rq_{i}xx"))),
            no_route: c("no_route"),
            no_cluster: c("no_cluster"),
            // Counted only for internal redirects, which pilotfish does not follow.
            rq_direct_response: {
                c("rq_redirect");
                c("rq_direct_response")
            },
            rq_total: c("rq_total"),
            downstream_rq_idle_timeout: c("downstream_rq_idle_timeout"),
            downstream_rq_max_duration_reached: c("downstream_rq_max_duration_reached"),
            downstream_rq_timeout: c("downstream_rq_timeout"),
            downstream_rq_header_timeout: c("downstream_rq_header_timeout"),
            downstream_rq_too_many_headers: c("downstream_rq_too_many_headers"),
            downstream_cx_idle_timeout: c("downstream_cx_idle_timeout"),
            downstream_cx_max_duration_reached: c("downstream_cx_max_duration_reached"),
            downstream_cx_max_requests_reached: c("downstream_cx_max_requests_reached"),
        }
    }
}

/// An http_connection_manager as configured on one filter chain, built at start-up.
pub struct HttpConnectionManagerFilter {
    pub config: HttpConnectionManager,
    /// The route configuration (inline, or RDS by name from the loaded configuration); None
    /// when RDS names one the configuration lacks: every request is answered 404.
    routes: Option<Arc<RouteTable>>,
    stats: HcmStats,
    logs: Vec<AccessLog>,
    /// The fault filter, when the chain has one: its configuration per route (the filter's own
    /// where a route and its virtual host name none) and its counters (aborts_injected,
    /// delays_injected).
    fault: Option<FaultFilter>,
    /// The CORS filter's policies per route, when the chain has the filter.
    cors: Option<PerRoute<cors::Policy>>,
    conn_limits: timeouts::ConnLimits,
    tracing: Option<trace::Tracing>,
    grpc_stats: Option<grpc_stats::GrpcStats>,
    local_reply: Option<LocalReply>,
    metadata_exchange: Option<istio::MetadataExchange>,
    alpn: Option<istio::AlpnOverride>,
    istio_stats: Option<crate::istio_stats::IstioStats>,
    /// Whether anything reads a stream's header lists (access logs, local reply mappers, header
    /// values with command operators such as `%REQ(...)%`): without, they are not made.
    keeps_headers: bool,
}

impl HttpConnectionManagerFilter {
    /// `istio.stats`: the ended stream into Istio's metrics. Sizes are Envoy's
    /// `request.total_size` / `response.total_size`: the headers' names and values (pseudo
    /// headers included) and the body.
    fn report_istio_stats(&self, e: &Entry) {
        let (Some(stats), Some(h)) = (&self.istio_stats, &e.http) else {
            return;
        };
        let report = crate::istio_stats::Report {
            downstream_peer: h.downstream_peer.as_deref(),
            upstream_peer: h.upstream_peer.as_deref(),
            route: &h.route_name,
            authority: &h.authority,
            response_code: e.response_code,
            flags: &e.flags,
            grpc: h.grpc.then_some(h.grpc_status),
            ..crate::istio_stats::Report::of_connection(
                h.downstream_tls.as_deref(),
                h.upstream_identity.as_deref(),
                &e.upstream_cluster,
            )
        };
        let request = h.request_header_bytes
            + (":authority".len() + h.authority.len() + ":path".len() + h.path.len()) as u64
            + (":method".len() + h.method.len()) as u64
            + e.bytes_received;
        let response = h.response_header_bytes
            + (":status".len() + 3) as u64 * u64::from(e.response_code != 0)
            + e.bytes_sent;
        stats.http(&report, e.duration.as_millis() as u64, request, response);
    }
}

/// local_reply_config: how the connection manager's own replies are rewritten, by the first
/// mapper whose filter matches, then formatted.
struct LocalReply {
    mappers: Vec<Mapper>,
    body_format: Option<crate::access_log::BodyFormat>,
}

struct Mapper {
    filter: crate::access_log::filter::Filter,
    status: Option<u16>,
    body: Option<String>,
    body_format: Option<crate::access_log::BodyFormat>,
    headers_to_add: Vec<HeaderValueOption>,
}

impl LocalReply {
    fn new(
        c: &pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::LocalReplyConfig,
        warn: &mut Vec<String>,
    ) -> LocalReply {
        let format =
            |f: Option<&pilotfish_api::pb::envoy::config::core::v3::SubstitutionFormatString>,
             warn: &mut Vec<String>| {
                match crate::access_log::BodyFormat::new(f?) {
                    Ok((b, unknown)) => {
                        warn.extend(unknown.into_iter().map(|u| {
                            format!("local_reply_config: operator {u} is not implemented")
                        }));
                        Some(b)
                    }
                    Err(e) => {
                        warn.push(format!("local_reply_config: {e}"));
                        None
                    }
                }
            };
        let body_format = format(c.body_format.as_ref(), warn);
        let mappers = c
            .mappers
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut unsupported = vec![];
                let filter = crate::access_log::filter::Filter::new(
                    m.filter.as_ref().unwrap_or(&Default::default()),
                    &format!("local_reply_config.mappers[{i}].filter"),
                    &mut unsupported,
                );
                warn.extend(unsupported);
                Mapper {
                    filter,
                    status: m.status_code.as_ref().map(|v| v.value as u16),
                    body: m.body.as_ref().and_then(|d| match &d.specifier {
                        Some(pilotfish_api::pb::envoy::config::core::v3::data_source::Specifier::InlineString(s)) => Some(s.clone()),
                        Some(pilotfish_api::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                        Some(pilotfish_api::pb::envoy::config::core::v3::data_source::Specifier::Filename(p)) => std::fs::read_to_string(p).ok(),
                        _ => None,
                    }),
                    body_format: format(m.body_format_override.as_ref(), warn),
                    headers_to_add: m.headers_to_add.clone(),
                }
            })
            .collect();
        LocalReply {
            mappers,
            body_format,
        }
    }

    /// Rewrites a local reply (`body` its text) as configured; `entry` is the stream as it
    /// stands, its response code the reply's. The reply, and its body as sent.
    fn apply(
        &self,
        response: Response<Body>,
        body: &str,
        entry: &mut Entry,
    ) -> (Response<Body>, String) {
        let (mut parts, _) = response.into_parts();
        let mut text = body.to_string();
        let mut format = self.body_format.as_ref();
        if let Some(m) = self.mappers.iter().find(|m| m.filter.evaluate(entry)) {
            // Header values see the reply as it was.
            apply_headers(&mut parts.headers, &m.headers_to_add, &[], entry);
            if let Some(s) = m.status.and_then(|s| StatusCode::from_u16(s).ok()) {
                parts.status = s;
                entry.response_code = s.as_u16() as u32;
            }
            if let Some(b) = &m.body {
                text = b.clone();
            }
            format = m.body_format.as_ref().or(format);
        }
        let mut content_type = (!text.is_empty()).then_some("text/plain");
        if let Some(f) = format {
            // LOCAL_REPLY_BODY is the reply's body while it is formatted, not in access logs.
            if let Some(h) = entry.http.as_mut() {
                h.local_reply_body = Some(text);
            }
            text = f.render(entry);
            if let Some(h) = entry.http.as_mut() {
                h.local_reply_body = None;
            }
            content_type = Some(f.content_type());
        }
        parts.headers.remove("content-type");
        if let Some(t) = content_type.and_then(|t| HeaderValue::from_str(t).ok()) {
            parts.headers.insert("content-type", t);
        }
        if !text.is_empty() || parts.headers.contains_key("content-length") {
            parts
                .headers
                .insert("content-length", HeaderValue::from(text.len()));
        }
        (Response::from_parts(parts, full(text.clone())), text)
    }
}

struct FaultFilter {
    own: Arc<fault::Fault>,
    per_route: PerRoute<fault::Fault>,
    /// aborts_injected, delays_injected
    counters: [Arc<Stat>; 2],
}

/// An HTTP filter's per-route configuration, made once with the route table: each virtual host's
/// own and each route's, a route without one taking its virtual host's.
struct PerRoute<T> {
    vhosts: Vec<VhostConfig<T>>,
}

struct VhostConfig<T> {
    own: Option<Arc<T>>,
    routes: Vec<Option<Arc<T>>>,
}

impl<T> PerRoute<T> {
    fn new(
        table: Option<&RouteTable>,
        of_vhost: impl Fn(&pilotfish_api::pb::envoy::config::route::v3::VirtualHost) -> Option<T>,
        of_route: impl Fn(&pilotfish_api::pb::envoy::config::route::v3::Route) -> Option<T>,
    ) -> PerRoute<T> {
        let vhosts = table
            .iter()
            .flat_map(|t| &t.config.virtual_hosts)
            .map(|vh| {
                let own = of_vhost(vh).map(Arc::new);
                let routes = vh
                    .routes
                    .iter()
                    .map(|r| of_route(r).map(Arc::new).or_else(|| own.clone()))
                    .collect();
                VhostConfig { own, routes }
            })
            .collect();
        PerRoute { vhosts }
    }

    /// The configuration for the matched virtual host and route (the virtual host's when no
    /// route matched).
    fn get(&self, vhost: Option<usize>, route: Option<usize>) -> Option<&Arc<T>> {
        let v = self.vhosts.get(vhost?)?;
        match route {
            Some(r) => v.routes.get(r)?.as_ref(),
            None => v.own.as_ref(),
        }
    }
}

/// The route configuration an http_connection_manager uses.
pub fn route_configuration(
    set: &ResourceSet,
    hcm: &HttpConnectionManager,
) -> Result<pilotfish_api::pb::envoy::config::route::v3::RouteConfiguration, String> {
    match &hcm.route_specifier {
        Some(RouteSpecifier::RouteConfig(rc)) => Ok(rc.clone()),
        Some(RouteSpecifier::Rds(rds)) => set
            .route_configs
            .iter()
            .find(|r| r.name == rds.route_config_name && !r.origin.is_static())
            .or_else(|| set.route_config(&rds.route_config_name))
            .map(|r| r.value.clone())
            .ok_or_else(|| {
                format!(
                    "RDS route configuration '{}' is not in the configuration",
                    rds.route_config_name
                )
            }),
        _ => Err("no route configuration (scoped routes are not implemented)".into()),
    }
}

impl HttpConnectionManagerFilter {
    /// `direction`: its listener's traffic_direction (an outbound listener's decorator goes
    /// upstream; Istio's metadata exchange sends this node's metadata by it).
    pub fn new(
        set: &ResourceSet,
        config: HttpConnectionManager,
        stats: &Store,
        direction: i32,
    ) -> Self {
        use pilotfish_api::pb::envoy::config::core::v3::TrafficDirection;
        let egress = direction == TrafficDirection::Outbound as i32;
        let routes = match route_configuration(set, &config).and_then(|rc| RouteTable::new(&rc)) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => {
                tracing::warn!(target: "config", "http_connection_manager '{}': {e}: requests are answered 404", config.stat_prefix);
                None
            }
        };
        let (logs, warnings) = crate::access_log::build(&config.access_log);
        for w in warnings {
            tracing::warn!(target: "config", "http_connection_manager '{}': {w}", config.stat_prefix);
        }
        use pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType;
        let typed = |f: &pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter| match &f.config_type {
            Some(ConfigType::TypedConfig(any)) => Some(any.clone()),
            _ => None,
        };
        let table = routes.as_deref();
        let fault = config.http_filters.iter().find_map(|f| {
            let own = Arc::new(fault::Fault::new(pilotfish_config::model::unpack(&typed(
                f,
            )?)?));
            let name = f.name.as_str();
            let per_route = PerRoute::new(
                table,
                |v| fault::Fault::per_filter(name, &v.typed_per_filter_config),
                |r| fault::Fault::per_filter(name, &r.typed_per_filter_config),
            );
            let n = |k: &str| stats.counter(&format!("http.{}.fault.{k}", config.stat_prefix));
            Some(FaultFilter {
                own,
                per_route,
                counters: [n("aborts_injected"), n("delays_injected")],
            })
        });
        let cors = config.http_filters.iter().find_map(|f| {
            if !typed(f)?.type_url.ends_with("filters.http.cors.v3.Cors") {
                return None;
            }
            let name = f.name.as_str();
            Some(PerRoute::new(
                table,
                |v| cors::Policy::of_vhost(name, v),
                |r| cors::Policy::of_route(name, r),
            ))
        });
        let keeps_headers = !logs.is_empty()
            || config.local_reply_config.is_some()
            || routes.as_ref().is_some_and(|t| mutations_format(&t.config));
        HttpConnectionManagerFilter {
            keeps_headers,
            conn_limits: timeouts::ConnLimits::of(&config),
            tracing: trace::Tracing::of(set, &config, egress),
            metadata_exchange: config.http_filters.iter().find_map(|f| {
                let code = pilotfish_config::model::null_vm_plugin(&typed(f)?)?;
                (code == istio::METADATA_EXCHANGE_CODE).then(|| {
                    let node = set.bootstrap.node.as_ref();
                    istio::MetadataExchange::new(
                        node.map_or("", |n| n.id.as_str()),
                        node.and_then(|n| n.metadata.as_ref()),
                        direction,
                    )
                })
            }),
            istio_stats: config.http_filters.iter().find_map(|f| {
                let json = pilotfish_config::istio::stats_configuration(&typed(f)?)?;
                crate::istio_stats::IstioStats::new(set, &json, direction, stats.istio.clone())
                    .map_err(|e| tracing::warn!(target: "config", "http_connection_manager '{}': {e}: its Istio metrics are not kept", config.stat_prefix))
                    .ok()
            }),
            alpn: config.http_filters.iter().find_map(|f| {
                let any = typed(f)?;
                if !any.type_url.ends_with("istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig") {
                    return None;
                }
                let c = <pilotfish_api::istio::alpn::FilterConfig as prost::Message>::decode(any.value.as_slice()).ok()?;
                Some(istio::AlpnOverride::new(&c))
            }),
            local_reply: config.local_reply_config.as_ref().map(|c| {
                let mut warnings = vec![];
                let l = LocalReply::new(c, &mut warnings);
                for w in warnings {
                    tracing::warn!(target: "config", "http_connection_manager '{}': {w}", config.stat_prefix);
                }
                l
            }),
            grpc_stats: config.http_filters.iter().find_map(|f| {
                let any = typed(f)?;
                if !any
                    .type_url
                    .ends_with("filters.http.grpc_stats.v3.FilterConfig")
                {
                    return None;
                }
                Some(grpc_stats::GrpcStats::new(
                    &pilotfish_config::model::unpack(&any)?,
                ))
            }),
            cors,
            fault,
            stats: HcmStats::new(&config.stat_prefix, stats),
            routes,
            logs,
            config,
        }
    }

    /// The route configuration the connection manager routes by, if it has one.
    pub fn route_config(
        &self,
    ) -> Option<&pilotfish_api::pb::envoy::config::route::v3::RouteConfiguration> {
        self.routes.as_ref().map(|t| &t.config)
    }

    /// common_http_protocol_options.max_headers_count, when set.
    fn max_headers_count(&self) -> Option<usize> {
        self.config
            .common_http_protocol_options
            .as_ref()
            .and_then(|o| o.max_headers_count.as_ref())
            .map(|v| v.value as usize)
    }

    fn server_name(&self) -> &str {
        if self.config.server_name.is_empty() {
            "envoy"
        } else {
            &self.config.server_name
        }
    }
}

/// Serves the HTTP connection until either side closes it, or until it has been idle or open
/// too long: then it is drained (HTTP/2: GOAWAY at once; HTTP/1: closed at the end of the
/// drain period, when idle) and closed after `drain_timeout`. When its listener drains (an
/// update replaced or removed it), HTTP/2 gets GOAWAY at once and each HTTP/1 response says
/// `connection: close`; what is still open at the end of `--drain-time-s` is closed.
pub async fn serve(
    server: Arc<Server>,
    slot: Arc<HcmSlot>,
    io: Box<dyn crate::cluster::Io>,
    info: Arc<Downstream>,
    conn: u64,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let hcm = slot.load_full();
    hcm.stats.downstream_cx_total.inc();
    hcm.stats.downstream_cx_active.inc();
    let streams = timeouts::ConnStreams::new();
    let http2_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let svc = {
        let (slot, streams, http2_seen, info) = (
            slot.clone(),
            streams.clone(),
            http2_seen.clone(),
            info.clone(),
        );
        // The codec is known with the first request: count the connection under it then.
        let counted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let hcm = slot.load_full();
            if !counted.swap(true, Ordering::Relaxed) {
                if req.version() == hyper::Version::HTTP_2 {
                    http2_seen.store(true, Ordering::Relaxed);
                    hcm.stats.downstream_cx_http2_total.inc();
                } else {
                    hcm.stats.downstream_cx_http1_total.inc();
                }
            }
            let slot = streams.open();
            let (server, info) = (server.clone(), info.clone());
            async move {
                Ok::<_, std::convert::Infallible>(
                    stream(&server, &hcm, &info, req, conn, slot).await,
                )
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let codec = CodecType::try_from(hcm.config.codec_type).unwrap_or(CodecType::Auto);
    match codec {
        CodecType::Http1 => builder = builder.http1_only(),
        CodecType::Http2 => builder = builder.http2_only(),
        _ => {}
    }
    builder.http1().title_case_headers(false);
    // Envoy's limit is max_headers_count (100 by default); hyper's parser gets room above it so
    // the connection manager can refuse with Envoy's reply.
    if let Some(n) = hcm.max_headers_count() {
        builder.http1().max_headers(n + 16);
    }
    http2_options(&mut builder, hcm.config.http2_protocol_options.as_ref());
    let limits = hcm.conn_limits;
    let mut header_timeout = None;
    let io: Box<dyn crate::cluster::Io> = match limits.request_headers {
        Some(t) if codec != CodecType::Http2 => {
            let w = timeouts::HeadersTimeout::new(io, streams.clone(), t, hcm.server_name().into());
            header_timeout = Some(w.fired.clone());
            Box::new(w)
        }
        _ => io,
    };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(connection);
    let listener_drained = async {
        match info.drain.clone() {
            Some(mut drain) => drain.began().await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = connection.as_mut() => Some(r),
        ends = listener_drained => {
            tracing::debug!(target: "connection", connection = conn, "listener draining: closing within {:?}", ends - tokio::time::Instant::now());
            // Responses from now on tell the client to close as the drain decides (HTTP/1
            // `connection: close`, HTTP/2 GOAWAY), so a client that keeps sending loses no
            // request; a connection still open at the end is closed.
            let mut goaway_sent = false;
            let r = loop {
                if !goaway_sent
                    && http2_seen.load(Ordering::Relaxed)
                    && info.drain.as_ref().is_some_and(|d| d.close_now())
                {
                    connection.as_mut().graceful_shutdown();
                    goaway_sent = true;
                }
                tokio::select! {
                    r = connection.as_mut() => break r,
                    _ = info.goaway.notified(), if !goaway_sent => {}
                    _ = tokio::time::sleep_until(ends) => break Ok(()),
                }
            };
            return done_serving(&hcm, conn, r, header_timeout, &info);
        }
        why = limits.drain_due(&streams) => {
            match why {
                timeouts::Drain::Idle => hcm.stats.downstream_cx_idle_timeout.inc(),
                timeouts::Drain::MaxDuration => hcm.stats.downstream_cx_max_duration_reached.inc(),
                // Counted by the stream that reached it.
                timeouts::Drain::MaxRequests => {}
            }
            tracing::debug!(target: "connection", connection = conn, "{} reached: draining", match why {
                timeouts::Drain::Idle => "idle timeout",
                timeouts::Drain::MaxDuration => "max connection duration",
                timeouts::Drain::MaxRequests => "max requests per connection",
            });
            None
        }
    };
    let result = match result {
        Some(r) => r,
        None => {
            // HTTP/1 has no GOAWAY: the connection serves on through the drain period.
            if !http2_seen.load(Ordering::Relaxed) {
                if let Ok(r) = tokio::time::timeout(limits.drain, connection.as_mut()).await {
                    return done_serving(&hcm, conn, r, header_timeout, &info);
                }
            }
            connection.as_mut().graceful_shutdown();
            // Streams under way finish; a connection with none left is closed after the
            // drain period.
            loop {
                match tokio::time::timeout(limits.drain, connection.as_mut()).await {
                    Ok(r) => break r,
                    Err(_) if streams.busy() => continue,
                    Err(_) => break Ok(()),
                }
            }
        }
    };
    done_serving(&hcm, conn, result, header_timeout, &info);
}

fn done_serving(
    hcm: &Arc<HttpConnectionManagerFilter>,
    conn: u64,
    result: Result<(), BoxError>,
    header_timeout: Option<Arc<std::sync::atomic::AtomicBool>>,
    info: &Downstream,
) {
    if let Err(e) = result {
        tracing::debug!(target: "http", connection = conn, "codec: {e}");
    }
    // A request whose headers never completed got Envoy's 408: counted and logged as Envoy does.
    if header_timeout.is_some_and(|f| f.load(Ordering::Relaxed)) {
        hcm.stats.downstream_rq_header_timeout.inc();
        hcm.stats.downstream_rq_xx[3].inc();
        let mut e = Entry::new(
            SystemTime::now(),
            (info.remote, info.local),
            info.server_name.clone(),
            conn,
            pilotfish_api::pb::envoy::data::accesslog::v3::AccessLogType::DownstreamEnd,
        );
        e.response_code = 408;
        e.bytes_sent = "request header timeout".len() as u64;
        e.http = Some(Box::new(HttpEntry {
            details: "request_header_timeout".into(),
            ..Default::default()
        }));
        for l in &hcm.logs {
            l.write(&e);
        }
    }
    hcm.stats.downstream_cx_active.dec();
}

/// The connection manager's HTTP/2 settings (where unset, the 1024 concurrent streams Envoy 1.40
/// announces; hyper's window sizes, smaller than Envoy's 256 MiB, keep a connection's buffered
/// data small).
fn http2_options(
    builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    o: Option<&pilotfish_api::pb::envoy::config::core::v3::Http2ProtocolOptions>,
) {
    let mut h2 = builder.http2();
    let streams = o
        .and_then(|o| o.max_concurrent_streams.as_ref())
        .map_or(1024, |v| v.value);
    h2.max_concurrent_streams(streams);
    if let Some(v) = o.and_then(|o| o.initial_stream_window_size.as_ref()) {
        h2.initial_stream_window_size(v.value);
    }
    if let Some(v) = o.and_then(|o| o.initial_connection_window_size.as_ref()) {
        h2.initial_connection_window_size(v.value);
    }
}

/// `strip_matching_host_port` / `strip_any_host_port`: the authority routing sees.
fn strip_port(c: &HttpConnectionManager, authority: &str, listener_port: u16) -> String {
    use pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::StripPortMode;
    let Some((host, port)) = authority.rsplit_once(':') else {
        return authority.to_string();
    };
    // An IPv6 literal without a port has colons inside its brackets only.
    if host.starts_with('[') && !host.ends_with(']') || port.parse::<u16>().is_err() {
        return authority.to_string();
    }
    let any = matches!(
        c.strip_port_mode,
        Some(StripPortMode::StripAnyHostPort(true))
    );
    if any || (c.strip_matching_host_port && port == listener_port.to_string()) {
        host.to_string()
    } else {
        authority.to_string()
    }
}

/// The protocol an HTTP/1.1 request asks to upgrade to (`connection: upgrade` and `upgrade:`).
fn upgrade_of(req: &Request<Incoming>) -> Option<String> {
    // A CONNECT is an upgrade of its own kind.
    if req.method() == hyper::Method::CONNECT {
        return Some("connect".into());
    }
    if req.version() != hyper::Version::HTTP_11 {
        return None;
    }
    let h = req.headers();
    let asks = h
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| h.get("upgrade")?.to_str().ok().map(str::to_ascii_lowercase))
        .flatten()
}

/// Whether an upgrade to `kind` is allowed: the route's `upgrade_configs` decide when they name
/// it, else the connection manager's.
fn upgrade_allowed(hcm: &HttpConnectionManager, route: Option<&RouteAction>, kind: &str) -> bool {
    if let Some(u) = route
        .into_iter()
        .flat_map(|r| &r.upgrade_configs)
        .find(|u| u.upgrade_type.eq_ignore_ascii_case(kind))
    {
        return u.enabled.as_ref().is_none_or(|v| v.value);
    }
    hcm.upgrade_configs
        .iter()
        .find(|u| u.upgrade_type.eq_ignore_ascii_case(kind))
        .is_some_and(|u| u.enabled.as_ref().is_none_or(|v| v.value))
}

/// Joins an upgraded downstream and upstream (after the 101 is sent) and copies both ways.
/// Copies `r` into `w`, counting into `bytes`, until either ends: true when `r` did (its peer
/// closed), false when `w` could not be written.
async fn pump(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    bytes: &AtomicU64,
) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return true,
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::Relaxed);
                if w.write_all(&buf[..n]).await.is_err() {
                    return false;
                }
            }
        }
    }
}

/// What a downstream upgrade is joined to: the upstream's upgraded HTTP connection, or the TCP
/// connection of a CONNECT terminated here.
enum Joined {
    Upgraded(hyper::upgrade::OnUpgrade),
    Tcp(crate::cluster::Upstream),
}

/// Joins an upgraded downstream connection to its upstream once both are there. A CONNECT
/// tunnel's stream (`done`) ends with it: the first side to close closes the other, and a
/// client that closes first is DC (downstream_remote_disconnect), as Envoy logs it.
fn splice(down: hyper::upgrade::OnUpgrade, up: Joined, conn: u64, mut done: Option<DoneGuard>) {
    tokio::spawn(async move {
        use hyper_util::rt::TokioIo;
        let down = match down.await {
            Ok(d) => TokioIo::new(d),
            Err(e) => {
                tracing::debug!(target: "http", connection = conn, "upgrade failed: {e}");
                return;
            }
        };
        let up: Box<dyn crate::cluster::Io> = match up {
            Joined::Tcp(t) => Box::new(t),
            Joined::Upgraded(u) => match u.await {
                Ok(u) => Box::new(TokioIo::new(u)),
                Err(e) => {
                    tracing::debug!(target: "http", connection = conn, "upgrade failed: {e}");
                    return;
                }
            },
        };
        let Some(guard) = done.as_mut() else {
            let (mut d, mut u) = (down, up);
            let _ = tokio::io::copy_bidirectional(&mut d, &mut u).await;
            return;
        };
        let (mut dr, mut dw) = tokio::io::split(down);
        let (mut ur, mut uw) = tokio::io::split(up);
        let (to_up, to_down) = (guard.received.clone(), guard.sent.clone());
        let downstream_closed = tokio::select! {
            closed = pump(&mut dr, &mut uw, &to_up) => closed,
            closed = pump(&mut ur, &mut dw, &to_down) => !closed,
        };
        // An upstream that closes ends the tunnel as its response; a client that does, as DC.
        if let (true, Some(e)) = (downstream_closed, guard.entry.as_mut()) {
            e.flags.push("DC");
            if let Some(h) = e.http.as_mut() {
                h.details = "downstream_remote_disconnect".into();
            }
        }
        tracing::debug!(target: "http", connection = conn, "tunnel closed by the {}", if downstream_closed { "client" } else { "upstream" });
    });
}

/// Headers that belong to one connection and never cross the proxy.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

/// The machine's first address of the family that is not loopback: what Envoy appends to
/// x-forwarded-for for a client on loopback.
fn local_interface_address(v6: bool) -> Option<IpAddr> {
    let mut found = None;
    // SAFETY: getifaddrs fills a list that freeifaddrs releases; entries are only read.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut list) != 0 {
            return None;
        }
        let mut p = list;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                let ip = match (*a).sa_family as i32 {
                    libc::AF_INET if !v6 => {
                        let s = &*(a as *const libc::sockaddr_in);
                        Some(IpAddr::from(u32::from_be(s.sin_addr.s_addr).to_be_bytes()))
                    }
                    libc::AF_INET6 if v6 => {
                        let s = &*(a as *const libc::sockaddr_in6);
                        Some(IpAddr::from(s.sin6_addr.s6_addr))
                    }
                    _ => None,
                };
                if let Some(ip) = ip.filter(|ip| !ip.is_loopback()) {
                    found = Some(ip);
                    break;
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found
}

/// x-envoy-* headers only an internal request may carry (Envoy drops them from the others).
const INTERNAL_ONLY: &[&str] = &[
    "x-envoy-internal",
    "x-envoy-retriable-status-codes",
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-force-trace",
    "x-envoy-ip-tags",
    "x-envoy-original-url",
    "x-envoy-hedge-on-per-try-timeout",
];

/// A random version 4 UUID, as Envoy's request ids are.
fn request_id(seed: u64) -> String {
    let hi = crate::random(seed);
    let lo = crate::random(seed.rotate_left(29) ^ 0x51ed);
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&hi.to_be_bytes());
    b[8..].copy_from_slice(&lo.to_be_bytes());
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Headers as Envoy's debug log shows them: pseudo-headers first, one `'name', 'value'` a line.
pub(crate) fn dump(pseudo: &[(&str, &str)], h: &HeaderMap) -> String {
    let mut out = String::new();
    for (k, v) in pseudo {
        out.push_str(&format!("'{k}', '{v}'\n"));
    }
    // HTTP/1.1's host is the :authority above.
    for (k, v) in h.iter().filter(|(k, _)| k.as_str() != "host") {
        out.push_str(&format!(
            "'{}', '{}'\n",
            k,
            String::from_utf8_lossy(v.as_bytes())
        ));
    }
    out
}

/// Whether a route configuration's header mutations (at any level) hold command operators
/// (`%REQ(x)%`, `%DOWNSTREAM_REMOTE_ADDRESS%`, ...), which read the stream's header lists.
fn mutations_format(rc: &pilotfish_api::pb::envoy::config::route::v3::RouteConfiguration) -> bool {
    use pilotfish_api::pb::envoy::config::core::v3::HeaderValueOption;
    let any = |list: &[HeaderValueOption]| {
        list.iter()
            .any(|o| o.header.as_ref().is_some_and(|h| h.value.contains('%')))
    };
    any(&rc.request_headers_to_add)
        || any(&rc.response_headers_to_add)
        || rc.virtual_hosts.iter().any(|v| {
            any(&v.request_headers_to_add)
                || any(&v.response_headers_to_add)
                || v.routes
                    .iter()
                    .any(|r| any(&r.request_headers_to_add) || any(&r.response_headers_to_add))
        })
}

fn header_bytes(h: &HeaderMap) -> u64 {
    h.iter()
        .map(|(k, v)| (k.as_str().len() + v.len()) as u64)
        .sum()
}

fn header_list(h: &HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

fn set_header(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

/// What the connection manager does to request headers before routing (Envoy's
/// ConnectionManagerUtility::mutateRequestHeaders); returns whether the request is internal.
fn mutate_request_headers(
    hcm: &HttpConnectionManagerFilter,
    info: &Downstream,
    h: &mut HeaderMap,
    seed: u64,
    upgrade: bool,
) -> bool {
    let c = &hcm.config;
    for name in HOP_BY_HOP {
        // An upgrade keeps what asks for it: `connection: upgrade` and `upgrade`.
        if upgrade && *name == "upgrade" {
            continue;
        }
        if upgrade && *name == "connection" {
            continue;
        }
        if *name == "te" {
            // Only `te: trailers` may pass.
            if h.get("te")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
            {
                continue;
            }
        }
        h.remove(*name);
    }
    let use_remote = c.use_remote_address.as_ref().is_some_and(|v| v.value);
    let scheme = if info.tls.is_some() { "https" } else { "http" };
    // Only what internal_address_config names is internal (Envoy's default since 1.33).
    let is_internal = |ip: IpAddr| {
        c.internal_address_config.as_ref().is_some_and(|i| {
            i.cidr_ranges
                .iter()
                .filter_map(pilotfish_decide::matcher::Cidr::new)
                .any(|r| r.contains(ip))
        })
    };
    let internal = if use_remote {
        let ip = info.remote.ip();
        if !c.skip_xff_append {
            // A client on loopback is recorded as this machine's own address.
            let appended = if ip.is_loopback() {
                local_interface_address(ip.is_ipv6()).unwrap_or(ip)
            } else {
                ip
            };
            let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
                Some(v) => format!("{v},{appended}"),
                None => appended.to_string(),
            };
            set_header(h, "x-forwarded-for", &xff);
        }
        set_header(h, "x-forwarded-proto", scheme);
        is_internal(ip)
    } else {
        if !h.contains_key("x-forwarded-proto") {
            set_header(h, "x-forwarded-proto", scheme);
        }
        // The trusted client address is the last x-forwarded-for entry (xff_num_trusted_hops 0).
        let trusted = h
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let parts: Vec<&str> = v.split(',').map(str::trim).collect();
                let back = c.xff_num_trusted_hops as usize;
                parts
                    .len()
                    .checked_sub(back + 1)
                    .and_then(|i| parts[i].parse::<IpAddr>().ok())
            });
        trusted.is_some_and(is_internal)
    };
    let edge = use_remote && !internal;
    if internal {
        set_header(h, "x-envoy-internal", "true");
    } else {
        if edge {
            for n in [
                "x-envoy-decorator-operation",
                "x-envoy-downstream-service-cluster",
                "x-envoy-downstream-service-node",
            ] {
                h.remove(n);
            }
            set_header(h, "x-envoy-external-address", &info.remote.ip().to_string());
        }
        for n in INTERNAL_ONLY {
            h.remove(*n);
        }
    }
    let generate = c.generate_request_id.as_ref().is_none_or(|v| v.value);
    if generate && (!h.contains_key("x-request-id") || (edge && !c.preserve_external_request_id)) {
        set_header(h, "x-request-id", &request_id(seed));
    }
    forward_client_cert(c, info, h);
    internal
}

/// x-forwarded-client-cert as `forward_client_cert_details` says: dropped (SANITIZE, and any
/// mode but ALWAYS_FORWARD_ONLY without a client certificate), passed on, or given this hop's
/// element (`By=<our URI SAN>;Hash=<sha256 of the client's certificate>;...`), appended or alone.
fn forward_client_cert(c: &HttpConnectionManager, info: &Downstream, h: &mut HeaderMap) {
    use pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::ForwardClientCertDetails as F;
    const XFCC: &str = "x-forwarded-client-cert";
    let mode = F::try_from(c.forward_client_cert_details).unwrap_or(F::Sanitize);
    let peer = info
        .tls
        .as_ref()
        .and_then(|t| t.peer_chain.first().map(|leaf| (t, leaf)));
    let Some((tls, leaf)) = peer else {
        if mode != F::AlwaysForwardOnly {
            h.remove(XFCC);
        }
        return;
    };
    let element = || {
        tls.xfcc_element
            .get_or_init(|| {
                let d = c.set_current_client_cert_details.unwrap_or_default();
                let facts = crate::transport_socket::cert_facts(leaf);
                let mut parts = vec![];
                if let Some(by) = &tls.local_uri {
                    parts.push(format!("By={by}"));
                }
                let digest = ring::digest::digest(&ring::digest::SHA256, leaf);
                let hash: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
                parts.push(format!("Hash={hash}"));
                if d.cert {
                    parts.push(format!(
                        "Cert=\"{}\"",
                        url_encoded_pem(std::slice::from_ref(leaf))
                    ));
                }
                if d.chain {
                    parts.push(format!("Chain=\"{}\"", url_encoded_pem(&tls.peer_chain)));
                }
                if d.subject.as_ref().is_some_and(|v| v.value) {
                    parts.push(format!("Subject=\"{}\"", facts.subject));
                }
                if d.uri {
                    parts.extend(facts.uris.iter().map(|u| format!("URI={u}")));
                }
                if d.dns {
                    parts.extend(facts.dns.iter().map(|n| format!("DNS={n}")));
                }
                parts.join(";")
            })
            .clone()
    };
    match mode {
        F::Sanitize => {
            h.remove(XFCC);
        }
        F::ForwardOnly | F::AlwaysForwardOnly => {}
        F::AppendForward => {
            let value = match h.get(XFCC).and_then(|v| v.to_str().ok()) {
                Some(old) => format!("{old},{}", element()),
                None => element(),
            };
            set_header(h, XFCC, &value);
        }
        F::SanitizeSet => set_header(h, XFCC, &element()),
    }
}

/// Certificates as PEM, URL-encoded the way Envoy writes them into x-forwarded-client-cert.
fn url_encoded_pem(ders: &[Vec<u8>]) -> String {
    use base64::Engine;
    let mut pem = String::new();
    for der in ders {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap_or(""));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    pem.replace('\n', "%0A")
        .replace(' ', "%20")
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D")
}

/// Applies header_value_options (route, virtual host, route configuration levels).
fn apply_headers(h: &mut HeaderMap, add: &[HeaderValueOption], remove: &[String], entry: &Entry) {
    for r in remove {
        h.remove(r.as_str());
    }
    for o in add {
        let Some(hv) = &o.header else { continue };
        let Ok(name) = HeaderName::from_bytes(hv.key.as_bytes()) else {
            continue;
        };
        let raw = if hv.value.is_empty() {
            String::from_utf8_lossy(&hv.raw_value).into_owned()
        } else {
            hv.value.clone()
        };
        // Only a value with `%` has operators (or `%%`) for the formatter to read.
        let value = if raw.contains('%') {
            Template::new(&raw).render(entry)
        } else {
            raw
        };
        if value.is_empty() && !o.keep_empty_value {
            continue;
        }
        let Ok(value) = HeaderValue::from_str(&value) else {
            continue;
        };
        #[allow(deprecated)]
        let action = match &o.append {
            // The deprecated `append` wins when set.
            Some(a) if a.value => HeaderAppendAction::AppendIfExistsOrAdd,
            Some(_) => HeaderAppendAction::OverwriteIfExistsOrAdd,
            None => HeaderAppendAction::try_from(o.append_action)
                .unwrap_or(HeaderAppendAction::AppendIfExistsOrAdd),
        };
        match action {
            HeaderAppendAction::AppendIfExistsOrAdd => {
                h.append(name, value);
            }
            HeaderAppendAction::AddIfAbsent => {
                if !h.contains_key(&name) {
                    h.insert(name, value);
                }
            }
            HeaderAppendAction::OverwriteIfExistsOrAdd => {
                h.insert(name, value);
            }
            HeaderAppendAction::OverwriteIfExists => {
                if h.contains_key(&name) {
                    h.insert(name, value);
                }
            }
        }
    }
}

/// The route's `hash_policy` hash, as Envoy combines its policies: each hash found is XORed into
/// the previous one rotated left by one; a terminal policy that found one ends the search.
fn route_hash(
    action: &RouteAction,
    req: &pilotfish_decide::router::Request,
    info: &Downstream,
) -> Option<u64> {
    use pilotfish_api::pb::envoy::config::route::v3::route_action::hash_policy::PolicySpecifier as P;
    let xx = |s: &str| xxhash_rust::xxh64::xxh64(s.as_bytes(), 0);
    let mut hash: Option<u64> = None;
    for p in &action.hash_policy {
        let found = match &p.policy_specifier {
            Some(P::Header(h)) => req.header(&h.header_name).map(|v| xx(&v)),
            Some(P::ConnectionProperties(c)) if c.source_ip => {
                Some(crate::lb::source_ip_hash(info.remote.ip()))
            }
            Some(P::QueryParameter(q)) => {
                pilotfish_decide::matcher::query_param(&req.path, &q.name).map(|v| xx(&v))
            }
            Some(P::Cookie(c)) => req.header("cookie").and_then(|cookies| {
                cookies
                    .split(';')
                    .filter_map(|kv| kv.trim().split_once('='))
                    .find(|(k, _)| *k == c.name)
                    .map(|(_, v)| xx(v))
            }),
            _ => None,
        };
        if let Some(n) = found {
            hash = Some(hash.map_or(0, |h| h.rotate_left(1)) ^ n);
        }
        if p.terminal && hash.is_some() {
            break;
        }
    }
    hash
}

/// One level's header mutations (route, virtual host or route configuration).
struct Mutations<'a> {
    request_add: &'a [HeaderValueOption],
    request_remove: &'a [String],
    response_add: &'a [HeaderValueOption],
    response_remove: &'a [String],
}

impl<'a> Mutations<'a> {
    fn of(
        request_add: &'a [HeaderValueOption],
        request_remove: &'a [String],
        response_add: &'a [HeaderValueOption],
        response_remove: &'a [String],
    ) -> Mutations<'a> {
        Mutations {
            request_add,
            request_remove,
            response_add,
            response_remove,
        }
    }
}

/// A local reply: Envoy's status and body (text/plain when there is one).
fn local_reply(status: u16, body: &str) -> Response<Body> {
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    // An empty body has no content-length of its own: HTTP/1.1 says 0, HTTP/2 ends the stream
    // with the headers.
    if !body.is_empty() {
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("text/plain"));
        r.headers_mut().insert(
            "content-length",
            HeaderValue::from_str(&body.len().to_string()).unwrap(),
        );
    }
    r
}

/// What became of a stream, for its response headers, counters and access log.
pub(crate) struct Outcome {
    response: Response<Body>,
    flags: Vec<&'static str>,
    details: String,
    cluster: String,
    upstream_host: Option<String>,
    upstream_local: Option<SocketAddr>,
    /// Over upstream TLS: the identities shown (Istio's stats report them).
    upstream_identity: Option<Arc<crate::transport_socket::UpstreamIdentity>>,
    transport_failure: Option<String>,
    /// A local reply's body text (a gRPC request gets it as grpc-message instead).
    local_text: Option<String>,
    /// A CONNECT the route terminates: the TCP connection to its upstream.
    tunnel: Option<crate::cluster::Upstream>,
}

impl Outcome {
    fn local(status: u16, body: &str, flag: Option<&'static str>, details: &str) -> Outcome {
        Outcome {
            response: local_reply(status, body),
            flags: flag.into_iter().collect(),
            details: details.into(),
            cluster: String::new(),
            upstream_host: None,
            upstream_local: None,
            upstream_identity: None,
            transport_failure: None,
            local_text: Some(body.to_string()),
            tunnel: None,
        }
    }
}

/// One request, from its headers to the response handed to the codec.
async fn stream(
    server: &Arc<Server>,
    hcm: &Arc<HttpConnectionManagerFilter>,
    info: &Downstream,
    req: Request<Incoming>,
    conn: u64,
    slot: timeouts::StreamSlot,
) -> Response<Body> {
    let received = Arc::new(AtomicU64::new(0));
    let activity = Arc::new(timeouts::Activity::new());
    let grpc = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    // Under the grpc_stats filter a gRPC call's messages are counted both ways.
    let grpc_call = (grpc && hcm.grpc_stats.is_some()).then(|| GrpcCall {
        path: req.uri().path().to_string(),
        messages: Default::default(),
        server: server.clone(),
    });
    if hyper::body::Body::is_end_stream(req.body()) {
        activity.request_complete();
    }
    let upgrade = upgrade_of(&req);
    let mut req = req;
    let down_upgrade = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let mut req = Request::from_parts(
        parts,
        Counting {
            inner: body,
            bytes: received.clone(),
            activity: activity.clone(),
            timer: None,
            grpc: grpc_call
                .as_ref()
                .map(|c| grpc_stats::Frames::new(c.messages[0].clone())),
            _done: None,
        }
        .boxed(),
    );
    let start = SystemTime::now();
    let began = Instant::now();
    let seed = crate::random(conn ^ began.elapsed().as_nanos() as u64);
    let mut clock = Clock {
        began,
        stream: seed,
        received: received.clone(),
        activity: activity.clone(),
        limits: timeouts::Limits::of(&hcm.config, None),
        decorator: None,
        grpc_call,
        last_on_connection: false,
        listener_drain: None,
        connect: false,
        _active: RqActive::new(hcm),
        _slot: slot,
    };
    let stats = &hcm.stats;
    clock.connect = req.method() == hyper::Method::CONNECT;
    // The last request max_requests_per_connection allows: its response closes the connection.
    if let Some(m) = hcm.conn_limits.max_requests {
        let n = clock._slot.index();
        if n == m {
            stats.downstream_cx_max_requests_reached.inc();
        }
        if n >= m {
            clock.last_on_connection = true;
            clock._slot.limit_reached();
        }
    }
    stats.downstream_rq_total.inc();
    let http2 = req.version() == hyper::Version::HTTP_2;
    if !http2 {
        clock.listener_drain = info.drain.clone();
    } else if info.drain.as_ref().is_some_and(|d| d.close_now()) {
        info.goaway.notify_one();
    }
    if http2 {
        stats.downstream_rq_http2_total.inc();
    } else {
        stats.downstream_rq_http1_total.inc();
    }
    let protocol = match req.version() {
        hyper::Version::HTTP_2 => "HTTP/2",
        hyper::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get("host")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    // A CONNECT has no path (only connect_matcher routes match it).
    let connect = req.method() == hyper::Method::CONNECT;
    let path = match req.uri().path_and_query() {
        _ if connect => String::new(),
        p => p.map_or("/".to_string(), |p| p.as_str().to_string()),
    };
    let method = req.method().as_str().to_string();
    tracing::debug!(target: "http", connection = conn, "new stream");
    tracing::debug!(target: "http", connection = conn, stream = seed,
        "request headers complete (end_stream={}):\n{}",
        hyper::body::Body::is_end_stream(req.body()),
        dump(&[(":authority", &authority), (":path", &path), (":method", &method)], req.headers())
    );
    let authority = strip_port(&hcm.config, &authority, info.local.port());
    // max_headers_count counts the headers as received.
    let too_many_headers = hcm
        .max_headers_count()
        .is_some_and(|n| req.headers().len() > n);
    let internal = mutate_request_headers(hcm, info, req.headers_mut(), seed, upgrade.is_some());
    let traced = hcm
        .tracing
        .as_ref()
        .is_some_and(|t| t.decide(req.headers_mut(), seed));
    // Istio's metadata exchange: the downstream peer's headers are taken off (and kept); an
    // outbound sidecar adds its own.
    let downstream_peer = hcm
        .metadata_exchange
        .as_ref()
        .map(|x| x.on_request(req.headers_mut()));
    if let Some(p) = downstream_peer.as_ref().and_then(|p| p.id.as_deref()) {
        tracing::debug!(target: "filter", connection = conn, stream = seed, "metadata exchange: downstream peer {p}");
    }
    // The access log sees the request headers as the connection manager left them (x-request-id,
    // x-forwarded-for, ...), and, once the router has forwarded it, as the upstream got them.
    let received_headers = if hcm.keeps_headers {
        header_list(req.headers())
    } else {
        vec![]
    };
    let mut entry = Entry::new(
        start,
        (info.remote, info.local),
        info.server_name.clone(),
        conn,
        pilotfish_api::pb::envoy::data::accesslog::v3::AccessLogType::DownstreamEnd,
    );
    entry.http = Some(Box::new(HttpEntry {
        method: method.clone(),
        path: path.clone(),
        authority: authority.clone(),
        protocol: protocol.into(),
        request_headers: received_headers,
        request_header_bytes: header_bytes(req.headers()),
        grpc,
        downstream_peer: downstream_peer.and_then(|p| p.metadata),
        downstream_tls: info.tls.clone(),
        ..Default::default()
    }));
    let mut entry = Unfinished {
        entry: Some(entry),
        hcm: hcm.clone(),
        began,
        received: received.clone(),
        http2,
    };
    // Headers beyond max_request_headers_kb (60 KiB by default) are refused with 431.
    let limit = hcm
        .config
        .max_request_headers_kb
        .as_ref()
        .map_or(60, |v| v.value as usize)
        * 1024;
    let size: usize = method.len()
        + path.len()
        + authority.len()
        + req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum::<usize>();
    if size > limit {
        let o = Outcome::local(
            431,
            "Request Header Fields Too Large",
            None,
            "request_headers_too_large",
        );
        return finish(hcm, o, clock, entry.take(), vec![], None);
    }
    if too_many_headers {
        stats.downstream_rq_too_many_headers.inc();
        // The codec refuses them before the stream has any: the log shows none.
        if let Some(h) = entry.http.as_mut() {
            h.path.clear();
            h.method.clear();
            h.authority.clear();
            h.request_headers.clear();
        }
        let o = Outcome::local(
            431,
            "Request Header Fields Too Large",
            Some("DPE"),
            if http2 {
                "http2.too_many_headers"
            } else {
                "http1.too_many_headers"
            },
        );
        return finish(hcm, o, clock, entry.take(), vec![], None);
    }
    // The path as normalized is what routing, the upstream and the access log see.
    let normalized = if connect {
        path::Normalized::Path(path.clone())
    } else {
        path::normalize(&hcm.config, &path)
    };
    let path = match normalized {
        path::Normalized::Path(p) => {
            if let Some(pq) = p
                .parse::<hyper::http::uri::PathAndQuery>()
                .ok()
                .filter(|_| p != path)
            {
                let mut parts = req.uri().clone().into_parts();
                parts.path_and_query = Some(pq);
                if let Ok(uri) = hyper::Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
            }
            if let Some(h) = entry.http.as_mut() {
                h.path = p.clone();
            }
            p
        }
        other => {
            let o = match other {
                path::Normalized::Redirect(location) => {
                    let mut o = Outcome::local(307, "", None, "path_normalization_redirect");
                    set_header(o.response.headers_mut(), "location", &location);
                    o
                }
                _ => Outcome::local(400, "", None, "path_normalization_failed"),
            };
            return finish(hcm, o, clock, entry.take(), vec![], None);
        }
    };
    let scheme = req
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("http")
        .to_string();
    let routing = pilotfish_decide::router::Request {
        authority: authority.clone(),
        path: path.clone(),
        method: method.clone(),
        scheme,
        headers: header_list(req.headers()),
        random_value: seed,
        internal,
        runtime: pilotfish_decide::router::Runtime::Defaults,
    };
    stats.rq_total.inc();
    let mut fault_flags: Vec<&'static str> = vec![];
    let mut cors_headers: Vec<(&'static str, String)> = vec![];
    let mut route_levels: Vec<Mutations> = vec![];
    let outcome = match &hcm.routes {
        None => {
            stats.no_route.inc();
            Outcome::local(404, "", Some("NR"), "route_not_found")
        }
        Some(table) => {
            let d = table.route(&routing);
            let route = match (d.virtual_host_index, d.route_index) {
                (Some(v), Some(r)) => {
                    let rc = &table.config;
                    let vh = &rc.virtual_hosts[v];
                    let rt = &vh.routes[r];
                    // Envoy's order: the route's mutations, then the virtual host's, then the
                    // route configuration's.
                    route_levels = vec![
                        Mutations::of(
                            &rt.request_headers_to_add,
                            &rt.request_headers_to_remove,
                            &rt.response_headers_to_add,
                            &rt.response_headers_to_remove,
                        ),
                        Mutations::of(
                            &vh.request_headers_to_add,
                            &vh.request_headers_to_remove,
                            &vh.response_headers_to_add,
                            &vh.response_headers_to_remove,
                        ),
                        Mutations::of(
                            &rc.request_headers_to_add,
                            &rc.request_headers_to_remove,
                            &rc.response_headers_to_add,
                            &rc.response_headers_to_remove,
                        ),
                    ];
                    if let Some(h) = entry.http.as_mut() {
                        h.route_name = rt.name.clone();
                    }
                    if let Some(route::Action::Route(a)) = &rt.action {
                        clock.limits = timeouts::Limits::of(&hcm.config, Some(a));
                    }
                    // Under tracing, the route's decorator names the operation: on the
                    // response (inbound), or to the upstream (outbound).
                    if let (Some(t), Some(d)) = (&hcm.tracing, &rt.decorator) {
                        if t.decorator_on_response() {
                            clock.decorator = Some(d.operation.clone());
                        } else if d.propagate.as_ref().is_none_or(|p| p.value) {
                            set_header(
                                req.headers_mut(),
                                "x-envoy-decorator-operation",
                                &d.operation,
                            );
                        }
                    }
                    // An inbound request's x-envoy-decorator-operation is what Envoy names its
                    // server span by, in place of the route's decorator (pilotfish exports no
                    // spans): the response then carries no decorator, and the header is not
                    // passed on to the service.
                    if hcm
                        .tracing
                        .as_ref()
                        .is_some_and(|t| t.decorator_on_response())
                    {
                        if let Some(op) = req.headers_mut().remove("x-envoy-decorator-operation") {
                            if !op.is_empty() {
                                clock.decorator = None;
                            }
                        }
                    }
                    Some(rt)
                }
                _ => None,
            };
            // The fault filter comes before the router: it may delay the request or answer it.
            if let Some(FaultFilter {
                own,
                per_route,
                counters,
            }) = &hcm.fault
            {
                let config = per_route
                    .get(d.virtual_host_index, d.route_index)
                    .unwrap_or(own);
                let cluster = match &d.action {
                    Action::Forward { cluster, .. } => Some(cluster.as_str()),
                    _ => None,
                };
                let injected = fault::decide(config, &routing, cluster, seed);
                if let Some(delay) = injected.delay {
                    counters[1].inc();
                    tracing::debug!(target: "filter", connection = conn, stream = seed, "fault: delaying the request {} ms", delay.as_millis());
                    fault_flags.push("DI");
                    let slept = clock
                        .limits
                        .race(&activity, tokio::time::sleep(delay))
                        .await;
                    if let Err(expired) = slept {
                        let mut o = timed_out(hcm, expired, &activity);
                        o.flags = [fault_flags.clone(), o.flags].concat();
                        return finish(hcm, o, clock, entry.take(), route_levels, None);
                    }
                }
                if let Some((status, body)) = injected.abort {
                    counters[0].inc();
                    let mut o = Outcome::local(status, &body, Some("FI"), "fault_filter_abort");
                    if let Some(g) = injected.grpc_status {
                        o = Outcome::local(200, "", Some("FI"), "fault_filter_abort");
                        set_header(o.response.headers_mut(), "content-type", "application/grpc");
                        set_header(o.response.headers_mut(), "grpc-status", &g.to_string());
                    }
                    o.flags = [fault_flags.clone(), o.flags].concat();
                    return finish(hcm, o, clock, entry.take(), route_levels, None);
                }
            }
            // Then CORS: a preflight is answered here; a CORS request's response gets its headers.
            if let Some(per_route) = &hcm.cors {
                if let Some(p) = per_route.get(d.virtual_host_index, d.route_index) {
                    let origin = req.headers().get("origin").and_then(|v| v.to_str().ok());
                    let preflight = req
                        .headers()
                        .get("access-control-request-method")
                        .is_some_and(|v| !v.is_empty());
                    match cors::decide(p, &method, origin, preflight) {
                        cors::Cors::Preflight(headers) => {
                            let mut o = Outcome::local(200, "", None, "cors_response");
                            for (k, v) in headers {
                                set_header(o.response.headers_mut(), k, &v);
                            }
                            o.flags = fault_flags.clone();
                            return finish(hcm, o, clock, entry.take(), route_levels, None);
                        }
                        cors::Cors::Simple(headers) => cors_headers = headers,
                        cors::Cors::No => {}
                    }
                }
            }
            match d.action {
                Action::NoRoute => {
                    stats.no_route.inc();
                    tracing::debug!(target: "router", connection = conn, stream = seed, "no route match for URL '{path}'");
                    Outcome::local(404, "", Some("NR"), "route_not_found")
                }
                Action::DirectResponse { status, body } => {
                    stats.rq_direct_response.inc();
                    Outcome::local(status as u16, &body, None, "direct_response")
                }
                Action::Redirect { location, code } => {
                    let mut o = Outcome::local(code as u16, "", None, "direct_response");
                    if let Ok(v) = HeaderValue::from_str(&location) {
                        o.response.headers_mut().insert("location", v);
                    }
                    o
                }
                Action::Forward {
                    cluster,
                    path: new_path,
                    host,
                    ..
                } => {
                    // A forwarding decision comes from a route action; the default only stands
                    // in for the type.
                    let no_action;
                    let action = match route.and_then(|r| r.action.as_ref()) {
                        Some(route::Action::Route(a)) => a,
                        _ => {
                            no_action = RouteAction::default();
                            &no_action
                        }
                    };
                    let vh = d.virtual_host_index.map(|v| &table.config.virtual_hosts[v]);
                    if let Some(kind) = &upgrade {
                        if !upgrade_allowed(&hcm.config, Some(action), kind) {
                            tracing::debug!(target: "http", connection = conn, stream = seed, "upgrade to {kind} is not configured");
                            let o = Outcome::local(403, "", None, "upgrade_failed");
                            return finish(hcm, o, clock, entry.take(), route_levels, None);
                        }
                    }
                    let info_for_router = upstream::RouteInfo {
                        retry_policy: action
                            .retry_policy
                            .as_ref()
                            .or_else(|| vh.and_then(|v| v.retry_policy.as_ref())),
                        include_attempt_count: vh.is_some_and(|v| v.include_request_attempt_count),
                        include_attempt_count_in_response: vh
                            .is_some_and(|v| v.include_attempt_count_in_response),
                        hash: route_hash(action, &routing, info),
                        action,
                        alpn: hcm.alpn.as_ref(),
                    };
                    // A CONNECT the route terminates: a TCP connection to a host of the
                    // cluster, and 200 to the client.
                    let terminate = upgrade.as_deref() == Some("connect")
                        && action.upgrade_configs.iter().any(|u| {
                            u.upgrade_type.eq_ignore_ascii_case("CONNECT")
                                && u.connect_config.is_some()
                        });
                    match server.cluster(&cluster).as_ref() {
                        Some(c) if terminate => {
                            let opened = clock
                                .limits
                                .race(
                                    &activity,
                                    upstream::open_tunnel(
                                        server,
                                        c,
                                        info,
                                        route_hash(action, &routing, info),
                                        conn,
                                        seed,
                                    ),
                                )
                                .await;
                            match opened {
                                Ok(o) => o,
                                Err(expired) => timed_out(hcm, expired, &activity),
                            }
                        }
                        None => {
                            stats.no_cluster.inc();
                            tracing::debug!(target: "router", connection = conn, "unknown cluster '{cluster}'");
                            let mut o = Outcome::local(503, "", Some("NC"), "cluster_not_found");
                            o.cluster = cluster;
                            o
                        }
                        Some(c) => {
                            // Envoy keeps what a rewrite replaced.
                            if new_path != path {
                                set_header(req.headers_mut(), "x-envoy-original-path", &path);
                            }
                            if host != authority {
                                set_header(req.headers_mut(), "x-envoy-original-host", &authority);
                            }
                            for m in &route_levels {
                                apply_headers(
                                    req.headers_mut(),
                                    m.request_add,
                                    m.request_remove,
                                    &entry,
                                );
                            }
                            if let Some(t) = &hcm.tracing {
                                t.propagate(req.headers_mut(), traced, seed);
                            }
                            if let Some(h) = entry.http.as_mut() {
                                if hcm.keeps_headers {
                                    h.request_headers = header_list(req.headers());
                                }
                                h.request_header_bytes = header_bytes(req.headers());
                                h.path = new_path.clone();
                                h.authority = host.clone();
                            }
                            let picked = std::sync::Mutex::new(None);
                            let forwarding = upstream::forward(
                                server,
                                c,
                                req,
                                &info_for_router,
                                &new_path,
                                &host,
                                info,
                                http2,
                                conn,
                                seed,
                                &picked,
                            );
                            match clock.limits.race(&activity, forwarding).await {
                                Ok(o) => o,
                                Err(expired) => {
                                    let mut o = timed_out(hcm, expired, &activity);
                                    o.cluster = cluster;
                                    o.upstream_host = picked.lock().unwrap().take();
                                    o
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    // An accepted upgrade joins the two connections once the 101 has gone out.
    let mut outcome = outcome;
    outcome.flags = [fault_flags, std::mem::take(&mut outcome.flags)].concat();
    for (k, v) in cors_headers {
        set_header(outcome.response.headers_mut(), k, &v);
    }
    // A CONNECT answered 2xx by its upstream (or terminated here) is a tunnel from now on.
    let status = outcome.response.status();
    let joined = match upgrade.as_deref() {
        Some("connect") => status.is_success(),
        Some(_) => status == StatusCode::SWITCHING_PROTOCOLS,
        None => false,
    };
    let splice_with = joined.then(|| match outcome.tunnel.take() {
        Some(tcp) => (down_upgrade, Joined::Tcp(tcp)),
        None => (
            down_upgrade,
            Joined::Upgraded(hyper::upgrade::on(&mut outcome.response)),
        ),
    });
    finish(hcm, outcome, clock, entry.take(), route_levels, splice_with)
}

/// A stream's access-log entry until its response goes to the codec. A stream the codec drops
/// before (the client went away or reset it) is logged as Envoy logs it: no response code,
/// DC (HTTP/1) or DR (HTTP/2).
struct Unfinished {
    entry: Option<Entry>,
    hcm: Arc<HttpConnectionManagerFilter>,
    began: Instant,
    received: Arc<AtomicU64>,
    http2: bool,
}

impl Unfinished {
    fn take(&mut self) -> Entry {
        self.entry.take().expect("a stream is finished once")
    }
}

impl std::ops::Deref for Unfinished {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        self.entry.as_ref().expect("not finished")
    }
}

impl std::ops::DerefMut for Unfinished {
    fn deref_mut(&mut self) -> &mut Entry {
        self.entry.as_mut().expect("not finished")
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let Some(mut e) = self.entry.take() else {
            return;
        };
        let (flag, details) = if self.http2 {
            ("DR", "http2.remote_reset")
        } else {
            ("DC", "downstream_remote_disconnect")
        };
        e.flags.push(flag);
        if let Some(h) = e.http.as_mut() {
            h.details = details.into();
        }
        e.duration = self.began.elapsed();
        e.bytes_received = self.received.load(Ordering::Relaxed);
        for l in &self.hcm.logs {
            l.write(&e);
        }
        self.hcm.report_istio_stats(&e);
    }
}

/// A stream's timer fired before its response began: Envoy's reply, counted.
fn timed_out(
    hcm: &HttpConnectionManagerFilter,
    expired: timeouts::Expired,
    activity: &timeouts::Activity,
) -> Outcome {
    hcm.count_expired(expired);
    expired.reply(activity.request_done())
}

impl HttpConnectionManagerFilter {
    fn count_expired(&self, expired: timeouts::Expired) {
        match expired {
            timeouts::Expired::Idle => self.stats.downstream_rq_idle_timeout.inc(),
            timeouts::Expired::Duration => self.stats.downstream_rq_max_duration_reached.inc(),
            timeouts::Expired::Request => self.stats.downstream_rq_timeout.inc(),
        }
    }
}

/// A stream's clock and counts: when it began, its id, the request body bytes read, its
/// activity and timers, and its place among the connection's open streams.
struct Clock {
    began: Instant,
    stream: u64,
    received: Arc<AtomicU64>,
    activity: Arc<timeouts::Activity>,
    limits: timeouts::Limits,
    /// The operation an inbound stream's response names (x-envoy-decorator-operation).
    decorator: Option<String>,
    grpc_call: Option<GrpcCall>,
    /// The connection's last stream (max_requests_per_connection): its response says close.
    last_on_connection: bool,
    /// An HTTP/1 stream's listener drain: once it has begun, the response says close.
    listener_drain: Option<crate::server::Drain>,
    /// A CONNECT: unless it becomes a tunnel, its connection is closed after the reply.
    connect: bool,
    _active: RqActive,
    _slot: timeouts::StreamSlot,
}

/// A stream counted in downstream_rq_active until it ends, also when the codec drops it half
/// way (the client reset it or went away).
struct RqActive(Arc<HttpConnectionManagerFilter>);

impl RqActive {
    fn new(hcm: &Arc<HttpConnectionManagerFilter>) -> RqActive {
        hcm.stats.downstream_rq_active.inc();
        RqActive(hcm.clone())
    }
}

impl Drop for RqActive {
    fn drop(&mut self) {
        self.0.stats.downstream_rq_active.dec();
    }
}

/// A gRPC call the grpc_stats filter counts: its `:path` as received, its messages (request,
/// response), and where its counters are kept.
struct GrpcCall {
    path: String,
    messages: [Arc<AtomicU64>; 2],
    server: Arc<Server>,
}

/// Response headers (the route's mutations, server, ...), counters and the access log entry,
/// written when the response body has been sent.
fn finish(
    hcm: &Arc<HttpConnectionManagerFilter>,
    outcome: Outcome,
    clock: Clock,
    mut entry: Entry,
    route_levels: Vec<Mutations>,
    splice_with: Option<(hyper::upgrade::OnUpgrade, Joined)>,
) -> Response<Body> {
    let Clock {
        began,
        stream,
        received,
        activity,
        limits,
        decorator,
        grpc_call,
        last_on_connection,
        listener_drain,
        connect,
        _active,
        _slot,
    } = clock;
    let mut response = outcome.response;
    entry.flags = outcome.flags;
    entry.upstream_cluster = outcome.cluster;
    entry.upstream_host = outcome.upstream_host;
    entry.upstream_local = outcome.upstream_local;
    if let Some(h) = entry.http.as_mut() {
        h.details = outcome.details;
        h.upstream_transport_failure = outcome.transport_failure;
        h.upstream_identity = outcome.upstream_identity;
    }
    let mut local_text = outcome.local_text;
    // local_reply_config rewrites the connection manager's own replies.
    if let (Some(l), Some(text)) = (&hcm.local_reply, local_text.as_mut()) {
        entry.response_code = response.status().as_u16() as u32;
        let (r, sent) = l.apply(response, text, &mut entry);
        response = r;
        *text = sent;
    }
    // A gRPC request's local reply is gRPC: 200, its status in grpc-status, its text in
    // grpc-message.
    if let Some(text) = local_text
        .as_deref()
        .filter(|_| entry.http.as_ref().is_some_and(|h| h.grpc))
    {
        response = grpc_local_reply(response, text);
    }
    for m in &route_levels {
        apply_headers(
            response.headers_mut(),
            m.response_add,
            m.response_remove,
            &entry,
        );
    }
    if let Some(x) = &hcm.metadata_exchange {
        let peer = x.on_response(response.headers_mut());
        if let Some(h) = entry.http.as_mut() {
            h.upstream_peer = peer.metadata;
        }
    }
    let refused_408 = response.status() == StatusCode::REQUEST_TIMEOUT;
    let h = response.headers_mut();
    if let Some(op) = decorator {
        set_header(h, "x-envoy-decorator-operation", &op);
    }
    if splice_with.is_none() {
        for name in HOP_BY_HOP {
            h.remove(*name);
        }
    }
    // A request the connection manager refuses outright ends the connection, as in Envoy.
    let timeout = [
        "stream_idle_timeout",
        "max_duration_timeout",
        "request_overall_timeout",
    ]
    .contains(&details_of(&entry));
    if [
        "upgrade_failed",
        "path_normalization_failed",
        "request_headers_too_large",
        "http1.too_many_headers",
    ]
    .contains(&details_of(&entry))
        || (timeout && refused_408)
        || last_on_connection
        || listener_drain.is_some_and(|d| d.close_now())
        || (connect && splice_with.is_none())
    {
        h.insert("connection", HeaderValue::from_static("close"));
    }
    match ServerHeaderTransformation::try_from(hcm.config.server_header_transformation)
        .unwrap_or(ServerHeaderTransformation::Overwrite)
    {
        ServerHeaderTransformation::Overwrite => {
            if let Ok(v) = HeaderValue::from_str(hcm.server_name()) {
                h.insert("server", v);
            }
        }
        ServerHeaderTransformation::AppendIfAbsent => {
            if !h.contains_key("server") {
                if let Ok(v) = HeaderValue::from_str(hcm.server_name()) {
                    h.insert("server", v);
                }
            }
        }
        ServerHeaderTransformation::PassThrough => {}
    }
    let status = response.status().as_u16();
    entry.response_code = status as u32;
    let stats = &hcm.stats;
    if (1..=5).contains(&(status / 100)) {
        stats.downstream_rq_xx[(status / 100 - 1) as usize].inc();
    }
    if let Some(http) = entry.http.as_mut() {
        // A gRPC stream's status may be in its headers.
        if hcm.keeps_headers || http.grpc {
            http.response_headers = header_list(response.headers());
        }
        http.response_header_bytes = header_bytes(response.headers());
    }
    let conn = entry.connection_id;
    tracing::debug!(target: "http", connection = conn, stream = stream,
        "encoding headers via codec (end_stream={}):\n{}",
        hyper::body::Body::is_end_stream(response.body()),
        dump(&[(":status", &status.to_string())], response.headers())
    );
    let sent = Arc::new(AtomicU64::new(0));
    let done = DoneGuard {
        entry: Some(entry),
        began,
        received,
        sent: sent.clone(),
        hcm: hcm.clone(),
        conn,
        stream,
        _slot,
        _active,
        grpc_call,
    };
    if splice_with.is_some() {
        done._slot.upgraded();
    }
    // A CONNECT tunnel's stream ends (and is logged) when the tunnel does.
    let (done, splice_with) = match splice_with {
        Some((down, up)) if connect => {
            splice(down, up, conn, Some(done));
            (None, None)
        }
        other => (Some(done), other),
    };
    if let Some((down, up)) = splice_with {
        splice(down, up, conn, None);
    }
    let (parts, body) = response.into_parts();
    // A stream that ended on a timer has no more to time.
    let timer = (!timeout)
        .then(|| timeouts::BodyTimer::new(limits, activity.clone()))
        .flatten();
    let grpc = done
        .as_ref()
        .and_then(|d| d.grpc_call.as_ref())
        .map(|c| grpc_stats::Frames::new(c.messages[1].clone()));
    let body = Counting {
        inner: body,
        bytes: sent,
        activity,
        timer,
        grpc,
        _done: done,
    };
    Response::from_parts(parts, body.boxed())
}

/// Envoy's mapping of a local reply's HTTP status to a gRPC status.
fn grpc_status_of(http: u16) -> u32 {
    match http {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

fn grpc_local_reply(r: Response<Body>, text: &str) -> Response<Body> {
    let status = r.status().as_u16();
    let (parts, _) = r.into_parts();
    let mut out = Response::new(full(Bytes::new()));
    let h = out.headers_mut();
    for (k, v) in &parts.headers {
        if k != "content-length" && k != "content-type" {
            h.insert(k.clone(), v.clone());
        }
    }
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(grpc_status_of(status)));
    if !text.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(text)) {
            h.insert("grpc-message", v);
        }
    }
    out
}

/// grpc-message as gRPC encodes it: bytes outside printable ASCII, and `%`, as `%XX`.
fn grpc_percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn details_of(e: &Entry) -> &str {
    e.http.as_ref().map_or("", |h| h.details.as_str())
}

/// Ends the stream's accounting when its response body is done (or dropped): counters, and
/// the access log with the bytes sent and the duration.
struct DoneGuard {
    entry: Option<Entry>,
    began: Instant,
    /// Request body bytes, counted as the upstream (or nobody) reads them, and response body
    /// bytes, as the codec sends them.
    received: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    hcm: Arc<HttpConnectionManagerFilter>,
    conn: u64,
    stream: u64,
    /// The stream stays open on its connection, and active, until its response is done.
    _slot: timeouts::StreamSlot,
    _active: RqActive,
    grpc_call: Option<GrpcCall>,
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        tracing::debug!(target: "http", connection = self.conn, stream = self.stream, "Codec completed encoding stream.");
        self.hcm.stats.downstream_rq_completed.inc();
        if let Some(mut e) = self.entry.take() {
            self.grpc_done(&mut e);
            e.duration = self.began.elapsed();
            e.bytes_received = self.received.load(Ordering::Relaxed);
            e.bytes_sent = self.sent.load(Ordering::Relaxed);
            for l in &self.hcm.logs {
                l.write(&e);
            }
            self.hcm.report_istio_stats(&e);
        }
    }
}

impl DoneGuard {
    /// A gRPC stream's status for the access log (grpc-status in the trailers, else the
    /// headers, else what its HTTP status stands for) and the grpc_stats filter's accounting.
    fn grpc_done(&self, e: &mut Entry) {
        let code = e.response_code;
        let cluster = e.upstream_cluster.clone();
        let Some(h) = e.http.as_mut().filter(|h| h.grpc) else {
            return;
        };
        let find = |list: &[(String, String)]| {
            list.iter()
                .find(|(k, _)| k == "grpc-status")
                .and_then(|(_, v)| v.parse::<u32>().ok())
        };
        let given = find(&h.response_trailers).or_else(|| find(&h.response_headers));
        h.grpc_status = given.or(Some(grpc_status_of(code as u16)));
        let (Some(call), Some(filter)) = (&self.grpc_call, &self.hcm.grpc_stats) else {
            return;
        };
        let messages = (
            call.messages[0].load(Ordering::Relaxed),
            call.messages[1].load(Ordering::Relaxed),
        );
        if filter.emit_filter_state && messages.0 + messages.1 > 0 {
            h.grpc_messages = Some(messages);
        }
        // Calls with no cluster (no route) are counted nowhere, as in Envoy.
        if !cluster.is_empty() {
            filter.record(&call.server.stats, &cluster, &call.path, given, messages);
        }
    }
}

/// A body that counts the data bytes it yields (into `bytes`) as the stream's activity and, for
/// a response, holds the stream's accounting until it is done and runs its timers: a timer
/// that fires resets the stream.
struct Counting<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
    activity: Arc<timeouts::Activity>,
    timer: Option<timeouts::BodyTimer>,
    /// A gRPC call's messages, counted for the grpc_stats filter.
    grpc: Option<grpc_stats::Frames>,
    _done: Option<DoneGuard>,
}

impl<B> hyper::body::Body for Counting<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                    if let Some(g) = &mut this.grpc {
                        g.feed(d);
                    }
                }
                // A response's trailers are for the access log (and a gRPC status).
                if let (Some(t), Some(done)) = (f.trailers_ref(), &mut this._done) {
                    if let Some(h) = done.entry.as_mut().and_then(|e| e.http.as_mut()) {
                        h.response_trailers = header_list(t);
                    }
                }
                this.activity.touch();
                // A request body is all in with its last frame.
                if this._done.is_none() && this.inner.is_end_stream() {
                    this.activity.request_complete();
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                if this._done.is_none() {
                    this.activity.request_complete();
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some(expired) = this.timer.as_mut().and_then(|t| t.poll_expired(cx)) else {
                    return Poll::Pending;
                };
                this.timer = None;
                if let Some(done) = &mut this._done {
                    done.hcm.count_expired(expired);
                    tracing::debug!(target: "http", connection = done.conn, stream = done.stream, "{}: resetting the stream", expired.details());
                    if let Some(e) = done.entry.as_mut() {
                        e.flags.extend(expired.flag());
                        if let Some(h) = e.http.as_mut() {
                            h.details = expired.details().into();
                        }
                    }
                }
                Poll::Ready(Some(Err(expired.details().into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
