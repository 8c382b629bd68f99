//! pilotfish as a proxy: `pilotfish -c FILE` runs a bootstrap or config dump on Envoy's data path:
//! listeners and their filters, filter chains, `tcp_proxy`, the `http_connection_manager` with its
//! HTTP filters and the router, the cluster manager and its load balancers, the admin API,
//! Envoy's stats and Envoy's log lines. Every matching decision is the shared one in
//! `pilotfish_decide`; what the proxy cannot run yet is named at start-up.
//!
//! Modules follow Envoy's data path: [`listener_filter`] -> filter chain (shared decision) ->
//! network filter ([`tcp_proxy`] or [`http`]) -> [`cluster`] and its [`lb`]; [`server`] owns the
//! runtime, [`admin`] the admin API, [`log`] and [`stats`] what Envoy prints and counts.

pub mod access_log;
pub mod admin;
pub mod cluster;
pub mod dns;
pub mod health_check;
pub mod http;
pub mod istio_stats;
pub mod lb;
pub mod listener_filter;
pub mod log;
pub mod outlier;
pub mod peer_exchange;
pub mod server;
pub mod stats;
pub mod tcp_proxy;
pub mod transport_socket;
pub mod xds;

pub use server::Options;

use pilotfish_api::pb::envoy::config::listener::v3::filter;
use pilotfish_config::model::effective_type_url;
use pilotfish_config::Config;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tracing_subscriber::layer::SubscriberExt;

/// A protobuf Duration as a std one; unset means the field's Envoy default.
pub fn duration(
    d: Option<&pilotfish_api::pb::google::protobuf::Duration>,
    default: Duration,
) -> Duration {
    d.map_or(default, |d| {
        Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
    })
}

/// A random number good enough to spread load (weighted clusters, priority levels): mixed from
/// a seed and the clock.
pub fn random(seed: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos() as u64;
    let mut x = seed ^ t ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

/// Sets up Envoy's log: the level for every component, then the per-component overrides
/// (`upstream:debug,connection:trace`).
pub fn init_log(options: &Options) -> Result<(), String> {
    let level = log::level_index(&options.log_level)
        .ok_or_else(|| format!("invalid log level '{}'", options.log_level))?;
    log::set_all(level);
    for part in options
        .component_log_level
        .split(',')
        .filter(|s| !s.is_empty())
    {
        let (c, l) = part
            .split_once(':')
            .ok_or_else(|| format!("--component-log-level: '{part}' is not COMPONENT:LEVEL"))?;
        let l = log::level_index(l)
            .ok_or_else(|| format!("--component-log-level: invalid level '{l}'"))?;
        if !log::set(c, l) {
            return Err(format!("--component-log-level: unknown component '{c}'"));
        }
    }
    let out: Box<dyn std::io::Write + Send> = if options.log_path.is_empty() {
        Box::new(std::io::stderr())
    } else {
        Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&options.log_path)
                .map_err(|e| format!("--log-path {}: {e}", options.log_path))?,
        )
    };
    let subscriber = tracing_subscriber::registry().with(log::EnvoyLog::new(out));
    tracing::subscriber::set_global_default(subscriber).map_err(|e| e.to_string())
}

/// The HTTP filters the connection manager runs: the router, fault, CORS, grpc_stats, and
/// Istio's metadata exchange, ALPN and stats filters.
fn runs_http_filter(any: &pilotfish_api::pb::google::protobuf::Any) -> bool {
    let ty = effective_type_url(any);
    [
        "router.v3.Router",
        "HTTPFault",
        "filters.http.cors.v3.Cors",
        "grpc_stats.v3.FilterConfig",
        "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
    ]
    .iter()
    .any(|t| ty.ends_with(t))
        || pilotfish_config::model::null_vm_plugin(any).is_some_and(|code| {
            code == crate::http::istio::METADATA_EXCHANGE_CODE
                || code == pilotfish_config::istio::STATS_CODE
        })
}

