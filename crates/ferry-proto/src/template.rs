//! URI templates for UDP proxying (RFC 9298, sections 2 and 3; RFC 6570 levels 1 to 3) and
//! the default-template path check Envoy applies to every CONNECT-UDP request.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Path prefix of the default template (the "masque" well-known URI).
pub const DEFAULT_TEMPLATE_PREFIX: &str = "/.well-known/masque/udp/";

//= https://www.rfc-editor.org/rfc/rfc9298#section-2
//# Client implementations of this
//# specification that are constrained by such limitations MAY attempt to access UDP
//# proxying capabilities using the default template, which is defined as
//# "https://$PROXY_HOST:$PROXY_PORT/.well-known/masque/udp/{target_host}/{target_port}/",
/// Path and query of the default template.
pub const DEFAULT_TEMPLATE: &str = "/.well-known/masque/udp/{target_host}/{target_port}/";

/// Templates longer than this are refused (they are configuration, not data; the bound keeps
/// matching cheap).
pub const MAX_TEMPLATE_LEN: usize = 4096;

/// Templates with more expressions than this are refused (RFC 9298 templates need two).
pub const MAX_EXPRESSIONS: usize = 16;

/// Work limit for matching one path, in steps of the backtracking matcher plus bytes
/// examined. A template whose expressions are separated by literals needs about one unit per
/// byte of the path; the limit only stops pathological templates (adjacent expressions)
/// from spending more than about a millisecond on an attacker's path.
const MAX_MATCH_WORK: usize = 1_000_000;

const TARGET_HOST: &str = "target_host";
const TARGET_PORT: &str = "target_port";

/// The host part of a UDP proxying target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetHost {
    /// An IPv4 or IPv6 literal.
    Ip(IpAddr),
    /// A DNS name (reg-name), kept as written (not lower-cased).
    Name(String),
}

impl fmt::Display for TargetHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetHost::Ip(ip) => ip.fmt(f),
            TargetHost::Name(name) => f.write_str(name),
        }
    }
}

/// Where a CONNECT-UDP request asks to send UDP.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// The parsed host.
    pub host: TargetHost,
    /// The UDP port, 1..=65535.
    pub port: u16,
    /// The host exactly as written in the request (after percent-decoding), e.g.
    /// `2001:0db8:85a3::8a2e:0370:7334` even though `host` would print as
    /// `2001:db8:85a3::8a2e:370:7334`. Used by [`Target::authority`], as Envoy does.
    pub host_text: String,
}

impl Target {
    /// A target whose `host_text` is the canonical text of `host`.
    pub fn new(host: TargetHost, port: u16) -> Self {
        let host_text = host.to_string();
        Self {
            host,
            port,
            host_text,
        }
    }

    /// `host:port` for rewriting the Host/:authority, as Envoy does: the host text as written
    /// in the request, IPv6 literals in brackets (`[2001:0db8:85a3::8a2e:0370:7334]:80`).
    pub fn authority(&self) -> String {
        let text = if self.host_text.is_empty() {
            self.host.to_string()
        } else {
            self.host_text.clone()
        };
        match self.host {
            TargetHost::Ip(IpAddr::V6(_)) => format!("[{text}]:{}", self.port),
            _ => format!("{text}:{}", self.port),
        }
    }

    /// The socket address, when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        match self.host {
            TargetHost::Ip(ip) => Some(std::net::SocketAddr::new(ip, self.port)),
            TargetHost::Name(_) => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.authority())
    }
}

