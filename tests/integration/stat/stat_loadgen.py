"""A pod program for the stat tests: an open-loop client that records what it sent and saw.

    stat_loadgen.py http --target IP:PORT --rate R --duration S --out FILE
                         [--host H] [--method M] [--path '/load/{i}'] [--plan PLAN.json]
    stat_loadgen.py grpc --target IP:PORT --rate R --calls N --out FILE [--method /stat.Echo/Get]

HTTP: request i is sent at start + i/rate whatever happened to earlier ones (open loop, so a slow
answer never lowers the offered rate), each on its own connection (`Connection: close`), so a
ClusterIP spreads them over the replicas. `--plan` gives an explicit list of {method, path, host}.
gRPC: sequential unary calls on one channel at `rate`. The out file is a JSON list with one record
per request: times (epoch seconds), status, the replica (`x-pod`), whether a 5xx was the server's
designed failure, and any error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any


async def http_one(i: int, ip: str, port: int, method: str, path: str, host: str) -> dict[str, Any]:
    rec: dict[str, Any] = {"i": i, "method": method, "path": path, "host": host, "start": time.time()}
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 5)
        rec["send"] = time.time()
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                     f"Content-Length: 0\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(-1), 10)
        rec["end"] = time.time()
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        rec["status"] = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        rec["pod"] = headers.get("x-pod", "")
        rec["designed"] = body.startswith(b"designed failure")
        rec["latency_ms"] = (rec["end"] - rec["send"]) * 1000.0
    except Exception as exc:  # noqa: BLE001 - every failure is data for the test
        rec["end"] = time.time()
        rec["error"] = f"{type(exc).__name__}: {exc}"
    return rec


async def run_http(args: argparse.Namespace) -> list[dict[str, Any]]:
    ip, _, port = args.target.rpartition(":")
    if args.plan:
        plan = json.loads(Path(args.plan).read_text())
    else:
        n = round(args.rate * args.duration)
        plan = [{"method": args.method, "path": args.path.replace("{i}", str(i)), "host": args.host}
                for i in range(n)]
    start = time.time() + 0.05
    tasks = []
    loop = asyncio.get_running_loop()
    for i, req in enumerate(plan):
        delay = start + i / args.rate - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(http_one(i, ip, int(port), req["method"], req["path"],
                                               req.get("host") or args.host)))
    return list(await asyncio.gather(*tasks))


def run_grpc(args: argparse.Namespace) -> list[dict[str, Any]]:
    import grpc

    records = []
    with grpc.insecure_channel(args.target) as channel:
        call = channel.unary_unary(args.method)
        start = time.time()
        for i in range(args.calls):
            delay = start + i / args.rate - time.time()
            if delay > 0:
                time.sleep(delay)
            rec: dict[str, Any] = {"i": i, "method": args.method, "start": time.time()}
            try:
                call(f"call {i}".encode(), timeout=10)
                rec["code"] = 0
            except grpc.RpcError as err:
                rec["code"] = err.code().value[0]
                rec["details"] = err.details()
            rec["end"] = time.time()
            records.append(rec)
    return records


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["http", "grpc"])
    p.add_argument("--target", required=True)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--host", default="server")
    p.add_argument("--method", default="GET")
    p.add_argument("--path", default="/load/{i}")
    p.add_argument("--plan", default="")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.mode == "grpc":
        if args.method == "GET":
            args.method = "/stat.Echo/Get"
        records = run_grpc(args)
    else:
        records = asyncio.run(run_http(args))
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(records))
    tmp.rename(args.out)  # the test polls for the file: it appears complete or not at all


if __name__ == "__main__":
    main()
