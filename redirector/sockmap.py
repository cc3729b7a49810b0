"""`--accelerate sockmap`: the local hop between a pod and the agent skips the TCP/IP stack.

Two programs (bcc, loaded by the redirector, pinned in `<bpf-dir>-sockmap`):

- **cgroup/sock_ops** `nm_accel_sockops`, attached once to the node's cgroup root (every pod's
  cgroup and the agent's are below it): at ESTABLISHED it files a socket in the sockhash
  `nm_pairs` when it is one end of a pod<->agent connection of this node. The key is the
  connection as the *pod* sees it (pod IP, pod port, peer IP, peer port) plus the side, so the two
  ends of one connection have the same tuple and differ only in the side; the side is the
  socket's network namespace (the node's, `nm_aconf.host_ns`: the agent; any other: a pod).
  Filed are: the agent's upstream sockets to this node's pods (active, remote in the pod CIDR) and
  the pods' accepted sockets (passive); with eBPF capture also the pods' connects to the agent's
  outbound listener (active, remote node IP:4140) and the agent's accepted ones (passive, local
  node IP:4140). With iptables capture the pod's socket names the original destination and the
  agent's the NATed one: the two ends cannot be paired without trusting conntrack not to have
  moved the source port, so that hop is left to the stack (docs/redirector.md, "sockmap").
- **sk_msg** `nm_accel_msg`, on the sockhash: a send on a filed socket goes straight into the
  peer's receive queue (`msg_redirect_hash(..., BPF_F_INGRESS)`).

Ordering. A receiver reads redirected data before what the stack queued, so a direction must
never switch from the stack to redirection: a send that finds no peer marks its socket in
`nm_taint` and that socket's later sends stay on the stack (a client sending before its peer's
ESTABLISHED was seen). A peer filed at SYN-ACK (the connecting side) is always there before the
accepting side can send, so the answers of a connection are redirected from their first byte.
FIN and RST still travel the stack; a peer reads its redirected bytes before the FIN's EOF.

Removal detaches the sock_ops program, switches redirection off (queued bytes stay readable),
waits a moment for readers, and unpins: the kernel frees the sockhash and the sockets go back to
plain TCP. No program, map or pin is left.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nodemesh.redirector import bpfsys
from nodemesh.redirector.ebpf import BPF_F_ALLOW_MULTI, Probe, detach_everywhere
from nodemesh.redirector.ebpf import probe as capture_probe

ATTACH_SOCK_OPS = 3          # BPF_CGROUP_SOCK_OPS
ATTACH_SK_MSG_VERDICT = 7    # BPF_SK_MSG_VERDICT
SO_NETNS_COOKIE = 71
PAIRS_MAX = 65536
DRAIN_S = 0.5                # at removal: redirection off this long before the sockhash goes

PROGS = ("nm_accel_sockops", "nm_accel_msg")
MAPS = ("nm_pairs", "nm_aconf", "nm_taint", "nm_stats")
STATS = ("redirected_sends", "redirected_bytes", "stack_sends", "sockets_filed")

PROGRAM = r"""
#include <uapi/linux/bpf.h>
#include <linux/socket.h>
#include <linux/in.h>

#define SIDE_POD 1
#define SIDE_AGENT 2

struct nm_pair { u32 pod_ip; u32 peer_ip; u32 pod_port; u32 peer_port; u32 side; u32 pad; };
struct nm_aconf { u64 host_ns; u32 node_ip; u32 outbound_port; u32 pod_net; u32 pod_mask;
                  u32 outbound_pairs; u32 enabled; };

BPF_SOCKHASH(nm_pairs, struct nm_pair, PAIRS_MAX);
BPF_ARRAY(nm_aconf, struct nm_aconf, 1);
BPF_TABLE("lru_hash", struct nm_pair, u32, nm_taint, PAIRS_MAX);
BPF_PERCPU_ARRAY(nm_stats, u64, 4);   /* sends redirected, bytes redirected, sends left to the stack, filed */

static __always_inline void count(u32 i, u64 n) {
    u64 *v = nm_stats.lookup(&i);
    if (v) *v += n;
}

/* IPv4, or an AF_INET6 socket talking to a v4-mapped address (grpcio's dual-stack sockets). */
static __always_inline int ipv4ish(u32 family, u32 r0, u32 r1, u32 r2) {
    if (family == AF_INET) return 1;
    return family == AF_INET6 && r0 == 0 && r1 == 0 && r2 == bpf_htonl(0xffff);
}

