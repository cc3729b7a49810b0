"""Tap is authorised and redacts by default (issue 13, item 5), on a meshed sandbox.

A real client pod sends HTTP/1 and gRPC (HTTP/2) requests carrying `Authorization` and `Cookie`
(and the HTTP/1 server answers `Set-Cookie`); the real `nodemesh tap -o json` shows those headers
as `[REDACTED]` and none of the secrets anywhere. A token with only the `stats` role may run
`stat` but is refused `tap` with one clear line.
"""

from __future__ import annotations

import json
import time

from trust_harness import NS, PEERS, PY, Trust

SECRET = "hunter2-e7f1c9"


def test_trust_tap_redacts_credentials_in_http1_and_http2(trust: Trust) -> None:
    taps = {app: trust.tap(f"deploy/{app}", "-n", NS, "-o", "json") for app in ("web", "grpcweb")}
    client = trust.start_in_pod("client", [PY, PEERS, "client", f"http://{trust.service_ip('web')}:8080/x",
                                           f"{trust.service_ip('grpcweb')}:9090", SECRET, "40"])
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            seen = {app: [json.loads(x) for x in t.snapshot() if x.strip()] for app, t in taps.items()}
            if all(any("responseInitEvent" in e for e in evs) for evs in seen.values()):
                break
            time.sleep(0.3)
    finally:
        client.kill()
        out, err = client.communicate()
        results = {app: t.stop() for app, t in taps.items()}
    assert "http1 200" in out and "grpc ok" in out, f"client: {out[-500:]} {err[-500:]}"
    for app, (rc, err) in results.items():
        lines = taps[app].snapshot()
        assert lines, f"tap deploy/{app} showed nothing: rc={rc} {err}"
        text = "\n".join(lines)
        for leaked in (f"{SECRET}-auth", f"{SECRET}-cookie", f"{SECRET}-setcookie"):
            assert leaked not in text, f"tap deploy/{app} leaked {leaked}: {text[:2000]}"
        events = [json.loads(x) for x in lines if x.strip()]
        req_headers = {h["name"].lower(): h["valueStr"] for e in events if "requestInitEvent" in e
                       for h in e["requestInitEvent"]["headers"]}
        assert req_headers["authorization"] == req_headers["cookie"] == "[REDACTED]", (app, req_headers)
        if app == "web":  # the query string is shown unless --tap-redact-query (unit-tested)
            assert any(e["requestInitEvent"]["path"] == f"/x?secret={SECRET}" for e in events
                       if "requestInitEvent" in e)
            rsp_headers = {h["name"].lower(): h["valueStr"] for e in events if "responseInitEvent" in e
                           for h in e["responseInitEvent"]["headers"]}
            assert rsp_headers["set-cookie"] == "[REDACTED]", rsp_headers
            assert rsp_headers["content-length"] == "3"   # the rest is shown as it was
        else:
            assert req_headers["content-type"] == "application/grpc"


def test_trust_tap_needs_its_own_permission(trust: Trust) -> None:
    stats_only = trust.add_token("stats-only-4b1d", "stats")
    res = trust.cli("stat", "deploy", "-n", NS, "--token-file", str(stats_only))
    assert res.returncode == 0, res.stderr
    assert "web" in res.stdout
    res = trust.cli("tap", "deploy/web", "-n", NS, "--token-file", str(stats_only), timeout=20)
    assert res.returncode == 1
    assert res.stderr.strip() == ("Error: the controller refused this call: "
                                  "this token may not call Tap: it needs role tap, the token has stats"), \
        res.stderr
    tapper = trust.add_token("tap-only-8c2e", "tap")
    res = trust.cli("stat", "deploy", "-n", NS, "--token-file", str(tapper))
    assert res.returncode == 1 and "may not call StatSummary" in res.stderr, res.stderr