/// What the proxy does not run yet in this configuration, beyond what `validate` lists: said at
/// start-up so nobody takes it as supported.
fn proxy_gaps(cfg: &Config) -> Vec<String> {
    let mut gaps = std::collections::BTreeMap::<String, usize>::new();
    for l in &cfg.resources.listeners {
        for (_, fc) in server::chains(&l.value) {
            for f in &fc.filters {
                let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    continue;
                };
                let ty = effective_type_url(any);
                if ty.ends_with("HttpConnectionManager") {
                    let hcm: Option<pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager> =
                        pilotfish_config::model::unpack(any);
                    for h in hcm.iter().flat_map(|h| &h.http_filters) {
                        use pilotfish_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType;
                        let runs = match &h.config_type {
                            Some(ConfigType::TypedConfig(a)) => runs_http_filter(a),
                            _ => h.name == "envoy.filters.http.router",
                        };
                        if !runs {
                            *gaps
                                .entry(format!("HTTP filter '{}' (passed over)", h.name))
                                .or_default() += 1;
                        }
                    }
                } else if !ty.ends_with("TcpProxy")
                    && pilotfish_config::istio::stats_configuration(any).is_none()
                    && crate::peer_exchange::configured(any).is_none()
                {
                    *gaps
                        .entry(format!("network filter '{}' (passed over)", f.name))
                        .or_default() += 1;
                }
            }
        }
        for f in &l.value.listener_filters {
            let kind = f.name.trim_start_matches("envoy.filters.listener.");
            if ![
                "original_dst",
                "tls_inspector",
                "http_inspector",
                "proxy_protocol",
            ]
            .contains(&kind)
            {
                *gaps
                    .entry(format!("listener filter '{}' (passed over)", f.name))
                    .or_default() += 1;
            }
        }
    }
    for c in &cfg.resources.clusters {
        use pilotfish_api::pb::envoy::config::cluster::v3::cluster::LbPolicy as P;
        if let Ok(p @ P::LoadBalancingPolicyConfig) = P::try_from(c.value.lb_policy) {
            *gaps
                .entry(format!("lb_policy {} (round robin used)", p.as_str_name()))
                .or_default() += 1;
        }
        for hc in &c.value.health_checks {
            if let Some(what) = crate::health_check::unsupported(hc) {
                *gaps
                    .entry(format!("{what} (hosts stay unhealthy until checked)"))
                    .or_default() += 1;
            }
        }
        if c.value.load_balancing_policy.is_some() {
            *gaps
                .entry("load_balancing_policy (round robin used)".into())
                .or_default() += 1;
        }
    }
    gaps.into_iter().map(|(g, n)| format!("{g}: {n}")).collect()
}

/// Runs the configuration until SIGTERM, SIGINT or `/quitquitquit`; returns the exit code.
pub fn run(cfg: Config, options: Options) -> u8 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.concurrency.max(1))
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 1;
        }
    };
    let code = runtime.block_on(serve(cfg, options));
    // A name lookup may still be blocking a thread: do not wait for it to exit.
    runtime.shutdown_timeout(Duration::from_millis(500));
    code
}

