//! CONNECT-UDP request validation (RFC 9298, section 3): request head in, [`Target`] or a
//! typed [`Rejection`] (status code + Proxy-Status) out, whatever the HTTP version.

use crate::template::{parse_default_path, PathError, Target, UriTemplate};

/// The "connect-udp" HTTP Upgrade Token.
pub const CONNECT_UDP: &str = "connect-udp";

/// RFC 9209 Proxy Error Types Ferry uses (section 2.3 of RFC 9209).
pub mod proxy_error {
    /// The request was malformed (RFC 9209).
    pub const HTTP_REQUEST_ERROR: &str = "http_request_error";
    /// The request was refused by policy (RFC 9209).
    pub const HTTP_REQUEST_DENIED: &str = "http_request_denied";
    /// The target's IP address is prohibited (RFC 9209, section 2.3.5).
    pub const DESTINATION_IP_PROHIBITED: &str = "destination_ip_prohibited";
    /// DNS resolution failed (RFC 9209, section 2.3.2).
    pub const DNS_ERROR: &str = "dns_error";
    /// The target could not be reached (RFC 9209).
    pub const DESTINATION_UNAVAILABLE: &str = "destination_unavailable";
    /// Something went wrong inside the proxy (RFC 9209).
    pub const PROXY_INTERNAL_ERROR: &str = "proxy_internal_error";
}

/// Everything the validator needs from the request head, whatever the HTTP version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestHead<'a> {
    /// "CONNECT" for HTTP/2 and HTTP/3 extended CONNECT, "GET" for the HTTP/1.1 upgrade.
    pub method: &'a str,
    /// `:protocol` (HTTP/2, HTTP/3) or the Upgrade header value (HTTP/1.1).
    pub protocol: Option<&'a str>,
    /// `:path`, or the HTTP/1.1 request target (origin-form or absolute-form).
    pub path: Option<&'a str>,
    /// `:authority` or Host.
    pub authority: Option<&'a str>,
    /// `:scheme` (HTTP/2, HTTP/3).
    pub scheme: Option<&'a str>,
    /// The raw "capsule-protocol" header value, if present.
    pub capsule_protocol: Option<&'a str>,
}

/// A refused request: the status code and the RFC 9209 Proxy-Status the client sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// HTTP status code.
    pub status: u16,
    /// RFC 9209 Proxy Error Type, e.g. "http_request_error" (see [`proxy_error`]).
    pub error: Option<&'static str>,
    /// Human-readable details (the Proxy-Status `details` parameter).
    pub details: String,
    /// For `dns_error`: the DNS rcode (`NXDOMAIN`, `SERVFAIL`, ...), the Proxy-Status
    /// `rcode` parameter (RFC 9209 section 2.3.2).
    pub rcode: Option<&'static str>,
    /// A `www-authenticate` challenge sent with a 401 (basic authentication).
    pub challenge: Option<String>,
}

impl Rejection {
    /// A rejection with the given status, error type and details.
    pub fn new(status: u16, error: Option<&'static str>, details: impl Into<String>) -> Self {
        Self {
            status,
            error,
            details: details.into(),
            rcode: None,
            challenge: None,
        }
    }

    /// 400 with `http_request_error`: a malformed CONNECT-UDP request.
    pub fn bad_request(details: impl Into<String>) -> Self {
        Self::new(400, Some(proxy_error::HTTP_REQUEST_ERROR), details)
    }

    /// 404 with `http_request_error`: the path names no valid target (Envoy answers 404).
    pub fn not_found(details: impl Into<String>) -> Self {
        Self::new(404, Some(proxy_error::HTTP_REQUEST_ERROR), details)
    }

