"""The kernel's BPF objects as bpftool lists them, for the eBPF and sockmap removal tests."""

from __future__ import annotations

import json
import subprocess
import time


def bpftool(*args: str) -> object:
    """`bpftool -j ARGS` parsed, or None when it fails or prints nothing."""
    res = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=False)
    return json.loads(res.stdout) if res.returncode == 0 and res.stdout.strip() else None


def left_after_removal(prog_ids: set[int], map_ids: set[int], timeout: float = 5.0) -> tuple[set[int], dict[int, str]]:
    """The programs and maps of these ids the kernel still holds, waiting up to `timeout` (it frees
    them in deferred work once the last reference is gone): empty when removal left nothing."""
    deadline = time.monotonic() + timeout
    while True:
        left = ({p["id"] for p in bpftool("prog", "show") or []} & prog_ids,  # type: ignore[union-attr]
                {m["id"]: m.get("name") for m in bpftool("map", "show") or [] if m["id"] in map_ids})  # type: ignore[union-attr]
        if not any(left) or time.monotonic() > deadline:
            return left
        time.sleep(0.1)
