"""Echo probe for test_faults.py's network-namespace test (run inside the namespace).

Connects to a CONNECT-UDP proxy on HOST:PORT (default 127.0.0.1) (retrying for up to 15 s while it starts),
opens one tunnel, sends COUNT distinct payloads PACE seconds apart, collects the echoes until
all came back or none came for 2 s, and prints one JSON line:
``{"status": 200, "sent": N, "received": distinct echoes, "foreign": payloads never sent}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from masque_client import MasqueClient  # noqa: E402


async def probe(host: str, port: int, count: int, pace: float) -> dict:
    deadline = time.monotonic() + 15.0
    while True:
        try:
            async with MasqueClient.connect(host, port, idle_timeout=30.0, timeout=3.0) as client:
                tunnel = await client.tunnel("foo.lyft.com", 80, timeout=10.0)
                result = {"status": tunnel.status, "sent": count, "received": 0, "foreign": 0}
                if tunnel.status != 200:
                    return result
                sent = [b"probe-%05d" % i for i in range(count)]
                for p in sent:
                    tunnel.send(p)
                    await asyncio.sleep(pace)
                got: set[bytes] = set()
                foreign = 0
                while len(got) < count:
                    reply = await tunnel.recv_or_none(2.0)
                    if reply is None:
                        break
                    if reply in sent:
                        got.add(reply)
                    else:
                        foreign += 1
                result.update(received=len(got), foreign=foreign)
                return result
        except (asyncio.TimeoutError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--pace", type=float, default=0.005)
    args = ap.parse_args()
    result = asyncio.run(asyncio.wait_for(probe(args.host, args.port, args.count, args.pace), 50.0))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
