#!/usr/bin/env python3
"""Soak test: mixed CONNECT-UDP traffic against one Ferry process, then check it let go.

Usage (from the repository root, after scripts/setup-venv.sh and cargo build --release):

    .venv/bin/python scripts/soak.py --duration 600      # the 10-minute soak
    .venv/bin/python scripts/soak.py --duration 60       # what CI runs (tests/interop/test_soak.py)

One Ferry (FERRY_BIN, default target/release/ferry) with an HTTP/3 listener and a TLS TCP
listener (HTTP/2 + HTTP/1.1), both terminating to a UDP echo target in this process. For
``--duration`` seconds, workers open and close tunnels constantly:

- HTTP/3 workers (aioquic): a connection carries a few tunnels one after another and
  several at once; each tunnel echoes 1-5 datagrams (QUIC datagrams, or DATAGRAM capsules
  for a capsule-only client), then ends by FIN; every few connections one is abandoned
  without a stream end (its tunnels end by the connection's close);
- HTTP/2 workers (h2 over TLS): tunnels opened, echoed, ended by END_STREAM or by closing
  the connection; HTTP/1.1 Upgrade tunnels now and then.

Every second it samples the process's open file descriptors (/proc/PID/fd) and RSS
(VmRSS). When traffic stops it waits (bounded) for tunnels_active and downstream_cx_active
to reach 0, then asserts:

- the process never exited, and logged no panic (server.ferry.task_panics == 0);
- open fds are back to the baseline taken before traffic, within --fd-tolerance (default 2);
- RSS is within --rss-tolerance-mib (default 32 MiB) of the baseline: the allocator keeps
  some freed memory, a leak of one tunnel's state per tunnel would exceed it well before the
  end of a long run (tens of thousands of tunnels);
- each worker kind completed tunnels, and almost every echo came back (loopback).

Prints one JSON summary line; exits 0 if every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "interop"))

from conftest import BOOTSTRAPS, ProxyProcess, UdpTarget, render_bootstrap, wait_until  # noqa: E402
from masque_client import MasqueClient  # noqa: E402
from tcp_client import H1Tunnel, H2Client  # noqa: E402

H3_TUNNELS = "http.ingress_http.connect_udp.tunnels_active"
TCP_TUNNELS = "http.ingress_tcp.connect_udp.tunnels_active"
CX_ACTIVE = ("http.ingress_http.downstream_cx_active", "http.ingress_tcp.downstream_cx_active")


def combined_bootstrap(dest: Path, echo_port: int) -> Path:
    """terminate-h3.yaml.in plus the TCP listener of terminate-tcp-h2-h1.yaml.in."""
    h3 = (BOOTSTRAPS / "terminate-h3.yaml.in").read_text()
    tcp = (BOOTSTRAPS / "terminate-tcp-h2-h1.yaml.in").read_text()
    tcp_listener = tcp.split("  listeners:\n", 1)[1].split("  clusters:\n", 1)[0]
    tcp_listener = tcp_listener.replace("@PROXY_PORT@", "0")
    text = h3.replace("  clusters:\n", tcp_listener + "  clusters:\n", 1)
    tmpl = dest.with_suffix(".in")
    tmpl.write_text(text)
    # render_bootstrap reads templates from BOOTSTRAPS; render by hand with the same rules.
    for name, value in {"PROXY_PORT": 0, "ADMIN_PORT": 0, "ECHO_PORT": echo_port,
                        "CERT": REPO / "examples/certs/cert.pem",
                        "KEY": REPO / "examples/certs/key.pem"}.items():
        text = text.replace(f"@{name}@", str(value))
    assert "@" not in text.replace('"@type"', ""), "unreplaced placeholder"
    dest.write_text(text)
    return dest


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.c: dict[str, int] = {}

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.c[key] = self.c.get(key, 0) + n


def proc_sample(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss_kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    return fds, rss_kib


# --------------------------------------------------------------------------- HTTP/3 worker


async def h3_worker(port: int, stop: float, tally: Tally, rng: random.Random, capsules: bool) -> None:
    while time.monotonic() < stop:
        try:
            async with MasqueClient.connect("127.0.0.1", port, h3_datagram=not capsules,
                                            idle_timeout=30.0, timeout=5.0) as client:
                tally.add("h3_connections")
                abandon = rng.random() < 0.2
                for _ in range(rng.randint(2, 8)):
                    if time.monotonic() >= stop:
                        break
                    tunnels = [client.open_tunnel("foo.lyft.com", 80) for _ in range(rng.randint(1, 4))]
                    for t in tunnels:
                        if await t.wait_status(5.0) != 200:
                            tally.add("h3_refused")
                            continue
                        tally.add("h3_tunnels")
                        for i in range(rng.randint(1, 5)):
                            payload = os.urandom(rng.randint(1, 1000))
                            t.send(payload)
                            tally.add("echo_sent")
                            if await t.recv_or_none(2.0) == payload:
                                tally.add("echo_ok")
                    if abandon:
                        break  # leave the tunnels open: the connection's close ends them
                    for t in tunnels:
                        t.finish()
                        await t.wait_closed(2.0)
        except Exception as e:  # noqa: BLE001 - a soak counts client errors, it does not stop
            tally.add("h3_errors")
            tally.add(f"h3_error:{type(e).__name__}")
            await asyncio.sleep(0.1)


async def h3_workers(port: int, stop: float, tally: Tally, n: int, seed: int) -> None:
    await asyncio.gather(*(h3_worker(port, stop, tally, random.Random(seed + i), capsules=(i % 3 == 2))
                           for i in range(n)))


# --------------------------------------------------------------------------- HTTP/2 + 1.1 worker


def tcp_worker(port: int, stop: float, tally: Tally, rng: random.Random) -> None:
    while time.monotonic() < stop:
        try:
            if rng.random() < 0.15:
                t = H1Tunnel(port)
                try:
                    if t.request() == 101:
                        tally.add("h1_tunnels")
                        payload = os.urandom(rng.randint(1, 500))
                        t.send(payload)
                        tally.add("echo_sent")
                        if t.recv(2.0) == payload:
                            tally.add("echo_ok")
                finally:
                    t.sock.close()
                continue
            with H2Client(port) as client:
                tally.add("h2_connections")
                for _ in range(rng.randint(1, 8)):
                    if time.monotonic() >= stop:
                        break
                    st = client.tunnel(timeout=5.0)
                    if st.status != 200:
                        tally.add("h2_refused")
                        continue
                    tally.add("h2_tunnels")
                    for _ in range(rng.randint(1, 5)):
                        payload = os.urandom(rng.randint(1, 1000))
                        st.send(payload)
                        tally.add("echo_sent")
                        if st.recv(2.0) == payload:
                            tally.add("echo_ok")
                    if rng.random() < 0.7:
                        client.send_data(st.stream_id, b"", end_stream=True)
                        st.wait_closed(2.0)
                    # else: left open, ended when the connection closes
        except Exception as e:  # noqa: BLE001
            tally.add("tcp_errors")
            tally.add(f"tcp_error:{type(e).__name__}")
            time.sleep(0.1)


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    ap.add_argument("--h3-workers", type=int, default=6)
    ap.add_argument("--tcp-workers", type=int, default=3)
    ap.add_argument("--fd-tolerance", type=int, default=2)
    ap.add_argument("--rss-tolerance-mib", type=float, default=32.0)
    ap.add_argument("--settle", type=float, default=20.0, help="bound for tunnels/connections to drain")
    ap.add_argument("--seed", type=int, default=9298)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ferry-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    target = UdpTarget()
    cfg = combined_bootstrap(workdir / "soak.yaml", target.port)
    proxy = ProxyProcess("ferry", cfg, workdir, "soak", log_level="warning")
    failures: list[str] = []
    summary: dict = {"duration_s": args.duration, "workdir": str(workdir)}
    try:
        proxy.wait_ready()
        h3_port = proxy.discover_listener_port("h3_listener")
        tcp_port = proxy.discover_listener_port("tcp_listener")
        pid = proxy.proc.pid
        base_fds, base_rss = proc_sample(pid)
        samples: list[tuple[float, int, int]] = []
        tally = Tally()
        start = time.monotonic()
        stop = start + args.duration
        threads = [threading.Thread(target=tcp_worker, args=(tcp_port, stop, tally, random.Random(args.seed + 100 + i)),
                                    daemon=True) for i in range(args.tcp_workers)]
        for t in threads:
            t.start()

        def sampler() -> None:
            while time.monotonic() < stop and proxy.alive():
                fds, rss = proc_sample(pid)
                samples.append((time.monotonic() - start, fds, rss))
                time.sleep(1.0)

        sampling = threading.Thread(target=sampler, daemon=True)
        sampling.start()
        asyncio.run(h3_workers(h3_port, stop, tally, args.h3_workers, args.seed))
        for t in threads:
            t.join(timeout=30)
        sampling.join(timeout=5)
        if not proxy.alive():
            failures.append(f"ferry exited during the soak ({proxy.exit_description()})")
        else:
            def drained() -> bool:
                s = proxy.stats()
                return all(int(s.get(k, "0")) == 0 for k in (H3_TUNNELS, TCP_TUNNELS, *CX_ACTIVE))

            try:
                wait_until(drained, args.settle, "tunnels and connections to drain")
            except TimeoutError as e:
                failures.append(str(e))
            try:
                wait_until(lambda: proc_sample(pid)[0] <= base_fds + args.fd_tolerance, args.settle,
                           "open fds back to baseline")
            except TimeoutError:
                pass  # reported below with the figures
            end_fds, end_rss = proc_sample(pid)
            stats = proxy.stats()
            panics = int(stats.get("server.ferry.task_panics", "-1"))
            summary.update(
                fds={"baseline": base_fds, "peak": max((s[1] for s in samples), default=base_fds),
                     "end": end_fds},
                rss_mib={"baseline": round(base_rss / 1024, 1),
                         "peak": round(max((s[2] for s in samples), default=base_rss) / 1024, 1),
                         "end": round(end_rss / 1024, 1)},
                task_panics=panics,
                tunnels_total={k: int(stats.get(f"http.{k}.connect_udp.tunnels_total", "0"))
                               for k in ("ingress_http", "ingress_tcp")},
            )
            if end_fds > base_fds + args.fd_tolerance:
                failures.append(f"open fds {end_fds} > baseline {base_fds} + {args.fd_tolerance}")
            if end_rss > base_rss + args.rss_tolerance_mib * 1024:
                failures.append(f"RSS {end_rss / 1024:.1f} MiB > baseline {base_rss / 1024:.1f} MiB "
                                f"+ {args.rss_tolerance_mib} MiB")
            if panics != 0:
                failures.append(f"server.ferry.task_panics = {panics}")
        if "panicked" in proxy.log_path.read_text(errors="replace"):
            failures.append("the log reports a panic")
        c = tally.c
        summary["client"] = dict(sorted(c.items()))
        for kind in ("h3_tunnels", "h2_tunnels"):
            if c.get(kind, 0) == 0:
                failures.append(f"no {kind} completed")
        sent, ok = c.get("echo_sent", 0), c.get("echo_ok", 0)
        if sent == 0 or ok < 0.99 * sent:
            failures.append(f"echoes: {ok}/{sent} came back (expected >= 99% on loopback)")
    finally:
        proxy.stop()
        target.close()
    summary["failures"] = failures
    summary["ok"] = not failures
    print(json.dumps(summary), flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
