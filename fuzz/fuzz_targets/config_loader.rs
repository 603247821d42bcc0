//! The bootstrap loader on arbitrary text, as YAML and as JSON: it never panics, and every
//! error it reports names a field path (or `(document)`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for format in [ferry_config::Format::Yaml, ferry_config::Format::Json] {
        if let Err(errors) = ferry_config::load_str(text, format) {
            assert!(!errors.0.is_empty(), "an Err with no error");
            for e in &errors.0 {
                assert!(!e.path.is_empty(), "an error without a path: {e}");
            }
        }
    }
});
