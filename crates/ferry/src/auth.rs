//! Request authentication: Envoy's `envoy.filters.http.basic_auth` (RFC 7617).
//!
//! Envoy 1.40's behaviour, kept here: the credentials are read from the first
//! `authorization` header (or `authentication_header`, such as `proxy-authorization`);
//! they must start with `Basic ` (case-sensitive), then base64 of `user:password`;
//! the password's SHA-1 must match the user's `{SHA}` line. A failure is a 401 with
//! `www-authenticate: Basic realm="<scheme>://<host><path>"` (path cut to 256 bytes) and
//! counts `http.<p>.basic_auth.denied`; a success counts `.allowed` and, with
//! `forward_username_header`, sets that header to the user name on the forwarded request.
//! The header is not removed (Envoy forwards it too).
//!
//! No I/O here: [`check`] looks only at the headers. Digests are compared in constant time,
//! and an unknown user costs the same hash and comparison as a known one.

use ferry_config::{BasicAuth, HttpConnectionManager};
use ferry_proto::request::{Rejection, RequestHead};

use crate::decide::Plan;
use crate::stats::AuthStats;

/// Envoy's bound on the path in the realm (`MaximumUriLength`).
const MAX_REALM_PATH: usize = 256;

/// Why a request was refused, with Envoy's local-reply text and response code details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    Missing,
    Scheme,
    Format,
    Credential,
}

impl Denial {
    /// Envoy's 401 body, which Ferry sends as the `proxy-status` details.
    pub fn message(self) -> &'static str {
        match self {
            Denial::Missing => "User authentication failed. Missing username and password.",
            Denial::Scheme => "User authentication failed. Expected 'Basic' authentication scheme.",
            Denial::Format => "User authentication failed. Invalid basic credential format.",
            Denial::Credential => {
                "User authentication failed. Invalid username/password combination."
            }
        }
    }

    /// Envoy's `%RESPONSE_CODE_DETAILS%` for this refusal.
    pub fn code_details(self) -> &'static str {
        match self {
            Denial::Missing => "no_credential_for_basic_auth",
            Denial::Scheme => "invalid_scheme_for_basic_auth",
            Denial::Format => "invalid_format_for_basic_auth",
            Denial::Credential => "invalid_credential_for_basic_auth",
        }
    }
}

/// Checks the credentials in `headers`: the user name, or why not.
pub fn check(cfg: &BasicAuth, headers: &http::HeaderMap) -> Result<String, Denial> {
    let value = headers
        .get(cfg.authentication_header.as_str())
        .ok_or(Denial::Missing)?;
    let token = value
        .as_bytes()
        .strip_prefix(b"Basic ")
        .ok_or(Denial::Scheme)?;
    let decoded = decode_base64(token).unwrap_or_default();
    let colon = decoded
        .iter()
        .position(|&b| b == b':')
        .ok_or(Denial::Format)?;
    let (user, password) = (&decoded[..colon], &decoded[colon + 1..]);
    let digest = sha1(password);
    let user = String::from_utf8_lossy(user);
    // An unknown user is compared against a digest no password has in practice, so the
    // time taken does not tell whether the user exists.
    let expected = cfg.users.get(&*user);
    let matches = constant_time_eq(&digest, expected.unwrap_or(&[0u8; 20]));
    if matches && expected.is_some() {
        Ok(user.into_owned())
    } else {
        Err(Denial::Credential)
    }
}

/// The 401 for `denial`: Envoy's status, `www-authenticate` challenge and message (as
/// the `proxy-status` details, error type `http_request_denied`).
pub fn rejection(denial: Denial, scheme: &str, authority: &str, path: &str) -> Rejection {
    let mut cut = path.len().min(MAX_REALM_PATH);
    while !path.is_char_boundary(cut) {
        cut -= 1;
    }
    let realm = format!("{scheme}://{authority}{}", &path[..cut]);
    let mut r = Rejection::new(401, Some("http_request_denied"), denial.message());
    // A realm that cannot be a header value (it came from the request) is left out.
    let challenge = format!("Basic realm=\"{}\"", realm.replace(['"', '\\'], ""));
    r.challenge = http::HeaderValue::from_str(&challenge)
        .is_ok()
        .then_some(challenge);
    r
}

/// A header to add to a request forwarded to a next hop (`forward_username_header`).
pub type ForwardHeader = Option<(http::HeaderName, http::HeaderValue)>;

