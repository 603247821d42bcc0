//! Errors: one [`ConfigError`] per problem, each naming the field path it is about.

use std::fmt;

use crate::any::PATH_MARK;

/// One problem in a configuration, at a field path such as
/// `static_resources.listeners[0].filter_chains[0].filters[0].typed_config.stat_prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where: the field path in Envoy's own field names (`(document)` for the whole input,
    /// or the file name when the file itself cannot be read).
    pub path: String,
    /// What is wrong (with line and column when the parser knows them).
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a configuration (validation does not stop at the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// True if some error is at exactly `path`.
    pub fn has_path(&self, path: &str) -> bool {
        self.0.iter().any(|e| e.path == path)
    }

    /// The paths of all errors, in order.
    pub fn paths(&self) -> Vec<&str> {
        self.0.iter().map(|e| e.path.as_str()).collect()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
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

/// The path shown for an error about the input as a whole.
pub(crate) const DOCUMENT: &str = "(document)";

/// Builds the error for a parse (layer 1) failure from the tracked path, the parser's
/// message with any location suffix removed, and the location.
pub(crate) fn parse_error(
    path: &str,
    message: &str,
    location: Option<(usize, usize)>,
) -> ConfigError {
    let mut path = if path == "." {
        String::new()
    } else {
        path.to_owned()
    };
    let mut message = message.to_owned();
    // A message from a buffered `typed_config` carries the rest of the path.
    if let Some(rest) = message.strip_prefix(PATH_MARK) {
        if let Some((inner, msg)) = rest.split_once(PATH_MARK) {
            if inner != "." {
                if !path.is_empty() && !inner.starts_with('[') {
                    path.push('.');
                }
                path.push_str(inner);
            }
            message = msg.to_owned();
        }
    }
    let mut message = tidy_unknown_field(&message);
    if let Some((line, column)) = location {
        message.push_str(&format!(" (line {line}, column {column})"));
    }
    if path.is_empty() {
        path = DOCUMENT.to_owned();
    }
    ConfigError { path, message }
}

/// serde's "unknown field `x`, expected one of `a`, `b`, ..." lists every field, including
/// the Envoy fields Ferry only knows to reject: keep the name, suggest a close match.
fn tidy_unknown_field(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_owned();
    };
    let Some((name, tail)) = rest.split_once('`') else {
        return message.to_owned();
    };
    let expected: Vec<&str> = tail
        .split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s)
        .collect();
    let mut out =
        format!("unknown field `{name}` (not a field Ferry knows for this Envoy message)");
    if let Some(best) = closest(name, &expected) {
        out.push_str(&format!("; did you mean `{best}`?"));
    } else if expected.is_empty() {
        out.push_str("; this message takes no fields");
    } else if expected.len() <= 8 {
        let list: Vec<String> = expected.iter().map(|e| format!("`{e}`")).collect();
        out.push_str(&format!("; expected one of {}", list.join(", ")));
    }
    out
}

fn closest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).clamp(1, 3);
    candidates
        .iter()
        .map(|c| (edit_distance(name, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Removes serde_yaml_ng's own decorations from its message: its path prefix (`a.b[0]: `)
/// and its ` at line L column C` suffix (reported separately).
pub(crate) fn yaml_message(e: &serde_yaml_ng::Error) -> (String, Option<(usize, usize)>) {
    let text = e.to_string();
    let Some(loc) = e.location() else {
        return (text, None);
    };
    let suffix = format!(" at line {} column {}", loc.line(), loc.column());
    let Some(body) = text.strip_suffix(&suffix) else {
        // A scanner error: its text already says where.
        return (text, None);
    };
    let body = match body.split_once(": ") {
        Some((prefix, msg)) if looks_like_yaml_path(prefix) => msg,
        _ => body,
    };
    (body.to_owned(), Some((loc.line(), loc.column())))
}

fn looks_like_yaml_path(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(PATH_MARK)
        && s.chars()
            .all(|c| !c.is_whitespace() && c != '`' && c != '"' && c != '\'')
}

/// Removes serde_json's ` at line L column C` suffix (reported separately).
pub(crate) fn json_message(e: &serde_json::Error) -> (String, Option<(usize, usize)>) {
    let text = e.to_string();
    if e.line() == 0 {
        return (text, None);
    }
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match text.strip_suffix(&suffix) {
        Some(body) => (body.to_owned(), Some((e.line(), e.column()))),
        None => (text, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display() {
        let errs = ConfigErrors(vec![
            ConfigError::new("a.b", "bad"),
            ConfigError::new("c[0]", "worse"),
        ]);
        assert_eq!(errs.to_string(), "a.b: bad\nc[0]: worse");
    }

    #[test]
    fn unknown_field_suggestion() {
        let m = tidy_unknown_field(
            "unknown field `upgrade_config`, expected one of `cluster`, `upgrade_configs`",
        );
        assert_eq!(
            m,
            "unknown field `upgrade_config` (not a field Ferry knows for this Envoy message); did you mean `upgrade_configs`?"
        );
        let m = tidy_unknown_field("unknown field `zzz`, there are no fields");
        assert!(m.ends_with("this message takes no fields"), "{m}");
        let m = tidy_unknown_field("unknown field `zzz`, expected `name`");
        assert!(m.ends_with("expected one of `name`"), "{m}");
    }

    #[test]
    fn nested_path_is_spliced() {
        let e = parse_error(
            "a.typed_config",
            &format!("{PATH_MARK}x.y{PATH_MARK}bad"),
            None,
        );
        assert_eq!(e.path, "a.typed_config.x.y");
        assert_eq!(e.message, "bad");
        let e = parse_error(".", "bad", Some((1, 2)));
        assert_eq!(e.path, DOCUMENT);
        assert_eq!(e.message, "bad (line 1, column 2)");
    }
}
