//! Envoy's substitution format strings (access log formats): `%COMMAND(args):max_len%`
//! command operators between literal text, parsed once at load time.
//!
//! The parser follows Envoy's grammar: a command is `%` + `[A-Z0-9_]+` + optional `(args)`
//! (no `)` inside) + optional `:digits` + `%`; `%%` is a literal `%`; any other `%` is an
//! error. Operators Ferry does not implement are errors too, never printed as text.

use std::fmt;

/// The default format of Envoy's file and stream access loggers.
pub const ENVOY_DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// The dynamic metadata namespace Ferry fills for each CONNECT-UDP tunnel
/// (`%DYNAMIC_METADATA(ferry.connect_udp:KEY)%`).
pub const TUNNEL_METADATA_NAMESPACE: &str = "ferry.connect_udp";

/// The keys of [`TUNNEL_METADATA_NAMESPACE`].
pub const TUNNEL_METADATA_KEYS: [&str; 9] = [
    "target",
    "datagrams_received",
    "datagrams_sent",
    "bytes_received",
    "bytes_sent",
    "datagrams_dropped",
    "close_reason",
    "setup_time_us",
    "cluster",
];

/// The dynamic metadata namespace of a udp_proxy session (Envoy's), filled at the
/// session's end: `%DYNAMIC_METADATA(udp.proxy.session:KEY)%`.
pub const UDP_SESSION_METADATA_NAMESPACE: &str = "udp.proxy.session";

/// The keys of [`UDP_SESSION_METADATA_NAMESPACE`] (Envoy's).
pub const UDP_SESSION_METADATA_KEYS: [&str; 6] = [
    "cluster_name",
    "bytes_sent",
    "bytes_received",
    "errors_sent",
    "datagrams_sent",
    "datagrams_received",
];

/// The filter state keys a udp_proxy session fills (Envoy's): the tunnel's response
/// headers (`propagate_response_headers`) and trailers.
pub const UDP_FILTER_STATE_KEYS: [&str; 2] = [
    "envoy.udp_proxy.propagate_response_headers",
    "envoy.udp_proxy.propagate_response_trailers",
];

/// A parsed format string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Template {
    pub segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    Command(Command),
}

/// One `%COMMAND%` with its optional `:max_len` truncation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub operator: Operator,
    pub max_len: Option<usize>,
}

/// The command operators Ferry implements (Envoy's names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operator {
    /// `START_TIME` or `START_TIME(strftime format)`.
    StartTime(Option<String>),
    /// `REQ(X?Y)`: request header `X`, else `Y` (lower-cased; pseudo-headers start with `:`).
    Req(HeaderLookup),
    /// `RESP(X?Y)`: response header.
    Resp(HeaderLookup),
    ResponseCode,
    ResponseCodeDetails,
    ResponseFlags,
    ResponseFlagsLong,
    ConnectionTerminationDetails,
    /// Milliseconds from the request's start to the end of the stream.
    Duration,
    /// Milliseconds from the request's start to the response headers.
    ResponseDuration,
    BytesReceived,
    BytesSent,
    Protocol,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamRemotePort,
    DownstreamLocalAddress,
    DownstreamLocalAddressWithoutPort,
    DownstreamLocalPort,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocalAddress,
    RouteName,
    RequestedServerName,
    ConnectionId,
    Hostname,
    /// `DYNAMIC_METADATA(NAMESPACE:KEY:...)`.
    DynamicMetadata {
        namespace: String,
        path: Vec<String>,
    },
    /// `FILTER_STATE(KEY)`, `FILTER_STATE(KEY:TYPED)` or `FILTER_STATE(KEY:PLAIN)`.
    FilterState {
        key: String,
        plain: bool,
    },
    /// `UPSTREAM_REQUEST_ATTEMPT_COUNT`: a udp_proxy session's tunnel attempts.
    UpstreamRequestAttemptCount,
    /// `ACCESS_LOG_TYPE`: `DownstreamEnd` (HCM), `UdpSessionEnd`,
    /// `UdpTunnelUpstreamConnected`, `UdpPeriodic` (udp_proxy).
    AccessLogType,
}

/// `REQ`/`RESP` arguments: a header and an optional alternative, lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderLookup {
    pub name: String,
    pub alternative: Option<String>,
}

