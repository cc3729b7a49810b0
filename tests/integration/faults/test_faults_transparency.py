"""Issue 12, the malformed-input row: what nginx answers without the mesh, it answers with it.

Each payload is sent raw, once from nginx's own node (not captured: the direct answer) and once
from a client pod on each node (captured: outbound, and inbound too across nodes); what comes back
must be the same bytes (HTTP/1: apart from the Date header) and end the same way. Before: a bare-LF
request got 400 from the agent (nginx: 200), HTTP/9.9 got 400 (nginx: 505), a valid request followed
by junk in one read was not answered (nginx answers it, then 400), and the agent answered HTTP/2
protocol errors with its own GOAWAY.
"""

from __future__ import annotations

import pytest
from faults_harness import PEERS, PY, Faults
from transparency_inputs import HTTP1, HTTP2, normalize

pytestmark = pytest.mark.root

def _send(faults: Faults, via: str, port: int, payload: bytes) -> tuple[bytes, str]:
    srv = faults.server("nginx")
    argv = [PY, PEERS, "raw", srv.ip, str(port), "-", "2"]
    if via == "direct":
        res = faults.sb.node_exec(srv.node, argv, input=payload.hex(), capture_output=True, text=True, timeout=60)
    else:
        client = faults.client_near(srv, via == "same-node")
        res = faults.sb.exec("faults", client.name, argv, input=payload.hex(), capture_output=True, text=True,
                             timeout=60)
    assert res.returncode == 0, res.stderr
    out = __import__("json").loads(res.stdout.strip().splitlines()[-1])
    return bytes.fromhex(out["got"]), out["end"]


@pytest.mark.parametrize("case", list(HTTP1) + list(HTTP2))
def test_faults_malformed_input_answered_as_nginx_answers(faults: Faults, case: str) -> None:
    port, payload = (8080, HTTP1[case]) if case in HTTP1 else (8081, HTTP2[case])
    direct = _send(faults, "direct", port, payload)
    first = direct[0].split(b"\n", 1)[0] if port == 8080 else direct[0][:40].hex()
    for via in ("same-node", "cross-node"):
        meshed = _send(faults, via, port, payload)
        print(f"transparency cni={faults.cni} {case!r} {via}: nginx {first!r} ({direct[1]}) | "
              f"mesh {'same' if normalize(meshed[0]) == normalize(direct[0]) else meshed[0][:60]!r} ({meshed[1]})")
        assert (normalize(meshed[0]), meshed[1]) == (normalize(direct[0]), direct[1]), (via, meshed, direct)
