//! What pilotfish implements of the Envoy API, in one table, and the walk that lists everything a
//! configuration sets outside it (grouped by field or extension, with a count and an example
//! path). Every capability that lands extends these tables in the same change; nothing outside
//! them is ever silently taken as supported.

use crate::model::effective_type_url;
use crate::resources::ResourceSet;
use crate::walk::join;
use pilotfish_api::prost_reflect::{DynamicMessage, Kind, MapKey, ReflectMessage, Value};
use pilotfish_api::{descriptor_pool, type_url_message_name};
use prost::{Message, Name};
use std::collections::BTreeMap;

/// Messages pilotfish reads part of, and the fields it reads. A message not listed here but
/// reached through a listed field is read whole (addresses, matchers, match criteria).
const FIELDS: &[(&str, &[&str])] = &[
    (
        "envoy.config.bootstrap.v3.Bootstrap",
        &[
            "node",
            "static_resources",
            "dynamic_resources",
            "admin",
            "tracing",
        ],
    ),
    // xDS: ADS (state of the world) over a static cluster, clusters and listeners through it.
    (
        "envoy.config.bootstrap.v3.Bootstrap.DynamicResources",
        &["lds_config", "cds_config", "ads_config"],
    ),
    // A subscription's source: ADS, or a gRPC api_config_source of its own (files, REST and
    // the xDS-TP `self`/`authorities` are not implemented).
    (
        "envoy.config.core.v3.ConfigSource",
        &[
            "ads",
            "api_config_source",
            "initial_fetch_timeout",
            "resource_api_version",
        ],
    ),
    (
        "envoy.config.core.v3.ApiConfigSource",
        &[
            "api_type",
            "transport_api_version",
            "grpc_services",
            "set_node_on_first_message_only",
        ],
    ),
    ("envoy.config.core.v3.GrpcService", &["envoy_grpc"]),
    (
        "envoy.config.core.v3.GrpcService.EnvoyGrpc",
        &["cluster_name", "authority", "retry_policy"],
    ),
    // EnvoyGrpc's: the reconnection backoff of an xDS stream.
    ("envoy.config.core.v3.RetryPolicy", &["retry_back_off"]),
    (
        "envoy.config.core.v3.BackoffStrategy",
        &["base_interval", "max_interval"],
    ),
    ("envoy.config.bootstrap.v3.Admin", &["address"]),
    // The tracer connection managers without their own use.
    ("envoy.config.trace.v3.Tracing", &["http"]),
    ("envoy.config.trace.v3.Tracing.Http", &["name", "typed_config"]),
    // B3 propagation; spans are not exported (the collector fields are listed).
    (
        "envoy.config.trace.v3.ZipkinConfig",
        &["trace_id_128bit", "shared_span_context"],
    ),
    // Span tags (custom_tags) only matter to exported spans, which pilotfish does not send.
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.Tracing",
        &["client_sampling", "random_sampling", "overall_sampling", "provider"],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.RequestIDExtension",
        &["typed_config"],
    ),
    (
        "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
        &["pack_trace_reason", "use_request_id_for_trace_sampling"],
    ),
    ("envoy.config.route.v3.Decorator", &["operation", "propagate"]),
    (
        "envoy.config.bootstrap.v3.Bootstrap.StaticResources",
        &["listeners", "clusters", "secrets"],
    ),
    (
        "envoy.config.listener.v3.Listener",
        &[
            "name",
            "address",
            "filter_chains",
            "default_filter_chain",
            "listener_filters",
            "use_original_dst",
            "bind_to_port",
            "traffic_direction",
            "filter_chain_matcher",
            "listener_filters_timeout",
            "continue_on_listener_filters_timeout",
            "enable_reuse_port",
            "tcp_backlog_size",
            "stat_prefix",
            "per_connection_buffer_limit_bytes",
            "connection_balance_config",
        ],
    ),
    // Connections are tasks on one work-stealing runtime: they are spread over the workers
    // as exact_balance asks, whatever the listener says.
    (
        "envoy.config.listener.v3.Listener.ConnectionBalanceConfig",
        &["exact_balance"],
    ),
    // The unified matcher, as filter_chain_matcher uses it: network inputs, string or IP
    // matchers, actions naming a filter chain.
    (
        "xds.type.matcher.v3.Matcher",
        &["matcher_list", "matcher_tree", "on_no_match"],
    ),
    (
        "xds.type.matcher.v3.Matcher.OnMatch",
        &["matcher", "action"],
    ),
    ("xds.type.matcher.v3.Matcher.MatcherList", &["matchers"]),
    (
        "xds.type.matcher.v3.Matcher.MatcherList.FieldMatcher",
        &["predicate", "on_match"],
    ),
    (
        "xds.type.matcher.v3.Matcher.MatcherList.Predicate",
        &[
            "single_predicate",
            "or_matcher",
            "and_matcher",
            "not_matcher",
        ],
    ),
    (
        "xds.type.matcher.v3.Matcher.MatcherList.Predicate.PredicateList",
        &["predicate"],
    ),
    (
        "xds.type.matcher.v3.Matcher.MatcherList.Predicate.SinglePredicate",
        &["input", "value_match", "custom_match"],
    ),
    (
        "xds.type.matcher.v3.Matcher.MatcherTree",
        &["input", "exact_match_map", "prefix_match_map"],
    ),
    ("xds.type.matcher.v3.Matcher.MatcherTree.MatchMap", &["map"]),
    (
        "xds.core.v3.TypedExtensionConfig",
        &["name", "typed_config"],
    ),
    (
        "envoy.config.listener.v3.FilterChain",
        &[
            "filter_chain_match",
            "filters",
            "transport_socket",
            "name",
            "metadata",
        ],
    ),
    (
        "envoy.config.listener.v3.ListenerFilter",
        &["name", "typed_config", "filter_disabled"],
    ),
    ("envoy.config.listener.v3.Filter", &["name", "typed_config"]),
    (
        "envoy.config.core.v3.TransportSocket",
        &["name", "typed_config"],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        &[
            "stat_prefix",
            "codec_type",
            "rds",
            "route_config",
            "http_filters",
            "server_name",
            "server_header_transformation",
            "use_remote_address",
            "skip_xff_append",
            "xff_num_trusted_hops",
            "internal_address_config",
            "generate_request_id",
            "preserve_external_request_id",
            "access_log",
            "strip_matching_host_port",
            "strip_any_host_port",
            "upgrade_configs",
            "forward_client_cert_details",
            "set_current_client_cert_details",
            "normalize_path",
            "merge_slashes",
            "path_with_escaped_slashes_action",
            "max_request_headers_kb",
            "stream_idle_timeout",
            "request_timeout",
            "request_headers_timeout",
            "drain_timeout",
            "common_http_protocol_options",
            "http2_protocol_options",
            "tracing",
            "request_id_extension",
            "local_reply_config",
        ],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.LocalReplyConfig",
        &["mappers", "body_format"],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.ResponseMapper",
        &["filter", "status_code", "body", "body_format_override", "headers_to_add"],
    ),
    // A connection's and its streams' limits (the last two downstream only, see ONLY_WHERE).
    (
        "envoy.config.core.v3.HttpProtocolOptions",
        &[
            "idle_timeout",
            "max_connection_duration",
            "max_requests_per_connection",
            "max_headers_count",
            "max_stream_duration",
        ],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.SetCurrentClientCertDetails",
        &["subject", "cert", "chain", "dns", "uri"],
    ),
    // HTTP/1.1 upgrades (websocket and the like); their own filter chains are not implemented.
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.UpgradeConfig",
        &["upgrade_type", "enabled"],
    ),
    (
        "envoy.config.route.v3.RouteAction.UpgradeConfig",
        &["upgrade_type", "enabled", "connect_config"],
    ),
    // A CONNECT terminated into a plain TCP connection: PROXY protocol and POST are not.
    ("envoy.config.route.v3.RouteAction.UpgradeConfig.ConnectConfig", &[]),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.InternalAddressConfig",
        &["cidr_ranges"],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.Rds",
        &["route_config_name", "config_source"],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter",
        &["name", "typed_config"],
    ),
    (
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        &[
            "stat_prefix",
            "cluster",
            "weighted_clusters",
            "idle_timeout",
            "max_connect_attempts",
            "access_log",
            "hash_policy",
        ],
    ),
    // filter_state needs objects other filters set; pilotfish keeps none.
    ("envoy.type.v3.HashPolicy", &["source_ip"]),
    (
        "envoy.config.accesslog.v3.AccessLog",
        &["name", "typed_config", "filter"],
    ),
    // grpc_status_filter and extension_filter are not evaluated.
    (
        "envoy.config.accesslog.v3.AccessLogFilter",
        &[
            "status_code_filter",
            "duration_filter",
            "not_health_check_filter",
            "traceable_filter",
            "runtime_filter",
            "and_filter",
            "or_filter",
            "header_filter",
            "response_flag_filter",
            "metadata_filter",
            "log_type_filter",
        ],
    ),
    (
        "envoy.config.accesslog.v3.RuntimeFilter",
        &["runtime_key", "percent_sampled", "use_independent_randomness"],
    ),
    (
        "envoy.extensions.access_loggers.file.v3.FileAccessLog",
        &["path", "log_format", "format", "json_format", "typed_json_format"],
    ),
    ("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", &["log_format"]),
    ("envoy.extensions.access_loggers.stream.v3.StderrAccessLog", &["log_format"]),
    (
        "envoy.config.core.v3.SubstitutionFormatString",
        &["text_format", "text_format_source", "json_format", "content_type"],
    ),
    ("envoy.extensions.filters.http.router.v3.Router", &[]),
    (
        "envoy.extensions.filters.http.fault.v3.HTTPFault",
        &["delay", "abort", "upstream_cluster", "headers"],
    ),
    ("envoy.extensions.filters.http.cors.v3.Cors", &[]),
    (
        "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
        &["alpn_override"],
    ),
    // Stat names as Envoy 1.40 writes them in /stats whether dots are replaced or not; the
    // upstream timing stats (enable_upstream_stats) are not kept.
    (
        "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
        &[
            "emit_filter_state",
            "stats_for_all_methods",
            "individual_method_stats_allowlist",
            "replace_dots_in_grpc_service_name",
        ],
    ),
    // shadow_enabled, private network access and forwarding unmatched preflights are not
    // implemented.
    (
        "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        &[
            "allow_origin_string_match",
            "allow_methods",
            "allow_headers",
            "expose_headers",
            "max_age",
            "allow_credentials",
            "filter_enabled",
        ],
    ),
    (
        "envoy.config.route.v3.CorsPolicy",
        &[
            "allow_origin_string_match",
            "allow_methods",
            "allow_headers",
            "expose_headers",
            "max_age",
            "allow_credentials",
            "filter_enabled",
        ],
    ),
    (
        "envoy.extensions.filters.http.fault.v3.FaultAbort",
        &["http_status", "grpc_status", "header_abort", "percentage", "response_body"],
    ),
    (
        "envoy.extensions.filters.common.fault.v3.FaultDelay",
        &["fixed_delay", "header_delay", "percentage"],
    ),
    // Listener filters run with their defaults: any field set on them is listed.
    ("envoy.extensions.filters.listener.original_dst.v3.OriginalDst", &[]),
    ("envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector", &[]),
    ("envoy.extensions.filters.listener.http_inspector.v3.HttpInspector", &[]),
    ("envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol", &[]),
    (
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        // Session tickets use keys of pilotfish's own: session_ticket_keys are not read.
        &[
            "common_tls_context",
            "require_client_certificate",
            "disable_stateless_session_resumption",
            "disable_stateful_session_resumption",
        ],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        &["common_tls_context", "sni"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
        &[
            "tls_certificates",
            "tls_certificate_sds_secret_configs",
            "validation_context",
            "validation_context_sds_secret_config",
            "combined_validation_context",
            "alpn_protocols",
            "tls_params",
        ],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.TlsParameters",
        &[
            "tls_minimum_protocol_version",
            "tls_maximum_protocol_version",
            "cipher_suites",
            "ecdh_curves",
        ],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext.CombinedCertificateValidationContext",
        &["default_validation_context", "validation_context_sds_secret_config"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig",
        &["name", "sds_config"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.Secret",
        &["name", "tls_certificate", "validation_context"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.TlsCertificate",
        &["certificate_chain", "private_key", "ocsp_staple"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext",
        &[
            "trusted_ca",
            "match_subject_alt_names",
            "match_typed_subject_alt_names",
        ],
    ),
    (
        "envoy.config.route.v3.RouteConfiguration",
        &[
            "name",
            "virtual_hosts",
            "validate_clusters",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
        ],
    ),
    (
        "envoy.config.route.v3.VirtualHost",
        &[
            "name",
            "domains",
            "routes",
            "typed_per_filter_config",
            "retry_policy",
            "include_request_attempt_count",
            "include_attempt_count_in_response",
            "cors",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
        ],
    ),
    (
        "envoy.config.route.v3.Route",
        &[
            "name",
            "match",
            "route",
            "redirect",
            "direct_response",
            "typed_per_filter_config",
            "decorator",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
        ],
    ),
    (
        "envoy.config.core.v3.HeaderValueOption",
        &["header", "append", "append_action", "keep_empty_value"],
    ),
    (
        "envoy.config.route.v3.RouteAction",
        &[
            "cluster",
            "cluster_header",
            "weighted_clusters",
            "prefix_rewrite",
            "regex_rewrite",
            "host_rewrite_literal",
            "auto_host_rewrite",
            "host_rewrite_header",
            "timeout",
            "retry_policy",
            "upgrade_configs",
            "hash_policy",
            "cors",
            "max_grpc_timeout",
            "grpc_timeout_offset",
            "max_stream_duration",
            "idle_timeout",
        ],
    ),
    (
        "envoy.config.route.v3.RouteAction.MaxStreamDuration",
        &[
            "max_stream_duration",
            "grpc_timeout_header_max",
            "grpc_timeout_header_offset",
        ],
    ),
    // Cookies are hashed when present; generating one (ttl) is not implemented.
    (
        "envoy.config.route.v3.RouteAction.HashPolicy",
        &["header", "cookie", "connection_properties", "query_parameter", "terminal"],
    ),
    ("envoy.config.route.v3.RouteAction.HashPolicy.Header", &["header_name"]),
    ("envoy.config.route.v3.RouteAction.HashPolicy.Cookie", &["name"]),
    (
        "envoy.config.route.v3.RouteAction.HashPolicy.ConnectionProperties",
        &["source_ip"],
    ),
    (
        "envoy.config.route.v3.RouteAction.HashPolicy.QueryParameter",
        &["name"],
    ),
    (
        "envoy.config.route.v3.RetryPolicy",
        &[
            "retry_on",
            "num_retries",
            "per_try_timeout",
            "retriable_status_codes",
            "retry_back_off",
            "retry_host_predicate",
            "host_selection_retry_max_attempts",
        ],
    ),
    (
        "envoy.config.route.v3.RetryPolicy.RetryBackOff",
        &["base_interval", "max_interval"],
    ),
    (
        "envoy.config.route.v3.RetryPolicy.RetryHostPredicate",
        &["name", "typed_config"],
    ),
    (
        "envoy.config.route.v3.WeightedCluster",
        &["clusters", "total_weight", "header_name"],
    ),
    (
        "envoy.config.route.v3.WeightedCluster.ClusterWeight",
        &["name", "weight"],
    ),
    (
        "envoy.config.cluster.v3.Cluster",
        &[
            "name",
            "type",
            "eds_cluster_config",
            "load_assignment",
            "transport_socket",
            "transport_socket_matches",
            "metadata",
            "connect_timeout",
            "upstream_bind_config",
            "circuit_breakers",
            "lb_policy",
            "health_checks",
            "outlier_detection",
            "cleanup_interval",
            "dns_lookup_family",
            "dns_refresh_rate",
            "per_connection_buffer_limit_bytes",
            "typed_extension_protocol_options",
            "ring_hash_lb_config",
            "maglev_lb_config",
            "least_request_lb_config",
            "common_lb_config",
            // Upstream network filters: Istio's TCP metadata exchange (any other type is
            // listed as an extension).
            "filters",
        ],
    ),
    ("envoy.config.cluster.v3.Filter", &["name", "typed_config"]),
    // Istio's TCP metadata exchange; `enable_discovery` is not read.
    ("envoy.tcp.metadataexchange.config.MetadataExchange", &["protocol"]),
    // The upstream HTTP protocol: HTTP/1.1 or HTTP/2, fixed or as downstream; their options
    // are not read (listed when set).
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        &[
            "explicit_http_config",
            "use_downstream_protocol_config",
            "auto_config",
            "common_http_protocol_options",
        ],
    ),
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig",
        &["http_protocol_options", "http2_protocol_options"],
    ),
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.UseDownstreamHttpConfig",
        &["http_protocol_options", "http2_protocol_options"],
    ),
    // HTTP/3 and the alternate protocols cache are not.
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.AutoHttpConfig",
        &["http_protocol_options", "http2_protocol_options"],
    ),
    ("envoy.config.core.v3.Http1ProtocolOptions", &[]),
    (
        "envoy.config.core.v3.Http2ProtocolOptions",
        &[
            "max_concurrent_streams",
            "initial_stream_window_size",
            "initial_connection_window_size",
        ],
    ),
    (
        "envoy.config.cluster.v3.Cluster.RingHashLbConfig",
        &["minimum_ring_size", "maximum_ring_size", "hash_function"],
    ),
    ("envoy.config.cluster.v3.Cluster.MaglevLbConfig", &["table_size"]),
    (
        "envoy.config.cluster.v3.Cluster.LeastRequestLbConfig",
        &["choice_count", "active_request_bias"],
    ),
    ("envoy.config.core.v3.RuntimeDouble", &["default_value", "runtime_key"]),
    (
        "envoy.config.cluster.v3.Cluster.CommonLbConfig",
        &[
            "healthy_panic_threshold",
            "locality_weighted_lb_config",
            "consistent_hashing_lb_config",
        ],
    ),
    (
        "envoy.config.cluster.v3.Cluster.CommonLbConfig.ConsistentHashingLbConfig",
        &["use_hostname_for_hashing"],
    ),
    (
        "envoy.config.cluster.v3.OutlierDetection",
        &[
            "consecutive_5xx",
            "enforcing_consecutive_5xx",
            "consecutive_gateway_failure",
            "enforcing_consecutive_gateway_failure",
            "split_external_local_origin_errors",
            "consecutive_local_origin_failure",
            "enforcing_consecutive_local_origin_failure",
            "interval",
            "base_ejection_time",
            "max_ejection_time",
            "max_ejection_percent",
        ],
    ),
    (
        "envoy.config.core.v3.HealthCheck",
        &[
            "timeout",
            "interval",
            "unhealthy_threshold",
            "healthy_threshold",
            "no_traffic_interval",
            "tcp_health_check",
            "http_health_check",
        ],
    ),
    ("envoy.config.core.v3.HealthCheck.TcpHealthCheck", &["send", "receive"]),
    (
        "envoy.config.core.v3.HealthCheck.HttpHealthCheck",
        &["host", "path", "expected_statuses"],
    ),
    ("envoy.config.core.v3.HealthCheck.Payload", &["text", "binary"]),
    ("envoy.config.core.v3.BindConfig", &["source_address"]),
    ("envoy.config.cluster.v3.CircuitBreakers", &["thresholds"]),
    (
        "envoy.config.cluster.v3.CircuitBreakers.Thresholds",
        // max_requests and max_retries bind HTTP streams and retries; TCP connections are
        // bound by max_connections and max_pending_requests, as in Envoy.
        &[
            "priority",
            "max_connections",
            "max_pending_requests",
            "max_requests",
            "max_retries",
            "track_remaining",
        ],
    ),
    (
        "envoy.config.cluster.v3.Cluster.EdsClusterConfig",
        &["service_name", "eds_config"],
    ),
    (
        "envoy.config.cluster.v3.Cluster.TransportSocketMatch",
        &["name", "match", "transport_socket"],
    ),
    (
        "envoy.config.endpoint.v3.ClusterLoadAssignment",
        &["cluster_name", "endpoints"],
    ),
    (
        "envoy.config.endpoint.v3.LocalityLbEndpoints",
        &[
            "locality",
            "lb_endpoints",
            "priority",
            "load_balancing_weight",
        ],
    ),
    (
        "envoy.config.endpoint.v3.LbEndpoint",
        &[
            "endpoint",
            "health_status",
            "metadata",
            "load_balancing_weight",
        ],
    ),
    (
        "envoy.config.endpoint.v3.Endpoint",
        &["address", "hostname"],
    ),
];

