"""eBPF capture (`--capture ebpf`): pod connects are sent to the agent by the pod's own kernel.

Programs (bcc, loaded by the redirector, pinned in `bpf_dir`, attached to each pod's cgroup v2):

- **cgroup/connect4** `nm_connect4`: a pod's TCP connect() to anything but the node, loopback and
  the skipped ports is rewritten to the agent's outbound listener (node IP : 4140) *before* a
  packet leaves: no NAT, no conntrack rewrite. The original destination is remembered under the
  socket's cookie (`nm_orig`). It redirects only while capture is enabled (`nm_conf`, the
  redirector's switch: the same decisions as the iptables hooks, fail-open included) **and** an
  agent listening socket is in the sockmap `nm_agent`. The agent's parent puts its outbound
  listeners there (agent/capture.py); the kernel removes a socket from every sockmap when it
  closes, so when the last agent process dies (kill -9, OOM, crash) the very next connect goes
  direct: fail-open in the kernel, instantly, with no process of ours left (issue 14 item 3).
- **cgroup/connect6** `nm_connect6`: the same for a dual-stack socket dialling a v4-mapped
  address (::ffff:a.b.c.d; grpcio does): sent to ::ffff:node-IP. Real IPv6 is left alone.
- **cgroup/sock_ops** `nm_sockops`: at TCP_CONNECT (source port chosen, SYN not yet sent) moves
  the original destination from the cookie to the pod-side (IP, port) in `nm_tuple`, which is
  what the agent sees as the accepted socket's peer: the agent reads (and deletes) it there
  instead of asking conntrack (SO_ORIGINAL_DST).

The caller's source IP is the pod's own (the connection really comes from the pod), as with
iptables capture; the agent's upstream borrows it the same way (the return path stays iptables).
Inbound capture stays iptables (docs/architecture.md says why). The pod's kernel picks the source
port against the agent's address, so two connections of a pod never fold onto one agent tuple
(the REDIRECT/DNAT "folded tuples" of docs/agent.md).

Programs attach per pod cgroup (found under `cgroup_root`: a directory whose processes live in a
network namespace holding an address of the node's pod CIDR, not excluded) with
BPF_F_ALLOW_MULTI, so other programs there (a CNI's, systemd's) keep running. Removal detaches
ours from every cgroup under the root and unpins everything: no program, map or pin is left.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from nodemesh.redirector import bpfsys

BPF_FS_MAGIC = 0xCAFE4A11
CGROUP2_SUPER_MAGIC = 0x63677270
DEFAULT_BPF_DIR = "/sys/fs/bpf/nodemesh"
DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"
MAX_AGENT_SOCKETS = 16      # sockmap slots: one outbound listener per agent worker
BPF_F_ALLOW_MULTI = 2
ATTACH_CONNECT4 = 10       # BPF_CGROUP_INET4_CONNECT
ATTACH_CONNECT6 = 11       # BPF_CGROUP_INET6_CONNECT
ATTACH_SOCK_OPS = 3        # BPF_CGROUP_SOCK_OPS

MAPS = ("nm_conf", "nm_skip", "nm_agent", "nm_orig", "nm_tuple")
PROGS = (("nm_connect4", ATTACH_CONNECT4), ("nm_connect6", ATTACH_CONNECT6), ("nm_sockops", ATTACH_SOCK_OPS))

PROGRAM = r"""
#include <uapi/linux/bpf.h>
#include <linux/socket.h>
#include <linux/in.h>

struct nm_conf { u32 agent_ip; u32 agent_port; u32 enabled; u32 pad; };
struct nm_dst { u32 ip; u32 port; };   /* ip: network order; port: host order */
struct nm_src { u32 ip; u32 port; };

BPF_TABLE_PINNED("array", u32, struct nm_conf, nm_conf, 1, "PIN/nm_conf");
BPF_TABLE_PINNED("hash", u32, u32, nm_skip, 256, "PIN/nm_skip");
BPF_TABLE_PINNED("sockmap", u32, u64, nm_agent, MAX_AGENT, "PIN/nm_agent");
BPF_TABLE_PINNED("lru_hash", u64, struct nm_dst, nm_orig, 65536, "PIN/nm_orig");
BPF_TABLE_PINNED("lru_hash", struct nm_src, struct nm_dst, nm_tuple, 65536, "PIN/nm_tuple");

static __always_inline int agent_listening(void) {
#pragma unroll
    for (u32 i = 0; i < MAX_AGENT; i++) {
        u32 k = i;
        struct bpf_sock *sk = (struct bpf_sock *)nm_agent.lookup(&k);
        if (sk) { bpf_sk_release(sk); return 1; }
    }
    return 0;
}

