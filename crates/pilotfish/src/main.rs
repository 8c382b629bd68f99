//! The `pilotfish` command.

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
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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

fn main() -> ExitCode {
    match Cli::parse().command {
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
        Command::Bootstrap { file } => {
            let Some(cfg) = load(&file) else {
                return ExitCode::from(1);
            };
            print!(
                "{}",
                pilotfish_config::output::standalone_bootstrap_yaml(&cfg.resources)
            );
        }
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