int nm_accel_sockops(struct bpf_sock_ops *skops) {
    u32 op = skops->op;
    if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) return 1;
    if (!ipv4ish(skops->family, skops->remote_ip6[0], skops->remote_ip6[1], skops->remote_ip6[2])) return 1;
    u32 z = 0;
    struct nm_aconf *c = nm_aconf.lookup(&z);
    if (!c || !c->enabled) return 1;
    u32 lip = skops->local_ip4, rip = skops->remote_ip4;
    u32 lport = skops->local_port, rport = bpf_ntohl(skops->remote_port);
    int active = op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB;
    struct nm_pair k = {};
    if (bpf_get_netns_cookie(skops) == c->host_ns) {
        if (active) {                      /* the agent's upstream to a pod of this node */
            if ((rip & c->pod_mask) != c->pod_net) return 1;
        } else {                           /* the agent's outbound listener, eBPF capture */
            if (!c->outbound_pairs || lip != c->node_ip || lport != c->outbound_port) return 1;
        }
        k.pod_ip = rip; k.pod_port = rport; k.peer_ip = lip; k.peer_port = lport; k.side = SIDE_AGENT;
    } else {
        if (active) {                      /* a pod's connect sent to the agent (eBPF capture) */
            if (!c->outbound_pairs || rip != c->node_ip || rport != c->outbound_port) return 1;
        }
        k.pod_ip = lip; k.pod_port = lport; k.peer_ip = rip; k.peer_port = rport; k.side = SIDE_POD;
    }
    nm_taint.delete(&k);                   /* a reused tuple starts clean */
    int filed = nm_pairs.sock_hash_update(skops, &k, BPF_NOEXIST);
    if (filed == 0) count(3, 1);
    return 1;
}

int nm_accel_msg(struct sk_msg_md *msg) {
    u32 z = 0;
    struct nm_aconf *c = nm_aconf.lookup(&z);
    struct nm_pair self = {}, peer = {};
    u32 lip = msg->local_ip4, rip = msg->remote_ip4;
    u32 lport = msg->local_port, rport = bpf_ntohl(msg->remote_port);
    if (bpf_get_netns_cookie(msg) == (c ? c->host_ns : 0)) {
        self.pod_ip = rip; self.pod_port = rport; self.peer_ip = lip; self.peer_port = lport;
        self.side = SIDE_AGENT;
    } else {
        self.pod_ip = lip; self.pod_port = lport; self.peer_ip = rip; self.peer_port = rport;
        self.side = SIDE_POD;
    }
    if (!c || !c->enabled || nm_taint.lookup(&self)) return SK_PASS;
    peer = self;
    peer.side = self.side == SIDE_POD ? SIDE_AGENT : SIDE_POD;
    int verdict = nm_pairs.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
    if (verdict != SK_PASS) {
        u32 one = 1;                       /* sent on the stack: this direction stays there */
        nm_taint.update(&self, &one);
        count(2, 1);
    } else {
        count(0, 1);
        count(1, msg->size);
    }
    return SK_PASS;
}
"""


class SockmapError(RuntimeError):
    """sockmap acceleration cannot run here (the reason is the message)."""


def accel_dir(bpf_dir: str) -> str:
    """Beside the capture's pin directory, not in it: capture removal unpins all it finds there."""
    return bpf_dir.rstrip("/") + "-sockmap"


def program_text() -> str:
    return PROGRAM.replace("PAIRS_MAX", str(PAIRS_MAX))


def program_hash() -> str:
    return hashlib.sha256(program_text().encode()).hexdigest()[:12]


def netns_cookie() -> int:
    """This process's network namespace cookie (the agent side of every pair)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


def probe(bpf_dir: str, cgroup_root: str) -> Probe:
    """What capture needs (bcc, bpffs, cgroup v2, headers) plus the netns cookie (Linux 5.14);
    the kernel's verdict on the programs themselves comes at load."""
    found = capture_probe(bpf_dir, cgroup_root)
    if not found.ok:
        return found
    try:
        netns_cookie()
    except OSError as exc:
        return Probe(False, f"no SO_NETNS_COOKIE ({exc.strerror})")
    return Probe(True, found.reason)