/* The config to redirect to when this connect to `dip` (network order) goes to the agent, the
   original destination filed under the socket's cookie for sock_ops; NULL: let it go direct. */
static __always_inline struct nm_conf *nm_redirect(struct bpf_sock_addr *ctx, u32 dip) {
    u32 z = 0;
    struct nm_conf *c = nm_conf.lookup(&z);
    if (!c || !c->enabled) return 0;
    if (dip == c->agent_ip || (dip & 0xff) == 127 || dip == 0) return 0;
    u32 port = bpf_ntohs((u16)ctx->user_port);
    if (nm_skip.lookup(&port)) return 0;
    if (!agent_listening()) return 0;
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct nm_dst d = {.ip = dip, .port = port};
    nm_orig.update(&cookie, &d);
    return c;
}

int nm_connect4(struct bpf_sock_addr *ctx) {
    if (ctx->type != 1 /* SOCK_STREAM */) return 1;
    struct nm_conf *c = nm_redirect(ctx, ctx->user_ip4);
    if (!c) return 1;
    ctx->user_ip4 = c->agent_ip;
    ctx->user_port = c->agent_port;
    return 1;
}

/* Dual-stack clients (grpcio, Java, Go's net with "tcp") connect IPv4 peers from an AF_INET6
   socket to ::ffff:a.b.c.d: that is connect6, not connect4. Only those v4-mapped addresses are
   redirected (to ::ffff:agent); real IPv6 stays uncaptured, as with iptables capture. */
int nm_connect6(struct bpf_sock_addr *ctx) {
    if (ctx->type != 1 /* SOCK_STREAM */) return 1;
    if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 || ctx->user_ip6[2] != bpf_htonl(0xffff)) return 1;
    struct nm_conf *c = nm_redirect(ctx, ctx->user_ip6[3]);
    if (!c) return 1;
    ctx->user_ip6[3] = c->agent_ip;
    ctx->user_port = c->agent_port;
    return 1;
}

int nm_sockops(struct bpf_sock_ops *skops) {
    if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB) return 1;
    if (skops->family != AF_INET && skops->family != AF_INET6) return 1;   /* v4-mapped: local_ip4 is set */
    u64 cookie = bpf_get_socket_cookie(skops);
    struct nm_dst *d = nm_orig.lookup(&cookie);
    if (!d) return 1;
    struct nm_src k = {.ip = skops->local_ip4, .port = skops->local_port};
    struct nm_dst v = *d;
    nm_tuple.update(&k, &v);
    nm_orig.delete(&cookie);
    return 1;
}
"""


class EbpfError(RuntimeError):
    """eBPF capture cannot run here (the reason is the message)."""


def _statfs_type(path: str) -> int | None:
    """f_type of the filesystem holding `path` (statfs(2)), None when unreadable."""
    buf = ctypes.create_string_buffer(120)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return struct.unpack_from("=q", buf, 0)[0] & 0xFFFFFFFF


def program_text(bpf_dir: str) -> str:
    return PROGRAM.replace("PIN/", bpf_dir.rstrip("/") + "/").replace("MAX_AGENT", str(MAX_AGENT_SOCKETS))


def program_hash(bpf_dir: str) -> str:
    return hashlib.sha256(program_text(bpf_dir).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Probe:
    ok: bool
    reason: str


def probe(bpf_dir: str = DEFAULT_BPF_DIR, cgroup_root: str = DEFAULT_CGROUP_ROOT) -> Probe:
    """Can eBPF capture run on this node? Cheap checks only (no compile): bcc importable, the pin
    directory's parent on a bpffs, the cgroup root a cgroup v2 hierarchy, kernel headers or BTF
    for bcc. The first missing piece is the reason."""
    try:
        import bcc  # noqa: F401
    except Exception as exc:  # noqa: BLE001 (ImportError, or libbcc failing to load)
        return Probe(False, f"bcc not importable ({type(exc).__name__}: {exc})")
    parent = str(Path(bpf_dir).parent)
    if _statfs_type(parent) != BPF_FS_MAGIC:
        return Probe(False, f"{parent} is not a bpf filesystem (mount -t bpf bpf {parent})")
    if _statfs_type(cgroup_root) != CGROUP2_SUPER_MAGIC:
        return Probe(False, f"{cgroup_root} is not a cgroup v2 hierarchy")
    release = os.uname().release
    if not Path(f"/lib/modules/{release}/build/include").exists() and \
            not Path("/sys/kernel/kheaders.tar.xz").exists():
        return Probe(False, f"no kernel headers for bcc (/lib/modules/{release}/build)")
    return Probe(True, f"bcc, bpffs at {parent}, cgroup v2 at {cgroup_root}")


def netns_ipv4(pid: int) -> set[str]:
    """The local IPv4 addresses of a process's network namespace (from /proc/PID/net/fib_trie)."""
    try:
        with open(f"/proc/{pid}/net/fib_trie") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    found: set[str] = set()
    last = ""
    for line in lines:
        text = line.strip()
        if text.startswith(("|--", "+--")):
            last = text[3:].strip().split("/")[0]
        elif text == "/32 host LOCAL" and last:
            found.add(last)
    return found


