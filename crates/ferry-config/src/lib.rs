//! Envoy v3 bootstrap (YAML or JSON) -> validated Ferry configuration ([`model`]).
//!
//! Two layers:
//! 1. **Parse** into raw structs that mirror Envoy's proto messages field for field
//!    (`deny_unknown_fields` everywhere, read through `serde_path_to_error`): a field that is
//!    not an Envoy field is an error naming its full path, with line and column.
//! 2. **Validate and build** the [`model`]: every problem is collected (not just the first),
//!    each with its path. An Envoy field or extension Ferry does not implement is never
//!    ignored: it is reported as "not supported by Ferry (yet)".
//!
//! ```
//! let yaml = r#"
//! static_resources:
//!   clusters:
//!   - name: target
//!     load_assignment:
//!       cluster_name: target
//!       endpoints:
//!       - lb_endpoints:
//!         - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 5300 } } }
//! "#;
//! let bootstrap = ferry_config::load_str(yaml, ferry_config::Format::Yaml).unwrap();
//! assert_eq!(bootstrap.clusters[0].endpoints[0].port, 5300);
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod format;
pub mod model;

mod any;
mod build;
mod datasource;
mod duration;
mod error;
mod raw;

pub use any::{DOWNSTREAM_TLS_CONTEXT, HTTP_CONNECTION_MANAGER, QUIC_DOWNSTREAM_TRANSPORT, ROUTER};
pub use build::{DESTINATION_POLICY_NAME, DESTINATION_POLICY_TYPE_URL, NOT_SUPPORTED};
pub use duration::parse_duration;
pub use error::{ConfigError, ConfigErrors};
pub use model::*;

use std::path::Path;

/// The syntax of a configuration text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

impl Format {
    /// `.json` (any case) is JSON; everything else (`.yaml`, `.yml`, ...) is YAML, as in Envoy.
    pub fn from_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Yaml,
        }
    }
}

/// Parses, validates and builds the bootstrap in the file at `path` (format from its
/// extension, see [`Format::from_path`]). Certificate and key files named by `filename`
/// are read; relative file paths are resolved against the current directory (as Envoy
/// does), not against the bootstrap's directory.
pub fn load_file(path: &Path) -> Result<Bootstrap, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError::new(
            path.display().to_string(),
            format!("cannot read the configuration file: {e}"),
        )])
    })?;
    load_str(&text, Format::from_path(path))
}

/// Parses, validates and builds a bootstrap from text. Certificate and key files named by
/// `filename` are read (relative to the current directory).
pub fn load_str(text: &str, format: Format) -> Result<Bootstrap, ConfigErrors> {
    let raw = parse(text, format).map_err(ConfigErrors::from)?;
    build::build(&raw).map_err(ConfigErrors)
}

fn parse(text: &str, format: Format) -> Result<raw::Bootstrap, ConfigError> {
    // Blank, or only comments and document markers: nothing to configure (serde would
    // read it as an empty bootstrap).
    let blank = text.lines().map(str::trim).all(|l| {
        l.is_empty() || (format == Format::Yaml && (l.starts_with('#') || l == "---" || l == "..."))
    });
    if blank {
        return Err(ConfigError::new(
            error::DOCUMENT,
            "the configuration is empty",
        ));
    }
    match format {
        Format::Yaml => {
            let de = serde_yaml_ng::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let (message, location) = error::yaml_message(e.inner());
                error::parse_error(&e.path().to_string(), &message, location)
            })
        }
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(text);
            let raw = serde_path_to_error::deserialize(&mut de).map_err(|e| {
                let (message, location) = error::json_message(e.inner());
                error::parse_error(&e.path().to_string(), &message, location)
            })?;
            de.end().map_err(|e| {
                let (message, location) = error::json_message(&e);
                error::parse_error(".", &message, location)
            })?;
            Ok(raw)
        }
    }
}
