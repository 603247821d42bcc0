//! Damaged configurations never panic and never load silently wrong: each either loads or
//! reports at least one error with a non-empty path.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use ferry_config::*;
use proptest::prelude::*;

/// One substituted bootstrap for all cases (its certificate files are written once).
fn base() -> &'static str {
    static BASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BASE.get_or_init(terminate_h3)
}

fn check(text: &str, format: Format) {
    if let Err(errs) = load_str(text, format) {
        assert!(!errs.0.is_empty());
        for e in &errs.0 {
            assert!(!e.path.is_empty() && !e.message.is_empty(), "{e:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_text(text in ".{0,200}") {
        check(&text, Format::Yaml);
        check(&text, Format::Json);
    }

    #[test]
    fn a_line_removed_or_doubled(index in 0usize..80, double in any::<bool>()) {
        let text = base();
        let lines: Vec<&str> = text.lines().collect();
        let index = index % lines.len();
        let mut damaged: Vec<&str> = lines.clone();
        if double { damaged.insert(index, lines[index]); } else { damaged.remove(index); }
        check(&damaged.join("\n"), Format::Yaml);
    }

    #[test]
    fn a_byte_replaced(index in 0usize..4000, byte in prop::sample::select(b"x0:-[]{}\"' \n#*@.".to_vec())) {
        let mut bytes = base().as_bytes().to_vec();
        let index = index % bytes.len();
        bytes[index] = byte;
        if let Ok(text) = String::from_utf8(bytes) {
            check(&text, Format::Yaml);
        }
    }
}
