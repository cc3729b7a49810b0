"""Bulk TCP through one in-process relay on loopback: agent CPU per GB, splice on/off interleaved.

    python3 tests/bench/bulk_loopback.py --runs 5 --mb 1024 [--pipe-kb 256]

No root, no sandbox: the real relay (Connection, TcpMode, agent/splice.py) on uvloop in a child
process, the bench's bulk.py receiver and sender as two more processes. Per run: the relay
process's CPU (user, sys) for the transfer, in CPU-s per GB, and the sender's MB/s. Loopback has no
veth/bridge/netfilter, so the numbers isolate the agent's own cost (copies, syscalls, Python) from
the path a sandbox adds; tests/bench/bulk_ab.py measures that path.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def relay(port_out: int, upstream_port: int, use_splice: bool, pipe_kb: int) -> None:
    """The child: serve one relay, report its CPU after each connection closes."""
    import asyncio

    sys.path.insert(0, str(HERE.parent / "unit" / "agent"))
    import uvloop
    from loopback_relay import serve
    from nodemesh.agent import splice as splice_mod
    from nodemesh.agent.observe import ConnectionEnd, ConnectionMeta

    splice_mod.PIPE_SIZE = pipe_kb * 1024
    out = socket.socket(fileno=port_out)

    class Obs:
        """CPU from the connection's open (detection done) to its close."""

        def connection_open(self, meta: ConnectionMeta) -> object:
            return resource.getrusage(resource.RUSAGE_SELF), meta.protocol

        def connection_close(self, conn: object, end: ConnectionEnd) -> None:
            (ru0, protocol), ru = conn, resource.getrusage(resource.RUSAGE_SELF)  # type: ignore[misc]
            out.sendall(json.dumps({"user": ru.ru_utime - ru0.ru_utime, "sys": ru.ru_stime - ru0.ru_stime,
                                    "read": end.read_bytes, "protocol": protocol}).encode() + b"\n")

    async def main() -> None:
        _server, port, _ctx = await serve(Obs(), ("127.0.0.1", upstream_port), splice=use_splice)
        out.sendall(json.dumps({"port": port}).encode() + b"\n")
        await asyncio.Event().wait()

    uvloop.run(main())


def one(mb: int, use_splice: bool, pipe_kb: int, recv_port: int) -> dict[str, float]:
    a, b = socket.socketpair()
    child = subprocess.Popen([sys.executable, __file__, "--child", str(b.fileno()), str(recv_port),
                              "1" if use_splice else "0", str(pipe_kb)], pass_fds=[b.fileno()])
    b.close()
    f = a.makefile("r")
    try:
        port = json.loads(f.readline())["port"]
        sent = subprocess.run([sys.executable, str(HERE / "bulk.py"), "send", "--target", f"127.0.0.1:{port}",
                               "--mb", str(mb)], capture_output=True, text=True, check=True)
        end = json.loads(f.readline())
        assert end["protocol"] == "tcp" and end["read"] == mb << 20, end
        res = json.loads(sent.stdout.strip().splitlines()[-1])
        gb = res["bytes"] / 1e9
        return {"splice": use_splice, "mb_per_s": res["mb_per_s"], "cpu_s_per_gb": round((end["user"] + end["sys"]) / gb, 3),
                "user_s_per_gb": round(end["user"] / gb, 3), "sys_s_per_gb": round(end["sys"] / gb, 3)}
    finally:
        child.kill()
        child.wait()
        a.close()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        relay(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--pipe-kb", type=int, default=256)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        recv_port = s.getsockname()[1]
    receiver = subprocess.Popen([sys.executable, str(HERE / "bulk.py"), "recv", "--port", str(recv_port)])
    time.sleep(0.5)
    rows = []
    try:
        for i in range(args.runs):
            for use in ((True, False) if i % 2 == 0 else (False, True)):
                row = one(args.mb, use, args.pipe_kb, recv_port)
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        receiver.kill()
        receiver.wait()
    for use in (True, False):
        mine = [r for r in rows if r["splice"] is use]
        for key in ("cpu_s_per_gb", "user_s_per_gb", "sys_s_per_gb", "mb_per_s"):
            vals = sorted(r[key] for r in mine)
            print(f"{'splice' if use else 'copy'} {key}: {vals[0]}–{vals[-1]} (median {vals[len(vals) // 2]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
