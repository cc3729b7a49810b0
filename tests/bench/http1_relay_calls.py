"""Python calls the agent makes per HTTP/1.1 keep-alive request, end to end on loopback (issue 18).

    PYTHONPATH=DIR python3 tests/bench/http1_relay_calls.py [-n 200]

tests/bench/http1_micro.py counts from the mode's entry points (Http1Mode.client_data /
upstream_data) on; this counts from the transports' callbacks on: the relay (relay.Connection, its
_Upstream, the HTTP/1 readers), the mode, the classifier and the real WorkerTelemetry, on a real
loopback connection through a uvloop relay to a keep-alive server (tests/unit/agent/
loopback_relay.py, no root). sys.setprofile sees the whole loop thread, so only calls into
functions defined under the tree's `agent/` are counted (Python) — the client, the server and
asyncio are not the agent's. The client sends one request at a time and waits for the response,
so each request is two reads for the agent, as at a fixed rate. Prints JSON: calls per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections import Counter
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REQ = b"GET /api/vote?choice=1 HTTP/1.1\r\nHost: voting\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


async def measure(n: int) -> dict[str, Any]:
    sys.path.insert(0, os.path.join(HERE, "..", "unit", "agent"))
    import nodemesh
    from loopback_relay import serve  # type: ignore[import-not-found]
    from nodemesh.agent.config import AgentConfig
    from nodemesh.agent.telemetry import WorkerTelemetry

    agent_dir = os.path.join(os.path.dirname(os.path.abspath(nodemesh.__file__)), "agent")

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                await r.readuntil(b"\r\n\r\n")
                w.write(RESP)
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()

    upstream = await asyncio.start_server(handle, "127.0.0.1", 0)
    tel = WorkerTelemetry(AgentConfig(node="n", workers=1))
    server, port, _ctx = await serve(tel, upstream.sockets[0].getsockname()[:2])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def one() -> None:
        writer.write(REQ)
        await reader.readexactly(len(RESP))

    for _ in range(20):
        await one()   # warm: detection, the upstream, the readers (if the tree has them)
    calls: Counter[str] = Counter()

    def prof(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(agent_dir):
            calls[frame.f_code.co_qualname] += 1

    sys.setprofile(prof)
    for _ in range(n):
        await one()
    sys.setprofile(None)
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.1)   # the server's handler sees the end
    server.close()
    upstream.close()
    return {"agent_py_calls_per_request": round(sum(calls.values()) / n, 2),
            "by_function": {k: round(v / n, 2) for k, v in calls.most_common()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200)
    args = ap.parse_args()
    import uvloop
    print(json.dumps(uvloop.run(measure(args.n)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