@dataclass
class SockmapAccel:
    """One node's acceleration: `load()` compiles or reuses, `attach()` hooks the cgroup root,
    `remove()` leaves nothing behind."""

    node_ip: str
    outbound_port: int
    pod_cidr: str
    outbound_pairs: bool          # eBPF capture: pod->agent connects are unNATed, pairable
    bpf_dir: str                  # the capture's; ours is accel_dir(bpf_dir)
    cgroup_root: str
    log: Callable[..., None] = lambda *a, **k: None
    prog_fds: dict[str, int] = field(default_factory=dict)

    @property
    def dir(self) -> str:
        return accel_dir(self.bpf_dir)

    def _pin(self, name: str) -> str:
        return f"{self.dir}/{name}"

    def _prog_pin(self, name: str) -> str:
        return self._pin(f"{name}_{program_hash()}")

    def load(self) -> bool:
        """Reuse this version's pinned programs (a restarted redirector) or compile and pin them;
        then configure and attach. True if compiled now."""
        os.makedirs(self.dir, exist_ok=True)
        compiled = False
        try:
            self.prog_fds = {name: bpfsys.obj_get(self._prog_pin(name)) for name in PROGS}
        except bpfsys.BpfError:
            self._close()
            self.remove()   # another version's (or a half-made) set: none of it stays
            os.makedirs(self.dir, exist_ok=True)
            self._compile()
            compiled = True
        self._configure(enabled=True)
        self._attach()
        return compiled

    def _compile(self) -> None:
        from bcc import BPF  # here only: bcc is big

        try:
            b = BPF(text=program_text().encode(), cflags=["-w"])
            fns = {"nm_accel_sockops": b.load_func(b"nm_accel_sockops", BPF.SOCK_OPS),
                   "nm_accel_msg": b.load_func(b"nm_accel_msg", BPF.SK_MSG)}
            # bcc's Python tables do not know a sockhash (type 18): ask libbcc for the fds.
            from bcc.libbcc import lib
            maps = {name: lib.bpf_table_fd(b.module, name.encode()) for name in MAPS}
        except Exception as exc:
            raise SockmapError(f"loading the programs failed: {str(exc).splitlines()[0]}") from exc
        try:
            bpfsys.prog_attach(fns["nm_accel_msg"].fd, maps["nm_pairs"], ATTACH_SK_MSG_VERDICT, 0)
            for name, fd in maps.items():
                bpfsys.obj_pin(fd, self._pin(name))
            for name, fn in fns.items():
                bpfsys.obj_pin(fn.fd, self._prog_pin(name))
        except OSError as exc:
            raise SockmapError(f"attaching or pinning failed: {exc}") from exc
        self.prog_fds = {name: bpfsys.obj_get(self._prog_pin(name)) for name in PROGS}
        b.cleanup()

    def _close(self) -> None:
        for fd in self.prog_fds.values():
            os.close(fd)
        self.prog_fds = {}

    def _configure(self, enabled: bool) -> None:
        net = ipaddress.IPv4Network(self.pod_cidr)
        value = struct.pack("=Q4sI4s4sII", netns_cookie(), socket.inet_aton(self.node_ip), self.outbound_port,
                            net.network_address.packed, net.netmask.packed, int(self.outbound_pairs),
                            int(enabled))
        fd = bpfsys.obj_get(self._pin("nm_aconf"))
        try:
            bpfsys.update(fd, struct.pack("=I", 0), value)
        finally:
            os.close(fd)

    def _attach(self) -> None:
        cg = os.open(self.cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            bpfsys.prog_attach(self.prog_fds["nm_accel_sockops"], cg, ATTACH_SOCK_OPS, BPF_F_ALLOW_MULTI)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise SockmapError(f"attaching sock_ops to {self.cgroup_root} failed: {exc.strerror}") from exc
        finally:
            os.close(cg)

    def remove(self) -> bool:
        """Detach, switch redirection off, let readers take what is queued, unpin. True if
        anything was there."""
        self._close()
        if not os.path.isdir(self.dir):
            return False
        entries = sorted(os.listdir(self.dir))
        for entry in entries:
            if entry.startswith("nm_accel_sockops_"):
                detach_everywhere(os.path.join(self.dir, entry), self.cgroup_root, ATTACH_SOCK_OPS)
        if "nm_aconf" in entries:
            try:
                fd = bpfsys.obj_get(self._pin("nm_aconf"))
                try:
                    raw = bpfsys.lookup(fd, struct.pack("=I", 0), 32)
                    if raw and struct.unpack_from("=I", raw, 28)[0]:
                        bpfsys.update(fd, struct.pack("=I", 0), raw[:28] + struct.pack("=I", 0))
                        time.sleep(DRAIN_S)
                finally:
                    os.close(fd)
            except OSError:
                pass
        for entry in entries:
            os.unlink(os.path.join(self.dir, entry))
        os.rmdir(self.dir)
        return True


def read_stats(bpf_dir: str) -> dict[str, int] | None:
    """The programs' counters (summed over CPUs), None when acceleration is not pinned there."""
    try:
        fd = bpfsys.obj_get(f"{accel_dir(bpf_dir)}/nm_stats")
    except OSError:
        return None
    ncpu = _possible_cpus()
    try:
        out = {}
        for i, name in enumerate(STATS):
            raw = bpfsys.lookup(fd, struct.pack("=I", i), 8 * ncpu) or b""
            out[name] = sum(struct.unpack(f"={len(raw) // 8}Q", raw))
        return out
    finally:
        os.close(fd)


def _possible_cpus() -> int:
    """Per-CPU map values hold one slot per possible CPU (/sys/devices/system/cpu/possible)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    total = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        total += int(hi or lo) - int(lo) + 1
    return total


def pinned(bpf_dir: str) -> bool:
    return Path(accel_dir(bpf_dir)).is_dir()
