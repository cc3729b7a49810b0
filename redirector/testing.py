"""Test peers for capture, run as processes inside network namespaces (`ip netns exec NS python -m
nodemesh.redirector.testing VERB ...`). Standard library only, so they start fast in any pod.

- `standin`: a stand-in agent. Listens on 4140/4143, reads each connection's original destination
  (SO_ORIGINAL_DST after DNAT, else getsockname() as with TPROXY), connects onward with IP_TRANSPARENT
  bound to the real source pod IP, relays bytes, and appends one JSON line per connection to a record
  file. Serves `/ready` and `/capture` (`{"excluded_ips": [...]}` read from a file) on 4191.
- `whoami`: a pod server answering every connection with the caller's IP as it sees it.
- `dial`: connect, print what the server said, exit non-zero on failure.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19


def original_destination(conn: socket.socket) -> tuple[str, int]:
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntoa(raw[4:8]), port
    except OSError:
        host, port = conn.getsockname()[:2]
        return host, port


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class StandIn:
    def __init__(self, record: Path, ports: list[int], admin_port: int, excluded_file: Path | None) -> None:
        self.record = record
        self.ports = ports
        self.admin_port = admin_port
        self.excluded_file = excluded_file
        self.lock = threading.Lock()

    def _write(self, entry: dict[str, object]) -> None:
        with self.lock, self.record.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def _handle(self, conn: socket.socket, port: int) -> None:
        src_ip, src_port = conn.getpeername()[:2]
        dst_ip, dst_port = original_destination(conn)
        entry: dict[str, object] = {"port": port, "src": f"{src_ip}:{src_port}", "src_ip": src_ip,
                                    "orig_dst": f"{dst_ip}:{dst_port}", "ts": time.time()}
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            up.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            up.bind((src_ip, 0))           # the destination sees who really called
            up.settimeout(3)
            up.connect((dst_ip, dst_port))
            up.settimeout(None)
            entry["upstream"] = "ok"
        except OSError as exc:
            entry["upstream"] = f"error: {exc}"
            self._write(entry)
            conn.close()
            up.close()
            return
        self._write(entry)
        t = threading.Thread(target=_pipe, args=(up, conn), daemon=True)
        t.start()
        _pipe(conn, up)
        t.join(10)
        conn.close()
        up.close()

    @staticmethod
    def _bind(port: int) -> socket.socket:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)   # lets TPROXY hand us connections too
        ls.bind(("0.0.0.0", port))
        ls.listen(128)
        return ls

    def _listen(self, ls: socket.socket, port: int) -> None:
        while True:
            conn, _ = ls.accept()
            threading.Thread(target=self._handle, args=(conn, port), daemon=True).start()

    def _excluded(self) -> list[str]:
        if self.excluded_file and self.excluded_file.exists():
            return [ip for ip in self.excluded_file.read_text().split() if ip]
        return []

    def serve(self) -> None:
        # Bound here, not in the threads: a port already taken must end the process, not half of it.
        listeners = [(self._bind(port), port) for port in self.ports]
        for ls, port in listeners:
            threading.Thread(target=self._listen, args=(ls, port), daemon=True).start()
        standin = self

        class Admin(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/ready":
                    body, code = b"ready\n", 200
                elif self.path == "/capture":
                    body, code = json.dumps({"excluded_ips": standin._excluded()}).encode(), 200
                else:
                    body, code = b"not found\n", 404
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        ThreadingHTTPServer(("0.0.0.0", self.admin_port), Admin).serve_forever()


def whoami(port: int) -> None:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(128)
    while True:
        conn, peer = ls.accept()
        try:
            conn.sendall(f"{peer[0]}\n".encode())
        except OSError:
            pass
        conn.close()


def dial(host: str, port: int, timeout: float) -> int:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(data.decode())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodemesh.redirector.testing")
    sub = parser.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("standin")
    s.add_argument("--record", type=Path, required=True)
    s.add_argument("--ports", default="4140,4143")
    s.add_argument("--admin-port", type=int, default=4191)
    s.add_argument("--excluded-file", type=Path, default=None)
    w = sub.add_parser("whoami")
    w.add_argument("--port", type=int, default=8080)
    d = sub.add_parser("dial")
    d.add_argument("host")
    d.add_argument("port", type=int)
    d.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.verb == "standin":
        StandIn(args.record, [int(p) for p in args.ports.split(",")], args.admin_port, args.excluded_file).serve()
    elif args.verb == "whoami":
        whoami(args.port)
    else:
        return dial(args.host, args.port, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