impl Operator {
    /// Whether a lone command of this kind is a number in a JSON format (Envoy keeps
    /// these typed).
    pub fn is_numeric(&self) -> bool {
        matches!(
            self,
            Operator::ResponseCode
                | Operator::Duration
                | Operator::ResponseDuration
                | Operator::BytesReceived
                | Operator::BytesSent
                | Operator::DownstreamRemotePort
                | Operator::DownstreamLocalPort
                | Operator::ConnectionId
                | Operator::UpstreamRequestAttemptCount
        )
    }
}

impl fmt::Display for Template {
    /// The format string again (`%` in literal text doubled): parsing it gives the same
    /// template.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for seg in &self.segments {
            match seg {
                Segment::Literal(s) => f.write_str(&s.replace('%', "%%"))?,
                Segment::Command(c) => write!(f, "{c}")?,
            }
        }
        Ok(())
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header = |h: &HeaderLookup| match &h.alternative {
            Some(a) => format!("{}?{}", h.name.to_ascii_uppercase(), a.to_ascii_uppercase()),
            None => h.name.to_ascii_uppercase(),
        };
        let (name, args): (&str, Option<String>) = match &self.operator {
            Operator::StartTime(a) => ("START_TIME", a.clone()),
            Operator::Req(h) => ("REQ", Some(header(h))),
            Operator::Resp(h) => ("RESP", Some(header(h))),
            Operator::ResponseCode => ("RESPONSE_CODE", None),
            Operator::ResponseCodeDetails => ("RESPONSE_CODE_DETAILS", None),
            Operator::ResponseFlags => ("RESPONSE_FLAGS", None),
            Operator::ResponseFlagsLong => ("RESPONSE_FLAGS_LONG", None),
            Operator::ConnectionTerminationDetails => ("CONNECTION_TERMINATION_DETAILS", None),
            Operator::Duration => ("DURATION", None),
            Operator::ResponseDuration => ("RESPONSE_DURATION", None),
            Operator::BytesReceived => ("BYTES_RECEIVED", None),
            Operator::BytesSent => ("BYTES_SENT", None),
            Operator::Protocol => ("PROTOCOL", None),
            Operator::DownstreamRemoteAddress => ("DOWNSTREAM_REMOTE_ADDRESS", None),
            Operator::DownstreamRemoteAddressWithoutPort => {
                ("DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", None)
            }
            Operator::DownstreamRemotePort => ("DOWNSTREAM_REMOTE_PORT", None),
            Operator::DownstreamLocalAddress => ("DOWNSTREAM_LOCAL_ADDRESS", None),
            Operator::DownstreamLocalAddressWithoutPort => {
                ("DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT", None)
            }
            Operator::DownstreamLocalPort => ("DOWNSTREAM_LOCAL_PORT", None),
            Operator::UpstreamHost => ("UPSTREAM_HOST", None),
            Operator::UpstreamCluster => ("UPSTREAM_CLUSTER", None),
            Operator::UpstreamLocalAddress => ("UPSTREAM_LOCAL_ADDRESS", None),
            Operator::RouteName => ("ROUTE_NAME", None),
            Operator::RequestedServerName => ("REQUESTED_SERVER_NAME", None),
            Operator::ConnectionId => ("CONNECTION_ID", None),
            Operator::Hostname => ("HOSTNAME", None),
            Operator::DynamicMetadata { namespace, path } => {
                let mut a = namespace.clone();
                for p in path {
                    a.push(':');
                    a.push_str(p);
                }
                ("DYNAMIC_METADATA", Some(a))
            }
            Operator::FilterState { key, plain } => (
                "FILTER_STATE",
                Some(if *plain {
                    format!("{key}:PLAIN")
                } else {
                    key.clone()
                }),
            ),
            Operator::UpstreamRequestAttemptCount => ("UPSTREAM_REQUEST_ATTEMPT_COUNT", None),
            Operator::AccessLogType => ("ACCESS_LOG_TYPE", None),
        };
        write!(f, "%{name}")?;
        if let Some(a) = args {
            write!(f, "({a})")?;
        }
        if let Some(n) = self.max_len {
            write!(f, ":{n}")?;
        }
        f.write_str("%")
    }
}

