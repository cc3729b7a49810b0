"""A pod program for the stat tests: a gRPC server with a known failure pattern, no .proto needed.

Service `stat.Echo` (raw bytes in, the same bytes out):
  * `Get`: call number n of this replica fails with NOT_FOUND when n % 3 == 2 (every 3rd call);
  * `Ping`: always OK (the tests' probes, so they leave Get's pattern alone).
"""

from __future__ import annotations

import os
import threading
from concurrent import futures

import grpc

_lock = threading.Lock()
_calls = 0


def get(request: bytes, context: grpc.ServicerContext) -> bytes:
    global _calls
    with _lock:
        n = _calls
        _calls += 1
    if n % 3 == 2:
        context.abort(grpc.StatusCode.NOT_FOUND, f"designed not found {n}")
    return request


def ping(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def main() -> None:
    handlers = {
        "Get": grpc.unary_unary_rpc_method_handler(get),
        "Ping": grpc.unary_unary_rpc_method_handler(ping),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("stat.Echo", handlers),))
    server.add_insecure_port(f"0.0.0.0:{os.environ.get('PORT', '9090')}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
