"""Differential tests: Envoy's basic_auth HTTP filter in front of CONNECT-UDP over HTTP/3,
Envoy 1.40 vs Ferry, on the same bootstrap (bootstraps/basic-auth-h3.yaml.in).

Both must answer good credentials with a tunnel (200, UDP relayed), and bad, missing or
misplaced ones with 401 and the same ``www-authenticate`` challenge, and count the
outcomes in ``http.<stat_prefix>.basic_auth.allowed`` / ``.denied``. Ferry's 401 also
carries ``proxy-status`` (Envoy's has a text body instead).
"""

from __future__ import annotations

import base64

import pytest

from conftest import async_wait_until, plus_0x10, run_async
from masque_client import MasqueClient

WAIT = 3.0
REALM = 'Basic realm="https://foo.lyft.com:80/.well-known/masque/udp/foo.lyft.com/80/"'


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


CASES = [
    # (name, headers, expected status)
    ("good", [("authorization", basic("alice", "password"))], 200),
    ("good-second-user", [("authorization", basic("bob", "test"))], 200),
    ("wrong-password", [("authorization", basic("alice", "wrong"))], 401),
    ("unknown-user", [("authorization", basic("mallory", "password"))], 401),
    ("missing", [], 401),
    ("other-scheme", [("authorization", "Bearer abc")], 401),
    ("no-colon", [("authorization", "Basic " + base64.b64encode(b"alice").decode())], 401),
    # The filter reads `authorization` unless authentication_header says otherwise.
    ("proxy-authorization-ignored", [("proxy-authorization", basic("alice", "password"))], 401),
]


@pytest.mark.parametrize("name,headers,expected", CASES, ids=[c[0] for c in CASES])
def test_basic_auth_h3(impl, start_proxy, udp_target, name, headers, expected):
    proxy = start_proxy("basic-auth-h3.yaml.in", AUTH_HEADER="authorization", DOMAIN='"*"')

    async def go():
        async with MasqueClient.connect("127.0.0.1", proxy.listener_port) as client:
            tunnel = await client.tunnel("foo.lyft.com", 80, extra_headers=headers)
            assert tunnel.status == expected, f"{impl} {name}: {tunnel.status} {tunnel.headers}"
            if expected == 200:
                udp_target.reply = plus_0x10
                tunnel.send(b"\xa1\xa2")
                assert await async_wait_until(lambda: udp_target.saw(b"\xa1\xa2"), WAIT)
                assert await tunnel.recv(WAIT) == b"\xb1\xb2"
            else:
                assert tunnel.header("www-authenticate") == REALM, f"{impl}: {tunnel.headers}"
                if impl == "ferry":
                    ps = tunnel.header("proxy-status") or ""
                    assert ps.startswith("ferry; error=http_request_denied"), ps
                    assert "User authentication failed." in ps, ps
                assert udp_target.payloads() == []

    run_async(go())
    allowed, denied = (1, 0) if expected == 200 else (0, 1)
    assert proxy.counter("http.ingress_http.basic_auth.allowed") == allowed
    assert proxy.counter("http.ingress_http.basic_auth.denied") == denied


def test_basic_auth_proxy_authorization_header(impl, start_proxy, udp_target):
    """authentication_header: proxy-authorization, as a CONNECT-UDP client would send."""
    proxy = start_proxy("basic-auth-h3.yaml.in", AUTH_HEADER="proxy-authorization", DOMAIN='"*"')

    async def go():
        async with MasqueClient.connect("127.0.0.1", proxy.listener_port) as client:
            good = await client.tunnel(
                "foo.lyft.com", 80, extra_headers=[("proxy-authorization", basic("alice", "password"))])
            assert good.status == 200, f"{impl}: {good.headers}"
            plain = await client.tunnel(
                "foo.lyft.com", 80, extra_headers=[("authorization", basic("alice", "password"))])
            assert plain.status == 401, f"{impl}: {plain.headers}"

    run_async(go())
    assert proxy.counter("http.ingress_http.basic_auth.allowed") == 1
    assert proxy.counter("http.ingress_http.basic_auth.denied") == 1