/// Why a URI template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A byte outside 0x21..=0x7E.
    #[error("byte {byte:#04x} at offset {index} is not allowed in a URI template")]
    BadCharacter {
        /// Offset in the template.
        index: usize,
        /// The byte.
        byte: u8,
    },
    /// A character RFC 6570 does not allow in literals (`"'<>\^`|`).
    #[error("character {ch:?} at offset {index} is not allowed in a URI template literal")]
    DisallowedLiteral {
        /// Offset in the template.
        index: usize,
        /// The character.
        ch: char,
    },
    /// A '%' not followed by two hex digits.
    #[error("bad percent-encoding at offset {index}")]
    BadPercentEncoding {
        /// Offset in the template.
        index: usize,
    },
    /// A '{' without its '}'.
    #[error("unclosed expression starting at offset {index}")]
    UnclosedExpression {
        /// Offset of the '{'.
        index: usize,
    },
    /// A '}' outside an expression.
    #[error("unexpected '}}' at offset {index}")]
    UnexpectedCloseBrace {
        /// Offset of the '}'.
        index: usize,
    },
    /// `{}` or an empty variable name.
    #[error("empty expression or variable at offset {index}")]
    EmptyExpression {
        /// Offset of the '{'.
        index: usize,
    },
    /// An operator RFC 9298 forbids: '+', '#', '.', '/', ';'.
    #[error("operator {0:?} is not allowed in a UDP proxying template")]
    ForbiddenOperator(char),
    /// An operator RFC 6570 reserves for future use: '=', ',', '!', '@', '|'.
    #[error("reserved operator {0:?}")]
    ReservedOperator(char),
    /// A prefix (`:n`) or explode (`*`) modifier: level 4, and the template must be level 3
    /// or lower.
    #[error("variable {0:?} uses a level 4 modifier")]
    Level4Modifier(String),
    /// A variable name that is not `varchar *( ["."] varchar )`.
    #[error("bad variable name {0:?}")]
    BadVariableName(String),
    /// `target_host` or `target_port` is missing.
    #[error("the template has no {0} variable")]
    MissingVariable(&'static str),
    /// `target_host` or `target_port` appears twice.
    #[error("variable {0} appears more than once")]
    DuplicateVariable(&'static str),
    /// A variable in the scheme or authority.
    #[error("template variables must be in the path or query")]
    VariableOutsidePathOrQuery,
    /// The path does not start with '/'.
    #[error("the template path must start with '/'")]
    PathMustStartWithSlash,
    /// `scheme://` with an empty authority.
    #[error("the template has an empty authority")]
    EmptyAuthority,
    /// A '#' (fragment) in the template.
    #[error("the template has a fragment")]
    Fragment,
    /// More than [`MAX_EXPRESSIONS`] expressions.
    #[error("the template has more than {MAX_EXPRESSIONS} expressions")]
    TooManyExpressions,
    /// Longer than [`MAX_TEMPLATE_LEN`].
    #[error("the template is longer than {MAX_TEMPLATE_LEN} bytes")]
    TooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// `{var}`: comma-separated values.
    Simple,
    /// `{?var}`: `?name=value&name=value`.
    Query,
    /// `{&var}`: `&name=value&name=value`.
    QueryContinuation,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Expression { op: Op, vars: Vec<String> },
}

/// A parsed UDP proxying URI template (RFC 9298, section 2): level 3 or lower, no '+', '#',
/// '.', '/' or ';' operators, with `target_host` and `target_port`.
///
/// Both the absolute form (`https://proxy.example:443/.well-known/masque/udp/{target_host}/{target_port}/`)
/// and a bare path and query (`/masque{?target_host,target_port}`) are accepted. Clients
/// expand it; servers match request paths against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriTemplate {
    source: String,
    scheme: Option<String>,
    authority: Option<String>,
    parts: Vec<Part>,
}

impl fmt::Display for UriTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl std::str::FromStr for UriTemplate {
    type Err = TemplateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decode `s`; `None` if a '%' is not followed by two hex digits.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hi = hex_val(*bytes.get(i + 1)?)?;
            let lo = hex_val(*bytes.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Some(out)
}

/// Percent-encode everything but unreserved characters (RFC 6570 simple and query
/// expansion), with upper-case hex digits.
fn percent_encode_into(value: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value.as_bytes() {
        if is_unreserved(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            for nibble in [b >> 4, b & 0x0f] {
                if let Some(&h) = HEX.get(usize::from(nibble)) {
                    out.push(char::from(h));
                }
            }
        }
    }
}

/// Characters a matched variable value may contain: what expansion produces (unreserved and
/// percent-encoded octets), plus ':' so that clients that do not encode the colons of IPv6
/// literals are still understood.
fn is_value_char(b: u8) -> bool {
    is_unreserved(b) || b == b'%' || b == b':'
}

fn valid_varname(name: &str) -> bool {
    //= https://www.rfc-editor.org/rfc/rfc6570#section-2.3
    //# varname       =  varchar *( ["."] varchar )
    //# varchar       =  ALPHA / DIGIT / "_" / pct-encoded
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.first() == Some(&b'.') || bytes.last() == Some(&b'.') {
        return false;
    }
    let mut i = 0;
    let mut prev_dot = false;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'.' if prev_dot => return false,
            b'.' => {
                prev_dot = true;
                i += 1;
                continue;
            }
            b'%' => {
                let ok = bytes.get(i + 1).copied().and_then(hex_val).is_some()
                    && bytes.get(i + 2).copied().and_then(hex_val).is_some();
                if !ok {
                    return false;
                }
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || b == b'_' => i += 1,
            _ => return false,
        }
        prev_dot = false;
    }
    true
}

