//! The fixtures in the workspace's `tests/configs/`: `good-*` load, `bad-*` fail with the
//! error path their README row names.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_config::*;

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/configs")
}

fn fixtures(prefix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(configs_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.starts_with(prefix)
                && (name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json"))
        })
        .collect();
    files.sort();
    files
}

/// `| `file` | `path` |` rows of the README table.
fn readme_paths() -> BTreeMap<String, String> {
    let readme = std::fs::read_to_string(configs_dir().join("README.md")).unwrap();
    readme
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            match cells.as_slice() {
                ["", file, path, ""] if file.starts_with("`bad-") => Some((
                    file.trim_matches('`').to_owned(),
                    path.trim_matches('`').to_owned(),
                )),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn good_fixtures_load() {
    let good = fixtures("good-");
    assert!(!good.is_empty());
    for path in &good {
        let bootstrap = load_file(path).unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
        assert_eq!(bootstrap.listeners.len(), 1, "{}", path.display());
    }
    // The JSON twin is the same configuration.
    let yaml = load_file(&configs_dir().join("good-terminate-h3.yaml")).unwrap();
    let json = load_file(&configs_dir().join("good-terminate-h3.json")).unwrap();
    assert_eq!(yaml, json);
    let tls = yaml.listeners[0].filter_chain.tls.as_ref().unwrap();
    assert!(tls.certificates[0]
        .certificate_chain_pem
        .starts_with("-----BEGIN CERTIFICATE-----\n"));
    assert!(tls.certificates[0]
        .private_key_pem
        .starts_with("-----BEGIN PRIVATE KEY-----\n"));
}

#[test]
fn bad_fixtures_fail_at_their_readme_path() {
    let expected = readme_paths();
    let bad = fixtures("bad-");
    for required in [
        "bad-unknown-field.yaml",
        "bad-missing-cluster.yaml",
        "bad-type-url.yaml",
    ] {
        assert!(
            bad.iter().any(|p| p.ends_with(required)),
            "{required} is missing"
        );
    }
    for path in &bad {
        let name = path.file_name().unwrap().to_str().unwrap();
        let want = expected
            .get(name)
            .unwrap_or_else(|| panic!("README.md has no row for {name}"));
        let errs = load_file(path).expect_err(name);
        assert_eq!(&errs.0[0].path, want, "{name}:\n{errs}");
        assert!(
            errs.to_string().starts_with(&format!("{want}: ")),
            "{name}:\n{errs}"
        );
    }
    assert_eq!(
        expected.len(),
        bad.len(),
        "README rows without a file: {expected:?}"
    );
}

#[test]
fn unknown_field_fixture_prints_unknown_field() {
    let errs = load_file(&configs_dir().join("bad-unknown-field.yaml")).unwrap_err();
    assert_eq!(errs.0.len(), 1);
    assert!(errs.to_string().starts_with(
        "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[0].route.upgrade_config: unknown field "
    ));
}