def test_basic_auth_runs_before_the_route_lookup(impl, start_proxy):
    """Envoy's filters run before its router: a request that matches no virtual host gets
    401 without credentials and 404 only with good ones."""
    proxy = start_proxy("basic-auth-h3.yaml.in", AUTH_HEADER="authorization",
                        DOMAIN='"only.example:443"')

    async def go():
        async with MasqueClient.connect("127.0.0.1", proxy.listener_port) as client:
            anonymous = await client.tunnel("foo.lyft.com", 80)
            assert anonymous.status == 401, f"{impl}: {anonymous.headers}"
            assert anonymous.header("www-authenticate") == REALM
            authed = await client.tunnel(
                "foo.lyft.com", 80, extra_headers=[("authorization", basic("alice", "password"))])
            assert authed.status == 404, f"{impl}: {authed.headers}"

    run_async(go())
    assert proxy.counter("http.ingress_http.basic_auth.allowed") == 1
    assert proxy.counter("http.ingress_http.basic_auth.denied") == 1


# --------------------------------------------------------------------------- mutual TLS


def _write_pki(directory) -> dict[str, str]:
    """A client CA, a client certificate it signed, and one signed by another CA (PEM files)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn: str):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cert, key

    def leaf(issuer, issuer_key):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name("client.test"))
                .issuer_name(issuer.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("client.test")]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(issuer_key, hashes.SHA256()))
        return cert, key

    def write(stem: str, cert, key=None) -> None:
        (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (directory / f"{stem}.key").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))

    good_ca, good_key = ca("interop client CA")
    other_ca, other_key = ca("some other CA")
    write("client-ca", good_ca)
    write("trusted", *leaf(good_ca, good_key))
    write("untrusted", *leaf(other_ca, other_key))
    return {stem: str(directory / stem) for stem in ("client-ca", "trusted", "untrusted")}


def _h2_settings_over_tls(port: int, client: str | None) -> bool:
    """TLS (ALPN h2) with the given client certificate, then the HTTP/2 preface: whether
    the server's SETTINGS came back (False: the handshake or the connection failed)."""
    import socket
    import ssl

    from conftest import CERT

    ctx = ssl.create_default_context(cafile=str(CERT))
    ctx.set_alpn_protocols(["h2"])
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if client is not None:
        ctx.load_cert_chain(f"{client}.pem", f"{client}.key")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
                head = sock.recv(9)
                return len(head) == 9 and head[3] == 0x4  # a SETTINGS frame
    except (OSError, ssl.SSLError):
        return False


SSL = "listener.127.0.0.1_0.ssl."


def test_mtls_tcp(impl, start_proxy, workdir):
    """Trusted, untrusted and no client certificate on a TLS TCP listener."""
    pki = _write_pki(workdir)
    proxy = start_proxy("mtls-tcp.yaml.in", CLIENT_CA=pki["client-ca"] + ".pem")
    assert _h2_settings_over_tls(proxy.listener_port, pki["trusted"]), impl
    assert not _h2_settings_over_tls(proxy.listener_port, pki["untrusted"]), impl
    assert not _h2_settings_over_tls(proxy.listener_port, None), impl
    stats = proxy.stats()
    assert stats.get(SSL + "fail_verify_error") == "1", {k: v for k, v in stats.items() if ".ssl." in k}
    assert stats.get(SSL + "fail_verify_no_cert") == "1", {k: v for k, v in stats.items() if ".ssl." in k}


