"""Socket plumbing for the traffic path: listeners, original destination, transparent upstreams."""

from __future__ import annotations

import errno
import resource
import socket
import struct
from typing import Any

from nodemesh.agent.capture import ebpf_capture_pinned, ebpf_original_destination

SO_ORIGINAL_DST = 80          # linux/netfilter_ipv4.h
IP_TRANSPARENT = 19           # linux/in.h
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: bind() takes the address, connect() picks the port
_LINGER_RST = struct.pack("ii", 1, 0)
# Accept queue of each traffic listener. The event loop's create_server(sock=...) listens again with
# its own default (100) unless told: pass this there too (`serve_outbound`/`serve_inbound`). The
# kernel caps it at net.core.somaxconn (4096 by default since Linux 5.4, per network namespace).
LISTEN_BACKLOG = 4096


def raise_fd_limit(want: int = 1 << 20) -> int:
    """RLIMIT_NOFILE's soft limit up to the hard one, and the hard one up to `want` (capped by
    fs.nr_open) where the process may (CAP_SYS_RESOURCE). Every relayed connection holds two fds;
    a worker left at a 20,000 limit refused connections past ~10,000 (issue 12). Returns the soft
    limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want
    try:
        with open("/proc/sys/fs/nr_open") as f:
            target = min(want, int(f.read()))
    except (OSError, ValueError):
        pass
    cap = target if hard == resource.RLIM_INFINITY else hard
    if cap < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            pass  # not allowed to raise the hard limit: use all of it
    new_soft = min(cap, target) if cap >= target else cap
    if new_soft > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        return new_soft
    return soft


# TCP keepalive on both sides of every relayed connection (Linkerd's proxy keeps 10 s too). A peer
# that vanishes without a FIN or RST — a deleted pod's veth, a crashed node, a close lost on the way —
# would otherwise hold our two sockets, and the server's, for as long as nobody writes: found on the
# routed sandbox as whole chains still ESTABLISHED minutes after their client was gone, whose tuple the
# client's next connection then met (docs/agent.md, "Known gaps"). Dead peers are found after
# IDLE + INTVL * CNT = 25 s of silence; a live idle peer answers each probe from its kernel.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTVL_S = 5
KEEPALIVE_CNT = 3


def set_keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTVL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_CNT)


def listen_socket(host: str, port: int, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A listening socket that other agents (workers, a newer agent) may bind too: SO_REUSEPORT.
    Accepted sockets inherit its keepalive (no call per connection)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        set_keepalive(sock)
        try:
            # Lets a TPROXY rule deliver connections for addresses that are not local.
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        except OSError:
            pass
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def original_destination(sock: Any) -> tuple[tuple[str, int], bool]:
    """(address the client dialled, True if it came from a NAT entry).

    With eBPF capture the pod's kernel recorded it (agent/capture.py, read first); with a nat
    REDIRECT/DNAT rule conntrack knows the pre-NAT destination (SO_ORIGINAL_DST);
    with TPROXY (no NAT entry) the accepted socket's own address is the original destination.
    """
    if ebpf_capture_pinned():
        try:
            # eBPF capture first (agent/capture.py): there the pod dialled us directly, and
            # conntrack would answer with our own address.
            peer = sock.getpeername()
            via_ebpf = ebpf_original_destination(peer[0], peer[1])
            if via_ebpf is not None:
                return via_ebpf, True
        except (OSError, IndexError):
            pass
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = int.from_bytes(raw[2:4], "big")
        return (socket.inet_ntoa(raw[4:8]), port), True
    except OSError:
        host, port = sock.getsockname()[:2]
        return (host, port), False


def set_reset_on_close(sock: Any) -> None:
    """Closing sends RST instead of FIN: the client sees a refused/aborted connection."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass


def upstream_socket(source_ip: str | None, source_port: int = 0) -> tuple[socket.socket, bool]:
    """A non-blocking socket for the upstream connection, bound to the calling pod's IP when the
    kernel lets us (IP_TRANSPARENT needs CAP_NET_ADMIN, and the redirector's return-path rules
    for replies to come back to this host). Returns (socket, transparent?).

    `source_port`: the caller's own port, kept when the capture NATed the connection to us (the
    caller's kernel already chose it so that its 4-tuple is unique; our TIME_WAIT sockets are the
    same tuples, closed a moment later). Then connect() checks one tuple instead of searching the
    ephemeral range: with 10,000 of our upstreams in TIME_WAIT (a pod that opened and closed
    10,000 connections) that search cost the workers ~40 % of a CPU each and the next 10,000
    connects took 30-55 s instead of 5. If the port is taken here (bind: a socket of the node
    holds it: EADDRINUSE, then port 0 here; connect: EADDRNOTAVAIL, that exact tuple open here, the
    caller asks again with port 0); a tuple of ours in TIME_WAIT is taken over at once (TCP
    timestamps, tcp_twsk_unique). Not with TPROXY capture: there the caller's own connection is
    tracked un-NATed, and an upstream with the same tuple would clash with it in the reply direction.

    Port 0 leaves the port to connect() (IP_BIND_ADDRESS_NO_PORT): the kernel then picks one that
    makes the whole 4-tuple unique, so a pod gets the same number of connections per destination
    through the agent as it has directly. bind(0) reserved a port per pod address across every
    destination (about 28,000 in TIME_WAIT's minute, then EADDRINUSE), and its search through
    the bound ports grew slow with them (8,000 connects: 48 s of worker CPU per 20,000 vs 28 s).

    Such a tuple can still be one the pod has in conntrack itself (a captured connection, DNATed
    to us), whatever port we pick: the pod's kernel does not know ours. The redirector puts our
    connections in a conntrack zone of their own (raw OUTPUT, `CT --zone-orig`), so they are never
    taken for the pod's (docs/redirector.md; tests/integration/faults/test_faults_connects.py)."""
    if source_ip and source_port:
        sock = _new_socket()
        try:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((source_ip, source_port))
            return sock, True
        except OSError:
            sock.close()  # port taken (or no transparency at all): the port-0 path below decides
    sock = _new_socket()
    if source_ip:
        try:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
            return sock, True
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EADDRNOTAVAIL, errno.EACCES, errno.EINVAL):
                sock.close()
                raise
            sock.close()
            sock = _new_socket()
    return sock, False


def _new_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_keepalive(sock)
    return sock


def enable_request_migration() -> bool:
    """net.ipv4.tcp_migrate_req=1: when a draining agent closes its SO_REUSEPORT listener, the
    connections still in its accept queue move to another listener of the group instead of being
    reset. Per network namespace. Read first: in a container /proc/sys is read-only, so there the
    DaemonSet's privileged init container sets it (`python -m nodemesh.redirector sysctls`) and
    the agent only checks; written here when it may (the sandbox, a node process)."""
    path = "/proc/sys/net/ipv4/tcp_migrate_req"
    try:
        with open(path) as f:
            if f.read().strip() == "1":
                return True
        with open(path, "w") as f:
            f.write("1")
        return True
    except OSError:
        return False