async fn serve(cfg: Config, options: Options) -> u8 {
    tracing::info!(target: "main", "initializing pilotfish {} (concurrency {})", env!("CARGO_PKG_VERSION"), options.concurrency);
    let stats = Arc::new(crate::stats::Store::default());
    // The admin API answers from the start, as Envoy's does: while the configuration is awaited
    // it reports PRE_INITIALIZING (not ready), the xDS client's stats and the bootstrap; then
    // the proxy.
    // Its bootstrap alone: a dump's dynamic resources (most of it) are not copied for the
    // moment start-up takes.
    let initializing = server::Server::initializing(
        pilotfish_config::ResourceSet::from_bootstrap(cfg.resources.bootstrap.clone()),
        options.clone(),
        stats.clone(),
    );
    let (current, admin_current) = tokio::sync::watch::channel(initializing.clone());
    if let Some(admin) = cfg
        .resources
        .bootstrap
        .admin
        .as_ref()
        .and_then(|a| a.address.as_ref())
        .and_then(pilotfish_decide::listener::socket_addr)
    {
        match tokio::net::TcpListener::bind(admin).await {
            Ok(l) => {
                tracing::info!(target: "main", "admin address: {}", l.local_addr().unwrap_or(admin));
                tokio::spawn(admin::serve(admin_current, l));
            }
            Err(e) => {
                tracing::error!(target: "main", "cannot bind the admin address {admin}: {e}");
                return 1;
            }
        }
    }
    let mut quit = initializing.shutdown.subscribe();
    let (mut cfg, ads, sds) = tokio::select! {
        r = configuration(cfg, stats.clone()) => match r {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(target: "main", "{e}");
                return 1;
            }
        },
        _ = quit.wait_for(|q| *q) => {
            tracing::info!(target: "main", "shutting down (/quitquitquit) before the configuration came");
            return 0;
        }
    };
    // The secrets SDS delivered are in the configuration now: no warning for them.
    if let Some((secrets, _)) = &sds {
        for r in &mut cfg.model.references {
            if r.kind == pilotfish_config::model::RefKind::Secret
                && secrets.iter().any(|s| s.name == r.name)
            {
                r.resolved = true;
            }
        }
    }
    for w in cfg.warnings() {
        tracing::warn!(target: "config", "{w}");
    }
    for g in pilotfish_config::coverage::gaps(&cfg.resources) {
        tracing::warn!(target: "config", "not implemented: {} ({}x, e.g. {})", g.key, g.count, g.example);
    }
    for g in proxy_gaps(&cfg) {
        tracing::warn!(target: "config", "not run by the proxy yet: {g}");
    }
    // Taken before anything can report ready: a SIGTERM from then on drains instead of killing.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let (sds_secrets, sds) = match sds {
        Some((secrets, sds)) => (secrets, Some(sds)),
        None => (vec![], None),
    };
    let server = server::Server::with_stats(cfg.resources, options, stats, sds_secrets);
    current.send_replace(server.clone());
    // Its copy of the configuration goes with it.
    drop(initializing);
    let active = server.active();
    // DNS clusters resolve before the listeners start.
    server.start_clusters(&active.clusters.clusters).await;
    drop(active);
    server::start_listeners(&server);
    // Loading the configuration goes through large transient structures (the parsed YAML as
    // dynamic messages, the descriptor pool that reads it); their freed memory is handed back to
    // the system rather than kept by the allocator for the life of the proxy.
    pilotfish_config::release_load_caches();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only gives back memory that no allocation holds.
    unsafe {
        libc::malloc_trim(0);
    }
    if let Some(ads) = ads {
        tokio::spawn(ads.serve(server.clone()));
    }
    if let Some(sds) = sds {
        tokio::spawn(sds.serve(server.clone()));
    }
    server.live.store(true, Ordering::Relaxed);
    tracing::info!(target: "main", "starting main dispatch loop");
    let mut shutdown = server.shutdown.subscribe();
    let term_recv = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term_recv => {
            tracing::warn!(target: "main", "caught SIGTERM");
            drain(&server).await;
        }
        _ = tokio::signal::ctrl_c() => tracing::warn!(target: "main", "caught SIGINT"),
        _ = shutdown.wait_for(|s| *s) => tracing::info!(target: "main", "shutting down (/quitquitquit)"),
    }
    tracing::info!(target: "main", "exiting");
    0
}

/// What the proxy starts with: a control plane's configuration first (the ADS client keeps
/// its stats in `stats`), then the secrets its TLS contexts name through SDS (istio-agent's
/// sds-grpc). A config dump already holds what its control plane sent and the secrets its
/// proxy had: only a bootstrap asks for them.
async fn configuration(
    cfg: Config,
    stats: Arc<crate::stats::Store>,
) -> Result<(Config, Option<xds::Running>, Option<SdsStart>), String> {
    let asks = cfg.kind == pilotfish_config::DocumentKind::Bootstrap;
    let (cfg, ads) = match xds::dynamic_resources(&cfg.resources)?.filter(|_| asks) {
        None => (cfg, None),
        Some(ads) => {
            let (cfg, running) = xds::fetch(&cfg, &ads, stats.clone()).await?;
            (cfg, Some(running))
        }
    };
    let sds = if asks {
        xds::sds::fetch(&cfg.resources, stats).await?
    } else {
        None
    };
    Ok((cfg, ads, sds))
}

type SdsStart = (
    Vec<
        pilotfish_config::resources::Resource<
            pilotfish_api::pb::envoy::extensions::transport_sockets::tls::v3::Secret,
        >,
    >,
    xds::sds::Sds,
);

/// Stops accepting, then waits for open connections to finish, for at most `--drain-time-s`.
async fn drain(server: &std::sync::Arc<server::Server>) {
    let _ = server.draining.send(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(server.options.drain_time_s);
    while server.active_connections.load(Ordering::Relaxed) > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