/// Applies the HCM's basic_auth filter, if any, to what `decide` made of a request, in
/// Envoy's order: refusals Envoy makes before its HTTP filters run (a malformed request,
/// a path that is not the CONNECT-UDP template, an upgrade the route does not enable)
/// stand; every other request, routed or not (Envoy's router, the last filter, is what
/// answers 404), must carry good credentials, else it gets the 401. Counts
/// `basic_auth.allowed` / `.denied`. `tls`: the request came over TLS or QUIC (the realm's
/// scheme). Returns the decision and, for a request forwarded to a next hop, the
/// `forward_username_header` to add.
pub fn authorize(
    hcm: &HttpConnectionManager,
    decision: Result<Plan, Rejection>,
    head: &RequestHead<'_>,
    headers: &http::HeaderMap,
    tls: bool,
    stats: &AuthStats,
) -> (Result<Plan, Rejection>, ForwardHeader) {
    let Some(cfg) = &hcm.basic_auth else {
        return (decision, None);
    };
    if let Err(r) = &decision {
        if !crate::decide::refused_after_filters(r) {
            return (decision, None);
        }
    }
    match check(cfg, headers) {
        Ok(user) => {
            stats.basic_auth(true).inc();
            let forward = match &decision {
                Ok(Plan::Forward { .. }) => cfg.forward_username_header.as_deref().and_then(|h| {
                    Some((
                        http::HeaderName::from_bytes(h.as_bytes()).ok()?,
                        http::HeaderValue::from_str(&user).ok()?,
                    ))
                }),
                _ => None,
            };
            (decision, forward)
        }
        Err(denial) => {
            stats.basic_auth(false).inc();
            // Envoy builds the realm after its Host rewrite (`target_host:target_port`).
            let authority = match &decision {
                Ok(Plan::Terminate { target, .. }) => target.authority(),
                Ok(Plan::Forward {
                    authority: Some(a), ..
                }) => a.clone(),
                _ => ferry_proto::request::validate_connect_udp(head)
                    .map(|t| t.authority())
                    .unwrap_or_else(|_| head.authority.unwrap_or_default().to_owned()),
            };
            let scheme = if tls { "https" } else { "http" };
            let r = rejection(denial, scheme, &authority, head.path.unwrap_or_default());
            (Err(r), None)
        }
    }
}

fn constant_time_eq(a: &[u8; 20], b: &[u8; 20]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// Standard base64, padding optional (Envoy's `decodeWithoutPadding`). None if invalid.
fn decode_base64(text: &[u8]) -> Option<Vec<u8>> {
    let text = text
        .strip_suffix(b"==")
        .or_else(|| text.strip_suffix(b"="))
        .unwrap_or(text);
    let mut out = Vec::with_capacity(text.len() / 4 * 3 + 2);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in text {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    (bits < 6).then_some(out)
}

/// SHA-1 (FIPS 180-4), only for htpasswd `{SHA}` hashes, as Envoy uses it.
pub fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let bit_len = (data.len() as u64).wrapping_mul(8);
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn hex(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha1_vectors() {
        assert_eq!(hex(&sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(
            hex(&sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex(&sha1(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        assert_eq!(
            hex(&sha1(b"password")),
            "5baa61e4c9b93f3f0682250b6cf8331b7ee68fd8"
        );
        assert_eq!(
            hex(&sha1(&[b'a'; 1000])),
            "291e9a6c66994949b57ba5e650361e98fc36b1ba"
        );
    }

    #[test]
    fn base64() {
        assert_eq!(decode_base64(b"YWxpY2U6cHc=").unwrap(), b"alice:pw");
        assert_eq!(decode_base64(b"YWxpY2U6cHc").unwrap(), b"alice:pw");
        assert_eq!(decode_base64(b"YQ").unwrap(), b"a");
        assert!(decode_base64(b"Y").is_none());
        assert!(decode_base64(b"YW*x").is_none());
    }

    fn cfg(header: &str) -> BasicAuth {
        BasicAuth {
            users: [("alice".to_owned(), sha1(b"password"))]
                .into_iter()
                .collect(),
            forward_username_header: None,
            authentication_header: header.to_owned(),
        }
    }

    fn headers(name: &'static str, value: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(name, http::HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn checks() {
        let c = cfg("authorization");
        // alice:password
        let good = "Basic YWxpY2U6cGFzc3dvcmQ=";
        assert_eq!(check(&c, &headers("authorization", good)).unwrap(), "alice");
        assert_eq!(check(&c, &http::HeaderMap::new()), Err(Denial::Missing));
        assert_eq!(
            check(&c, &headers("proxy-authorization", good)),
            Err(Denial::Missing)
        );
        assert_eq!(
            check(&c, &headers("authorization", "basic YWxpY2U6cGFzc3dvcmQ=")),
            Err(Denial::Scheme)
        );
        assert_eq!(
            check(&c, &headers("authorization", "Basic YWxpY2U=")),
            Err(Denial::Format)
        );
        assert_eq!(
            check(&c, &headers("authorization", "Basic !!!")),
            Err(Denial::Format)
        );
        // alice:wrong, bob:password
        assert_eq!(
            check(&c, &headers("authorization", "Basic YWxpY2U6d3Jvbmc=")),
            Err(Denial::Credential)
        );
        assert_eq!(
            check(&c, &headers("authorization", "Basic Ym9iOnBhc3N3b3Jk")),
            Err(Denial::Credential)
        );
        let p = cfg("proxy-authorization");
        assert_eq!(
            check(&p, &headers("proxy-authorization", good)).unwrap(),
            "alice"
        );
    }

    #[test]
    fn rejection_has_envoys_challenge() {
        let r = rejection(
            Denial::Missing,
            "https",
            "localhost:9000",
            "/.well-known/masque/udp/localhost/9000/",
        );
        assert_eq!(r.status, 401);
        assert_eq!(
            r.challenge.as_deref(),
            Some("Basic realm=\"https://localhost:9000/.well-known/masque/udp/localhost/9000/\"")
        );
        let long = format!("/{}", "a".repeat(400));
        let r = rejection(Denial::Credential, "https", "h", &long);
        assert_eq!(
            r.challenge.unwrap().len(),
            "Basic realm=\"https://h\"".len() + 256
        );
    }
}
