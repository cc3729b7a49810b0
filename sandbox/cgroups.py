"""Pod cgroups for the sandbox, as a real kubelet makes them: every pod in its own cgroup v2 directory.

eBPF capture (redirector/ebpf.py) attaches its programs to pod cgroups, so the sandbox's pods need
them like a real node's. This machine (and many CI hosts) mounts cgroup v1 at /sys/fs/cgroup, and
`ip netns exec` remounts /sys in the process it starts, so neither /sys/fs/cgroup nor /sys/fs/bpf
are reliable here: the sandbox mounts the (single, kernel-wide) cgroup v2 hierarchy at
CGROUP2_MOUNT and a bpf filesystem at BPFFS_MOUNT, outside /sys, before any node process starts
(mounts made later in the host would not reach processes already in `ip netns exec`'s private
mount namespace). Layout: CGROUP2_MOUNT/nodemesh-sandbox/<cluster>/<node>/pod<uid>; the node
directory is that node's `--cgroup-root` (a real node's is the kubelet's kubepods directory).
A process joins its pod's directory itself, before exec (`join_argv`), so its very first connect
is already in it. No controllers are enabled: the directories only group processes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

CGROUP2_MOUNT = "/run/nodemesh-cgroup2"
BPFFS_MOUNT = "/run/nodemesh-bpf"
SANDBOX_DIR = "nodemesh-sandbox"


def _mounted(path: str) -> str | None:
    """The filesystem type mounted exactly at `path`, None if nothing is."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] == path:
                    return fields[fields.index("-") + 1]
    except (OSError, ValueError, IndexError):
        return None
    return None


def ensure_mounts() -> str | None:
    """Mount cgroup2 and bpffs at their sandbox places if they are not there. None when both are
    in place, else why not (the sandbox runs without pod cgroups: eBPF capture then falls back)."""
    for path, fstype in ((CGROUP2_MOUNT, "cgroup2"), (BPFFS_MOUNT, "bpf")):
        if _mounted(path) == fstype:
            continue
        os.makedirs(path, exist_ok=True)
        res = subprocess.run(["mount", "-t", fstype, fstype, path], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            return f"mount -t {fstype} {path}: {res.stderr.strip()}"
    return None


def cluster_cgroup(cluster: str) -> Path:
    return Path(CGROUP2_MOUNT) / SANDBOX_DIR / cluster


def node_cgroup(cluster: str, node: str) -> Path:
    return cluster_cgroup(cluster) / node


def pod_cgroup(cluster: str, node: str, uid: str) -> Path:
    return node_cgroup(cluster, node) / f"pod{uid}"


def node_bpf_dir(cluster: str, node: str) -> str:
    """Where a sandbox node's eBPF capture pins its programs and maps."""
    return f"{BPFFS_MOUNT}/{cluster}-{node}"


def node_paths(cluster: str, node: str) -> dict[str, Path]:
    """A node's own /sys/fs/bpf and /sys/fs/cgroup, for hostPath volumes of its pods (the DaemonSet's
    eBPF capture mounts): its bpffs directory and its pods' cgroup directory."""
    bpf = Path(f"{BPFFS_MOUNT}/{cluster}-{node}-host")
    if _mounted(BPFFS_MOUNT) == "bpf":
        bpf.mkdir(parents=True, exist_ok=True)
    return {"/sys/fs/bpf": bpf, "/sys/fs/cgroup": node_cgroup(cluster, node)}


def prepare_pod(cluster: str, node: str, uid: str) -> Path | None:
    """The pod's cgroup directory, created; None without a cgroup2 mount."""
    if _mounted(CGROUP2_MOUNT) != "cgroup2":
        return None
    path = pod_cgroup(cluster, node, uid)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path


def join_argv(cgroup: Path, argv: list[str]) -> list[str]:
    """`argv`, started by a shell that first moves itself into `cgroup` (so does what it execs)."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *argv]


def remove_bpf_dirs(cluster: str) -> None:
    """The cluster's (empty) directories in the sandbox bpffs; pins left in one keep it."""
    root = Path(BPFFS_MOUNT)
    if not root.is_dir():
        return
    for d in root.glob(f"{cluster}-*"):
        with contextlib.suppress(OSError):
            d.rmdir()


def remove_tree(path: Path) -> None:
    """Remove empty cgroup directories bottom-up (a directory with live processes stays)."""
    if not path.is_dir():
        return
    for d, dirs, _files in os.walk(path, topdown=False):
        for name in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(d, name))
    with contextlib.suppress(OSError):
        path.rmdir()
