"""What the in-process micro-benchmarks of the agent's protocol modes share (http1_micro.py,
http2_micro.py): counting calls per exchange with sys.setprofile, and running the same benchmark
against several source trees, interleaved, each run in a subprocess importing `nodemesh` from
its tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any


def count_calls(mode: Any, reads: Sequence[tuple[bytes, bytes]]) -> dict[str, float]:
    """Python-level ('call') and C ('c_call') calls per (client read, upstream read) pair fed to
    `mode`, the loop's own two calls into the mode per pair included (as the issue counted them)."""
    counts = {"call": 0, "c_call": 0}

    def prof(frame: Any, event: str, arg: Any) -> None:
        if event in counts:
            counts[event] += 1

    client, upstream = mode.client_data, mode.upstream_data
    sys.setprofile(prof)
    for c, s in reads:
        client(c)
        upstream(s)
    sys.setprofile(None)
    return {"py_calls": counts["call"] / len(reads), "c_calls": counts["c_call"] / len(reads)}


def run_tree(script: str, tree: str | None, args: Sequence[str]) -> dict[str, float]:
    """`script args` in a subprocess importing nodemesh from `tree` (None: this process's
    PYTHONPATH); its last output line is the run's JSON."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as root:
        if tree is not None:
            os.symlink(os.path.abspath(tree), os.path.join(root, "nodemesh"))
            env["PYTHONPATH"] = root
        out = subprocess.run([sys.executable, os.path.abspath(script), *args], env=env, check=True,
                             capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare_trees(script: str, trees: Sequence[str | None], runs: int,
                  args: Sequence[str]) -> list[list[dict[str, float]]]:
    """`runs` runs of `script args` per tree, interleaved (tree A, B, A, B, ...): per tree, its runs."""
    results: list[list[dict[str, float]]] = [[] for _ in trees]
    for _ in range(runs):
        for i, tree in enumerate(trees):
            results[i].append(run_tree(script, tree, args))
    return results
