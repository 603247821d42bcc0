//! Shared helpers: temporary PEM files and bootstrap templates.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use ferry_config::{load_str, Bootstrap, ConfigErrors, Format};

pub const DUMMY_CERT: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBdummycertificate\n-----END CERTIFICATE-----\n";
pub const DUMMY_KEY: &str =
    "-----BEGIN PRIVATE KEY-----\nMIGHdummykey\n-----END PRIVATE KEY-----\n";

pub const PROXY_PORT: u16 = 4433;
pub const ADMIN_PORT: u16 = 9901;
pub const ECHO_PORT: u16 = 5300;
pub const NEXT_HOP_PORT: u16 = 4434;

/// A fresh directory under the system temp dir, unique per call.
pub fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ferry-config-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a dummy certificate and key; returns their paths.
pub fn pem_files() -> (PathBuf, PathBuf) {
    let dir = temp_dir();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, DUMMY_CERT).unwrap();
    std::fs::write(&key, DUMMY_KEY).unwrap();
    (cert, key)
}

pub fn bootstrap_template(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/envoy-bootstraps")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A reference bootstrap with its placeholders replaced (certificate files written).
pub fn bootstrap(name: &str) -> (String, PathBuf, PathBuf) {
    let (cert, key) = pem_files();
    let text = bootstrap_template(name)
        .replace("@PROXY_PORT@", &PROXY_PORT.to_string())
        .replace("@ADMIN_PORT@", &ADMIN_PORT.to_string())
        .replace("@ECHO_PORT@", &ECHO_PORT.to_string())
        .replace("@NEXT_HOP_PORT@", &NEXT_HOP_PORT.to_string())
        .replace("@CERT@", cert.to_str().unwrap())
        .replace("@KEY@", key.to_str().unwrap());
    assert!(
        !text.contains('@') || text.contains("\"@type\""),
        "placeholder left in {name}"
    );
    (text, cert, key)
}

/// `terminate-h3.yaml.in`, ready to load.
pub fn terminate_h3() -> String {
    bootstrap("terminate-h3.yaml.in").0
}

/// Replaces exactly one occurrence of `from` (fails the test otherwise).
pub fn edit(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "`{from}` must occur exactly once"
    );
    text.replacen(from, to, 1)
}

pub fn load_yaml(text: &str) -> Result<Bootstrap, ConfigErrors> {
    load_str(text, Format::Yaml)
}

pub fn errors_of(text: &str) -> ConfigErrors {
    match load_yaml(text) {
        Ok(b) => panic!("expected errors, got {b:#?}"),
        Err(e) => e,
    }
}

/// The single error of `text`; fails if there are more.
pub fn single_error(text: &str) -> ferry_config::ConfigError {
    let errs = errors_of(text);
    assert_eq!(errs.0.len(), 1, "expected one error, got:\n{errs}");
    errs.0.into_iter().next().unwrap()
}

/// The error at `path` (fails if none).
pub fn error_at<'a>(errs: &'a ConfigErrors, path: &str) -> &'a ferry_config::ConfigError {
    errs.0
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("no error at {path}; got:\n{errs}"))
}

pub const HCM: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config";
pub const TLS_CERT: &str = "static_resources.listeners[0].filter_chains[0].transport_socket.typed_config.downstream_tls_context.common_tls_context.tls_certificates[0]";
