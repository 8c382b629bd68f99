//! The `pilotfish` command.

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = match &cli.command {
        Command::Validate { file, .. }
        | Command::ConfigDump { file, .. }
        | Command::Bootstrap { file } => file,
    };
    let cfg = match pilotfish_config::load_file(file) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            eprintln!(
                "{}: configuration rejected ({} error{})",
                file.display(),
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" }
            );
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Validate { json, .. } => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&pilotfish_config::summary::to_json(&cfg))
                        .unwrap()
                );
            } else {
                print!("{}", pilotfish_config::summary::to_text(&cfg));
            }
        }
        Command::ConfigDump { include_eds, .. } => {
            println!(
                "{}",
                pilotfish_config::output::config_dump_json(&cfg.resources, include_eds)
            );
        }
        Command::Bootstrap { .. } => {
            print!(
                "{}",
                pilotfish_config::output::standalone_bootstrap_yaml(&cfg.resources)
            );
        }
    }
    ExitCode::SUCCESS
}
