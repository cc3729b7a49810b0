"""Pod programs of the trust tests (run by the sandbox's kubelet, or exec'd in a pod's netns).

  http1-server PORT   HTTP/1.1: answers 200 with `Set-Cookie: sid=<secret>` (the secret is the
                      request's `?secret=` value, so the test knows what must never show)
  grpc-server PORT    gRPC service `trust.Echo/Ping` (raw bytes echoed), over HTTP/2
  capture SECONDS PORT OUT [IFACE]
                      every TCP payload to or from PORT (0: any) on every interface of this network
                      namespace, or only IFACE (AF_PACKET, as tcpdump would see it), for SECONDS,
                      written to OUT
  garp IFACE IP        one gratuitous ARP (sender = target = IP, broadcast) from IFACE, as a
                      pod taking over an address announces it
  get-from SRC URL N   N HTTP GETs to URL from source address SRC (2 s timeout each); prints JSON
                      {"ok": n, "failed": n}
  client URL GRPC SECRET SECONDS
                      every 0.2 s: one HTTP/1 GET URL?secret=SECRET with `Authorization: Bearer
                      SECRET-auth` and `Cookie: sid=SECRET-cookie`, and one gRPC Ping to GRPC with
                      the same as metadata; prints one line per answer
"""

from __future__ import annotations

import http.client
import http.server
import sys
import time
import urllib.parse
from concurrent import futures


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        secret = query.get("secret", ["none"])[0]
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Set-Cookie", f"sid={secret}-setcookie")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def http1_server(port: int) -> None:
    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


def grpc_server(port: int) -> None:
    import grpc

    handlers = {"Ping": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("trust.Echo", handlers),))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    server.wait_for_termination()


def client(url: str, grpc_target: str, secret: str, seconds: float) -> None:
    import grpc

    parts = urllib.parse.urlsplit(url)
    channel = grpc.insecure_channel(grpc_target)
    ping = channel.unary_unary("/trust.Echo/Ping")
    metadata = (("authorization", f"Bearer {secret}-auth"), ("cookie", f"sid={secret}-cookie"))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=5)
            conn.request("GET", f"{parts.path or '/'}?secret={secret}",
                         headers={"Authorization": f"Bearer {secret}-auth", "Cookie": f"sid={secret}-cookie"})
            print("http1", conn.getresponse().status, flush=True)
            conn.close()
        except OSError as exc:
            print("http1 error", exc, flush=True)
        try:
            ping(b"x", metadata=metadata, timeout=5)
            print("grpc ok", flush=True)
        except grpc.RpcError as exc:
            print("grpc error", exc.code(), flush=True)
        time.sleep(0.2)


def garp(iface: str, ip: str) -> None:
    import socket

    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((iface, 0))
    mac = sock.getsockname()[4]
    addr = socket.inet_aton(ip)
    arp = (b"\x00\x01\x08\x00\x06\x04\x00\x02" + mac + addr + b"\xff" * 6 + addr)  # reply, sender = target
    for _ in range(3):
        sock.send(b"\xff" * 6 + mac + b"\x08\x06" + arp)
    sock.close()


def get_from(src: str, url: str, n: int) -> None:
    import json

    parts = urllib.parse.urlsplit(url)
    ok = failed = 0
    for _ in range(n):
        try:
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=2,
                                              source_address=(src, 0))
            conn.request("GET", parts.path or "/")
            conn.getresponse().read()
            conn.close()
            ok += 1
        except OSError:
            failed += 1
    print(json.dumps({"ok": ok, "failed": failed}), flush=True)


ANSWER_TAIL = 300_000  # bytes of the answer after its digest line: more than one TLS record, many segments


def halfclose_server(port: int) -> None:
    """Server-first, then half-close: greets on accept, reads until the client's EOF, then
    answers (sha256 and length of what it read, then ANSWER_TAIL bytes) and closes. A proxy that
    loses the client's half-close leaves it waiting; one that closes on it cuts the answer."""
    import hashlib
    import socket
    import threading

    def serve(c: socket.socket) -> None:
        with c:
            c.sendall(b"HELLO server-first\n")
            got = bytearray()
            while chunk := c.recv(65536):
                got += chunk
            c.sendall(b"%s %d\n" % (hashlib.sha256(got).hexdigest().encode(), len(got)) + b"A" * ANSWER_TAIL)

    srv = socket.create_server(("0.0.0.0", port), backlog=64, reuse_port=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def halfclose_client(host: str, port: int, n: int) -> None:
    """n connections: read the greeting, send 100 kB, shut down the write side, read to EOF."""
    import hashlib
    import json
    import os
    import socket

    ok = 0
    problems = []
    for i in range(n):
        sent = os.urandom(100_000)
        try:
            with socket.create_connection((host, port), timeout=10) as s:
                greeting = s.makefile("rb").readline()
                s.sendall(sent)
                s.shutdown(socket.SHUT_WR)
                answer = bytearray()
                while chunk := s.recv(65536):
                    answer += chunk
        except OSError as exc:
            problems.append(f"{i}: {exc!r}")
            continue
        head, _, tail = bytes(answer).partition(b"\n")
        want = b"%s %d" % (hashlib.sha256(sent).hexdigest().encode(), len(sent))
        if greeting == b"HELLO server-first\n" and head == want and tail == b"A" * ANSWER_TAIL:
            ok += 1
        else:
            problems.append(f"{i}: greeting={greeting!r} head={head[:80]!r} tail={len(tail)}")
    print(json.dumps({"ok": ok, "problems": problems[:5]}), flush=True)


def capture(seconds: float, port: int, out: str, iface: str = "") -> None:
    import socket
    import struct

    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
    if iface:
        sock.bind((iface, 0))
    sock.settimeout(0.2)
    end = time.monotonic() + seconds
    payload = bytearray()
    segments = 0
    while time.monotonic() < end:
        try:
            frame, addr = sock.recvfrom(65535)
        except TimeoutError:
            continue
        if addr[2] == socket.PACKET_OUTGOING and addr[0] == "lo":
            continue  # loopback frames show twice
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:  # IPv4 + TCP
            continue
        ihl = (frame[14] & 0x0F) * 4
        tcp = 14 + ihl
        sport, dport = struct.unpack("!HH", frame[tcp:tcp + 4])
        if port and port not in (sport, dport):
            continue
        data = frame[tcp + (frame[tcp + 12] >> 4) * 4:]
        total = struct.unpack("!H", frame[16:18])[0]
        data = data[: max(0, total - ihl - (frame[tcp + 12] >> 4) * 4)]  # no Ethernet padding
        if data:
            segments += 1
            payload += data
    with open(out, "wb") as f:
        f.write(payload)
    print(segments, flush=True)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "http1-server":
        http1_server(int(args[0]))
    elif mode == "grpc-server":
        grpc_server(int(args[0]))
    elif mode == "garp":
        garp(args[0], args[1])
    elif mode == "get-from":
        get_from(args[0], args[1], int(args[2]))
    elif mode == "capture":
        capture(float(args[0]), int(args[1]), args[2], *args[3:4])
    elif mode == "halfclose-server":
        halfclose_server(int(args[0]))
    elif mode == "halfclose-client":
        halfclose_client(args[0], int(args[1]), int(args[2]))
    elif mode == "client":
        client(args[0], args[1], args[2], float(args[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")
