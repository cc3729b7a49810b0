"""Is the redirector's capture in place on this node? (read only: the redirector owns the rules)

Our hook is a jump from nat PREROUTING to our chain (`redirector.plan.hook_present`). The agent
reads nat PREROUTING alone (`iptables -t nat -S PREROUTING`: on a node with 20k kube-proxy rules
~2 ms against ~370 ms for the whole table with `iptables-save -t nat`), in whichever backend the
redirector chose (redirector/backend.py), without ever creating a table in either:

- nft: `iptables-nft` never creates a table by reading one;
- legacy: read only when its nat table already exists (`/proc/net/ip_tables_names`). Reading a
  legacy table that does not exist creates it, and on an nft node that table stays until reboot
  and makes every `iptables` command there warn `iptables-legacy tables present`.

No pyroute2 (about 20 MB of the agent parent's memory for a check that reads one chain), no
thread, and no fork(): the tool is started with posix_spawn (agent/spawn.py; the parent runs
grpc's threads).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

from nodemesh.agent import spawn
from nodemesh.redirector import bpfsys
from nodemesh.redirector.backend import LEGACY_TABLE_LISTS
from nodemesh.redirector.plan import hook_present

log = logging.getLogger("nodemesh.agent.capture")
MAX_AGENT_SOCKETS = 16   # redirector/ebpf.py's sockmap size (not imported: the agent's memory)


def legacy_nat_exists() -> bool:
    try:
        with open(LEGACY_TABLE_LISTS[0]) as f:
            return "nat" in f.read().split()
    except OSError:
        return False


async def _hooked(backend: str) -> bool | None:
    """None: this backend could not be read (not installed, or the read failed)."""
    try:
        code, out = await spawn.run([f"iptables-{backend}", "-w", "2", "-t", "nat", "-S", "PREROUTING"])
    except OSError:  # this backend's tools are not installed
        return None
    if code != 0:
        return None
    return hook_present("*nat\n" + out.decode("utf-8", "replace"))


async def capture_active() -> bool | None:
    """True: hooked; False: no hook where it could be; None: unknown (a read failed, e.g. while
    another writer's transaction held the table) — the caller keeps what it knew."""
    nft = await _hooked("nft")
    if nft:
        return True
    if not legacy_nat_exists():
        return nft            # False, or None when nft could not be read
    legacy = await _hooked("legacy")
    if legacy:
        return True
    return None if nft is None or legacy is None else False


# ----------------------------------------------------------------------------- eBPF capture
# With `--capture ebpf` (redirector/ebpf.py) the pod's connect() itself reaches our outbound
# listener: no NAT, so conntrack cannot say where it was going. The pod's kernel left the original
# destination in a pinned map under the pod-side (IP, port), our accepted socket's peer. And the
# connect4 program redirects only while one of our outbound listeners is in its sockmap: the kernel
# drops a closed socket from every sockmap, so when the last agent process dies pods go direct at
# once. Standard library only (redirector/bpfsys.py), no bcc in the agent.
# The pin directory: NODEMESH_BPF_DIR (the DaemonSet and `install --sandbox --capture ebpf` set it).
BPF_DIR_ENV = "NODEMESH_BPF_DIR"
SO_COOKIE = 57
_REOPEN_S = 1.0


def bpf_dir() -> str:
    return os.environ.get(BPF_DIR_ENV) or "/sys/fs/bpf/nodemesh"   # redirector/ebpf.py DEFAULT_BPF_DIR


class _PinnedMap:
    """A pinned map opened on first use; absent, retried at most every _REOPEN_S."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fd: int | None = None
        self._next_try = 0.0

    def get(self) -> int | None:
        if self.fd is not None:
            return self.fd
        now = time.monotonic()
        if now < self._next_try:
            return None
        self._next_try = now + _REOPEN_S   # also when found: stale() counts from here
        try:
            self.fd = bpfsys.obj_get(f"{bpf_dir().rstrip('/')}/{self.name}")
        except OSError:
            return None
        return self.fd

    def stale(self) -> bool:
        """Opened more than _REOPEN_S ago (worth re-opening after a miss)."""
        return time.monotonic() >= self._next_try

    def reset(self) -> None:
        """The map went away (a removal, a redirector loading a new version): open again later."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = None


_tuples = _PinnedMap("nm_tuple")


def ebpf_capture_pinned() -> bool:
    """Is there an eBPF capture's tuple map to ask? False on an iptables node (the open is retried
    at most every _REOPEN_S), so the accept path skips the peer lookup there."""
    return _tuples.get() is not None


def ebpf_original_destination(peer_ip: str, peer_port: int) -> tuple[str, int] | None:
    """Where the pod at (peer_ip, peer_port) connected before connect4 sent it to us, read once
    (the entry is deleted: the map stays small and a reused port finds only its own entry)."""
    try:
        key = socket.inet_aton(peer_ip) + struct.pack("=I", peer_port)
    except OSError:
        return None
    for attempt in (0, 1):
        fd = _tuples.get()
        if fd is None:
            return None
        try:
            raw = bpfsys.lookup(fd, key, 8)
        except OSError:
            raw = None
        if raw is not None:
            with contextlib.suppress(OSError):
                bpfsys.delete(fd, key)
            return socket.inet_ntoa(raw[:4]), struct.unpack_from("=I", raw, 4)[0]
        # A miss: an iptables-captured connection, or our map was replaced (a redirector removed
        # and re-created it): look again in the pinned one, at most every _REOPEN_S.
        if attempt or not _tuples.stale():
            return None
        _tuples.reset()
    return None


class EbpfPresence:
    """Keeps our outbound listeners in the connect4 program's sockmap while `alive()`, and takes
    them out when not (SIGTERM: a draining agent takes no new connections). Slot = worker index; a
    slot holding another agent's socket (a rolling update's new agent) is never cleared by us."""

    def __init__(self, alive: Callable[[], bool], listeners: Callable[[], dict[int, socket.socket]],
                 period_s: float = 0.05) -> None:
        self.alive = alive
        self.listeners = listeners
        self.period_s = period_s
        self.registered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nodemesh-ebpf-presence", daemon=True)

    def start(self) -> EbpfPresence:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.sync()
            except Exception as exc:  # noqa: BLE001 (never end the thread: retry next period)
                log.debug("event=ebpf_presence_failed error=%r", exc)

    def sync(self) -> int:
        """One pass; the number of our sockets in the map afterwards. The map is opened afresh each
        pass (two syscalls): a redirector that removed and re-created it is followed at once."""
        try:
            fd = bpfsys.obj_get(f"{bpf_dir().rstrip('/')}/nm_agent")
        except OSError:
            self.registered = 0
            return 0
        try:
            return self._sync(fd)
        finally:
            os.close(fd)

    def _sync(self, fd: int) -> int:
        try:
            alive = bool(self.alive())
        except Exception:  # noqa: BLE001
            alive = False
        count = 0
        for index, sock in self.listeners().items():
            if index >= MAX_AGENT_SOCKETS:
                continue
            key = struct.pack("=I", index)
            mine = sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
            held = bpfsys.lookup(fd, key, 8)
            if alive:
                if held != mine:
                    bpfsys.update(fd, key, struct.pack("=Q", sock.fileno()))
                    log.info("event=ebpf_presence slot=%d registered=true", index)
                count += 1
            elif held == mine:
                bpfsys.delete(fd, key)
                log.info("event=ebpf_presence slot=%d registered=false", index)
        if count != self.registered:
            self.registered = count
        return count


def ebpf_capture_state() -> dict[str, str]:
    """Which capture runs on this node and why, for `/capture` and `nodemesh check`."""
    from nodemesh.redirector.ebpf import read_enabled

    where = bpf_dir()
    if read_enabled(where):
        state = {"capture_mode": "ebpf", "capture_mode_reason": f"connect4 programs pinned at {where}, enabled"}
    elif os.path.exists(f"{where.rstrip('/')}/nm_conf"):
        state = {"capture_mode": "iptables",
                 "capture_mode_reason": f"eBPF capture pinned at {where} but switched off (failed open)"}
    else:
        state = {"capture_mode": "iptables", "capture_mode_reason": f"no eBPF capture pinned at {where}"}
    from nodemesh.redirector.sockmap import accel_dir

    if os.path.exists(f"{accel_dir(where)}/nm_stats"):  # a stat, not the counters: this runs every few seconds
        state["capture_mode_reason"] += "; sockmap acceleration on"
    return state


def sockmap_stats(where: str | None = None) -> dict[str, int] | None:
    """`--accelerate sockmap`'s counters as the redirector's programs keep them (redirected sends
    and bytes, sends through the stack, sockets filed); None when it is not pinned (or not
    readable from here: a manifest agent has no bpffs)."""
    from nodemesh.redirector.sockmap import read_stats  # bpf(2) only: no bcc in the agent

    try:
        return read_stats(bpf_dir() if where is None else where)
    except OSError:
        return None
