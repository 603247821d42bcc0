"""The admin endpoint, stats, access logs and drain, on the real binaries.

Differential where Envoy has the feature (both implementations run the same bootstrap):
`/stats` lines in Envoy's text format, `/stats/prometheus` parsed by prometheus_client's
parser with the same families and labels, the admin's health-check and method rules, and
access log lines with the same keys and JSON types. Ferry only: exact CONNECT-UDP counters,
SIGTERM drain (Envoy exits at once on SIGTERM), and `/config_dump` loaded back by Envoy.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    KEY,
    REPO_ROOT,
    ProxyProcess,
    UdpTarget,
    async_wait_until,
    binary_for,
    render_bootstrap,
    run_async,
    skip_if_missing,
    wait_until,
)
from masque_client import MasqueClient, TunnelClosed

WAIT = 3.0
LOG_WAIT = 20.0  # Envoy writes access log files on its own flush schedule

# `name: value` (counter, gauge), `name: "text"` (Envoy's text readouts), or a histogram.
QUANTILE = r"P[0-9.]+\((nan|[0-9.e+-]+),(nan|[0-9.e+-]+)\)"
STATS_LINE = re.compile(
    rf'^[A-Za-z0-9_.\[\]:-]+: (-?\d+|"[^"]*"|No recorded values|{QUANTILE}( {QUANTILE}){{9}})$')


def connect(proxy: ProxyProcess, **kwargs):
    return MasqueClient.connect("127.0.0.1", proxy.listener_port, **kwargs)


async def exchange(proxy: ProxyProcess, target: UdpTarget, payloads: list[bytes]) -> None:
    """One tunnel: every payload out and back (echo), then a clean end."""
    async with connect(proxy) as client:
        tunnel = await client.tunnel("foo.lyft.com", 80)
        assert tunnel.status == 200, tunnel.headers
        for p in payloads:
            tunnel.send(p)
            assert await tunnel.recv(WAIT) == p
        tunnel.finish()
        if proxy.impl == "ferry":
            # Ferry ends the tunnel when the client does; Envoy keeps the stream until the
            # connection closes (the end of this block).
            assert await tunnel.wait_closed(WAIT)


def stats_map(proxy: ProxyProcess, query: str = "") -> dict[str, int]:
    status, body = proxy.admin_get(f"/stats{query}")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(": ")
        if re.fullmatch(r"-?\d+", value):
            out[name] = int(value)
    return out


def post(proxy: ProxyProcess, path: str) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://{proxy.admin}{path}", method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=2.0) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --------------------------------------------------------------------------- stats


def test_stats_lines_match_envoys_format(impl, proxy, udp_target):
    run_async(exchange(proxy, udp_target, [b"one", b"two"]))
    status, body = proxy.admin_get("/stats")
    assert status == 200
    lines = body.decode().splitlines()
    assert lines, "empty /stats"
    bad = [l for l in lines if not STATS_LINE.match(l)]
    assert not bad, f"{impl}: lines not in Envoy's /stats format: {bad[:5]}"
    stats = stats_map(proxy)
    # The HCM stats both implementations have, with the same names.
    assert stats["http.ingress_http.downstream_rq_2xx"] == 1
    assert stats["http.ingress_http.downstream_cx_upgrades_total"] == 1
    assert "listener.127.0.0.1_0.downstream_cx_total" in stats
    assert "cluster.service_target.upstream_cx_total" in stats
    if impl == "ferry":
        p = "http.ingress_http.connect_udp."
        assert stats[p + "tunnels_total"] == 1
        assert stats[p + "downstream_rx_datagrams_quic"] == 2
        assert stats[p + "downstream_tx_datagrams_quic"] == 2
        assert stats[p + "downstream_rx_bytes"] == 6
        assert stats[p + "upstream_datagrams_tx"] == 2
        assert stats["cluster.service_target.upstream_cx_total"] == 1
    # filter= is a regular expression on the name; usedonly drops what was never written.
    filtered = stats_map(proxy, "?filter=%5Ehttp%5C.ingress_http%5C.downstream_rq_%5B0-9%5Dxx%24")
    assert sorted(filtered) == [f"http.ingress_http.downstream_rq_{c}xx" for c in "12345"]
    used = stats_map(proxy, "?usedonly&filter=downstream_rq_")
    assert "http.ingress_http.downstream_rq_2xx" in used
    assert "http.ingress_http.downstream_rq_5xx" not in used


# The families both implementations expose, with their label names.
SHARED_FAMILIES = {
    "envoy_http_downstream_rq_xx": {"envoy_response_code_class", "envoy_http_conn_manager_prefix"},
    "envoy_http_downstream_cx_total": {"envoy_http_conn_manager_prefix"},
    "envoy_http_downstream_cx_upgrades_total": {"envoy_http_conn_manager_prefix"},
    "envoy_listener_downstream_cx_total": {"envoy_listener_address"},
    "envoy_listener_http_downstream_rq_xx": {
        "envoy_response_code_class", "envoy_http_conn_manager_prefix", "envoy_listener_address"},
    "envoy_cluster_upstream_cx_total": {"envoy_cluster_name"},
    "envoy_http_downstream_cx_length_ms": {"envoy_http_conn_manager_prefix"},
}


def test_prometheus_parses(impl, proxy, udp_target):
    run_async(exchange(proxy, udp_target, [b"x"]))
    status, body = proxy.admin_get("/stats/prometheus")
    assert status == 200
    text = body.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    types = [l.split()[2] for l in text.splitlines() if l.startswith("# TYPE ")]
    assert len(types) == len(set(types)), f"{impl}: a family is declared twice"
    for name, labels in SHARED_FAMILIES.items():
        # prometheus_client strips `_total` from counter family names.
        fam = families.get(name) or families.get(name.removesuffix("_total"))
        assert fam is not None, f"{impl}: no family {name}"
        for s in fam.samples:
            assert set(s.labels) - {"le"} == labels, f"{impl}: {s}"
    rq = families["envoy_http_downstream_rq_xx"]
    two = [s for s in rq.samples if s.labels.get("envoy_response_code_class") == "2"
           and s.labels.get("envoy_http_conn_manager_prefix") == "ingress_http"]
    assert [s.value for s in two] == [1.0]
    for fam in families.values():
        if fam.type != "histogram":
            continue
        for labels in {tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                       for s in fam.samples}:
            series = [s for s in fam.samples
                      if tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")) == labels]
            buckets = [s.value for s in series if s.name.endswith("_bucket")]
            count = [s.value for s in series if s.name.endswith("_count")]
            assert buckets == sorted(buckets), f"{impl}: {fam.name} buckets not cumulative"
            assert count and buckets[-1] == count[0], f"{impl}: {fam.name} +Inf != count"
    if impl == "ferry":
        tunnels = families["envoy_http_connect_udp_tunnels"]
        assert [(s.labels, s.value) for s in tunnels.samples] == [
            ({"envoy_http_conn_manager_prefix": "ingress_http"}, 1.0)]
        duration = families["envoy_http_connect_udp_tunnel_duration_ms"]
        count = [s for s in duration.samples if s.name.endswith("_count")]
        assert count[0].value == 1.0
        json_stats = json.loads(proxy.admin_get("/stats?format=json&filter=tunnels_total")[1])
        assert json_stats["stats"] == [
            {"name": "http.ingress_http.connect_udp.tunnels_total", "value": 1}]


# --------------------------------------------------------------------------- admin


def test_health_checks_and_methods(impl, proxy):
    assert proxy.admin_get("/ready") == (200, b"LIVE\n")
    status, body = proxy.admin_get("/healthcheck/fail")
    assert (status, body) == (405, b"Method GET not allowed, POST required.")
    assert post(proxy, "/healthcheck/fail") == (200, b"OK\n")
    assert proxy.admin_get("/ready") == (503, b"DRAINING\n")
    info = json.loads(proxy.admin_get("/server_info")[1])
    assert info["state"] == "DRAINING"
    assert post(proxy, "/healthcheck/ok") == (200, b"OK\n")
    assert proxy.admin_get("/ready") == (200, b"LIVE\n")
    clusters = json.loads(proxy.admin_get("/clusters?format=json")[1])
    assert clusters["cluster_statuses"][0]["name"] == "service_target"


def test_config_dump_is_a_bootstrap_envoy_accepts(proxy, workdir):
    """Ferry's /config_dump bootstrap (its effective config) validates in Envoy and Ferry.
    For Envoy: its own dump starts with the BootstrapConfigDump Ferry's mirrors."""
    if proxy.impl != "ferry":
        dump = json.loads(proxy.admin_get("/config_dump")[1])
        assert dump["configs"][0]["@type"].endswith("BootstrapConfigDump"), dump["configs"][0]["@type"]
        assert "static_resources" in dump["configs"][0]["bootstrap"]
        return
    skip_if_missing("envoy")
    dump = json.loads(proxy.admin_get("/config_dump")[1])
    assert [c["@type"].rsplit(".", 1)[1] for c in dump["configs"]] == [
        "BootstrapConfigDump", "ClustersConfigDump", "ListenersConfigDump", "RoutesConfigDump"]
    text = json.dumps(dump["configs"][0]["bootstrap"])
    assert "PRIVATE KEY" not in text
    text = text.replace(json.dumps("[redacted]"), json.dumps(KEY.read_text()))
    path = workdir / "dumped.json"
    path.write_text(text)
    for impl in ("envoy", "ferry"):
        result = subprocess.run([str(binary_for(impl)), "--mode", "validate", "-c", str(path)],
                                capture_output=True, text=True, timeout=30,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"{impl} rejected the dump:\n{result.stdout}\n{result.stderr}"


# --------------------------------------------------------------------------- access logs


def read_json_lines(path: Path, n: int, timeout: float) -> list[dict]:
    def ready() -> bool:
        return path.exists() and len(path.read_text().splitlines()) >= n

    wait_until(ready, timeout, f"{n} lines in {path.name}")
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_access_log_lines(impl, start_proxy, udp_target, workdir):
    text_log, json_log = workdir / f"{impl}-text.log", workdir / f"{impl}-json.log"
    proxy = start_proxy("terminate-h3-access-log.yaml.in", TEXT_LOG=text_log, JSON_LOG=json_log)
    run_async(exchange(proxy, udp_target, [b"hello", b"world!"]))
    [line] = read_json_lines(json_log, 1, LOG_WAIT)
    expected_types = {
        "code": int, "duration": int, "bytes_received": int, "bytes_sent": int,
        "protocol": str, "flags": str, "upstream_host": str, "upstream_cluster": str,
        "client": str, "start_time": str, "authority": str, "path": str, "sni": str,
    }
    for key, typ in expected_types.items():
        assert isinstance(line[key], typ), f"{impl}: {key}={line[key]!r}"
    assert line["code"] == 200
    assert line["flags"] == "-"
    assert line["protocol"] == "HTTP/3"
    assert line["details"] == "via_upstream"
    assert line["authority"] == "foo.lyft.com:80"  # the rewritten Host, in both
    assert line["upstream_host"] == f"127.0.0.1:{udp_target.port}"
    assert line["upstream_cluster"] == "service_target"
    assert line["sni"] == "localhost"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["start_time"])
    text = text_log.read_text().splitlines()
    assert len(text) == 1 and text[0].startswith("["), text
    if impl == "ferry":
        # UDP payload bytes and datagrams; Envoy counts capsule bytes and has no datagram
        # fields (null), and logs the method as GET (its internal HTTP/1 upgrade form).
        assert line["method"] == "CONNECT"
        assert (line["bytes_received"], line["bytes_sent"]) == (11, 11)
        assert (line["datagrams_received"], line["datagrams_sent"]) == (2, 2)
        assert line["datagrams_dropped"] == 0
        assert line["target"] == "foo.lyft.com:80"
        assert '"CONNECT /.well-known/masque/udp/foo.lyft.com/80/ HTTP/3" 200 - 11 11 ' in text[0]
    else:
        assert line["target"] is None


