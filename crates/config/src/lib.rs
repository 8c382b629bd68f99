//! Envoy v3 configuration, loaded: a bootstrap or a `/config_dump` (YAML or JSON) becomes typed
//! Envoy protobuf messages, then one [`ResourceSet`] (as if every resource had come through xDS),
//! then the resolved [`Model`]. Loading checks what Envoy checks and lists what pilotfish does not
//! implement yet ([`coverage`]). [`output`] writes the configuration back out as a config dump or a
//! standalone bootstrap.

pub mod coverage;
pub mod error;
pub mod model;
pub mod output;
pub mod parse;
mod pgv;
pub mod resources;
pub mod summary;
pub mod validate;
pub mod walk;

pub use error::{ConfigError, ConfigErrors};
pub use model::Model;
pub use parse::{DocumentKind, Format};
pub use resources::ResourceSet;

use pilotfish_api::pb::envoy::admin::v3::ConfigDump;
use pilotfish_api::pb::envoy::config::bootstrap::v3::Bootstrap;
use std::collections::BTreeSet;
use std::path::Path;

/// A loaded configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: String,
    pub kind: DocumentKind,
    pub format: Format,
    pub resources: ResourceSet,
    pub model: Model,
    /// Type URLs kept as opaque JSON (no schema in pilotfish).
    pub opaque_types: BTreeSet<String>,
}

impl Config {
    /// Non-fatal findings: dangling references, opaque types, redacted keys, inactive resources.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = vec![];
        for t in &self.opaque_types {
            w.push(format!(
                "{t}: no schema known to pilotfish; kept as opaque JSON, not interpreted"
            ));
        }
        for r in &self.model.references {
            if !r.resolved && !r.fatal {
                w.push(format!(
                    "{}: {} '{}' is not in this configuration",
                    r.from,
                    r.kind.label(),
                    r.name
                ));
            }
        }
        for s in &self.model.redacted_secrets {
            w.push(format!("secret '{s}': the dump redacted its private key; TLS with this certificate cannot work until the real key is supplied"));
        }
        w.extend(self.resources.not_active.iter().cloned());
        w
    }
}

pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(&file, "", format!("cannot read: {e}")))?;
    load_str(&file, &text, None)
}

/// Loads `text`; `file` names it in messages. The format follows the name's extension (else the
/// content); `kind` is detected when not given.
pub fn load_str(
    file: &str,
    text: &str,
    kind: Option<DocumentKind>,
) -> Result<Config, ConfigErrors> {
    let format = Format::detect(file, text);
    let kind = kind.unwrap_or_else(|| DocumentKind::detect(text));
    let parsed = parse::parse(file, text, format, kind)?;
    let mk = |(path, message): (String, String)| ConfigError::new(file, path, message);
    let findings = validate::check_document(&parsed.message);
    if !findings.is_empty() {
        return Err(ConfigErrors(findings.into_iter().map(mk).collect()));
    }
    let resources = match kind {
        DocumentKind::Bootstrap => {
            let b: Bootstrap = parsed
                .message
                .transcode_to()
                .map_err(|e| ConfigError::new(file, "", e.to_string()))?;
            ResourceSet::from_bootstrap(b)
        }
        DocumentKind::ConfigDump => {
            let d: ConfigDump = parsed
                .message
                .transcode_to()
                .map_err(|e| ConfigError::new(file, "", e.to_string()))?;
            ResourceSet::from_config_dump(file, &d)?
        }
    };
    let model = Model::build(&resources, kind == DocumentKind::Bootstrap);
    let findings = validate::check_resources(&resources, &model);
    if !findings.is_empty() {
        return Err(ConfigErrors(findings.into_iter().map(mk).collect()));
    }
    Ok(Config {
        file: file.to_string(),
        kind,
        format,
        resources,
        model,
        opaque_types: parsed.opaque_types,
    })
}
