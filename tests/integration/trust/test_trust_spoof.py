"""Unspoofable source identity (issue 13, item 3), on both CNI styles.

The issue's scenario: a pod (`attacker`) adds the address of another pod of its node (`victim`)
to its interface, announces it with a gratuitous ARP, and sends requests from it. Before, the
agent counted them as the victim's (6 of 6 for `deploy/peer`). Now the redirector's per-pod
anti-spoofing rules (redirector/antispoof.py) drop them at the attacker's interface: none is
counted for the victim, none reaches the server, the drops are logged, the victim keeps working
(its address was not taken over), and the attacker's own requests still work.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest
from nodemesh.manifests.sandbox_install import install_sandbox, redirector_process, uninstall_sandbox
from nodemesh.redirector.apply import strip_save
from nodemesh.sandbox.cluster import Sandbox
from nodemesh.sandbox.testing import agent_admin_request, running_sandbox
from prometheus_client.parser import text_string_to_metric_families
from trust_harness import NS, PEERS, PY, _deployment, _service

ATTACKS = 6


def manifest() -> str:
    def pinned(name: str) -> str:
        return _deployment(name, ["sleep", "infinity"], None, node="node1")

    return "---".join([f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n",
                       _deployment("web", [PY, PEERS, "http1-server", "8080"], 8080), _service("web", 8080),
                       pinned("attacker"), pinned("victim")])


def _netfilter(sb: Sandbox, node: str) -> str:
    return "".join(strip_save(sb.node_exec(node, cmd, capture_output=True, text=True, check=True).stdout)
                   for cmd in (["iptables-save"], ["ebtables-save"]))


@pytest.fixture(scope="module", params=["bridge", "routed"])
def spoof_cluster(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    with running_sandbox(nodes=2, cni=request.param, manifests=[manifest()], timeout=90) as sb:
        before = {n.name: _netfilter(sb, n.name) for n in sb.nodes()}
        install_sandbox(sb.name, timeout=90, progress=lambda msg: None)
        try:
            yield sb
        finally:
            uninstall_sandbox(sb.name)
        # Uninstalled, the anti-spoofing chains are gone with the capture, tables included.
        assert {n.name: _netfilter(sb, n.name) for n in sb.nodes()} == before


def _pod(sb: Sandbox, app: str) -> dict:  # type: ignore[type-arg]
    return next(p for p in sb.pods(NS) if p["metadata"]["labels"].get("app") == app)


def _requests_from(sb: Sandbox, deploy: str) -> float:
    """request_total the agents counted outbound with `deploy` as the source (each request once)."""
    total = 0.0
    for node in sb.nodes():
        req = agent_admin_request(sb.state_dir, f"http://{node.ip}:4191/metrics")
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "request_total" and s.labels.get("src_name") == deploy \
                        and s.labels.get("direction") == "outbound":
                    total += s.value
    return total


def _run(sb: Sandbox, app: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", sb.pod_netns(NS, _pod(sb, app)["metadata"]["name"]), *argv],
                          capture_output=True, text=True, timeout=timeout, check=False)


def _get_from(sb: Sandbox, app: str, src: str, url: str, n: int) -> dict:  # type: ignore[type-arg]
    res = _run(sb, app, PY, PEERS, "get-from", src, url, str(n))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_trust_spoofing_pod_is_not_its_victim(spoof_cluster: Sandbox) -> None:
    sb = spoof_cluster
    attacker, victim = _pod(sb, "attacker"), _pod(sb, "victim")
    assert attacker["spec"]["nodeName"] == victim["spec"]["nodeName"] == "node1"
    a_ip, v_ip = attacker["status"]["podIP"], victim["status"]["podIP"]
    svc = next(s for s in sb.objects().of_kind("Service") if s["metadata"]["name"] == "web")
    url = f"http://{svc['spec']['clusterIP']}:8080/x"
    # Both pods talk first: the node resolves them and the redirector pins each IP to its interface.
    assert _get_from(sb, "victim", v_ip, url, 3) == {"ok": 3, "failed": 0}
    assert _get_from(sb, "attacker", a_ip, url, 3) == {"ok": 3, "failed": 0}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rules = (sb.node_exec("node1", ["ebtables-save"], capture_output=True, text=True).stdout
                 + sb.node_exec("node1", ["iptables-save", "-t", "raw"], capture_output=True, text=True).stdout)
        if v_ip in rules and a_ip in rules:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"anti-spoofing rules never pinned {a_ip} and {v_ip}:\n{rules}")
    time.sleep(2)  # the agents' counters reach /metrics within a second or two
    victim_before, attacker_before = _requests_from(sb, "victim"), _requests_from(sb, "attacker")

    # The attack: the victim's address on the attacker's interface, announced, then used.
    prefix = "24" if sb.nodes()[0].cni == "bridge" else "32"
    res = _run(sb, "attacker", "ip", "addr", "add", f"{v_ip}/{prefix}", "dev", "eth0")
    assert res.returncode == 0, res.stderr
    assert _run(sb, "attacker", PY, PEERS, "garp", "eth0", v_ip).returncode == 0
    spoofed = _get_from(sb, "attacker", v_ip, url, ATTACKS)
    assert spoofed == {"ok": 0, "failed": ATTACKS}, spoofed  # dropped at the attacker's interface

    # The victim's address was not taken over: it still works, as the attacker does from its own.
    assert _get_from(sb, "victim", v_ip, url, 3) == {"ok": 3, "failed": 0}
    assert _get_from(sb, "attacker", a_ip, url, 2) == {"ok": 2, "failed": 0}
    time.sleep(2.5)
    # Never counted as the victim: only the victim's own 3 requests since.
    assert _requests_from(sb, "victim") - victim_before == 3
    assert _requests_from(sb, "attacker") - attacker_before == 2
    log = sb.node_process_log("node1", redirector_process("node1")).read_text()
    drops = [line for line in log.splitlines() if "event=spoof_dropped" in line and f"pinned_ip={a_ip}" in line]
    assert drops, log[-3000:]
