"""A pod program for the routes tests: a gRPC service with several methods, each with its own
latency and failure pattern, no .proto needed (raw bytes in, the same bytes out).

Service `routes.Votes`:
  * `Fast`: OK after 22 ms (Linkerd bucket (20, 30]);
  * `Slow`: OK after 110 ms (bucket (100, 200]);
  * `Flaky`: after 55 ms (bucket (50, 100]), call number n of the method fails UNKNOWN when n is odd.
Each delay sits just above a bucket's lower bound, so the agent's time to response headers and the
client's own (a few ms more on a busy machine) land in the same bucket.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent import futures

import grpc

_lock = threading.Lock()
_flaky_calls = 0


def fast(request: bytes, context: grpc.ServicerContext) -> bytes:
    time.sleep(0.022)
    return request


def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    time.sleep(0.110)
    return request


def flaky(request: bytes, context: grpc.ServicerContext) -> bytes:
    global _flaky_calls
    with _lock:
        n = _flaky_calls
        _flaky_calls += 1
    time.sleep(0.055)
    if n % 2 == 1:
        context.abort(grpc.StatusCode.UNKNOWN, f"designed failure {n}")
    return request


def main() -> None:
    handlers = {name: grpc.unary_unary_rpc_method_handler(fn)
                for name, fn in (("Fast", fast), ("Slow", slow), ("Flaky", flaky))}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("routes.Votes", handlers),))
    server.add_insecure_port(f"0.0.0.0:{os.environ.get('PORT', '9090')}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
