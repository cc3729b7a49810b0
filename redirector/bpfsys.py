"""The few bpf(2) calls on the eBPF capture's pinned objects, with ctypes.

The redirector loads and attaches the programs with bcc (redirector/ebpf.py). The agent only opens
two pinned maps and reads or writes single elements: the pod-side tuple -> original destination
map (one lookup per accepted connection) and the sockmap holding its listening sockets (the
liveness the connect4 program checks). bcc would bring libbcc and LLVM into every agent process
(~100 MB mapped per worker) for those four calls, so they are made here directly: pure standard
library, like redirector/heartbeat.py, which the agent imports for the same reason. The redirector
uses bcc only to compile and load; pinning, attaching and detaching are these calls too, so removal
works on a node where bcc no longer imports.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

# bpf(2) commands (include/uapi/linux/bpf.h)
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_ANY = 0

_SYSCALL = {"x86_64": 321, "aarch64": 280, "arm64": 280}.get(platform.machine())
_ATTR_SIZE = 32
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf(2) call failed (errno set)."""


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    if _SYSCALL is None:
        raise BpfError(errno.ENOSYS, f"bpf(2): unknown syscall number on {platform.machine()}")
    res = _libc.syscall(_SYSCALL, cmd, ctypes.byref(attr), _ATTR_SIZE)
    if res < 0:
        err = ctypes.get_errno()
        raise BpfError(err, os.strerror(err))
    return int(res)


def obj_get(path: str) -> int:
    """A file descriptor for the object pinned at `path` (read-write). Raises BpfError/ENOENT."""
    raw = os.fsencode(path)
    name = ctypes.create_string_buffer(raw)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=QII", attr, 0, ctypes.addressof(name), 0, 0)
    return _bpf(BPF_OBJ_GET, attr)


def obj_pin(fd: int, path: str) -> None:
    name = ctypes.create_string_buffer(os.fsencode(path))
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=QII", attr, 0, ctypes.addressof(name), fd, 0)
    _bpf(BPF_OBJ_PIN, attr)


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    """Attach a program to a cgroup (directory fd). EEXIST: already attached there."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIII", attr, 0, target_fd, prog_fd, attach_type, flags)
    _bpf(BPF_PROG_ATTACH, attr)


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> bool:
    """Detach that program from that cgroup; False when it was not attached there."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIII", attr, 0, target_fd, prog_fd, attach_type, 0)
    return _unless_absent(BPF_PROG_DETACH, attr)


def _unless_absent(cmd: int, attr: ctypes.Array) -> bool:
    """Run the command; False when the kernel says what it names is not there (ENOENT)."""
    try:
        _bpf(cmd, attr)
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def _elem_attr(fd: int, key: bytes, value: ctypes.Array | None, flags: int = 0) -> tuple[ctypes.Array, ...]:
    kbuf = ctypes.create_string_buffer(key, len(key))
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIQQQ", attr, 0, fd, 0, ctypes.addressof(kbuf),
                     ctypes.addressof(value) if value is not None else 0, flags)
    return attr, kbuf


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The element's value, or None when the key is absent."""
    value = ctypes.create_string_buffer(value_size)
    attr, _kbuf = _elem_attr(fd, key, value)
    return value.raw if _unless_absent(BPF_MAP_LOOKUP_ELEM, attr) else None


def update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    vbuf = ctypes.create_string_buffer(value, len(value))
    attr, _kbuf = _elem_attr(fd, key, vbuf, flags)
    _bpf(BPF_MAP_UPDATE_ELEM, attr)


def delete(fd: int, key: bytes) -> bool:
    """True if the key was there."""
    attr, _kbuf = _elem_attr(fd, key, None)
    return _unless_absent(BPF_MAP_DELETE_ELEM, attr)