impl UriTemplate {
    /// Parse and check a template.
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        if template.len() > MAX_TEMPLATE_LEN {
            return Err(TemplateError::TooLong);
        }
        //= https://www.rfc-editor.org/rfc/rfc9298#section-2
        //# The URI Template MUST NOT contain any non-ASCII Unicode characters and MUST
        //# only contain ASCII characters in the range 0x21-0x7E inclusive
        if let Some((index, &byte)) = template
            .as_bytes()
            .iter()
            .enumerate()
            .find(|(_, b)| !(0x21..=0x7e).contains(*b))
        {
            return Err(TemplateError::BadCharacter { index, byte });
        }

        // Split off `scheme://authority` if present.
        let (scheme, authority, rest_start) = split_scheme_authority(template)?;
        let rest = template.get(rest_start..).unwrap_or_default();
        //= https://www.rfc-editor.org/rfc/rfc9298#section-2
        //# The path component of the URI Template MUST start with a slash ("/").
        if !rest.starts_with('/') {
            return Err(TemplateError::PathMustStartWithSlash);
        }

        let parts = parse_parts(rest, rest_start)?;
        let expressions = parts
            .iter()
            .filter(|p| matches!(p, Part::Expression { .. }))
            .count();
        if expressions > MAX_EXPRESSIONS {
            return Err(TemplateError::TooManyExpressions);
        }

        //= https://www.rfc-editor.org/rfc/rfc9298#section-2
        //# The URI Template MUST contain the two variables "target_host" and
        //# "target_port" and MAY contain other variables.
        for name in [TARGET_HOST, TARGET_PORT] {
            let count = parts
                .iter()
                .filter_map(|p| match p {
                    Part::Expression { vars, .. } => Some(vars),
                    Part::Literal(_) => None,
                })
                .flatten()
                .filter(|v| v.as_str() == name)
                .count();
            match count {
                0 => return Err(TemplateError::MissingVariable(name)),
                1 => {}
                _ => return Err(TemplateError::DuplicateVariable(name)),
            }
        }