    //= https://www.rfc-editor.org/rfc/rfc9298#section-3.1
    //# If errors occur during this process, the
    //# UDP proxy MUST reject the request and SHOULD send details using an appropriate
    //# Proxy-Status header field {{!PROXY-STATUS=RFC9209}}.
    /// The RFC 9209 Proxy-Status header value naming Ferry, e.g.
    /// `ferry; error=http_request_error; details="bad target_port \"0\""`.
    ///
    /// `details` is written as an sf-string: '"' and '\' escaped, characters outside
    /// 0x20..=0x7E dropped. No `error` parameter when `error` is None, no `details`
    /// parameter when details are empty.
    pub fn proxy_status(&self) -> String {
        let mut out = String::from("ferry");
        if let Some(error) = self.error {
            out.push_str("; error=");
            out.push_str(error);
        }
        if let Some(rcode) = self.rcode {
            out.push_str("; rcode=\"");
            out.push_str(rcode);
            out.push('"');
        }
        if !self.details.is_empty() {
            out.push_str("; details=\"");
            for c in self.details.chars() {
                match c {
                    '"' | '\\' => {
                        out.push('\\');
                        out.push(c);
                    }
                    ' '..='~' => out.push(c),
                    _ => {}
                }
            }
            out.push('"');
        }
        out
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.status)?;
        if let Some(e) = self.error {
            write!(f, " {e}")?;
        }
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl From<PathError> for Rejection {
    /// A path that names no valid target: 404, as Envoy answers.
    fn from(e: PathError) -> Self {
        Self::not_found(e.to_string())
    }
}

/// Whether this is a CONNECT-UDP request: extended CONNECT with `:protocol` connect-udp
/// (HTTP/2, HTTP/3), or GET with an Upgrade header naming connect-udp (HTTP/1.1).
/// Tokens match case-insensitively; the Upgrade header may list several protocols.
pub fn is_connect_udp(head: &RequestHead<'_>) -> bool {
    let Some(protocol) = head.protocol else {
        return false;
    };
    match head.method {
        //= https://www.rfc-editor.org/rfc/rfc9298#section-3.4
        //# The :protocol pseudo-header field SHALL be "connect-udp".
        "CONNECT" => protocol.trim().eq_ignore_ascii_case(CONNECT_UDP),
        //= https://www.rfc-editor.org/rfc/rfc9298#section-3.2
        //# the request SHALL include an Upgrade header field with value "connect-udp".
        "GET" => protocol
            .split(',')
            .any(|p| p.trim().eq_ignore_ascii_case(CONNECT_UDP)),
        _ => false,
    }
}

//= https://www.rfc-editor.org/rfc/rfc9297#section-3.4
//# The "Capsule-Protocol" header field is an Item Structured Field, see {{Section
//# 3.3 of !STRUCT-FIELD=RFC8941}}; its value MUST be a Boolean; any other value
//# type MUST be handled as if the field were not present by recipients
/// Parse a Capsule-Protocol header value: `Some(true)` for `?1`, `Some(false)` for `?0`
/// (parameters allowed and ignored), `None` for anything else, which must be handled as if
/// the header were absent.
pub fn parse_capsule_protocol(value: &str) -> Option<bool> {
    // RFC 8941: optional leading/trailing spaces (OWS also tolerated), then an sf-boolean,
    // then parameters: *( ";" *SP key [ "=" bare-item ] ).
    let v = value.trim_matches([' ', '\t']);
    let (item, params) = match v.find(';') {
        Some(i) => (
            v.get(..i).unwrap_or_default(),
            v.get(i..).unwrap_or_default(),
        ),
        None => (v, ""),
    };
    let b = match item {
        "?1" => true,
        "?0" => false,
        _ => return None,
    };
    //= https://www.rfc-editor.org/rfc/rfc9297#section-3.4
    //# Receivers MUST ignore unknown parameters.
    if !params_well_formed(params) {
        return None;
    }
    Some(b)
}

/// A lenient check of sf parameters: each is `; key[=value]` with an lcalpha/'*' key.
fn params_well_formed(params: &str) -> bool {
    if params.is_empty() {
        return true;
    }
    let Some(params) = params.strip_prefix(';') else {
        return false;
    };
    params.split(';').all(|p| {
        let p = p.trim_start_matches(' ');
        let key = p.split('=').next().unwrap_or_default();
        let mut chars = key.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '*');
        first_ok
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.*".contains(c))
            && !p.contains(',')
    })
}

fn non_empty(v: Option<&str>) -> Option<&str> {
    v.filter(|s| !s.is_empty())
}

