"""A userspace UDP path impairer: loss, duplication, reordering and delay, like ``tc netem``.

``UdpImpairer(upstream)`` listens on 127.0.0.1 (port 0) and relays every datagram to
``upstream``, one upstream socket per downstream peer (like a NAT, so a proxy's
one-socket-per-tunnel stays one-socket-per-tunnel), and relays replies back. Each direction
applies the current :class:`Impairment`, which a test changes at any time with ``set()``
(``clear()`` restores a clean path).

Why not netem: the fault tests prefer ``tc qdisc ... netem`` in a network namespace
(``test_faults.py`` does that when the kernel has ``sch_netem``), but many kernels (CI
containers, Firecracker VMs) have no netem module and no way to load one. This impairer
gives the same four impairments on any machine, without root, between client and proxy and
between proxy and target. It runs in its own thread; every wait in it is bounded.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import random
import select
import socket
import threading
import time


@dataclasses.dataclass(frozen=True)
class Impairment:
    """Per-datagram probabilities (0..1) and delays (seconds), as netem's parameters."""

    loss: float = 0.0
    duplicate: float = 0.0
    # A reordered datagram skips the delay (netem's ``reorder``): it overtakes the ones
    # queued before it.
    reorder: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0

    def describe(self) -> str:
        return (f"loss {self.loss:.0%}, duplicate {self.duplicate:.0%}, reorder {self.reorder:.0%}, "
                f"delay {self.delay * 1000:.0f} ms +- {self.jitter * 1000:.0f} ms")


CLEAN = Impairment()


@dataclasses.dataclass
class Counts:
    relayed: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0


class UdpImpairer:
    def __init__(self, upstream: tuple[str, int], seed: int = 9298) -> None:
        self.upstream = upstream
        self.listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.listen.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.listen.bind(("127.0.0.1", 0))
        self.port = self.listen.getsockname()[1]
        self.impairment = CLEAN
        self.counts = Counts()
        self._rng = random.Random(seed)
        # downstream peer -> its upstream socket, and back
        self._up: dict[tuple[str, int], socket.socket] = {}
        self._down: dict[socket.socket, tuple[str, int]] = {}
        self._queue: list[tuple[float, int, socket.socket, bytes, tuple[str, int]]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"impair-{self.port}", daemon=True)
        self._thread.start()

    # -- control

    def set(self, impairment: Impairment) -> None:
        with self._lock:
            self.impairment = impairment

    def clear(self) -> None:
        self.set(CLEAN)

    def upstream_peers(self) -> int:
        with self._lock:
            return len(self._up)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for s in [self.listen, *self._up.values()]:
            s.close()

    # -- relay

    def _schedule(self, sock: socket.socket, data: bytes, dest: tuple[str, int]) -> None:
        imp = self.impairment
        rng = self._rng
        if rng.random() < imp.loss:
            self.counts.lost += 1
            return
        copies = 2 if rng.random() < imp.duplicate else 1
        if copies == 2:
            self.counts.duplicated += 1
        now = time.monotonic()
        for _ in range(copies):
            if rng.random() < imp.reorder:
                self.counts.reordered += 1
                delay = 0.0
            else:
                delay = max(0.0, imp.delay + rng.uniform(-imp.jitter, imp.jitter))
            heapq.heappush(self._queue, (now + delay, next(self._seq), sock, data, dest))

    def _flush(self) -> None:
        now = time.monotonic()
        while self._queue and self._queue[0][0] <= now:
            _, _, sock, data, dest = heapq.heappop(self._queue)
            try:
                sock.sendto(data, dest)
                self.counts.relayed += 1
            except OSError:
                pass  # e.g. ICMP port unreachable reported on a connected socket

    def _upstream_for(self, peer: tuple[str, int]) -> socket.socket:
        sock = self._up.get(peer)
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind(("127.0.0.1", 0))
            self._up[peer] = sock  # the caller holds self._lock
            self._down[sock] = peer
        return sock

    def _run(self) -> None:
        while not self._stop.is_set():
            timeout = 0.05
            if self._queue:
                timeout = min(timeout, max(0.0, self._queue[0][0] - time.monotonic()))
            with self._lock:
                socks = [self.listen, *self._down.keys()]
            try:
                readable, _, _ = select.select(socks, [], [], timeout)
            except (OSError, ValueError):
                return
            with self._lock:
                for sock in readable:
                    try:
                        data, addr = sock.recvfrom(65535)
                    except OSError:
                        continue
                    if sock is self.listen:
                        self._schedule(self._upstream_for(addr), data, self.upstream)
                    else:
                        self._schedule(self.listen, data, self._down[sock])
                self._flush()
