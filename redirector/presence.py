"""Who of the mesh runs on this node: agents and redirectors announce themselves on abstract unix sockets.

Each agent parent listens on `@nodemesh/agent/<pid>` and each redirector on `@nodemesh/redirector/<pid>`.
Abstract unix sockets belong to a network namespace: every hostNetwork container of the node sees the
same ones (in `/proc/net/unix`), whatever pod it is in, and no file is left behind; the kernel closes a
process's socket when it dies, however it dies. So:

- a redirector knows whether another redirector runs beside it (a DaemonSet rolling update: the old one
  hands the shared rules over instead of removing them) and how many agents do (two during an update);
- a redirector connects to every agent's socket and holds the connection: the agent's death is an EOF
  at once (`kill -9` included), not a missed poll 2 s later (docs/redirector.md, "Liveness").

Pure standard library: the agent imports this too (no pyroute2 in its memory).
"""

from __future__ import annotations

import os
import socket
import subprocess

PREFIX = "nodemesh/"
AGENT = "agent"
REDIRECTOR = "redirector"
_LISTENING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags column


def address(kind: str, pid: int | None = None) -> str:
    """The abstract name (without the leading NUL) of a process of `kind`."""
    return f"{PREFIX}{kind}/{os.getpid() if pid is None else pid}"


def register(kind: str) -> socket.socket:
    """Announce this process: a listening abstract socket that lives exactly as long as we do."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("\0" + address(kind))
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return sock


def present(kind: str, netns: str | None = None) -> list[str]:
    """The names of `kind`'s listening sockets in this (or the named) network namespace."""
    try:
        if netns:
            text = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/net/unix"], capture_output=True,
                                  text=True, check=False, timeout=5).stdout
        else:
            with open("/proc/net/unix") as f:
                text = f.read()
    except (OSError, subprocess.SubprocessError):
        return []
    wanted = "@" + PREFIX + kind + "/"
    names = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode Path: accepted sockets carry the path too.
        if len(fields) >= 8 and fields[7].startswith(wanted) and int(fields[3], 16) & _LISTENING:
            names.append(fields[7][1:])
    return sorted(set(names))


def connect(name: str) -> socket.socket | None:
    """A connection to a present process's socket (non-blocking), or None if it is gone."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect("\0" + name)
    except OSError:
        sock.close()
        return None
    sock.setblocking(False)
    return sock
