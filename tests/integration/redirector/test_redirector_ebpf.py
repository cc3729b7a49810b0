"""eBPF capture's kernel side, without a cluster (issue 14 items 1, 3, 4): the real programs, compiled
by bcc, pinned in a bpffs of the test's own, attached to a cgroup v2 directory of the test's own
holding a process in a network namespace of the test's own.

Two namespaces joined by a veth, addresses of one /24 (the "pod CIDR"): the "pod" (.2) and the
"node" (.1, the node IP; a server on .3 there answers `direct`, the "agent" on .1:4140 answers
`agent` plus the original destination it reads back the way the agent does, agent/capture.py).
A client in the pod's cgroup dials the server:
- with an agent listener in the sockmap and capture switched on, it reaches the agent, which learns
  the server's address; the source port the client's kernel chose is unique to that connection;
- with the switch off (the redirector's fail-open) it reaches the server directly;
- with the agent's listening socket closed (every agent process killed) it reaches the server
  directly at once, with the switch still on and no process of ours acting;
- removal detaches every program from every cgroup, unpins everything, and the kernel frees the
  programs and maps (their ids are gone).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from bpf_objects import bpftool, left_after_removal
from nodemesh.redirector import bpfsys, ebpf, ebpf_mode
from nodemesh.redirector.apply import Netfilter, Redirector
from nodemesh.redirector.config import CaptureConfig
from nodemesh.redirector.plan import build_plan
from nodemesh.sandbox import cgroups
from nodemesh.sandbox.netlink import socket_in_netns

pytestmark = pytest.mark.root

CLIENT = r"""
import json, socket, sys
out = []
for _ in range(int(sys.argv[2])):
    s = socket.create_connection((sys.argv[1], 8080), timeout=3)
    s.sendall(b"hi")
    out.append([s.getsockname()[1], s.recv(100).decode()])
    s.close()
