"""A pod program for the churn tests: an HTTP/1.1 or gRPC server that leaves gracefully.

    churn_server.py http [--port 8080]     every 5th request of a replica answers 500; 110 ms each
    churn_server.py grpc [--port 9090]     stat.Echo/Get: every 3rd call of a replica NOT_FOUND; 560 ms

Both take SIGTERM as a real server under Kubernetes should: finish what is in flight and tell the
clients to go elsewhere (HTTP: `Connection: close` on every answer from then on, then exit after
1.5 s; gRPC: `server.stop(grace)`, which sends GOAWAY). Every HTTP answer carries `x-pod`. The
delays sit just above a Linkerd bucket's lower bound, (100, 200] and (500, 1000], so the client's
and the agent's views land in the same bucket on a loaded machine (the gRPC client can only time
calls in user space, with its scheduling delays: hence the wider bucket).
"""

from __future__ import annotations

import argparse
import http.server
import os
import signal
import sys
import threading
import time
from concurrent import futures

DELAY_S = 0.110
GRPC_DELAY_S = 0.560
POD = os.environ.get("POD_NAME", "unknown")
_lock = threading.Lock()
_n = 0
draining = threading.Event()


def next_n() -> int:
    global _n
    with _lock:
        n = _n
        _n += 1
    return n


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        n = next_n()
        time.sleep(DELAY_S)
        status = 500 if n % 5 == 4 else 200
        body = b"designed failure\n" if status == 500 else f"ok {POD} {n}\n".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-pod", POD)
        if draining.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def serve_http(port: int) -> None:
    server = Server(("0.0.0.0", port), Handler)

    def term(*_: object) -> None:
        draining.set()
        threading.Timer(1.5, lambda: os._exit(0)).start()

    signal.signal(signal.SIGTERM, term)
    server.serve_forever()


def serve_grpc(port: int) -> None:
    import grpc

    def get(request: bytes, context: grpc.ServicerContext) -> bytes:
        n = next_n()
        time.sleep(GRPC_DELAY_S)
        if n % 3 == 2:
            context.abort(grpc.StatusCode.NOT_FOUND, f"designed not found {n}")
        return request

    handlers = {"Get": grpc.unary_unary_rpc_method_handler(get)}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("stat.Echo", handlers),))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    done = threading.Event()

    def term(*_: object) -> None:
        server.stop(2.0).wait()
        done.set()

    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=term, daemon=True).start())
    done.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["http", "grpc"])
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    if args.kind == "http":
        serve_http(args.port or 8080)
    else:
        serve_grpc(args.port or 9090)
    sys.exit(0)


if __name__ == "__main__":
    main()
