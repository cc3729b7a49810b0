"""sockmap acceleration's kernel side, without a cluster (issue 14 item 2): the real programs,
compiled by bcc, pinned in a bpffs of the test's own, sock_ops attached to a cgroup v2 directory of
the test's own that holds an "agent" (in the node's namespace) and a "pod" (in its own), joined by
a veth as a CNI joins them.

The pod connects to the agent's outbound listener (node IP:4140, where eBPF capture's connect4
sends it), sends a bulk body and half-closes; the agent answers the body's sha256 and a bulk body
of its own, then closes. Every byte must arrive in order, EOF must follow the last byte, and the
programs' counters must show the bytes went socket to socket (not on the stack). Then removal
leaves no program, map or pin behind, and a node without a bpffs runs without acceleration, with
one log line.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from bpf_objects import bpftool, left_after_removal
from nodemesh.redirector import sockmap, sockmap_mode
from nodemesh.redirector.apply import Netfilter, Redirector
from nodemesh.redirector.config import CaptureConfig
from nodemesh.sandbox import cgroups

pytestmark = pytest.mark.root

BODY = 4_000_000

AGENT = r"""
import hashlib, os, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 4140)); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    h = hashlib.sha256(); n = 0
    while True:
        d = c.recv(65536)
        if not d: break
        h.update(d); n += len(d)
    body = hashlib.sha256(str(n).encode()).digest() * (int(sys.argv[2]) // 32)
    c.sendall(h.hexdigest().encode() + body)
    c.close()
"""

POD = r"""
import hashlib, json, os, socket, sys
out = []
for i in range(int(sys.argv[3])):
    data = os.urandom(int(sys.argv[4]) if len(sys.argv) > 4 else int(sys.argv[2]))
    c = socket.create_connection((sys.argv[1], 4140), timeout=20)
    if len(sys.argv) > 5:
        c.settimeout(None)   # truly blocking (with a timeout Python polls and retries EAGAIN itself)
    for off in range(0, len(data), 65536):
        c.sendall(data[off:off + 65536])
    c.shutdown(socket.SHUT_WR)
    got = bytearray()
    while True:
        d = c.recv(65536)
        if not d: break
        got += d
    c.close()
    want_body = hashlib.sha256(str(len(data)).encode()).digest() * (int(sys.argv[2]) // 32)
    out.append([got[:64].decode() == hashlib.sha256(data).hexdigest(), bytes(got[64:]) == want_body, len(got)])
print(json.dumps(out))
"""


@pytest.fixture
def kernel() -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:6]
    ns, node_ns = f"nmsm-{tag}", f"nmsmn-{tag}"
    net = f"10.252.{int(tag[:2], 16) % 200 + 20}"
    bpffs = f"/run/nmsm-{tag}"
    assert cgroups.ensure_mounts() is None
    cg_root = Path(cgroups.CGROUP2_MOUNT) / f"nmsm-{tag}"
    for d in ("pod1", "agent"):
        (cg_root / d).mkdir(parents=True)
    os.makedirs(bpffs)
    subprocess.run(["mount", "-t", "bpf", "bpf", bpffs], check=True)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "netns", "add", node_ns], check=True)
    agent = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "veth0",
                        "netns", node_ns], check=True)
        for where, cmd in ((ns, "link set lo up"), (ns, f"addr add {net}.2/24 dev eth0"), (ns, "link set eth0 up"),
                           (node_ns, "link set lo up"), (node_ns, f"addr add {net}.1/24 dev veth0"),
                           (node_ns, "link set veth0 up")):
            subprocess.run(["ip", "-n", where, *cmd.split()], check=True)
        agent = subprocess.Popen(cgroups.join_argv(cg_root / "agent", [
            "ip", "netns", "exec", node_ns, sys.executable, "-c", AGENT, f"{net}.1", str(BODY)]),
            stdout=subprocess.PIPE, text=True)
        assert agent.stdout is not None and agent.stdout.readline().strip() == "ready"
        yield {"ns": ns, "node_ns": node_ns, "net": net, "bpf_dir": f"{bpffs}/node", "cg_root": str(cg_root)}
    finally:
        if agent is not None:
            agent.kill()
            agent.wait()
        with contextlib.suppress(OSError):
            sockmap.SockmapAccel(f"{net}.1", 4140, f"{net}.0/24", True, f"{bpffs}/node", str(cg_root)).remove()
        subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["ip", "netns", "del", node_ns], check=False)
        subprocess.run(["umount", bpffs], check=False)
        os.rmdir(bpffs)
        time.sleep(0.2)   # the killed processes leave their cgroups
        cgroups.remove_tree(cg_root)


def _load_in_node(k: dict[str, str]) -> list[str]:
    """The redirector's choose(), run in the node's namespace (the netns cookie it files is the agent side)."""
    code = (
        "import sys\n"
        "from nodemesh.redirector import sockmap_mode\n"
        "from nodemesh.redirector.apply import Netfilter, Redirector\n"
        "from nodemesh.redirector.config import CaptureConfig\n"
        f"config = CaptureConfig(node_ip='{k['net']}.1', pod_cidrs=('{k['net']}.0/24',), capture='ebpf')\n"
        "r = sockmap_mode.choose(config, Redirector(Netfilter()), 'sockmap', sys.argv[1], sys.argv[2],\n"
        "                        lambda e, **f: print(e, f, flush=True))\n"
        "print('wrapped', type(r).__name__)\n")
    res = subprocess.run(["ip", "netns", "exec", k["node_ns"], sys.executable, "-c", code, k["bpf_dir"], k["cg_root"]],
                         capture_output=True, text=True, timeout=120, check=True)
    return res.stdout.splitlines()


def _pod_bulk(k: dict[str, str], n: int, upload: int = BODY, blocking: bool = False) -> list[list[object]]:
    argv = cgroups.join_argv(Path(k["cg_root"]) / "pod1", ["ip", "netns", "exec", k["ns"], sys.executable, "-c", POD,
                                                           f"{k['net']}.1", str(BODY), str(n), str(upload),
                                                           *(["blocking"] if blocking else [])])
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def test_redirector_sockmap_carries_bulk_both_ways_in_order_and_removes_cleanly(kernel: dict[str, str]) -> None:
    k = kernel
    lines = _load_in_node(k)
    assert any(line.startswith("accelerate ") and "'mode': 'sockmap'" in line for line in lines), lines
    assert lines[-1] == "wrapped AcceleratedRedirector", lines

    got = _pod_bulk(k, 3)
    assert got == [[True, True, 64 + BODY // 32 * 32]] * 3, got
    stats = sockmap.read_stats(k["bpf_dir"])
    print(f"sockmap stats after 3 x {BODY} bytes each way: {stats}")
    assert stats is not None and stats["sockets_filed"] >= 6, stats
    # Both directions of every connection went socket to socket (the answers always can: the pod's
    # socket was filed before the agent's could send; the requests unless the pod sent first).
    assert stats["redirected_bytes"] >= 3 * BODY, stats

    # Removal: nothing left attached, pinned or loaded.
    attached = bpftool("cgroup", "show", k["cg_root"]) or []
    prog_ids = {p["id"] for p in attached}
    assert {p["name"] for p in attached} == {"nm_accel_sockops"}, attached
    map_ids = {m for pid in prog_ids for m in ((bpftool("prog", "show", "id", str(pid)) or {}).get("map_ids", []))}
    assert map_ids
    accel = sockmap.SockmapAccel(f"{k['net']}.1", 4140, f"{k['net']}.0/24", True, k["bpf_dir"], k["cg_root"])
    assert accel.remove()
    assert not os.path.exists(sockmap.accel_dir(k["bpf_dir"]))
    assert not bpftool("cgroup", "show", k["cg_root"])
    left = left_after_removal(prog_ids, set(map_ids))
    assert not any(left), left
    # And the same traffic still works on the plain stack afterwards.
    assert _pod_bulk(k, 1) == [[True, True, 64 + BODY // 32 * 32]]


def test_redirector_sockmap_off_with_one_line_where_the_node_cannot(tmp_path: Path) -> None:
    """No bpffs where the pins would go: no acceleration, the capture's redirector as it was, one line."""
    lines: list[str] = []
    config = CaptureConfig(node_ip="10.0.0.1", pod_cidrs=("10.1.0.0/24",))
    inner = Redirector(Netfilter())
    chosen = sockmap_mode.choose(config, inner, "sockmap", str(tmp_path / "pins"), cgroups.CGROUP2_MOUNT,
                                 lambda event, **f: lines.append(f"{event} {f}"))
    assert chosen is inner
    assert len(lines) == 1 and "'mode': 'none'" in lines[0] and "not a bpf filesystem" in lines[0], lines


@pytest.mark.xfail(strict=False, reason="kernel tcp_bpf_recvmsg: a blocking recv() on a sockhash socket can "
                   "return EAGAIN (seen on 6.18 after a 20 MB upload); docs/redirector.md 'Known hazard'")
def test_redirector_sockmap_blocking_client_after_a_20mb_upload(kernel: dict[str, str]) -> None:
    """The hazard that keeps sockmap opt-in, kept visible: XFAIL while the kernel shows it."""
    lines = _load_in_node(kernel)
    assert lines[-1] == "wrapped AcceleratedRedirector", lines
    assert _pod_bulk(kernel, 2, upload=20_000_000, blocking=True) == [[True, True, 64 + BODY // 32 * 32]] * 2