def test_mtls_h3(impl, start_proxy, workdir, udp_target):
    """Trusted, untrusted and no client certificate on an HTTP/3 listener."""
    pki = _write_pki(workdir)
    proxy = start_proxy("mtls-h3.yaml.in", CLIENT_CA=pki["client-ca"] + ".pem")

    async def attempt(client: str | None) -> int | str:
        cert = None if client is None else (f"{client}.pem", f"{client}.key")
        try:
            async with MasqueClient.connect("127.0.0.1", proxy.listener_port, client_cert=cert,
                                            timeout=WAIT) as c:
                tunnel = await c.tunnel("foo.lyft.com", 80, timeout=WAIT)
                return tunnel.status
        except Exception as e:  # the handshake or the connection failed
            return repr(e)

    assert run_async(attempt(pki["trusted"])) == 200, impl
    # Both close the connection with the TLS alert as a QUIC CRYPTO_ERROR (0x100 + alert):
    # unknown_ca (48) for a certificate from another CA, certificate_required (116) for none.
    untrusted = run_async(attempt(pki["untrusted"]))
    assert "0x130" in str(untrusted), f"{impl}: untrusted client certificate: {untrusted}"
    none = run_async(attempt(None))
    assert "0x174" in str(none), f"{impl}: no client certificate: {none}"
    stats = proxy.stats()
    assert stats.get(SSL + "fail_verify_error") == "1", stats
    # Envoy 1.40 does not count a QUIC client without a certificate; Ferry counts it as on TCP.
    assert stats.get(SSL + "fail_verify_no_cert") == ("1" if impl == "ferry" else "0"), stats


# --------------------------------------------------------------------------- forwarding


@pytest.mark.parametrize("first_impl", ["envoy", "ferry"])
def test_forward_username_header(first_impl, spawn_proxy, workdir, udp_target):
    """A first hop with basic_auth and forward_username_header forwards the user name (and,
    as Envoy does, the credentials) to the next hop, here Envoy logging both."""
    import json
    import time

    from conftest import render_bootstrap

    log = workdir / "next-hop.json"
    term = render_bootstrap("terminate-h3-access-log.yaml.in", workdir / "next-hop.yaml",
                            ECHO_PORT=udp_target.port, TEXT_LOG=workdir / "next-hop.txt", JSON_LOG=log)
    text = term.read_text()
    anchor = '                  method: "%REQ(:METHOD)%"\n'
    assert anchor in text
    term.write_text(text.replace(anchor, '                  user: "%REQ(X-USER)%"\n'
                                         '                  credentials: "%REQ(AUTHORIZATION)%"\n' + anchor))
    next_hop = spawn_proxy("envoy", "envoy-next", config=term)
    fwd = render_bootstrap("forward-h3.yaml.in", workdir / "first-hop.yaml",
                           NEXT_HOP_PORT=next_hop.listener_port)
    text = fwd.read_text()
    assert "          http_filters:\n" in text
    fwd.write_text(text.replace("          http_filters:\n", """          http_filters:
          - name: envoy.filters.http.basic_auth
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.basic_auth.v3.BasicAuth
              users: { inline_string: "alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=" }
              forward_username_header: x-user
"""))
    first = spawn_proxy(first_impl, f"{first_impl}-first", config=fwd)
    creds = basic("alice", "password")

    async def go():
        async with MasqueClient.connect("127.0.0.1", first.listener_port) as client:
            tunnel = await client.tunnel("foo.lyft.com", 80, extra_headers=[("authorization", creds)])
            assert tunnel.status == 200, f"{first_impl}: {tunnel.headers}"
            refused = await client.tunnel("foo.lyft.com", 80)
            assert refused.status == 401

    run_async(go())
    # The next hop writes its line when the tunnel ends (the client closed it) and flushes
    # its log about once a second.
    deadline = time.monotonic() + 10
    lines: list[dict] = []
    while time.monotonic() < deadline and not lines:
        if log.exists():
            lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        time.sleep(0.1)
    assert len(lines) == 1, lines
    assert lines[0]["user"] == "alice", lines
    assert lines[0]["credentials"] == creds, lines