        Ok(Self {
            source: template.to_owned(),
            scheme,
            authority,
            parts,
        })
    }

    /// The default template, `/.well-known/masque/udp/{target_host}/{target_port}/`.
    pub fn default_template() -> Self {
        Self {
            source: DEFAULT_TEMPLATE.to_owned(),
            scheme: None,
            authority: None,
            parts: vec![
                Part::Literal(DEFAULT_TEMPLATE_PREFIX.to_owned()),
                Part::Expression {
                    op: Op::Simple,
                    vars: vec![TARGET_HOST.to_owned()],
                },
                Part::Literal("/".to_owned()),
                Part::Expression {
                    op: Op::Simple,
                    vars: vec![TARGET_PORT.to_owned()],
                },
                Part::Literal("/".to_owned()),
            ],
        }
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The scheme, for an absolute template.
    pub fn scheme(&self) -> Option<&str> {
        self.scheme.as_deref()
    }

    /// The authority (proxy host and port), for an absolute template.
    pub fn authority(&self) -> Option<&str> {
        self.authority.as_deref()
    }

    /// Whether the path and query of this template are the default template's.
    pub fn is_default(&self) -> bool {
        let only = |vars: &[String], name: &str| {
            vars.len() == 1 && vars.first().is_some_and(|v| v == name)
        };
        match self.parts.as_slice() {
            [Part::Literal(prefix), Part::Expression {
                op: Op::Simple,
                vars: host,
            }, Part::Literal(sep), Part::Expression {
                op: Op::Simple,
                vars: port,
            }, Part::Literal(end)] => {
                prefix == DEFAULT_TEMPLATE_PREFIX
                    && sep == "/"
                    && end == "/"
                    && only(host, TARGET_HOST)
                    && only(port, TARGET_PORT)
            }
            _ => false,
        }
    }

    /// Expand into a path and query. Values are percent-encoded (everything but unreserved
    /// characters, so the ':' of an IPv6 literal becomes `%3A`); other variables are
    /// undefined and expand to nothing.
    pub fn expand_path(&self, target_host: &str, target_port: u16) -> String {
        let port = target_port.to_string();
        let lookup = |name: &str| match name {
            TARGET_HOST => Some(target_host),
            TARGET_PORT => Some(port.as_str()),
            _ => None,
        };
        let mut out = String::with_capacity(self.source.len() + target_host.len() * 3);
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Expression { op, vars } => {
                    let mut first = true;
                    for var in vars {
                        let Some(value) = lookup(var) else { continue };
                        match (op, first) {
                            (Op::Simple, true) => {}
                            (Op::Simple, false) => out.push(','),
                            (Op::Query, true) => out.push('?'),
                            (Op::Query, false) | (Op::QueryContinuation, _) => out.push('&'),
                        }
                        if *op != Op::Simple {
                            out.push_str(var);
                            out.push('=');
                        }
                        percent_encode_into(value, &mut out);
                        first = false;
                    }
                }
            }
        }
        out
    }

    /// Expand into a full URI when the template is absolute (`scheme://authority` + path),
    /// or the path and query otherwise.
    pub fn expand(&self, target_host: &str, target_port: u16) -> String {
        let path = self.expand_path(target_host, target_port);
        match (&self.scheme, &self.authority) {
            (Some(s), Some(a)) => format!("{s}://{a}{path}"),
            _ => path,
        }
    }

    /// Match a request path (and query) against the template; returns the percent-decoded
    /// `target_host` and `target_port` values, unchecked.
    pub fn match_path(&self, path: &str) -> Option<(String, String)> {
        let raw = self.match_raw(path)?;
        let host = String::from_utf8(percent_decode(raw.host?)?).ok()?;
        let port = String::from_utf8(percent_decode(raw.port?)?).ok()?;
        Some((host, port))
    }

    /// Match a request path and check the target as [`parse_default_path`] does. For the
    /// default template this *is* [`parse_default_path`] (Envoy's rules).
    pub fn match_target(&self, path: &str) -> Result<Target, PathError> {
        if self.is_default() {
            return parse_default_path(path);
        }
        check_bytes(path)?;
        let raw = self.match_raw(path).ok_or(PathError::NoMatch)?;
        let host = raw.host.ok_or(PathError::NoMatch)?;
        let port = raw.port.ok_or(PathError::NoMatch)?;
        if host.is_empty() {
            return Err(PathError::EmptyHost);
        }
        if port.is_empty() {
            return Err(PathError::EmptyPort);
        }
        target_from_encoded(host, port)
    }

    fn match_raw<'p>(&self, path: &'p str) -> Option<Captures<'p>> {
        let mut m = Matcher {
            parts: &self.parts,
            input: path,
            failed: HashSet::new(),
            caps: Captures::default(),
            work: 0,
        };
        if m.go(0, 0) {
            Some(m.caps)
        } else {
            None
        }
    }
}

/// Split `scheme://authority` off an absolute template; returns where the path starts.
fn split_scheme_authority(
    template: &str,
) -> Result<(Option<String>, Option<String>, usize), TemplateError> {
    if template.starts_with('/') {
        return Ok((None, None, 0));
    }
    // scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
    let bytes = template.as_bytes();
    let scheme_end = bytes
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')));
    let Some(scheme_end) = scheme_end else {
        return Err(TemplateError::PathMustStartWithSlash);
    };
    let starts_alpha = bytes.first().is_some_and(|b| b.is_ascii_alphabetic());
    let rest = template.get(scheme_end..).unwrap_or_default();
    if !starts_alpha || !rest.starts_with("://") {
        // "{x}://host/..." puts a variable in the scheme; anything else is a relative
        // reference that is not a path.
        let scheme_part = template.find("://").and_then(|i| template.get(..i));
        if scheme_part.is_some_and(|s| s.contains(['{', '}'])) {
            return Err(TemplateError::VariableOutsidePathOrQuery);
        }
        return Err(TemplateError::PathMustStartWithSlash);
    }
    let scheme = template.get(..scheme_end).unwrap_or_default();
    let auth_start = scheme_end + 3;
    let after = template.get(auth_start..).unwrap_or_default();
    let auth_len = after.find(['/', '?', '#']).unwrap_or(after.len());
    let authority = after.get(..auth_len).unwrap_or_default();
    if authority.contains(['{', '}']) {
        return Err(TemplateError::VariableOutsidePathOrQuery);
    }
    if authority.is_empty() {
        return Err(TemplateError::EmptyAuthority);
    }
    Ok((
        Some(scheme.to_owned()),
        Some(authority.to_owned()),
        auth_start + auth_len,
    ))
}