/// The operators Ferry supports, for error messages.
pub const SUPPORTED_OPERATORS: &str = "START_TIME, REQ(X?Y), RESP(X?Y), RESPONSE_CODE, \
RESPONSE_CODE_DETAILS, RESPONSE_FLAGS, RESPONSE_FLAGS_LONG, CONNECTION_TERMINATION_DETAILS, \
DURATION, RESPONSE_DURATION, BYTES_RECEIVED, BYTES_SENT, PROTOCOL, DOWNSTREAM_REMOTE_ADDRESS, \
DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT, DOWNSTREAM_REMOTE_PORT, DOWNSTREAM_LOCAL_ADDRESS, \
DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT, DOWNSTREAM_LOCAL_PORT, UPSTREAM_HOST, UPSTREAM_CLUSTER, \
UPSTREAM_LOCAL_ADDRESS, ROUTE_NAME, REQUESTED_SERVER_NAME, CONNECTION_ID, HOSTNAME, \
DYNAMIC_METADATA(ferry.connect_udp:KEY), DYNAMIC_METADATA(udp.proxy.session:KEY), \
FILTER_STATE(envoy.udp_proxy.propagate_response_headers), UPSTREAM_REQUEST_ATTEMPT_COUNT, \
ACCESS_LOG_TYPE";

/// Why a format string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError(pub String);

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parse a format string.
pub fn parse(text: &str) -> Result<Template, FormatError> {
    let bytes = text.as_bytes();
    let mut segments = Vec::new();
    let mut literal = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let Some(off) = text[i..].find('%') else {
            literal.push_str(&text[i..]);
            break;
        };
        literal.push_str(&text[i..i + off]);
        let start = i + off;
        if bytes.get(start + 1) == Some(&b'%') {
            literal.push('%');
            i = start + 2;
            continue;
        }
        let (command, end) = parse_command(text, start)?;
        if !literal.is_empty() {
            segments.push(Segment::Literal(std::mem::take(&mut literal)));
        }
        segments.push(Segment::Command(command));
        i = end;
    }
    if !literal.is_empty() {
        segments.push(Segment::Literal(literal));
    }
    Ok(Template { segments })
}

/// Parse the command starting at the `%` at `start`; returns it and the index after its
/// closing `%`.
fn parse_command(text: &str, start: usize) -> Result<(Command, usize), FormatError> {
    let bytes = text.as_bytes();
    let bad = || {
        FormatError(format!(
            "incorrect configuration: `{text}`: no valid command at position {start} (a command is %NAME%, %NAME(args)% or %NAME(args):max_len%; write %% for a literal %)"
        ))
    };
    let mut j = start + 1;
    while j < bytes.len()
        && (bytes[j].is_ascii_uppercase() || bytes[j].is_ascii_digit() || bytes[j] == b'_')
    {
        j += 1;
    }
    if j == start + 1 {
        return Err(bad());
    }
    let name = &text[start + 1..j];
    let mut args = None;
    if bytes.get(j) == Some(&b'(') {
        let close = text[j..].find(')').ok_or_else(bad)? + j;
        args = Some(&text[j + 1..close]);
        j = close + 1;
    }
    let mut max_len = None;
    if bytes.get(j) == Some(&b':') {
        let digits = text[j + 1..].bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: usize = text[j + 1..j + 1 + digits].parse().map_err(|_| bad())?;
        max_len = Some(n);
        j += 1 + digits;
    }
    if bytes.get(j) != Some(&b'%') {
        return Err(bad());
    }
    let operator = operator(name, args)?;
    Ok((Command { operator, max_len }, j + 1))
}

fn header_lookup(name: &str, args: Option<&str>) -> Result<HeaderLookup, FormatError> {
    let args = args.unwrap_or("");
    let (main, alt) = match args.split_once('?') {
        Some((m, a)) => (m, Some(a)),
        None => (args, None),
    };
    let check = |h: &str| -> Result<String, FormatError> {
        let body = h.strip_prefix(':').unwrap_or(h);
        if body.is_empty()
            || !body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.!#$&'*+^`|~".contains(&b))
        {
            return Err(FormatError(format!(
                "%{name}({args})%: `{h}` is not a header name"
            )));
        }
        Ok(h.to_ascii_lowercase())
    };
    Ok(HeaderLookup {
        name: check(main)?,
        alternative: alt.map(check).transpose()?,
    })
}