/// The origin-form part of an HTTP/1.1 absolute-form request target
/// (`https://example.org/path?q` -> `/path?q`); origin-form targets are returned as they are.
fn origin_form(target: &str) -> &str {
    let Some(colon) = target.find("://") else {
        return target;
    };
    let scheme = target.get(..colon).unwrap_or_default();
    if !(scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("http")) {
        return target;
    }
    let after = target.get(colon + 3..).unwrap_or_default();
    match after.find(['/', '?']) {
        Some(i) => after.get(i..).unwrap_or_default(),
        None => "",
    }
}

/// Validate a CONNECT-UDP request against the default template and return its target.
///
/// * Not a CONNECT-UDP request ([`is_connect_udp`]), or a missing/empty `:path`,
///   `:authority`/Host, or (extended CONNECT) `:scheme`: 400, `http_request_error`.
/// * A path [`parse_default_path`] refuses: 404, `http_request_error`,
///   the [`PathError`] as details (Envoy answers 404 on a bad path).
/// * The capsule-protocol header may be absent (Envoy's scenario), `?1` or `?0`; any other
///   value is ignored as RFC 9297 requires, never a reason to refuse.
/// * An HTTP/1.1 absolute-form target (`GET https://proxy/.well-known/...`, as in RFC 9298's
///   example) is reduced to its path first.
pub fn validate_connect_udp(head: &RequestHead<'_>) -> Result<Target, Rejection> {
    let path = check_head(head)?;
    parse_default_path(path).map_err(Rejection::from)
}

/// [`validate_connect_udp`] against any URI template; with the default template the path
/// rules are exactly [`parse_default_path`]'s.
pub fn validate_connect_udp_with(
    head: &RequestHead<'_>,
    template: &UriTemplate,
) -> Result<Target, Rejection> {
    let path = check_head(head)?;
    template.match_target(path).map_err(Rejection::from)
}