/// Parse the path-and-query part of a template; `offset` is where it starts in the template
/// (for error positions).
fn parse_parts(rest: &str, offset: usize) -> Result<Vec<Part>, TemplateError> {
    let bytes = rest.as_bytes();
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let index = offset + i;
        match b {
            b'{' => {
                let close = rest
                    .get(i + 1..)
                    .and_then(|r| r.find('}'))
                    .ok_or(TemplateError::UnclosedExpression { index })?;
                let body = rest.get(i + 1..i + 1 + close).unwrap_or_default();
                if body.contains('{') {
                    return Err(TemplateError::UnclosedExpression { index });
                }
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                }
                parts.push(parse_expression(body, index)?);
                i += close + 2;
            }
            b'}' => return Err(TemplateError::UnexpectedCloseBrace { index }),
            //= https://www.rfc-editor.org/rfc/rfc9298#section-2
            //# All template variables MUST be within the path or query components of the URI.
            b'#' => return Err(TemplateError::Fragment),
            b'%' => {
                let ok = bytes.get(i + 1).copied().and_then(hex_val).is_some()
                    && bytes.get(i + 2).copied().and_then(hex_val).is_some();
                if !ok {
                    return Err(TemplateError::BadPercentEncoding { index });
                }
                literal.push_str(rest.get(i..i + 3).unwrap_or_default());
                i += 3;
            }
            //= https://www.rfc-editor.org/rfc/rfc6570#section-2.1
            //# literals        =  %x21 / %x23-24 / %x26 / %x28-3B / %x3D / %x3F-5B
            //#                 /  %x5D / %x5F / %x61-7A / %x7E / ucschar / iprivate
            //#                 /  pct-encoded
            b'"' | b'\'' | b'<' | b'>' | b'\\' | b'^' | b'`' | b'|' => {
                return Err(TemplateError::DisallowedLiteral {
                    index,
                    ch: char::from(b),
                })
            }
            _ => {
                literal.push(char::from(b));
                i += 1;
            }
        }
    }
    if !literal.is_empty() {
        parts.push(Part::Literal(literal));
    }
    Ok(parts)
}

fn parse_expression(body: &str, index: usize) -> Result<Part, TemplateError> {
    let first = body
        .chars()
        .next()
        .ok_or(TemplateError::EmptyExpression { index })?;
    //= https://www.rfc-editor.org/rfc/rfc9298#section-2
    //# The URI Template MUST NOT use Reserved Expansion ("+" operator), Fragment
    //# Expansion ("#" operator), Label Expansion with Dot-Prefix, Path Segment
    //# Expansion with Slash-Prefix, nor Path-Style Parameter Expansion with
    //# Semicolon-Prefix.
    let (op, list) = match first {
        '+' | '#' | '.' | '/' | ';' => return Err(TemplateError::ForbiddenOperator(first)),
        '=' | ',' | '!' | '@' | '|' => return Err(TemplateError::ReservedOperator(first)),
        '?' => (Op::Query, body.get(1..).unwrap_or_default()),
        '&' => (Op::QueryContinuation, body.get(1..).unwrap_or_default()),
        _ => (Op::Simple, body),
    };
    let mut vars = Vec::new();
    for spec in list.split(',') {
        if spec.is_empty() {
            return Err(TemplateError::EmptyExpression { index });
        }
        //= https://www.rfc-editor.org/rfc/rfc9298#section-2
        //# The URI Template MUST be a level 3 template or lower.
        if spec.ends_with('*') || spec.contains(':') {
            return Err(TemplateError::Level4Modifier(spec.to_owned()));
        }
        if !valid_varname(spec) {
            return Err(TemplateError::BadVariableName(spec.to_owned()));
        }
        vars.push(spec.to_owned());
    }
    Ok(Part::Expression { op, vars })
}

/// Raw (still percent-encoded) values captured while matching.
#[derive(Debug, Default, Clone, Copy)]
struct Captures<'p> {
    host: Option<&'p str>,
    port: Option<&'p str>,
}

impl<'p> Captures<'p> {
    fn set(&mut self, name: &str, value: &'p str) {
        match name {
            TARGET_HOST => self.host = Some(value),
            TARGET_PORT => self.port = Some(value),
            _ => {}
        }
    }
}

