"""A pod program for the stat tests: an HTTP/1.1 server with a deterministic traffic mix.

Per replica, request number n (a counter shared by all connections) decides everything:
  * status: every 5th request (n % 5 == 4) answers 500 with the body "designed failure";
  * delay before the response headers: a fixed shuffle of 100 slots, 70 x FAST_MS, 27 x MID_MS,
    3 x SLOW_MS, so any 100 consecutive requests hold exactly that mix.
`?status=NNN` forces the status (the tap tests want known failures) and `?sleep=MS` the delay.
Every answer carries `x-pod: <pod name>` so a client knows which replica served it.
"""

from __future__ import annotations

import http.server
import os
import random
import threading
import time
import urllib.parse

# Each delay sits just above a Linkerd bucket's lower bound with most of the bucket above it:
# the agent measures at least the delay, and the client's own view (proxy hops, a loaded machine's
# scheduling: tens of ms measured on 2 busy cores) still lands in the same bucket.
FAST_MS, MID_MS, SLOW_MS = 110.0, 560.0, 2100.0   # buckets (100, 200], (500, 1000], (2000, 3000]
PATTERN = [SLOW_MS] * 3 + [MID_MS] * 27 + [FAST_MS] * 70
random.Random(7).shuffle(PATTERN)
POD = os.environ.get("POD_NAME", "unknown")

_lock = threading.Lock()
_counter = 0


def next_n() -> int:
    global _counter
    with _lock:
        n = _counter
        _counter += 1
    return n


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        n = next_n()
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        status = 500 if n % 5 == 4 else 200
        delay = PATTERN[n % len(PATTERN)]
        if "status" in query:
            status = int(query["status"][0])
        if "sleep" in query:
            delay = float(query["sleep"][0])
        time.sleep(delay / 1000.0)
        body = (b"designed failure\n" if status >= 500 else f"ok {POD} {n}\n".encode())
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-pod", POD)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args: object) -> None:  # quiet: the test reads the clients' records
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


if __name__ == "__main__":
    Server(("0.0.0.0", int(os.environ.get("PORT", "8080"))), Handler).serve_forever()
