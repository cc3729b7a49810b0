"""The relay never closes a file descriptor its event loop's transport owns (loopback, no root).

Under connect storms against upstreams that reset at once, uvloop attaches the socket object we
hand to `create_connection(sock=...)` only after the connection is made; an upstream reset in
between left our object owning a number libuv had already closed. Collected later, it closed
whatever the kernel had given that number since — another connection's socket. Seen as
`RuntimeError: File descriptor N is used by transport`, EBADF in `connection_made`, connections
counted open for good (the fault tests' `tcp_open_connections` stuck at 1–3) and, in this storm,
libuv aborting the worker within seconds (3 of 3 runs before the fix).

The storm runs in a child process (an abort must fail this test, not kill pytest): the real
relay on uvloop; 150 clients that connect and abort at once, abort after their request, or wait
for the answer; an upstream that resets every connection it accepts."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

STORM_S = 8.0


async def _storm() -> dict[str, object]:
    from loopback_relay import start
    from nodemesh.agent.admission import Admission

    loop = asyncio.get_running_loop()
    errors: list[str] = []
    loop.set_exception_handler(lambda _l, c: errors.append(f"{c.get('message')} {c.get('exception')!r}"))

    async def reset(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()

    up = await asyncio.start_server(reset, "127.0.0.1", 0, backlog=4096)
    server, port, ctx, rec = await start(up.sockets[0].getsockname()[:2], Admission(100_000))
    stop = time.monotonic() + STORM_S
    rng = random.Random(7)

    async def client() -> None:
        while time.monotonic() < stop:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                x = rng.random()
                if x < 0.3:
                    w.transport.abort()
                    continue
                w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                if x < 0.6:
                    await asyncio.sleep(0)
                    w.transport.abort()
                    continue
                await asyncio.wait_for(r.read(), 5)
                w.close()
            except (OSError, TimeoutError):
                pass

    await asyncio.gather(*(client() for _ in range(150)))
    deadline = time.monotonic() + 10
    while ctx.live and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    server.close()
    up.close()
    return {"live": len(ctx.live), "closes": len(rec.closes), "errors": errors[:5], "n_errors": len(errors)}


def test_a_connect_storm_against_resetting_upstreams_leaves_no_fd_closed_twice() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-X", "faulthandler", __file__], capture_output=True, text=True,
                         timeout=STORM_S + 60, env=env, check=False)
    assert res.returncode == 0, f"the relay's process died (rc {res.returncode}):\n{res.stderr[-3000:]}"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"\nstorm: {out['closes']} connections closed, {out['live']} live, {out['n_errors']} loop errors")
    assert out["closes"] > 1000, out  # the storm really ran
    assert out["live"] == 0 and out["n_errors"] == 0, out
    assert "is used by transport" not in res.stderr and "Bad file descriptor" not in res.stderr, res.stderr[-3000:]


if __name__ == "__main__":
    import uvloop

    print(json.dumps(uvloop.run(_storm())))
