"""`up` / `down`: down leaves no netns, link, process or file behind, even after a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from nodemesh.sandbox import naming, netlink
from nodemesh.sandbox.cluster import Sandbox
from nodemesh.sandbox.proctools import alive, cmdline, pids_in_netns
from nodemesh.sandbox.testing import WHOAMI_APP, unique_name

pytestmark = pytest.mark.root


def _netns() -> set[str]:
    return set(os.listdir("/var/run/netns")) if os.path.isdir("/var/run/netns") else set()


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _procs_of(cluster: str) -> set[int]:
    """Processes that belong to the cluster now: in one of its netns, or its kubelet."""
    inodes = {i for n in netlink.list_cluster_netns(cluster) if (i := netlink.netns_inode(n)) is not None}
    found = set(pids_in_netns(inodes))
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            args = cmdline(int(entry))
            if "nodemesh.sandbox.kubelet" in args and cluster in args:
                found.add(int(entry))
    return found


def _still_running(pids: set[int]) -> set[int]:
    return {p for p in pids if alive(p)}


def _root_rules() -> set[str]:
    """Root-namespace iptables rules (no counters): the sandbox must never add one."""
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return {ln for ln in out.splitlines() if ln.startswith("-A ")}


def _etc_netns(cluster: str) -> list[str]:
    d = Path("/etc/netns")
    return [p.name for p in d.iterdir() if p.name.startswith(naming.netns_prefix(cluster))] if d.is_dir() else []


def _assert_gone(sb: Sandbox, before_netns: set[str], before_links: set[str], pids: set[int]) -> None:
    mine = {n for n in _netns() if n.startswith(naming.netns_prefix(sb.name))}
    assert mine == set()
    # other engineers' tests run at the same time: compare only what could be ours
    assert {ln for ln in _root_links() - before_links if ln.startswith("nmsb")} == set()
    assert _still_running(pids) == set()
    assert _procs_of(sb.name) == set()
    assert _etc_netns(sb.name) == []
    assert not sb.state_dir.exists()
    assert sb.name not in (sb.state_root / "registry.json").read_text()


def test_down_leaves_nothing_behind() -> None:
    before_netns, before_links, before_rules = _netns(), _root_links(), _root_rules()
    sb = Sandbox(unique_name())
    try:
        assert sb.up(nodes=2, cni="routed") is True
        assert sb.up(nodes=2, cni="routed") is False  # up twice is not an error
        sb.apply(text=WHOAMI_APP)
        sb.wait_ready(timeout=30)
        sb.start_node_process("node1", "idler", ["sleep", "infinity"])
        ours = {n for n in _netns() - before_netns if n.startswith(naming.netns_prefix(sb.name))}
        assert len(ours) == 1 + 2 + 3  # underlay, 2 nodes, 3 pods
        assert sb.host_link in _root_links()
        pids = _procs_of(sb.name)
        assert len(pids) >= 5  # kubelet, 3 containers, node process
        assert len(_etc_netns(sb.name)) == 3 + 2  # pods, and nodes (for hostNetwork pods: ClusterFirstWithHostNet)
        added = _root_rules() - before_rules
        assert not [r for r in added if sb.host_link in r or str(sb.plan.underlay.network_address)[:-1] in r]
    finally:
        sb.down()
    _assert_gone(sb, before_netns, before_links, pids)
    sb.down()  # idempotent


def test_down_after_a_crash_half_way() -> None:
    """A kubelet killed with SIGKILL and an `up` that died after two netns: down still cleans all."""
    before_netns, before_links = _netns(), _root_links()
    sb = Sandbox(unique_name())
    try:
        sb.up(nodes=2, cni="bridge")
        sb.apply(text=WHOAMI_APP)
        sb.wait_ready(timeout=30)
        pid = int(sb.state.kubelet_pid_file.read_text())
        os.kill(pid, signal.SIGKILL)  # pods are orphaned, still running
        time.sleep(0.2)
        pids = _procs_of(sb.name)
        assert len(pids) >= 3
        # a second crash: half of a pod wiring left behind with no record of it
        netlink.create_netns(naming.pod_netns(sb.name, "shop", "orphan-xyz"))
        (sb.state_dir / "sandbox.json").write_text('{"phase": "creating"}')  # infra record half-written
    finally:
        sb.down()
    _assert_gone(sb, before_netns, before_links, pids)


def test_up_after_crash_starts_clean() -> None:
    sb = Sandbox(unique_name())
    try:
        sb.up(nodes=1)
        os.kill(int(sb.state.kubelet_pid_file.read_text()), signal.SIGKILL)
        time.sleep(0.1)
        assert not sb.is_up()
        assert sb.up(nodes=1) is True  # rebuilt from nothing
        assert sb.is_up()
    finally:
        sb.down()


def test_two_sandboxes_side_by_side_get_distinct_ranges() -> None:
    a, b = Sandbox(unique_name()), Sandbox(unique_name())
    try:
        a.up(nodes=1)
        b.up(nodes=1)
        assert a.index != b.index and a.host_link != b.host_link
        assert a.plan.underlay != b.plan.underlay
        assert a.nodes()[0].netns != b.nodes()[0].netns
    finally:
        a.down()
        b.down()


def test_cli_up_status_down() -> None:
    name = unique_name()
    env = {**os.environ, "NODEMESH_SANDBOX": name}
    try:
        up = subprocess.run(["nodemesh", "sandbox", "up", "--nodes", "2", "--cni", "routed"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
        assert up.returncode == 0, up.stderr
        again = subprocess.run(["nodemesh", "sandbox", "up"], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert again.returncode == 0 and "already up" in again.stdout
        st = subprocess.run(["nodemesh", "sandbox", "status"], env=env, capture_output=True, text=True, timeout=30, check=False)
        assert st.returncode == 0 and "node2" in st.stdout and "cni=routed" in st.stdout
    finally:
        down = subprocess.run(["nodemesh", "sandbox", "down"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert down.returncode == 0
    assert not [n for n in _netns() if n.startswith(naming.netns_prefix(name))]