def _pids(cgroup: Path) -> list[int]:
    try:
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def pod_cgroups(root: Path, networks: tuple[str, ...], node_ip: str,
                known: dict[Path, str] | None = None) -> dict[Path, str]:
    """Pod cgroups under `root` and the pod IP of each: the highest directories whose processes
    live in a network namespace with an address in `networks` and without the node's IP. hostNetwork
    pods — the agent among them — live in the node's namespace, which holds the node IP (and, on a
    bridge CNI, the bridge's gateway address inside the pod CIDR): never captured, or the agent's
    own upstream connects would come back to it. A pod directory without processes of its own (a
    real kubelet's, with one directory per container below) is searched below. `known` pods (found
    before: the runner polls every 250 ms) are taken as they are while their directory exists,
    without reading their namespace again."""
    nets = [ipaddress.IPv4Network(n) for n in networks]
    found: dict[Path, str] = {}
    known = known or {}

    def visit(d: Path, depth: int) -> None:
        if d in known:
            found[d] = known[d]
            return
        pids = _pids(d) if d != root else []
        for pid in pids[:3]:
            addresses = netns_ipv4(pid)
            if node_ip in addresses:
                return   # the node's own namespace: a hostNetwork pod
            for ip in sorted(addresses):
                if any(ipaddress.IPv4Address(ip) in n for n in nets):
                    found[d] = ip
                    return
        if pids or depth > 6:
            return
        try:
            children = [c for c in d.iterdir() if c.is_dir()]
        except OSError:
            return
        for c in children:
            visit(c, depth + 1)

    visit(root, 0)
    return found


