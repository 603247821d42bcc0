//! `envoy.filters.http.basic_auth`: the htpasswd users list and the header names.
//!
//! Envoy's rules (1.40): one `user:{SHA}base64(sha1(password))` per line; empty lines and
//! lines starting with `#` are skipped; a line without `:`, an empty name or hash, a
//! duplicate user, a hash other than `{SHA}` or one that is not 28 characters is a
//! configuration error. Ferry also refuses a `{SHA}` hash that is not valid base64 of a
//! 20-byte digest (Envoy accepts it, and its user can then never log in). Every error
//! names the field path and the line number (the line itself is not printed: it holds a
//! password hash).

use std::collections::BTreeMap;

use super::{data_source, is_tchar, Ctx, P};
use crate::datasource::{decode_base64, PemKind};
use crate::model;
use crate::raw;

pub(super) fn build(ctx: &mut Ctx, p: &P, b: &raw::BasicAuth) -> model::BasicAuth {
    ctx.unsupported(p, b.unsupported_fields());
    let up = p.f("users");
    // Envoy: "DataSource cannot be empty" (and a missing `users` is refused too).
    let text = data_source(ctx, &up, b.users.as_ref(), PemKind::Text, false);
    let at = match &b.users {
        Some(ds) if ds.filename.is_some() => up.f("filename"),
        Some(ds) if ds.inline_bytes.is_some() => up.f("inline_bytes"),
        _ => up.f("inline_string"),
    };
    if b.users.is_some() && text.is_empty() {
        ctx.err(
            &at,
            "must not be empty: an htpasswd list of `user:{SHA}hash` lines",
        );
    }
    let users = match parse_htpasswd(&text) {
        Ok(users) => users,
        Err(errors) => {
            for e in errors {
                ctx.err(&at, e);
            }
            BTreeMap::new()
        }
    };
    let header = |ctx: &mut Ctx, field: &str, value: &Option<String>| -> Option<String> {
        let v = value.as_deref().filter(|v| !v.is_empty())?;
        if !v.bytes().all(is_tchar) || v.starts_with(':') {
            ctx.err(
                &p.f(field),
                format!("`{v}` is not a valid HTTP header name"),
            );
            return None;
        }
        Some(v.to_ascii_lowercase())
    };
    let forward_username_header =
        header(ctx, "forward_username_header", &b.forward_username_header);
    let authentication_header = header(ctx, "authentication_header", &b.authentication_header)
        .unwrap_or_else(|| "authorization".to_owned());
    model::BasicAuth {
        users,
        forward_username_header,
        authentication_header,
    }
}

/// Parses an htpasswd list as Envoy does. Errors name the line (1-based), never its hash.
pub(crate) fn parse_htpasswd(text: &str) -> Result<BTreeMap<String, [u8; 20]>, Vec<String>> {
    let mut users = BTreeMap::new();
    let mut errors = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        let n = i + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, hash)) = line.split_once(':') else {
            errors.push(format!(
                "line {n}: invalid htpasswd format, `user:{{SHA}}hash` expected"
            ));
            continue;
        };
        if name.is_empty() || hash.is_empty() {
            errors.push(format!("line {n}: empty user name or password hash"));
            continue;
        }
        if users.contains_key(name) {
            errors.push(format!("line {n}: duplicate user `{name}`"));
            continue;
        }
        let Some(b64) = hash.strip_prefix("{SHA}") else {
            errors.push(format!(
                "line {n}: unsupported hash for user `{name}`: only `{{SHA}}` (base64 of the password's SHA-1) is supported, as in Envoy"
            ));
            continue;
        };
        let digest = (b64.len() == 28)
            .then(|| decode_base64(b64))
            .flatten()
            .and_then(|d| <[u8; 20]>::try_from(d).ok());
        match digest {
            Some(d) => {
                users.insert(name.to_owned(), d);
            }
            None => errors.push(format!(
                "line {n}: invalid {{SHA}} hash for user `{name}`: 28 base64 characters (a 20-byte SHA-1 digest) expected"
            )),
        }
    }
    if errors.is_empty() {
        Ok(users)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn htpasswd() {
        // sha1("password") = 5baa61e4c9b93f3f0682250b6cf8331b7ee68fd8
        let users =
            parse_htpasswd("# comment\n\nalice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\r\n").unwrap();
        assert_eq!(users.len(), 1);
        assert_eq!(users["alice"][0], 0x5b);
        let errs = parse_htpasswd(
            "bob\nalice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\nalice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\ncarol:$apr1$x$y\ndave:{SHA}abc\n:x\neve:{SHA}!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
        )
        .unwrap_err();
        assert_eq!(errs.len(), 6, "{errs:?}");
        assert!(errs[0].starts_with("line 1: invalid htpasswd format"));
        assert!(errs[1].starts_with("line 3: duplicate user `alice`"));
        assert!(errs[2].starts_with("line 4: unsupported hash"));
        assert!(errs[3].starts_with("line 5: invalid {SHA} hash"));
        assert!(errs[4].starts_with("line 6: empty user name"));
        assert!(errs[5].starts_with("line 7: invalid {SHA} hash"));
        assert!(!errs.iter().any(|e| e.contains("W6ph")));
    }
}
