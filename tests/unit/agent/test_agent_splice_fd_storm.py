"""A storm of spliced connections leaves no fd with two owners and none leaked (loopback, no root).

agent/splice.py takes sockets away from uvloop transports (dup, then the transport closes its
number) and owns pipes. Any mistake there closes another connection's socket later (see
test_agent_relay_fd_ownership.py): the symptom is bytes of one connection going nowhere or to
another, "is used by transport", EBADF, libuv aborting. In a child process (an abort must fail
this test, not kill pytest): 120 clients for a few seconds, each connection at random
- transfers 64–512 KiB both ways and half-closes, checking the echoed bytes' hash,
- aborts (RST) right after connecting or mid-transfer,
- asks the upstream to reset mid-stream,
- half-closes at once;
while the garbage collector runs often (a stray socket object would close its number then).
At the end: every checked transfer identical, nothing live, no loop error, the process's fd count
back where it was before the relay started.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

STORM_S = 6.0
RESET_ME = b"\x00R"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _fds_named() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return out


def _state(c: object) -> dict[str, object]:
    sp = c.splice  # type: ignore[attr-defined]
    d = {k: getattr(c, k) for k in ("client_eof", "up_eof", "client_lost", "up_lost", "client_shut", "opened",
                                    "connecting", "error", "read_bytes", "write_bytes", "throttled")}
    d["mode"] = type(c.mode).__name__  # type: ignore[attr-defined]
    if sp is not None:
        d["splice"] = {n: {k: getattr(getattr(sp, n), k) for k in ("eof", "shut", "in_pipe")} for n in ("c2u", "u2c")}
        d["paused"] = sp.paused
        d["readers"] = len(sp._readers)
        d["writers"] = len(sp._writers)
    return d


async def _storm() -> dict[str, object]:
    from loopback_relay import serve

    loop = asyncio.get_running_loop()
    errors: list[str] = []
    loop.set_exception_handler(lambda _l, c: errors.append(f"{c.get('message')} {c.get('exception')!r}"))

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            first = await r.read(2)
            if first == RESET_ME:
                w.write(b"x" * 200_000)
                await asyncio.sleep(0.01)
                w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()
                return
            w.write(first)
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.close()
        except OSError:
            w.transport.abort()

    class Obs:
        closes = 0

        def connection_open(self, meta: object) -> object:
            return meta

        def connection_close(self, conn: object, end: object) -> None:
            Obs.closes += 1

    up = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    server, port, ctx = await serve(Obs(), up.sockets[0].getsockname()[:2], splice=True, splice_after_bytes=0)
    # Counted with the listeners open (libuv's first listen opens /dev/null for good: its EMFILE
    # reserve); the listeners close at the end, so after ≤ before.
    fds_before = _fds()
    names_before = _fds_named()
    stop = time.monotonic() + STORM_S
    rng = random.Random(18)
    stats = {"checked": 0, "mismatch": 0, "spliced_seen": 0}

    async def client() -> None:
        while time.monotonic() < stop:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                x = rng.random()
                if x < 0.15:
                    w.transport.abort()
                    continue
                if x < 0.3:
                    w.write(RESET_ME)
                    try:
                        while await asyncio.wait_for(r.read(65536), 5):
                            pass
                    except (OSError, TimeoutError):
                        pass
                    w.close()
                    continue
                if x < 0.4:
                    w.write_eof()
                    await asyncio.wait_for(r.read(), 5)
                    w.close()
                    continue
                data = b"\x00" + rng.randbytes(rng.randrange(64 << 10, 512 << 10))
                w.write(data)
                if x < 0.55:
                    await asyncio.sleep(0)
                    w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                          struct.pack("ii", 1, 0))
                    w.transport.abort()
                    continue
                await w.drain()
                w.write_eof()
                got = await asyncio.wait_for(r.read(-1), 10)
                stats["checked"] += 1
                if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
                    stats["mismatch"] += 1
                w.close()
            except (OSError, TimeoutError):
                pass

    async def collector() -> None:
        while time.monotonic() < stop:
            stats["spliced_seen"] = max(stats["spliced_seen"], sum(c.splice is not None for c in ctx.live))
            gc.collect()
            await asyncio.sleep(0.05)

    await asyncio.gather(collector(), *(client() for _ in range(120)))
    deadline = time.monotonic() + 10
    while ctx.live and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    server.close()
    up.close()
    await server.wait_closed()
    await up.wait_closed()
    await asyncio.sleep(0.3)
    gc.collect()
    return {**stats, "live": len(ctx.live), "closes": Obs.closes, "errors": errors[:5], "n_errors": len(errors),
            "fds_before": fds_before, "fds_after": _fds(),
            "new_fds": sorted(set(_fds_named()) - set(names_before)),
            "stuck": [_state(c) for c in ctx.live]}


def test_a_storm_of_spliced_connections_keeps_every_fd_with_one_owner() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-X", "faulthandler", __file__], capture_output=True, text=True,
                         timeout=STORM_S + 60, env=env, check=False)
    assert res.returncode == 0, f"the relay's process died (rc {res.returncode}):\n{res.stderr[-3000:]}"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"\nsplice storm: {out}")
    assert out["closes"] > 500 and out["checked"] > 100 and out["spliced_seen"] > 0, out  # the storm really ran
    assert out["mismatch"] == 0, out
    assert out["live"] == 0 and out["n_errors"] == 0, out
    assert out["fds_after"] <= out["fds_before"], out
    assert "is used by transport" not in res.stderr and "Bad file descriptor" not in res.stderr, res.stderr[-3000:]


if __name__ == "__main__":
    import uvloop

    print(json.dumps(uvloop.run(_storm())))
