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
