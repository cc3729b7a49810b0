"""The agent's admin port from a pod (issue 13, item 6): /metrics and /identity need a credential
the controller accepts, /capture is only for the node itself, /ready and /live stay open; the
node's redirector (which reads /capture and /ready on 127.0.0.1) keeps capture installed.

The client runs inside a pod's network namespace and calls every node's :4191 as a pod would.
"""

from __future__ import annotations

import json

from nodemesh.manifests.sandbox_install import redirector_process
from nodemesh.redirector.plan import hook_present
from trust_harness import PY, Trust

FETCH = """
import json, sys, urllib.request, urllib.error
url, token = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        print(json.dumps([r.status, r.read().decode()[:4000]]))
except urllib.error.HTTPError as e:
    print(json.dumps([e.code, e.read().decode(), e.headers.get("WWW-Authenticate")]))
"""


def fetch(trust: Trust, url: str, token: str = "") -> list:  # type: ignore[type-arg]
    res = trust.in_pod("client", [PY, "-c", FETCH, url, token])
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_trust_admin_port_from_a_pod(trust: Trust) -> None:
    scraper = trust.add_token("scraper-5e0a", "metrics").read_text().strip()
    stats_only = trust.add_token("stats-only-9a7b", "stats").read_text().strip()
    for node in trust.sb.nodes():
        base = f"http://{node.ip}:4191"
        assert fetch(trust, base + "/ready")[:2] == [200, "ready\n"], node.name
        assert fetch(trust, base + "/live")[:2] == [200, "live\n"], node.name
        assert fetch(trust, base + "/capture")[:2] == [403, "/capture is only for this node's own processes\n"]
        for path in ("/metrics", "/identity"):
            status, body, challenge = fetch(trust, base + path)
            assert (status, challenge) == (401, 'Bearer realm="nodemesh-agent"'), (node.name, path, status, body)
            assert "request_total" not in body and "missing bearer token" in body
            status, body, _ = fetch(trust, base + path, "not-a-token")
            assert (status, body) == (403, "invalid token\n"), (node.name, path)
            status, body, _ = fetch(trust, base + path, stats_only)
            assert status == 403 and "needs role metrics" in body, (node.name, path, body)
            status, body = fetch(trust, base + path, scraper)
            assert status == 200, (node.name, path, body)
            assert ("agent_process" in body) if path == "/metrics" else ('"pods"' in body), body[:300]
    # The redirectors read /capture and /ready on 127.0.0.1: capture is in place on every node and
    # never went away.
    for node in trust.sb.nodes():
        nat = trust.sb.node_exec(node.name, ["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
        assert hook_present(nat), node.name
        log = trust.sb.node_process_log(node.name, redirector_process(node.name)).read_text()
        assert "event=capture_removed" not in log, log[-2000:]