/// Everything but the path check; returns the (origin-form) path.
fn check_head<'a>(head: &RequestHead<'a>) -> Result<&'a str, Rejection> {
    if !is_connect_udp(head) {
        return Err(Rejection::bad_request("not a connect-udp request"));
    }
    let extended_connect = head.method == "CONNECT";
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3.4
    //# The :path and :scheme pseudo-header fields SHALL NOT be empty.
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3.4
    //# A UDP proxying request that does not conform to these restrictions is
    //# malformed
    let Some(path) = non_empty(head.path) else {
        return Err(Rejection::bad_request("missing path"));
    };
    if extended_connect && non_empty(head.scheme).is_none() {
        return Err(Rejection::bad_request("missing :scheme"));
    }
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3.4
    //# The :authority pseudo-header field SHALL contain the authority of the UDP
    //# proxy.
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3.2
    //# the request SHALL include a single Host header field containing the origin
    //# of the UDP proxy.
    if non_empty(head.authority).is_none() {
        return Err(Rejection::bad_request(if extended_connect {
            "missing :authority"
        } else {
            "missing Host"
        }));
    }
    //= https://www.rfc-editor.org/rfc/rfc9297#section-3.4
    //# A Capsule-Protocol
    //# header field with a false value has the same semantics as when the header is not
    //# present.
    // Nothing to check: absent, true, false and unparseable values are all acceptable for
    // connect-udp, whose upgrade token already implies the Capsule Protocol.
    Ok(if extended_connect {
        path
    } else {
        origin_form(path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::TargetHost;

    fn h3(path: &str) -> RequestHead<'_> {
        RequestHead {
            method: "CONNECT",
            protocol: Some("connect-udp"),
            path: Some(path),
            authority: Some("proxy.example:443"),
            scheme: Some("https"),
            capsule_protocol: Some("?1"),
        }
    }

    fn h1(path: &str) -> RequestHead<'_> {
        RequestHead {
            method: "GET",
            protocol: Some("connect-udp"),
            path: Some(path),
            authority: Some("proxy.example"),
            scheme: None,
            capsule_protocol: Some("?1"),
        }
    }

    const GOOD: &str = "/.well-known/masque/udp/foo.lyft.com/80/";

    #[test]
    fn detects_connect_udp() {
        assert!(is_connect_udp(&h3(GOOD)));
        assert!(is_connect_udp(&h1(GOOD)));
        let mut h = h3(GOOD);
        h.protocol = Some("CONNECT-UDP");
        assert!(is_connect_udp(&h));
        h.protocol = Some("connect-ip");
        assert!(!is_connect_udp(&h));
        h.protocol = None;
        assert!(!is_connect_udp(&h), "classic CONNECT");
        let mut h = h1(GOOD);
        h.protocol = Some("websocket, Connect-UDP");
        assert!(is_connect_udp(&h));
        h.protocol = Some("websocket");
        assert!(!is_connect_udp(&h));
        h.method = "POST";
        h.protocol = Some("connect-udp");
        assert!(!is_connect_udp(&h));
        let mut h = h3(GOOD);
        h.method = "connect";
        assert!(!is_connect_udp(&h), "methods are case-sensitive");
        assert!(!is_connect_udp(&RequestHead::default()));
    }

    #[test]
    fn valid_requests_all_versions() {
        for head in [h3(GOOD), h1(GOOD)] {
            let t = validate_connect_udp(&head).unwrap();
            assert_eq!(t.host, TargetHost::Name("foo.lyft.com".into()));
            assert_eq!(t.port, 80);
            assert_eq!(t.authority(), "foo.lyft.com:80");
        }
    }

    // Envoy scenario: a request without capsule-protocol still works.
    #[test]
    fn capsule_protocol_absent_or_any_value_is_fine() {
        for value in [
            None,
            Some("?1"),
            Some("?0"),
            Some("?1;a=b"),
            Some("garbage"),
            Some("1"),
        ] {
            let mut head = h3(GOOD);
            head.capsule_protocol = value;
            assert!(validate_connect_udp(&head).is_ok(), "{value:?}");
        }
    }

    #[test]
    fn capsule_protocol_parsing() {
        assert_eq!(parse_capsule_protocol("?1"), Some(true));
        assert_eq!(parse_capsule_protocol(" ?1 "), Some(true));
        assert_eq!(parse_capsule_protocol("?0"), Some(false));
        assert_eq!(parse_capsule_protocol("?1;foo"), Some(true));
        assert_eq!(parse_capsule_protocol("?1; foo=bar;baz=?0"), Some(true));
        assert_eq!(parse_capsule_protocol("?1;Foo"), None);
        assert_eq!(parse_capsule_protocol("?1;"), None);
        assert_eq!(
            parse_capsule_protocol("?1, ?1"),
            None,
            "a list, not an item"
        );
        assert_eq!(parse_capsule_protocol("?1;a=b, ?0"), None);
        assert_eq!(parse_capsule_protocol("?2"), None);
        assert_eq!(parse_capsule_protocol("1"), None);
        assert_eq!(parse_capsule_protocol("true"), None);
        assert_eq!(parse_capsule_protocol(""), None);
        assert_eq!(parse_capsule_protocol("?1x"), None);
    }

    #[test]
    fn envoy_path_scenarios_give_404() {
        let cases = [
            ("/masque/udp/foo.lyft.com/80/", PathError::WrongPrefix),
            ("/.well-known/masque/udp//80/", PathError::EmptyHost),
            (
                "/.well-known/masque/udp/foo.lyft.com//",
                PathError::EmptyPort,
            ),
            (
                "/.well-known/masque/udp/fe80::a%25ee1/80/",
                PathError::ZoneId,
            ),
            (
                "/.well-known/masque/udp/foo.lyft.com/0/",
                PathError::BadPort("0".into()),
            ),
        ];
        for (path, err) in cases {
            for head in [h3(path), h1(path)] {
                let r = validate_connect_udp(&head).unwrap_err();
                assert_eq!(r.status, 404, "{path}");
                assert_eq!(r.error, Some("http_request_error"));
                assert_eq!(r.details, err.to_string());
            }
        }
    }

    #[test]
    fn envoy_ip_literals() {
        let t = validate_connect_udp(&h3("/.well-known/masque/udp/192.0.2.6/443/")).unwrap();
        assert_eq!(t.authority(), "192.0.2.6:443");
        let t = validate_connect_udp(&h3(
            "/.well-known/masque/udp/2001:0db8:85a3::8a2e:0370:7334/80/",
        ))
        .unwrap();
        assert_eq!(t.authority(), "[2001:0db8:85a3::8a2e:0370:7334]:80");
    }

    #[test]
    fn malformed_requests_give_400() {
        let mut h = h3(GOOD);
        h.path = None;
        assert_eq!(
            validate_connect_udp(&h),
            Err(Rejection::bad_request("missing path"))
        );
        h.path = Some("");
        assert_eq!(
            validate_connect_udp(&h),
            Err(Rejection::bad_request("missing path"))
        );
        let mut h = h3(GOOD);
        h.scheme = None;
        assert_eq!(
            validate_connect_udp(&h),
            Err(Rejection::bad_request("missing :scheme"))
        );
        let mut h = h3(GOOD);
        h.authority = Some("");
        assert_eq!(
            validate_connect_udp(&h),
            Err(Rejection::bad_request("missing :authority"))
        );
        let mut h = h1(GOOD);
        h.authority = None;
        assert_eq!(
            validate_connect_udp(&h),
            Err(Rejection::bad_request("missing Host"))
        );
        let mut h = h3(GOOD);
        h.protocol = Some("websocket");
        let r = validate_connect_udp(&h).unwrap_err();
        assert_eq!(r.status, 400);
        assert_eq!(r.details, "not a connect-udp request");
    }

    #[test]
    fn h1_absolute_form() {
        let t = validate_connect_udp(&h1(
            "https://example.org/.well-known/masque/udp/192.0.2.6/443/",
        ))
        .unwrap();
        assert_eq!(t.authority(), "192.0.2.6:443");
        assert_eq!(
            validate_connect_udp(&h1("HTTP://example.org")).map_err(|r| r.status),
            Err(404)
        );
        // Extended CONNECT :path must be origin-form already.
        let r = validate_connect_udp(&h3(
            "https://example.org/.well-known/masque/udp/192.0.2.6/443/",
        ))
        .unwrap_err();
        assert_eq!(r.details, PathError::WrongPrefix.to_string());
        assert_eq!(origin_form("/a"), "/a");
        assert_eq!(origin_form("ftp://x/a"), "ftp://x/a");
        assert_eq!(origin_form("http://x?q"), "?q");
    }

    #[test]
    fn custom_template() {
        let t = UriTemplate::parse("/masque{?target_host,target_port}").unwrap();
        let head = h3("/masque?target_host=2001%3Adb8%3A%3A1&target_port=53");
        let target = validate_connect_udp_with(&head, &t).unwrap();
        assert_eq!(target.authority(), "[2001:db8::1]:53");
        let r = validate_connect_udp_with(&h3(GOOD), &t).unwrap_err();
        assert_eq!(r.status, 404);
        assert_eq!(r.details, PathError::NoMatch.to_string());
    }

    #[test]
    fn proxy_status_format() {
        let r = Rejection::not_found("bad target_port");
        assert_eq!(
            r.proxy_status(),
            "ferry; error=http_request_error; details=\"bad target_port\""
        );
        let r = Rejection::new(403, None, "a \"quoted\" \\ back\tslash\u{e9}!");
        assert_eq!(
            r.proxy_status(),
            "ferry; details=\"a \\\"quoted\\\" \\\\ backslash!\""
        );
        let r = Rejection::new(502, Some(proxy_error::DNS_ERROR), "");
        assert_eq!(r.proxy_status(), "ferry; error=dns_error");
        assert_eq!(Rejection::new(500, None, "").proxy_status(), "ferry");
        let r = Rejection::from(PathError::BadPort("0".into()));
        assert_eq!(
            r.proxy_status(),
            "ferry; error=http_request_error; details=\"bad target_port \\\"0\\\"\""
        );
    }

    #[test]
    fn rejection_display_and_constants() {
        assert_eq!(
            Rejection::bad_request("x").to_string(),
            "400 http_request_error: x"
        );
        assert_eq!(Rejection::new(503, None, "").to_string(), "503");
        assert_eq!(proxy_error::HTTP_REQUEST_ERROR, "http_request_error");
        assert_eq!(proxy_error::HTTP_REQUEST_DENIED, "http_request_denied");
        assert_eq!(
            proxy_error::DESTINATION_IP_PROHIBITED,
            "destination_ip_prohibited"
        );
        assert_eq!(proxy_error::DNS_ERROR, "dns_error");
        assert_eq!(
            proxy_error::DESTINATION_UNAVAILABLE,
            "destination_unavailable"
        );
        assert_eq!(proxy_error::PROXY_INTERNAL_ERROR, "proxy_internal_error");
    }
}