@dataclass
class EbpfCapture:
    """The eBPF side of one node's capture. `load()` compiles (or reuses pinned) programs;
    `sync()` attaches them to pod cgroups; `set_enabled()` is the capture switch; `remove()`
    leaves nothing behind."""

    node_ip: str
    outbound_port: int
    networks: tuple[str, ...]
    skip_ports: tuple[int, ...]
    bpf_dir: str = DEFAULT_BPF_DIR
    cgroup_root: str = DEFAULT_CGROUP_ROOT
    log: Callable[..., None] = lambda *a, **k: None
    attached: dict[Path, str] = field(default_factory=dict)
    prog_fds: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------------------- pins
    def _pin(self, name: str) -> str:
        return f"{self.bpf_dir.rstrip('/')}/{name}"

    def _prog_pin(self, name: str) -> str:
        return self._pin(f"{name}_{program_hash(self.bpf_dir)}")

    def load(self) -> bool:
        """Programs pinned by this version already (a restarted redirector) are reused; else
        compiled with bcc and pinned. True if compiled now."""
        os.makedirs(self.bpf_dir, exist_ok=True)
        try:
            self.prog_fds = {name: bpfsys.obj_get(self._prog_pin(name)) for name, _ in PROGS}
            self._configure()
            return False
        except bpfsys.BpfError:
            self._close_progs()
        from bcc import BPF  # here only: bcc is big, and the agent never imports this module

        text = program_text(self.bpf_dir)
        try:
            b = BPF(text=text.encode(), cflags=["-w"])
            fns = {"nm_connect4": b.load_func(b"nm_connect4", BPF.CGROUP_SOCK_ADDR,
                                             attach_type=ATTACH_CONNECT4),
                   "nm_connect6": b.load_func(b"nm_connect6", BPF.CGROUP_SOCK_ADDR,
                                             attach_type=ATTACH_CONNECT6),
                   "nm_sockops": b.load_func(b"nm_sockops", BPF.SOCK_OPS)}
        except Exception as exc:
            raise EbpfError(f"loading the programs failed: {exc}") from exc
        for name, fn in fns.items():
            try:
                bpfsys.obj_pin(fn.fd, self._prog_pin(name))
            except OSError as exc:
                raise EbpfError(f"pinning {self._prog_pin(name)} failed: {exc}") from exc
        self.prog_fds = {name: bpfsys.obj_get(self._prog_pin(name)) for name, _ in PROGS}
        b.cleanup()
        self._remove_stale_programs()
        self._configure()
        return True

    def _close_progs(self) -> None:
        for fd in self.prog_fds.values():
            os.close(fd)
        self.prog_fds = {}

    def _remove_stale_programs(self) -> None:
        """Programs of another version pinned here (an upgrade): detach and unpin them."""
        current = {os.path.basename(self._prog_pin(n)) for n, _ in PROGS}
        for entry in os.listdir(self.bpf_dir):
            for name, kind in PROGS:
                if entry.startswith(name + "_") and entry not in current:
                    detach_everywhere(os.path.join(self.bpf_dir, entry), self.cgroup_root, kind)
                    os.unlink(os.path.join(self.bpf_dir, entry))

    def _configure(self) -> None:
        fd = bpfsys.obj_get(self._pin("nm_skip"))
        try:
            for port in self.skip_ports:
                bpfsys.update(fd, struct.pack("=I", port), struct.pack("=I", 1))
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------ switch
    def set_enabled(self, enabled: bool) -> None:
        value = struct.pack("=4sIII", socket.inet_aton(self.node_ip), socket.htons(self.outbound_port),
                            int(enabled), 0)
        fd = bpfsys.obj_get(self._pin("nm_conf"))
        try:
            bpfsys.update(fd, struct.pack("=I", 0), value)
        finally:
            os.close(fd)

    def enabled(self) -> bool:
        return read_enabled(self.bpf_dir)

    # ----------------------------------------------------------------------------- cgroups
    def sync(self, excluded: Iterable[str] = ()) -> bool:
        """Attach to every pod cgroup not excluded, detach from excluded ones; forget pods gone.
        True if anything changed."""
        excluded = set(excluded)
        pods = pod_cgroups(Path(self.cgroup_root), self.networks, self.node_ip, self.attached)
        changed = False
        for path, ip in pods.items():
            want = ip not in excluded
            have = path in self.attached
            if want and not have:
                if self._attach(path):
                    self.attached[path] = ip
                    changed = True
                    self.log("ebpf_attached", cgroup=str(path), pod_ip=ip)
            elif have and not want:
                self._detach(path)
                del self.attached[path]
                changed = True
                self.log("ebpf_detached", cgroup=str(path), pod_ip=ip, reason="excluded")
        for path in [p for p in self.attached if p not in pods]:
            del self.attached[path]   # the pod is gone: the kernel dropped its cgroup and programs
        return changed

    def _attach(self, path: Path) -> bool:
        try:
            cg = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return False
        try:
            for name, kind in PROGS:
                try:
                    bpfsys.prog_attach(self.prog_fds[name], cg, kind, BPF_F_ALLOW_MULTI)
                except OSError as exc:
                    if exc.errno != errno.EEXIST:   # EEXIST: attached by an earlier redirector
                        self.log("ebpf_attach_failed", cgroup=str(path), program=name, error=exc.strerror)
                        return False
        finally:
            os.close(cg)
        return True

    def _detach(self, path: Path) -> None:
        for name, kind in PROGS:
            _detach_one(self.prog_fds[name], path, kind)

    # ----------------------------------------------------------------------------- removal
    def remove(self) -> bool:
        """Detach our programs from every cgroup under the root, unpin programs and maps, remove
        the pin directory. True if anything was there."""
        self._close_progs()
        self.attached.clear()
        if not os.path.isdir(self.bpf_dir):
            return False
        for entry in sorted(os.listdir(self.bpf_dir)):
            pin = os.path.join(self.bpf_dir, entry)
            for name, kind in PROGS:
                if entry.startswith(name + "_"):
                    detach_everywhere(pin, self.cgroup_root, kind)
            os.unlink(pin)
        os.rmdir(self.bpf_dir)
        return True


def detach_everywhere(pin: str, cgroup_root: str | Path, kind: int) -> None:
    """Detach the program pinned at `pin` from every cgroup under `cgroup_root` (capture's
    connect programs, acceleration's sock_ops: an earlier version's, or ours at removal)."""
    try:
        fd = bpfsys.obj_get(pin)
    except bpfsys.BpfError:
        return
    try:
        for d, _dirs, _files in os.walk(cgroup_root):
            _detach_one(fd, Path(d), kind)
    finally:
        os.close(fd)


def _detach_one(prog_fd: int, path: Path, kind: int) -> None:
    try:
        cg = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        bpfsys.prog_detach(prog_fd, cg, kind)   # False: not attached there
    except OSError:
        pass
    finally:
        os.close(cg)


# ---------------------------------------------------------------------- read side (no bcc)
def read_enabled(bpf_dir: str) -> bool:
    """Is eBPF capture pinned in `bpf_dir` and switched on? (standard library only)"""
    try:
        fd = bpfsys.obj_get(f"{bpf_dir.rstrip('/')}/nm_conf")
    except OSError:
        return False
    try:
        raw = bpfsys.lookup(fd, struct.pack("=I", 0), 16)
    except OSError:
        return False
    finally:
        os.close(fd)
    return bool(raw and struct.unpack_from("=I", raw, 8)[0])
