//! TLS configuration from the PEM material the config carries.

use std::sync::Arc;

use ferry_config::ServerTls;

use crate::stats::HandshakeFailure;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_bytes()).collect();
    let certs = certs.map_err(|e| format!("bad certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in PEM".into());
    }
    Ok(certs)
}

pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| format!("bad private key PEM: {e}"))?
        .ok_or_else(|| "no private key in PEM".to_string())
}

/// A TLS 1.3 server config for QUIC with the given ALPN protocols.
pub fn server_config(tls: &ServerTls, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, String> {
    build_server_config(tls, alpn, &[&rustls::version::TLS13])
}

/// A TLS 1.2 and 1.3 server config for TCP listeners (Envoy's defaults) with ALPN.
pub fn tcp_server_config(tls: &ServerTls, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, String> {
    build_server_config(
        tls,
        alpn,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    )
}

fn build_server_config(
    tls: &ServerTls,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<rustls::ServerConfig, String> {
    let pair = match tls.certificates.as_slice() {
        [one] => one,
        [] => return Err("tls_certificates: at least one certificate is required".into()),
        _ => {
            return Err(
                "tls_certificates: Ferry supports one certificate per listener for now".into(),
            )
        }
    };
    let certs = parse_certs(&pair.certificate_chain_pem)?;
    let key = parse_key(&pair.private_key_pem)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?;
    let builder = match &tls.client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca_pem) => builder
            .with_client_cert_verifier(client_verifier(ca_pem, tls.require_client_certificate)?),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not form a usable pair: {e}"))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Mutual TLS: client certificates are verified against `ca_pem`
/// (`validation_context.trusted_ca`); without `require`, a client may send none (as in
/// Envoy, a certificate that is sent must still verify).
fn client_verifier(
    ca_pem: &str,
    require: bool,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_certs(ca_pem).map_err(|e| format!("validation_context.trusted_ca: {e}"))? {
        roots
            .add(cert)
            .map_err(|e| format!("validation_context.trusted_ca: bad CA certificate: {e}"))?;
    }
    let builder =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let builder = if require {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder
        .build()
        .map_err(|e| format!("validation_context.trusted_ca: {e}"))
}

/// Which `ssl.*` counter a failed TLS handshake counts in (Envoy's names).
pub fn classify_failure(error: Option<&rustls::Error>) -> HandshakeFailure {
    match error {
        Some(rustls::Error::NoCertificatesPresented) => HandshakeFailure::NoCert,
        Some(rustls::Error::InvalidCertificate(_)) => HandshakeFailure::VerifyError,
        _ => HandshakeFailure::ConnectionError,
    }
}

/// The same for a QUIC handshake, from the TLS alert the server closed with. None: the
/// connection failed for another reason (timeout, the client went away).
pub fn classify_quic_failure(error: &quinn::ConnectionError) -> Option<HandshakeFailure> {
    let quinn::ConnectionError::TransportError(t) = error else {
        return None;
    };
    let code = u64::from(t.code);
    // TLS alerts are carried as CRYPTO_ERROR 0x100 + alert (RFC 9001 section 4.8).
    let alert = code.checked_sub(0x100).filter(|a| *a <= 0xff)?;
    Some(match alert {
        // certificate_required
        116 => HandshakeFailure::NoCert,
        // bad_certificate, unsupported_certificate, certificate_revoked,
        // certificate_expired, certificate_unknown, unknown_ca
        42..=46 | 48 => HandshakeFailure::VerifyError,
        _ => HandshakeFailure::ConnectionError,
    })
}

/// A TLS 1.3 client config trusting `ca_pem` (or nothing is verified when `insecure`).
pub fn client_config(
    ca_pem: Option<&str>,
    insecure: bool,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?;
    let mut config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for cert in parse_certs(ca_pem.unwrap_or(""))? {
            roots
                .add(cert)
                .map_err(|e| format!("bad CA certificate: {e}"))?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Accepts any server certificate: only for an explicit `--insecure`.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