fn is_target_var(name: &str) -> bool {
    name == TARGET_HOST || name == TARGET_PORT
}

/// Backtracking matcher; `failed` remembers (part, position) pairs known not to match, so
/// the work is bounded by parts x positions x positions.
struct Matcher<'t, 'p> {
    parts: &'t [Part],
    input: &'p str,
    failed: HashSet<(usize, usize)>,
    caps: Captures<'p>,
    work: usize,
}

impl<'p> Matcher<'_, 'p> {
    fn go(&mut self, part: usize, pos: usize) -> bool {
        let Some(p) = self.parts.get(part) else {
            return pos == self.input.len();
        };
        if !self.charge(1) || self.failed.contains(&(part, pos)) {
            return false;
        }
        let ok = match p {
            Part::Literal(l) => {
                let rest = self.input.get(pos..).unwrap_or_default();
                self.charge(l.len())
                    && rest.starts_with(l.as_str())
                    && self.go(part + 1, pos + l.len())
            }
            Part::Expression {
                op: Op::Simple,
                vars,
            } => self.simple(part, pos, vars),
            Part::Expression { op, vars } => {
                let prefix = if *op == Op::Query { b'?' } else { b'&' };
                self.query(part, pos, prefix, vars)
            }
        };
        if !ok {
            self.failed.insert((part, pos));
        }
        ok
    }

    /// Account for `units` of work; false once the budget is spent.
    fn charge(&mut self, units: usize) -> bool {
        self.work = self.work.saturating_add(units);
        self.work <= MAX_MATCH_WORK
    }

    fn simple(&mut self, part: usize, pos: usize, vars: &[String]) -> bool {
        let input = self.input;
        let rest = input.get(pos..).unwrap_or_default();
        let bytes = rest.as_bytes();
        let run = bytes
            .iter()
            .position(|&b| !(is_value_char(b) || b == b','))
            .unwrap_or(bytes.len());
        if !self.charge(run) {
            return false;
        }
        let targets = vars.iter().filter(|v| is_target_var(v)).count();
        // What must follow the value: the next literal's first byte, or the end of input.
        let next = match self.parts.get(part + 1) {
            Some(Part::Literal(l)) => Some(l.as_bytes().first().copied()),
            Some(Part::Expression { .. }) => None,
            None => Some(None),
        };
        // Commas in rest[..len], kept up to date as len shrinks.
        let mut commas = bytes
            .get(..run)
            .unwrap_or_default()
            .iter()
            .filter(|&&b| b == b',')
            .count();
        for len in (0..=run).rev() {
            if len < run && bytes.get(len) == Some(&b',') {
                commas = commas.saturating_sub(1);
            }
            if next.is_some_and(|want| bytes.get(len).copied() != want) {
                continue;
            }
            let pieces = commas + 1;
            let span = rest.get(..len).unwrap_or_default();
            let saved = self.caps;
            let assigned = if pieces == vars.len() {
                for (var, value) in vars.iter().zip(span.split(',')) {
                    self.caps.set(var, value);
                }
                true
            } else if pieces == targets {
                // Undefined variables are skipped when expanding: the values present are
                // those of target_host and target_port, in order.
                let target_vars = vars.iter().filter(|v| is_target_var(v));
                for (var, value) in target_vars.zip(span.split(',')) {
                    self.caps.set(var, value);
                }
                true
            } else {
                span.is_empty() && targets == 0
            };
            if assigned && self.charge(len) && self.go(part + 1, pos + len) {
                return true;
            }
            self.caps = saved;
            if self.work > MAX_MATCH_WORK {
                return false;
            }
        }
        false
    }

    fn query(&mut self, part: usize, pos: usize, prefix: u8, vars: &[String]) -> bool {
        let input = self.input;
        let bytes = input.as_bytes();
        // Collect the longest run of `name=value` pairs naming this expression's variables
        // (each at most once), remembering where each pair ends.
        let mut ends: Vec<(usize, Captures<'p>)> = Vec::new();
        let mut caps = self.caps;
        let mut seen: Vec<&str> = Vec::new();
        let mut at = pos;
        let mut sep = prefix;
        loop {
            if bytes.get(at) != Some(&sep) {
                break;
            }
            let name_start = at + 1;
            let rest = input.get(name_start..).unwrap_or_default();
            let eq = rest
                .bytes()
                .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'%')))
                .unwrap_or(rest.len());
            if rest.as_bytes().get(eq) != Some(&b'=') {
                break;
            }
            let name = rest.get(..eq).unwrap_or_default();
            if !vars.iter().any(|v| v == name) || seen.contains(&name) {
                break;
            }
            let value_start = name_start + eq + 1;
            let value_rest = input.get(value_start..).unwrap_or_default();
            let value_len = value_rest
                .bytes()
                .position(|b| !is_value_char(b))
                .unwrap_or(value_rest.len());
            let value = value_rest.get(..value_len).unwrap_or_default();
            caps.set(name, value);
            seen.push(name);
            at = value_start + value_len;
            ends.push((at, caps));
            sep = b'&';
        }
        if !self.charge(at - pos) {
            return false;
        }
        let needed = vars.iter().filter(|v| is_target_var(v)).count();
        let saved = self.caps;
        for (n, (end, caps)) in ends.iter().enumerate().rev() {
            let have = seen
                .get(..=n)
                .unwrap_or_default()
                .iter()
                .filter(|s| is_target_var(s))
                .count();
            if have != needed {
                continue;
            }
            self.caps = *caps;
            if self.go(part + 1, *end) {
                return true;
            }
        }
        self.caps = saved;
        // All variables undefined: the expression expands to nothing.
        needed == 0 && self.go(part + 1, pos)
    }
}

