"""A node's iptables backend is the only one nodemesh touches (issue 11 item 6).

On a real nft node the agent's capture check (`iptables-legacy-save -t nat`, every 2 s) created a
legacy nat table, which cannot be removed until reboot; from then on every `iptables` command on
the node printed `# Warning: iptables-legacy tables present`. Here the real agent (capture check
on) and the real redirector (`run`: detect, install, fail-open watch, SIGTERM removal) run on
node 1 of a mini cluster whose kube-proxy rules are in one backend, a pod's connection goes
through the agent, and the other backend must never get a table:

- nft node: `/proc/net/ip_tables_names` and `ip6_tables_names` stay empty (sampled during the run
  and at the end: a legacy table, once there, stays), `iptables-legacy-save` prints nothing, and
  `iptables-nft-save` prints no legacy warning;
- legacy node: no table of the ip/ip6 families in nft, during and after. (ebtables uses nft on a
  kernel without legacy ebtables, like this one; that bridge-family table is removed on SIGTERM.)
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest
from redirector_minicluster import NODE_IP, POD_CIDR, MiniCluster, mini_cluster, run

pytestmark = pytest.mark.root


def legacy_tables(ns: str) -> str:
    return run("cat", "/proc/net/ip_tables_names", "/proc/net/ip6_tables_names", ns=ns).stdout


def nft_ip_tables(ns: str) -> str:
    return (run("iptables-nft-save", ns=ns).stdout + run("ip6tables-nft-save", ns=ns).stdout)


def metric(cl: MiniCluster, ns: str, name: str) -> float | None:
    body = run(sys.executable, "-c", "import urllib.request;print(urllib.request.urlopen("
               "'http://127.0.0.1:4191/metrics', timeout=2).read().decode())", ns=ns, check=False).stdout
    for line in body.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait(cond, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return bool(cond())


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_redirector_and_agent_touch_only_the_nodes_backend(backend: str, tmp_path: Path) -> None:
    other = "legacy" if backend == "nft" else "nft"

    def other_backend_tables() -> str:
        return legacy_tables(ns) if other == "legacy" else nft_ip_tables(ns)

    with mini_cluster("bridge", tmp_path, backend=backend) as cl:
        ns = cl.nodes[1]
        a, b = cl.pods["a"], cl.pods["b"]
        assert other_backend_tables() == "", "the mini cluster itself touched the other backend"
        agent = cl.spawn(ns, "-m", "nodemesh.agent", "--node", "n1", "--node-ip", NODE_IP[1], "--pod-cidr",
                         POD_CIDR[1], "--workers", "1", "--admin-host", "127.0.0.1", log="agent.log")
        redirector = cl.spawn(ns, "-m", "nodemesh.redirector", "run", "--node-ip", NODE_IP[1], "--pod-cidr",
                              POD_CIDR[1], log="redirector.log")
        try:
            assert wait(lambda: metric(cl, ns, "nodemesh_capture_installed") == 1.0), \
                (tmp_path / "agent.log").read_text() + (tmp_path / "redirector.log").read_text()
            assert f"backend={backend}" in (tmp_path / "redirector.log").read_text()
            assert "NODEMESH_PREROUTING" in run(f"iptables-{backend}-save", ns=ns).stdout
            # A pod's connection goes through the agent and keeps the caller's address.
            before = metric(cl, ns, "tcp_open_total") or 0.0
            assert cl.dial(a, b.ip, 8080).stdout.strip() == a.ip
            assert wait(lambda: (metric(cl, ns, "tcp_open_total") or 0.0) > before, 10)
            time.sleep(4.5)                     # two more of the agent's 2 s capture checks
            assert other_backend_tables() == ""
        finally:
            cl.stop(redirector, signal.SIGTERM, timeout=20)
            cl.stop(agent, signal.SIGTERM, timeout=45)
        log = (tmp_path / "redirector.log").read_text()
        assert "event=capture_uninstalled" in log, log
        assert "NODEMESH" not in run(f"iptables-{backend}-save", ns=ns).stdout
        assert "NODEMESH" not in run("ebtables-nft-save", ns=ns).stdout
        assert other_backend_tables() == ""
        if backend == "nft":
            assert run("iptables-legacy-save", ns=ns).stdout == ""
            assert "Warning" not in run("iptables-nft-save", ns=ns).stdout
            assert "Warning" not in run("iptables", "-t", "nat", "-S", ns=ns).stderr
