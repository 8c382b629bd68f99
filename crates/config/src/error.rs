//! The one error type configuration loading returns: where (file, line when the parser knows it,
//! path inside the configuration) and what.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file as the user named it (`<inline>` for `--config-yaml`).
    pub file: String,
    /// 1-based line and column, where the parser knows them.
    pub line: Option<(usize, usize)>,
    /// Path inside the configuration, e.g. `static_resources.listeners[3].filter_chains[1]`.
    /// Empty for errors about the whole document (syntax errors before the first key).
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: &str, path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_string(),
            line: None,
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, col)) = self.line {
            write!(f, ":{line}:{col}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Everything wrong with one configuration, in document order. Loading stops at the first syntax or
/// schema error (the parser cannot go on), but collects every semantic error it finds.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Checks' findings (path inside the configuration, problem) in `file`; `Ok` when none.
    pub fn check(file: &str, findings: Vec<(String, String)>) -> Result<(), ConfigErrors> {
        if findings.is_empty() {
            return Ok(());
        }
        Err(ConfigErrors(
            findings
                .into_iter()
                .map(|(path, message)| ConfigError::new(file, path, message))
                .collect(),
        ))
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}