/// Fields of a message both sides of the proxy use that pilotfish implements on one side only:
/// (field, how the path of the side it implements ends). Elsewhere they are listed.
const ONLY_WHERE: &[(&str, &str)] = &[
    // The connection manager's; upstream, a response's header count and a stream's duration
    // are not limited.
    (
        "envoy.config.core.v3.HttpProtocolOptions.max_headers_count",
        ".typed_config.common_http_protocol_options",
    ),
    (
        "envoy.config.core.v3.HttpProtocolOptions.max_stream_duration",
        ".typed_config.common_http_protocol_options",
    ),
];

/// Istio's null-VM Wasm plugins pilotfish implements natively (by their code name).
const NULL_VM_PLUGINS: &[&str] = &["envoy.wasm.metadata_exchange", crate::istio::STATS_CODE];

/// Extension configuration types pilotfish implements.
const EXTENSIONS: &[&str] = &[
    "envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
    "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
    "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
    "envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol",
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
    "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
    "envoy.extensions.filters.http.router.v3.Router",
    "envoy.config.trace.v3.ZipkinConfig",
    "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
    "envoy.extensions.filters.http.fault.v3.HTTPFault",
    "envoy.extensions.filters.http.cors.v3.Cors",
    "envoy.extensions.filters.http.cors.v3.CorsPolicy",
    "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
    "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
    "envoy.tcp.metadataexchange.config.MetadataExchange",
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
    "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
    "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
    "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer",
    "envoy.extensions.access_loggers.file.v3.FileAccessLog",
    "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
    "envoy.extensions.access_loggers.stream.v3.StderrAccessLog",
    // filter_chain_matcher inputs, its IP matcher, and its action (the chain's name).
    "envoy.extensions.matching.common_inputs.network.v3.DestinationIPInput",
    "envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput",
    "envoy.extensions.matching.common_inputs.network.v3.SourceIPInput",
    "envoy.extensions.matching.common_inputs.network.v3.SourcePortInput",
    "envoy.extensions.matching.common_inputs.network.v3.DirectSourceIPInput",
    "envoy.extensions.matching.common_inputs.network.v3.SourceTypeInput",
    "envoy.extensions.matching.common_inputs.network.v3.ServerNameInput",
    "envoy.extensions.matching.common_inputs.network.v3.TransportProtocolInput",
    "envoy.extensions.matching.common_inputs.network.v3.ApplicationProtocolInput",
    "envoy.extensions.matching.input_matchers.ip.v3.Ip",
    "google.protobuf.StringValue",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GapKind {
    /// A field of a message pilotfish reads part of: `envoy.config.route.v3.RouteAction.retry_policy`.
    Field,
    /// An extension's configuration type, with the names it was configured under.
    Extension,
    /// A type with no schema in pilotfish, kept as its JSON.
    Opaque,
}

/// One thing the configuration sets that pilotfish does not implement yet.
#[derive(Debug, Clone)]
pub struct Gap {
    pub kind: GapKind,
    /// Field full name, or the extension's type (message name).
    pub key: String,
    /// Names the extension was configured under (`envoy.filters.http.fault`), for extensions.
    pub names: Vec<String>,
    pub count: usize,
    pub example: String,
}

/// Everything `set` configures outside [`FIELDS`] and [`EXTENSIONS`], in a stable order.
pub fn gaps(set: &ResourceSet) -> Vec<Gap> {
    let mut acc: BTreeMap<(u8, String), Gap> = BTreeMap::new();
    let mut bootstrap = set.bootstrap.clone();
    // The static resources are walked as resources below, once each.
    bootstrap.static_resources = None;
    visit_typed(&bootstrap, "bootstrap", &mut acc);
    for r in &set.listeners {
        visit_typed(&r.value, &r.path, &mut acc);
    }
    for r in &set.clusters {
        visit_typed(&r.value, &r.path, &mut acc);
    }
    // Static route configurations are the inline ones, walked through their listener.
    for r in set.route_configs.iter().filter(|r| !r.origin.is_static()) {
        visit_typed(&r.value, &r.path, &mut acc);
    }
    for r in &set.endpoints {
        visit_typed(&r.value, &r.path, &mut acc);
    }
    for r in &set.secrets {
        visit_typed(&r.value, &r.path, &mut acc);
    }
    acc.into_values().collect()
}

fn visit_typed<T: Message + Name>(value: &T, path: &str, acc: &mut BTreeMap<(u8, String), Gap>) {
    let desc = descriptor_pool()
        .get_message_by_name(&T::full_name())
        .expect("type in pool");
    let msg = DynamicMessage::decode(desc, value.encode_to_vec().as_slice()).expect("re-decode");
    visit(&msg, path, acc);
}

fn record(
    acc: &mut BTreeMap<(u8, String), Gap>,
    kind: GapKind,
    key: String,
    name: Option<&str>,
    path: &str,
) {
    let order = match kind {
        GapKind::Extension => 0,
        GapKind::Opaque => 1,
        GapKind::Field => 2,
    };
    let gap = acc.entry((order, key.clone())).or_insert_with(|| Gap {
        kind,
        key,
        names: vec![],
        count: 0,
        example: path.to_string(),
    });
    gap.count += 1;
    if let Some(n) = name {
        if !n.is_empty() && !gap.names.iter().any(|x| x == n) {
            gap.names.push(n.to_string());
        }
    }
}

fn visit(msg: &DynamicMessage, path: &str, acc: &mut BTreeMap<(u8, String), Gap>) {
    let desc = msg.descriptor();
    let allowed = FIELDS
        .iter()
        .find(|(m, _)| *m == desc.full_name())
        .map(|(_, f)| *f);
    let sibling_name = msg
        .get_field_by_name("name")
        .and_then(|v| v.as_str().map(str::to_string));
    for (field, value) in msg.fields() {
        let fpath = join(path, field.name());
        if let Some(allowed) = allowed {
            let elsewhere = ONLY_WHERE
                .iter()
                .any(|(f, end)| *f == field.full_name() && !path.ends_with(end));
            if !allowed.contains(&field.name()) || elsewhere {
                record(
                    acc,
                    GapKind::Field,
                    field.full_name().to_string(),
                    None,
                    &fpath,
                );
                continue;
            }
        }
        let Kind::Message(mut m) = field.kind() else {
            continue;
        };
        // A map's values (typed_extension_protocol_options, typed_per_filter_config) are
        // walked as what they are.
        if field.is_map() {
            match m.map_entry_value_field().kind() {
                Kind::Message(v) => m = v,
                _ => continue,
            }
        }
        let mut each = |v: &Value, p: String| {
            if let Value::Message(inner) = v {
                if m.full_name() == "google.protobuf.Any" {
                    if allowed.is_some() {
                        visit_any(inner, &p, sibling_name.as_deref(), acc);
                    }
                } else if FIELDS.iter().any(|(n, _)| *n == m.full_name()) {
                    visit(inner, &p, acc);
                }
            }
        };
        match value {
            Value::List(items) => items
                .iter()
                .enumerate()
                .for_each(|(i, v)| each(v, format!("{fpath}[{i}]"))),
            Value::Map(map) => map.iter().for_each(|(k, v)| {
                let key = match k {
                    MapKey::String(s) => format!("{s:?}"),
                    other => format!("{other:?}"),
                };
                each(v, format!("{fpath}[{key}]"))
            }),
            v => each(v, fpath),
        }
    }
}

fn visit_any(
    any: &DynamicMessage,
    path: &str,
    name: Option<&str>,
    acc: &mut BTreeMap<(u8, String), Gap>,
) {
    let Ok(typed): Result<pilotfish_api::pb::google::protobuf::Any, _> = any.transcode_to() else {
        return;
    };
    let effective = effective_type_url(&typed);
    let message_name = type_url_message_name(&effective).to_string();
    if type_url_message_name(&typed.type_url) == "pilotfish.config.v1.OpaqueAny" {
        record(acc, GapKind::Opaque, message_name, name, path);
        return;
    }
    if crate::model::null_vm_plugin(&typed)
        .is_some_and(|code| NULL_VM_PLUGINS.contains(&code.as_str()))
    {
        // The stats plugin's JSON configuration: what of it pilotfish does not run.
        if let Some(json) = crate::istio::stats_configuration(&typed) {
            let gaps = match crate::istio::parse_stats(&json) {
                Ok((_, gaps)) => gaps,
                Err(e) => vec![e],
            };
            for g in gaps {
                record(
                    acc,
                    GapKind::Field,
                    format!("istio.stats configuration: {g}"),
                    name,
                    &format!("{path}.config.configuration"),
                );
            }
        }
        return;
    }
    if !EXTENSIONS.contains(&message_name.as_str()) {
        if descriptor_pool()
            .get_message_by_name(&message_name)
            .is_none()
        {
            record(acc, GapKind::Opaque, message_name, name, path);
        } else {
            record(acc, GapKind::Extension, message_name, name, path);
        }
        return;
    }
    if let Some(inner) = crate::walk::unpack_any(any, path, &mut vec![]) {
        visit(&inner, path, acc);
    }
}