# --------------------------------------------------------------------------- drain


def start_ferry(workdir: Path, udp_target: UdpTarget, request, *extra_args: str) -> ProxyProcess:
    skip_if_missing("ferry")
    cfg = render_bootstrap("terminate-h3.yaml.in", workdir / "ferry-drain.yaml",
                           ECHO_PORT=udp_target.port)
    proxy = ProxyProcess("ferry", cfg, workdir, request.node.name, log_level="info",
                         extra_args=extra_args)
    proxy.wait_ready()
    return proxy


@pytest.fixture
def drain_ferry(workdir, udp_target, request):
    started: list[ProxyProcess] = []

    def start(*extra_args: str) -> ProxyProcess:
        proxy = start_ferry(workdir, udp_target, request, *extra_args)
        started.append(proxy)
        return proxy

    yield start
    for p in started:
        p.stop()


async def new_connection_refused(proxy: ProxyProcess) -> bool:
    try:
        async with connect(proxy, timeout=2.0, idle_timeout=2.0) as client:
            t = client.open_tunnel("foo.lyft.com", 80)
            await t.wait_status(2.0)
            return False
    except (ConnectionError, asyncio.TimeoutError, TunnelClosed):
        return True


def test_sigterm_drains_then_exits_cleanly(drain_ferry, udp_target):
    proxy = drain_ferry("--drain-time-s", "30")

    async def body():
        async with connect(proxy) as client:
            tunnel = await client.tunnel("foo.lyft.com", 80)
            assert tunnel.status == 200
            tunnel.send(b"before")
            assert await tunnel.recv(WAIT) == b"before"

            proxy.proc.send_signal(signal.SIGTERM)
            assert await async_wait_until(
                lambda: proxy.admin_get("/ready")[0] == 503, WAIT), "never DRAINING"
            # The open tunnel keeps working during the drain.
            tunnel.send(b"during")
            assert await tunnel.recv(WAIT) == b"during"
            # New connections are refused; a new request on the open connection too (GOAWAY).
            assert await new_connection_refused(proxy)
            late = client.open_tunnel("foo.lyft.com", 80)
            with pytest.raises(TunnelClosed):
                await late.wait_status(WAIT)
            tunnel.send(b"after")
            assert await tunnel.recv(WAIT) == b"after"
            assert proxy.alive()
            # The last tunnel ends: Ferry exits 0 without waiting for the drain time.
            tunnel.finish()
            assert await tunnel.wait_closed(WAIT)
        assert await proxy.wait_dead(10.0), "ferry did not exit after the drain"

    run_async(body())
    assert proxy.proc.returncode == 0, proxy.log_tail()
    assert "drain complete" in proxy.log_path.read_text()