/// Why a request path does not name a valid UDP proxying target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A byte outside 0x21..=0x7E.
    #[error("byte {0:#04x} is not allowed in the path")]
    BadCharacter(u8),
    /// The path does not start with `/.well-known/masque/udp/`.
    #[error("path does not start with {DEFAULT_TEMPLATE_PREFIX}")]
    WrongPrefix,
    /// The path is not `/.well-known/masque/udp/{target_host}/{target_port}/`: missing
    /// trailing slash, extra segment, query string...
    #[error("path is not {DEFAULT_TEMPLATE}")]
    WrongSegmentCount,
    /// Empty target_host.
    #[error("empty target_host")]
    EmptyHost,
    /// Empty target_port.
    #[error("empty target_port")]
    EmptyPort,
    /// A '%' not followed by two hex digits in target_host or target_port.
    #[error("bad percent-encoding")]
    BadPercentEncoding,
    /// A '%' left in target_host after decoding: an IPv6 zone id, which RFC 9298 excludes.
    #[error("IPv6 zone id in target_host")]
    ZoneId,
    /// target_port is not an integer in 1..=65535 (the decoded text).
    #[error("bad target_port {0:?}")]
    BadPort(String),
    /// target_host is not an IPv6 literal, an IPv4 literal or a reg-name (the decoded text).
    #[error("bad target_host {0:?}")]
    BadHost(String),
    /// The path does not match a (non-default) URI template.
    #[error("path does not match the URI template")]
    NoMatch,
}

//= https://www.rfc-editor.org/rfc/rfc9298#section-2
//# The URI Template MUST NOT contain any non-ASCII Unicode characters and MUST
//# only contain ASCII characters in the range 0x21-0x7E inclusive
fn check_bytes(path: &str) -> Result<(), PathError> {
    match path.bytes().find(|b| !(0x21..=0x7e).contains(b)) {
        Some(b) => Err(PathError::BadCharacter(b)),
        None => Ok(()),
    }
}

/// Envoy's `rewriteAuthorityForConnectUdp` check on the default template, plus RFC 9298's
/// port rule.
///
/// Every byte must be in 0x21..=0x7E; the path must be
/// `/.well-known/masque/udp/{target_host}/{target_port}/` with non-empty host and port;
/// both are percent-decoded; a '%' left in the host (an IPv6 zone id such as
/// `fe80::a%25ee1`) is refused. IPv6 and IPv4 literals become [`TargetHost::Ip`], anything
/// else [`TargetHost::Name`], as written.
///
/// Ferry is stricter than Envoy in two ways (RFC 9298 wins over Envoy):
/// * the port must be decimal digits only with a value in 1..=65535 ([`PathError::BadPort`]);
///   Envoy accepts "0", "70000" and "http";
/// * the decoded host must be an IPv6 literal, an IPv4 literal or a reg-name made of
///   unreserved and sub-delims characters, and must not end in a numeric label unless it
///   is a dotted-quad IPv4 literal ([`PathError::BadHost`]): this refuses "a/b" (from
///   `a%2Fb`), "[::1]", "x:y", and shorthand IPv4 such as "127.1" or "0x7f.1" that a
///   resolver would otherwise turn into an address.
///   Malformed percent-encoding is an error too, where Envoy keeps it as written.
pub fn parse_default_path(path: &str) -> Result<Target, PathError> {
    check_bytes(path)?;
    let rest = path
        .strip_prefix(DEFAULT_TEMPLATE_PREFIX)
        .ok_or(PathError::WrongPrefix)?;
    // "/.well-known/masque/udp/" + "host/port/" splits into exactly 7 pieces on '/'.
    let mut pieces = rest.split('/');
    let (Some(host), Some(port), Some(""), None) =
        (pieces.next(), pieces.next(), pieces.next(), pieces.next())
    else {
        return Err(PathError::WrongSegmentCount);
    };
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3
    //# both the "target_host" and "target_port" variables MUST NOT be empty.
    if host.is_empty() {
        return Err(PathError::EmptyHost);
    }
    if port.is_empty() {
        return Err(PathError::EmptyPort);
    }
    target_from_encoded(host, port)
}

