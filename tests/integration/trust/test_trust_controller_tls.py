"""Agent <-> controller over TLS (issue 13, item 4): on the node-to-node link no bearer token.

The controller runs on node1 and serves its gRPC port with the certificate `nodemesh install
--sandbox` made (api/certs.py); node2's agent and the CLI verify it with the CA. A packet capture
in node2's network namespace (every interface: its end of the node-to-node link) records the
port-8085 payloads while node2's agent reconnects (its stream cut with `ss -K`), the CLI runs
`stat` from node2, and a scraper's token is checked through node2's agent: the tokens appear in
none of it, neither as text nor HPACK-Huffman coded, and the bytes are TLS records.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request

from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from nodemesh.manifests.sandbox_install import TOKEN_FILE, agent_process
from trust_harness import PEERS, PY, Trust


def forms(secret: str) -> list[bytes]:
    """How a token can appear in an HTTP/2 HEADERS frame: plain, or HPACK's Huffman coding."""
    huff = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
    return [secret.encode(), huff.encode(f"Bearer {secret}".encode()), huff.encode(secret.encode())[1:-1]]


def test_trust_controller_link_carries_no_token_in_clear(trust: Trust, tmp_path) -> None:  # type: ignore[no-untyped-def]
    node1, node2 = trust.sb.nodes()[:2]
    agent_token = (trust.state_dir / TOKEN_FILE).read_text().split()[0]
    scraper = trust.add_token("scraper-c4ff-77e2", "metrics").read_text().strip()
    out = tmp_path / "link.bin"
    cap = subprocess.Popen(["ip", "netns", "exec", trust.sb.node(node2.name).netns, PY, PEERS, "capture", "8",
                            "8085", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        # node2's agent stream: cut it, the agent reconnects and sends its token again
        trust.sb.node_exec(node2.name, ["ss", "-K", "dst", node1.ip, "dport", "=", ":8085"], capture_output=True)
        # the CLI from node2
        res = subprocess.run(["ip", "netns", "exec", trust.sb.node(node2.name).netns, PY, "-m", "nodemesh", "stat",
                              "deploy", "-n", "rt"], env=trust.cli_env(), capture_output=True, text=True, timeout=30,
                             check=False)
        assert res.returncode == 0 and "web" in res.stdout, res.stderr
        # a scraper's token, which node2's agent sends to the controller to check — once its link
        # is back: until the reconnect (the agent's backoff after the cut above) the agent cannot
        # ask and answers 503 (docs/controlplane.md, scrapes during a controller outage)
        req = urllib.request.Request(f"http://{node2.ip}:4191/metrics", headers={"Authorization": f"Bearer {scraper}"})
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    assert r.status == 200
                    break
            except urllib.error.HTTPError as exc:
                assert exc.code == 503 and time.monotonic() < deadline, (exc.code, exc.read()[:200])
                time.sleep(0.2)
    finally:
        stdout, err = cap.communicate(timeout=30)
    assert cap.returncode == 0, err
    data = out.read_bytes()
    assert int(stdout.strip()) > 10 and len(data) > 2000, (stdout, len(data))  # we did see the traffic
    for secret in (agent_token, scraper):
        for form in forms(secret):
            assert form not in data, f"a token crossed the node-to-node link in clear ({form!r})"
    assert b"PRI * HTTP/2.0" not in data and b"nodemesh.v1.Controller" not in data  # no plaintext HTTP/2
    assert data.count(b"\x17\x03\x03") >= 3  # TLS application-data records
    # and the agent is connected (over TLS) to the controller again
    log = trust.sb.node_process_log(node2.name, agent_process(node2.name))
    assert "event=controller_connected" in log.read_text()