fn operator(name: &str, args: Option<&str>) -> Result<Operator, FormatError> {
    let no_args = |op: Operator| -> Result<Operator, FormatError> {
        match args {
            None => Ok(op),
            Some(a) => Err(FormatError(format!(
                "%{name}({a})%: {name} takes no arguments"
            ))),
        }
    };
    match name {
        "START_TIME" => Ok(Operator::StartTime(
            args.filter(|a| !a.is_empty()).map(str::to_owned),
        )),
        "REQ" => Ok(Operator::Req(header_lookup(name, args)?)),
        "RESP" => Ok(Operator::Resp(header_lookup(name, args)?)),
        "RESPONSE_CODE" => no_args(Operator::ResponseCode),
        "RESPONSE_CODE_DETAILS" => no_args(Operator::ResponseCodeDetails),
        "RESPONSE_FLAGS" => no_args(Operator::ResponseFlags),
        "RESPONSE_FLAGS_LONG" => no_args(Operator::ResponseFlagsLong),
        "CONNECTION_TERMINATION_DETAILS" => no_args(Operator::ConnectionTerminationDetails),
        "DURATION" => no_args(Operator::Duration),
        "RESPONSE_DURATION" => no_args(Operator::ResponseDuration),
        "BYTES_RECEIVED" => no_args(Operator::BytesReceived),
        "BYTES_SENT" => no_args(Operator::BytesSent),
        "PROTOCOL" => no_args(Operator::Protocol),
        "DOWNSTREAM_REMOTE_ADDRESS" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => {
            no_args(Operator::DownstreamRemoteAddress)
        }
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => {
            no_args(Operator::DownstreamRemoteAddressWithoutPort)
        }
        "DOWNSTREAM_REMOTE_PORT" | "DOWNSTREAM_DIRECT_REMOTE_PORT" => {
            no_args(Operator::DownstreamRemotePort)
        }
        "DOWNSTREAM_LOCAL_ADDRESS" => no_args(Operator::DownstreamLocalAddress),
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => {
            no_args(Operator::DownstreamLocalAddressWithoutPort)
        }
        "DOWNSTREAM_LOCAL_PORT" => no_args(Operator::DownstreamLocalPort),
        "UPSTREAM_HOST" | "UPSTREAM_REMOTE_ADDRESS" => no_args(Operator::UpstreamHost),
        "UPSTREAM_CLUSTER" => no_args(Operator::UpstreamCluster),
        "UPSTREAM_LOCAL_ADDRESS" => no_args(Operator::UpstreamLocalAddress),
        "ROUTE_NAME" => no_args(Operator::RouteName),
        "REQUESTED_SERVER_NAME" => no_args(Operator::RequestedServerName),
        "CONNECTION_ID" => no_args(Operator::ConnectionId),
        "HOSTNAME" => no_args(Operator::Hostname),
        "DYNAMIC_METADATA" => {
            let a = args.unwrap_or("");
            let mut parts = a.split(':');
            let namespace = parts.next().unwrap_or("").to_owned();
            if namespace.is_empty() {
                return Err(FormatError(format!(
                    "%DYNAMIC_METADATA({a})%: a namespace is required"
                )));
            }
            let path: Vec<String> = parts.map(str::to_owned).collect();
            let keys: &[&str] = match namespace.as_str() {
                TUNNEL_METADATA_NAMESPACE => &TUNNEL_METADATA_KEYS,
                UDP_SESSION_METADATA_NAMESPACE => &UDP_SESSION_METADATA_KEYS,
                _ => {
                    return Err(FormatError(format!(
                        "%DYNAMIC_METADATA({a})%: Ferry fills only the `{TUNNEL_METADATA_NAMESPACE}` namespace (keys: {}) and, for udp_proxy sessions, `{UDP_SESSION_METADATA_NAMESPACE}` (keys: {})",
                        TUNNEL_METADATA_KEYS.join(", "),
                        UDP_SESSION_METADATA_KEYS.join(", ")
                    )));
                }
            };
            match path.as_slice() {
                [] => {}
                [key] if keys.contains(&key.as_str()) => {}
                _ => {
                    return Err(FormatError(format!(
                        "%DYNAMIC_METADATA({a})%: `{}` is not a key of `{namespace}` (keys: {})",
                        path.join(":"),
                        keys.join(", ")
                    )))
                }
            }
            Ok(Operator::DynamicMetadata { namespace, path })
        }
        "FILTER_STATE" => {
            let a = args.unwrap_or("");
            let (key, plain) = match a.rsplit_once(':') {
                Some((k, "TYPED")) => (k, false),
                Some((k, "PLAIN")) => (k, true),
                _ => (a, false),
            };
            if !UDP_FILTER_STATE_KEYS.contains(&key) {
                return Err(FormatError(format!(
                    "%FILTER_STATE({a})%: Ferry fills only the filter state keys {} (optionally with :TYPED or :PLAIN)",
                    UDP_FILTER_STATE_KEYS.join(", ")
                )));
            }
            Ok(Operator::FilterState {
                key: key.to_owned(),
                plain,
            })
        }
        "UPSTREAM_REQUEST_ATTEMPT_COUNT" => no_args(Operator::UpstreamRequestAttemptCount),
        "ACCESS_LOG_TYPE" => no_args(Operator::AccessLogType),
        other => Err(FormatError(format!(
            "`%{other}%` is not a command operator Ferry supports (yet); supported: {SUPPORTED_OPERATORS}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(operator: Operator) -> Segment {
        Segment::Command(Command {
            operator,
            max_len: None,
        })
    }

    #[test]
    fn parses_envoy_default() {
        let t = parse(ENVOY_DEFAULT_FORMAT).unwrap();
        assert_eq!(t.segments[0], Segment::Literal("[".into()));
        assert_eq!(t.segments[1], cmd(Operator::StartTime(None)));
        assert!(t.segments.contains(&cmd(Operator::Req(HeaderLookup {
            name: "x-envoy-original-path".into(),
            alternative: Some(":path".into())
        }))));
        assert_eq!(t.segments.last(), Some(&Segment::Literal("\"\n".into())));
    }

    #[test]
    fn arguments_truncation_and_percent() {
        let t = parse("%START_TIME(%s.%3f)% 100%% %REQ(:AUTHORITY):5%").unwrap();
        assert_eq!(
            t.segments,
            vec![
                cmd(Operator::StartTime(Some("%s.%3f".into()))),
                Segment::Literal(" 100% ".into()),
                Segment::Command(Command {
                    operator: Operator::Req(HeaderLookup {
                        name: ":authority".into(),
                        alternative: None
                    }),
                    max_len: Some(5)
                }),
            ]
        );
        let t = parse("%DYNAMIC_METADATA(ferry.connect_udp:target)%").unwrap();
        assert_eq!(
            t.segments,
            vec![cmd(Operator::DynamicMetadata {
                namespace: "ferry.connect_udp".into(),
                path: vec!["target".into()]
            })]
        );
    }

    #[test]
    fn display_round_trips() {
        for text in [
            ENVOY_DEFAULT_FORMAT,
            "%START_TIME(%s.%3f)% 100%% %REQ(:AUTHORITY):5% %DYNAMIC_METADATA(ferry.connect_udp:target)%",
            "%DYNAMIC_METADATA(ferry.connect_udp)% %RESP(PROXY-STATUS?X)% %CONNECTION_ID%\n",
            "%ACCESS_LOG_TYPE% %UPSTREAM_REQUEST_ATTEMPT_COUNT% %DYNAMIC_METADATA(udp.proxy.session:datagrams_sent)%",
            "%FILTER_STATE(envoy.udp_proxy.propagate_response_headers:PLAIN)% %FILTER_STATE(envoy.udp_proxy.propagate_response_headers)%",
        ] {
            let t = parse(text).unwrap();
            assert_eq!(parse(&t.to_string()).unwrap(), t, "{text}");
        }
    }

    #[test]
    fn errors() {
        for bad in [
            "50%",
            "%",
            "%lower%",
            "%RESPONSE_CODE",
            "%REQ(:PATH%",
            "%DURATION:%",
            "%NO_SUCH_OPERATOR%",
            "%DURATION(x)%",
            "%REQ()%",
            "%REQ(a b)%",
            "%DYNAMIC_METADATA(other:x)%",
            "%DYNAMIC_METADATA(ferry.connect_udp:nope)%",
            "%DYNAMIC_METADATA(udp.proxy.session:nope)%",
            "%FILTER_STATE(some.other.key)%",
            "%ACCESS_LOG_TYPE(x)%",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let e = parse("%UPSTREAM_TRANSPORT_FAILURE_REASON%").unwrap_err();
        assert!(e.0.contains("not a command operator Ferry supports"), "{e}");
    }
}