def test_sigterm_drain_time_closes_remaining_tunnels(drain_ferry, udp_target):
    proxy = drain_ferry("--drain-time-s", "1")

    async def body():
        async with connect(proxy) as client:
            tunnel = await client.tunnel("foo.lyft.com", 80)
            tunnel.send(b"a")
            assert await tunnel.recv(WAIT) == b"a"
            proxy.proc.send_signal(signal.SIGTERM)
            tunnel.send(b"b")
            assert await tunnel.recv(WAIT) == b"b"
            # Never finished by the client: closed by Ferry when the drain time is over.
            assert await tunnel.wait_closed(10.0)
        assert await proxy.wait_dead(10.0)

    run_async(body())
    assert proxy.proc.returncode == 0, proxy.log_tail()
    assert "drain time (1s) is over" in proxy.log_path.read_text()


def test_drain_listeners_then_quit(drain_ferry, udp_target):
    proxy = drain_ferry()

    async def body():
        async with connect(proxy) as client:
            tunnel = await client.tunnel("foo.lyft.com", 80)
            assert post(proxy, "/drain_listeners?graceful") == (200, b"OK\n")
            tunnel.send(b"x")
            assert await tunnel.recv(WAIT) == b"x"
            assert await new_connection_refused(proxy)
            assert proxy.alive()
            assert stats_map(proxy)["listener_manager.total_listeners_draining"] == 1
        assert post(proxy, "/quitquitquit") == (200, b"OK\n")
        assert await proxy.wait_dead(10.0)

    run_async(body())
    assert proxy.proc.returncode == 0
