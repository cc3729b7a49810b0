"""Bulk TCP transfer for the bench: a receiver that counts bytes and a sender that times them.

    python3 bulk.py recv --port 5001
    python3 bulk.py send --target 10.244.1.9:5001 --mb 1024

The sender streams `mb` MiB from one reusable 1 MiB buffer, half-closes, and stops the clock when
the receiver has read everything and answered with the byte count (so the time covers delivery,
not just the sender's socket buffer). Prints {"bytes", "seconds", "mb_per_s"} (MB = 10^6 bytes).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

CHUNK = 1 << 20


def recv(port: int) -> None:
    srv = socket.create_server(("0.0.0.0", port), backlog=16, reuse_port=True)
    buf = bytearray(CHUNK)
    while True:
        conn, _ = srv.accept()
        with conn:
            total = 0
            while n := conn.recv_into(buf):
                total += n
            conn.sendall(str(total).encode())


def send(target: str, mb: int) -> dict[str, float | int]:
    host, port = target.rsplit(":", 1)
    data = memoryview(bytes(CHUNK))
    with socket.create_connection((host, int(port)), timeout=120) as s:
        t0 = time.perf_counter()
        for _ in range(mb):
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(64):
            reply += chunk
        seconds = time.perf_counter() - t0
    got = int(reply or b"0")
    if got != mb * CHUNK:
        raise SystemExit(f"receiver got {got} bytes, sent {mb * CHUNK}")
    return {"bytes": got, "seconds": round(seconds, 4), "mb_per_s": round(got / seconds / 1e6, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--port", type=int, default=5001)
    s = sub.add_parser("send")
    s.add_argument("--target", required=True)
    s.add_argument("--mb", type=int, default=1024)
    args = ap.parse_args()
    if args.cmd == "recv":
        recv(args.port)
        return 0
    json.dump(send(args.target, args.mb), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