print(json.dumps(out))
"""


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:6]
    ns = f"nmebpf-{tag}"
    node_ns = f"nmebpfn-{tag}"
    third = int(tag[:2], 16) % 200 + 20
    net = f"10.251.{third}"
    bpffs = f"/run/nmebpf-{tag}"
    assert cgroups.ensure_mounts() is None
    cg_root = Path(cgroups.CGROUP2_MOUNT) / f"nmebpf-{tag}"
    pod_cg = cg_root / "pod1"
    pod_cg.mkdir(parents=True)
    os.makedirs(bpffs)
    subprocess.run(["mount", "-t", "bpf", "bpf", bpffs], check=True)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "netns", "add", node_ns], check=True)
    sleeper = host_sleeper = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "veth0",
                        "netns", node_ns], check=True)
        for where, cmd in ((ns, "link set lo up"), (ns, f"addr add {net}.2/24 dev eth0"), (ns, "link set eth0 up"),
                           (node_ns, "link set lo up"), (node_ns, f"addr add {net}.1/24 dev veth0"),
                           (node_ns, f"addr add {net}.3/32 dev lo"), (node_ns, "link set veth0 up")):
            subprocess.run(["ip", "-n", where, *cmd.split()], check=True)
        # A process of the "pod": how the redirector finds the pod's cgroup and its IP.
        sleeper = subprocess.Popen(cgroups.join_argv(pod_cg, ["ip", "netns", "exec", ns, "sleep", "600"]))
        # A hostNetwork pod: in the node's namespace (node IP, and an address in the pod CIDR as a
        # bridge's gateway has): never captured, or the agent's own connects would loop.
        (cg_root / "hostpod").mkdir()
        host_sleeper = subprocess.Popen(cgroups.join_argv(cg_root / "hostpod",
                                                          ["ip", "netns", "exec", node_ns, "sleep", "600"]))
        yield {"ns": ns, "node_ns": node_ns, "net": net, "bpf_dir": f"{bpffs}/node", "cg_root": str(cg_root), "pod_cg": str(pod_cg)}
    finally:
        for proc in (sleeper, host_sleeper):
            if proc is not None:
                proc.kill()
                proc.wait()
        with contextlib.suppress(OSError):
            ebpf.EbpfCapture(f"{net}.1", 4140, (f"{net}.0/24",), (), f"{bpffs}/node", str(cg_root)).remove()
        subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["ip", "netns", "del", node_ns], check=False)
        subprocess.run(["umount", bpffs], check=False)
        os.rmdir(bpffs)
        cgroups.remove_tree(cg_root)


class _Server(threading.Thread):
    """Accepts on a listening socket made in the netns; answers `name` (+ the original destination
    for the agent, read as agent/capture.py reads it)."""

    def __init__(self, sock: socket.socket, name: str, bpf_dir: str | None = None) -> None:
        super().__init__(daemon=True)
        self.sock, self.name, self.bpf_dir = sock, name, bpf_dir
        self.sock.setblocking(True)

    def run(self) -> None:
        from nodemesh.agent import capture

        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(10)
                answer = self.name
                if self.bpf_dir:
                    orig = capture.ebpf_original_destination(peer[0], peer[1])
                    answer += f" {orig[0]}:{orig[1]}" if orig else " ?"
                conn.sendall(answer.encode())


def _listen(ns: str, ip: str, port: int) -> socket.socket:
    sock = socket_in_netns(ns)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ip, port))
    sock.listen(64)
    return sock


def _dial(k: dict[str, str], n: int = 1) -> list[list[object]]:
    argv = cgroups.join_argv(Path(k["pod_cg"]), ["ip", "netns", "exec", k["ns"], sys.executable, "-c", CLIENT,
                                                   f"{k['net']}.3", str(n)])
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    return json.loads(res.stdout)


def test_redirector_ebpf_connect4_redirects_fails_open_and_removes_cleanly(kernel: dict[str, str],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    k = kernel
    net = k["net"]
    monkeypatch.setenv("NODEMESH_BPF_DIR", k["bpf_dir"])
    server = _Server(_listen(k["node_ns"], f"{net}.3", 8080), "direct")
    server.start()
    lines: list[str] = []
    config = CaptureConfig(node_ip=f"{net}.1", pod_cidrs=(f"{net}.0/24",), capture="ebpf")
    chosen, redirector = ebpf_mode.choose(config, Redirector(Netfilter(netns=k["node_ns"])), k["bpf_dir"], k["cg_root"],
                                          lambda event, **f: lines.append(f"{event} {f}"))
    assert chosen.capture == "ebpf", lines
    assert isinstance(redirector, ebpf_mode.EbpfRedirector)
    cap = redirector.ebpf
    assert cap.sync() and list(cap.attached) == [Path(k["pod_cg"])], cap.attached
    cap.set_enabled(True)

    # No agent listener in the sockmap yet: direct, though capture is switched on.
    assert [a for _p, a in _dial(k)] == ["direct"]

    agent_sock = _listen(k["node_ns"], f"{net}.1", 4140)
    agent = _Server(agent_sock, "agent", k["bpf_dir"])
    agent.start()
    fd = bpfsys.obj_get(f"{k['bpf_dir']}/nm_agent")
    try:
        bpfsys.update(fd, struct.pack("=I", 0), struct.pack("=Q", agent_sock.fileno()))
    finally:
        os.close(fd)
    got = _dial(k, 20)
    assert [a for _p, a in got] == [f"agent {net}.3:8080"] * 20, got
    assert len({p for p, _a in got}) == 20   # every connection its own source port (no folded tuples)

    cap.set_enabled(False)                    # the redirector's fail-open switch
    assert [a for _p, a in _dial(k)] == ["direct"]
    cap.set_enabled(True)
    assert [a for _p, a in _dial(k)] == [f"agent {net}.3:8080"]

    # Every agent process gone: its listening socket closes and the kernel drops it from the sockmap.
    # (shutdown first: the server thread's blocked accept() would keep the socket alive past close())
    agent_sock.shutdown(socket.SHUT_RDWR)
    agent_sock.close()
    agent.join(5)
    assert ebpf.read_enabled(k["bpf_dir"])    # still switched on: nobody acted
    assert [a for _p, a in _dial(k)] == ["direct"]

    # Removal: nothing left attached, pinned or loaded.
    attached = bpftool("cgroup", "show", k["pod_cg"]) or []
    prog_ids = {p["id"] for p in attached}
    assert {p["name"] for p in attached} >= {"nm_connect4", "nm_connect6", "nm_sockops"}, attached
    map_ids = {m for pid in prog_ids for m in ((bpftool("prog", "show", "id", str(pid)) or {}).get("map_ids", []))}
    assert map_ids
    redirector.remove(build_plan(chosen))
    # The "agent" (this process) holds the tuple map open, as an agent does until it exits with the
    # uninstall: let go of it as its exit would.
    from nodemesh.agent import capture

    capture._tuples.reset()
    assert not os.path.exists(k["bpf_dir"])
    assert not bpftool("cgroup", "show", k["pod_cg"])
    # The kernel frees programs and maps in deferred work once the last reference is gone.
    left = left_after_removal(prog_ids, set(map_ids))
    assert not any(left), left
    server.sock.close()


def test_redirector_ebpf_falls_back_to_iptables_with_one_line(tmp_path: Path) -> None:
    """No bpffs where the pins would go: iptables capture, and one line saying why."""
    lines: list[str] = []
    config = CaptureConfig(node_ip="10.0.0.1", pod_cidrs=("10.1.0.0/24",), capture="ebpf")
    inner = Redirector(Netfilter())
    chosen, redirector = ebpf_mode.choose(config, inner, str(tmp_path / "pins"), cgroups.CGROUP2_MOUNT,
                                          lambda event, **f: lines.append(f"{event} {f}"))
    assert chosen.capture == "iptables" and redirector is inner
    assert len(lines) == 1 and "fallback_from" in lines[0] and "not a bpf filesystem" in lines[0], lines
