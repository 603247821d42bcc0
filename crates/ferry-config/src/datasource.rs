//! `envoy.config.core.v3.DataSource` contents: base64 (`inline_bytes`) and PEM checks.

/// Decodes protobuf JSON `bytes`: standard or URL-safe base64, padding optional.
/// Whitespace (line breaks in long values) is ignored.
pub(crate) fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3 + 3);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    let mut padding = 0usize;
    for b in text.bytes() {
        if b.is_ascii_whitespace() {
            continue;
        }
        if b == b'=' {
            padding += 1;
            continue;
        }
        if padding > 0 {
            return None; // data after padding
        }
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    // Leftover bits must be fewer than a byte (6 bits of one lone character is invalid).
    if bits >= 6 || padding > 2 {
        return None;
    }
    Some(out)
}

/// What a PEM DataSource must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PemKind {
    CertificateChain,
    PrivateKey,
    /// Any text (an htpasswd users list).
    Text,
}

impl PemKind {
    /// Checks that `text` holds at least one PEM block of this kind (begin and end lines).
    pub(crate) fn check(self, text: &str) -> Result<(), String> {
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let (found, wanted) = match self {
            PemKind::Text => return Ok(()),
            PemKind::CertificateChain => (
                lines.contains(&"-----BEGIN CERTIFICATE-----")
                    && lines.contains(&"-----END CERTIFICATE-----"),
                "a PEM certificate (-----BEGIN CERTIFICATE----- ... -----END CERTIFICATE-----)",
            ),
            PemKind::PrivateKey => (
                lines
                    .iter()
                    .any(|l| l.starts_with("-----BEGIN ") && l.ends_with("PRIVATE KEY-----"))
                    && lines
                        .iter()
                        .any(|l| l.starts_with("-----END ") && l.ends_with("PRIVATE KEY-----")),
                "a PEM private key (-----BEGIN PRIVATE KEY-----, or RSA/EC PRIVATE KEY)",
            ),
        };
        if found {
            Ok(())
        } else {
            Err(format!("does not contain {wanted}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64() {
        assert_eq!(decode_base64("aGVsbG8="), Some(b"hello".to_vec()));
        assert_eq!(decode_base64("aGVsbG8"), Some(b"hello".to_vec()));
        assert_eq!(decode_base64("aGVs\nbG8h"), Some(b"hello!".to_vec()));
        assert_eq!(decode_base64(""), Some(Vec::new()));
        assert_eq!(decode_base64("-_8="), Some(vec![0xfb, 0xff]));
        assert_eq!(decode_base64("+/8="), Some(vec![0xfb, 0xff]));
        assert_eq!(decode_base64("a"), None);
        assert_eq!(decode_base64("aGVsbG8=x"), None);
        assert_eq!(decode_base64("a*b="), None);
    }

    #[test]
    fn pem() {
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let key = "-----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----\n";
        assert!(PemKind::CertificateChain.check(cert).is_ok());
        assert!(PemKind::CertificateChain.check(key).is_err());
        assert!(PemKind::PrivateKey.check(key).is_ok());
        assert!(PemKind::PrivateKey.check(cert).is_err());
        assert!(PemKind::PrivateKey.check("").is_err());
    }
}