/// Check and decode non-empty, still percent-encoded host and port values.
fn target_from_encoded(host: &str, port: &str) -> Result<Target, PathError> {
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3.1
    //# It extracts the "target_host" and "target_port" variables from the URI it has reconstructed
    //# from the request headers, decodes their percent-encoding, and establishes a
    //# tunnel by directly opening a UDP socket to the requested target.
    let host = percent_decode(host).ok_or(PathError::BadPercentEncoding)?;
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3
    //# Note
    //# that IPv6 scoped addressing zone identifiers are not supported.
    if host.contains(&b'%') {
        return Err(PathError::ZoneId);
    }
    let port = percent_decode(port).ok_or(PathError::BadPercentEncoding)?;
    let port = parse_port(&port)?;
    let host = String::from_utf8(host)
        .map_err(|e| PathError::BadHost(String::from_utf8_lossy(e.as_bytes()).into_owned()))?;
    let parsed = classify_host(&host)?;
    Ok(Target {
        host: parsed,
        port,
        host_text: host,
    })
}

//= https://www.rfc-editor.org/rfc/rfc9298#section-3
//# "target_port" MUST represent an integer between 1 and 65535 inclusive.
fn parse_port(decoded: &[u8]) -> Result<u16, PathError> {
    let bad = || PathError::BadPort(String::from_utf8_lossy(decoded).into_owned());
    if decoded.is_empty() {
        return Err(PathError::EmptyPort);
    }
    let mut value: u32 = 0;
    for &b in decoded {
        if !b.is_ascii_digit() {
            return Err(bad());
        }
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u32::from(b - b'0')))
            .filter(|v| *v <= u32::from(u16::MAX))
            .ok_or_else(bad)?;
    }
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(bad()),
    }
}

//= https://www.rfc-editor.org/rfc/rfc9298#section-3
//# target_host = IPv6address / IPv4address / reg-name
fn classify_host(host: &str) -> Result<TargetHost, PathError> {
    let bad = || PathError::BadHost(host.to_owned());
    if host.contains(':') {
        //= https://www.rfc-editor.org/rfc/rfc9298#section-3
        //# if "target_host" contains an IPv6 literal, the colons (":") MUST be
        //# percent-encoded.
        // Like Envoy, Ferry also accepts the colons unencoded.
        return host
            .parse::<Ipv6Addr>()
            .map(|ip| TargetHost::Ip(IpAddr::V6(ip)))
            .map_err(|_| bad());
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(TargetHost::Ip(IpAddr::V4(ip)));
    }
    // reg-name = *( unreserved / pct-encoded / sub-delims ); after decoding, Ferry accepts
    // only the unreserved and sub-delims characters.
    if !host.bytes().all(|b| is_unreserved(b) || is_sub_delim(b)) {
        return Err(bad());
    }
    // A name whose last label is a number is shorthand IPv4 ("127.1", "0x7f.0.0.1",
    // "2130706433", "010.0.0.1") to many resolvers: refuse it rather than resolve it.
    let last = host
        .trim_end_matches('.')
        .rsplit('.')
        .next()
        .unwrap_or_default();
    let numeric = !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit());
    let hex = last
        .strip_prefix("0x")
        .or_else(|| last.strip_prefix("0X"))
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric || hex {
        return Err(bad());
    }
    Ok(TargetHost::Name(host.to_owned()))
}

#[cfg(test)]
mod tests;
