"""Workers import only the data path: what a worker loads is what every worker pays in memory.

Checked in a fresh interpreter (the test process itself has imported everything already).
"""

from __future__ import annotations

import json
import subprocess
import sys

# Modules only the parent needs (admin, controller link, Kubernetes); a worker must not load them.
PARENT_ONLY = ("aiohttp", "grpc", "kubernetes", "prometheus_client", "yaml", "nodemesh.agent.node",
               "nodemesh.agent.admin", "nodemesh.agent.report")


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_worker_module_imports_no_parent_only_module() -> None:
    loaded = _modules_after("import nodemesh.agent.worker")
    assert "uvloop" in loaded and "httptools" in loaded  # the probe sees real imports
    heavy = sorted(m for m in loaded if m.split(".")[0] in PARENT_ONLY or m in PARENT_ONLY)
    assert heavy == [], heavy


def test_agent_entry_point_is_lean_until_the_workers_are_forked() -> None:
    # `python -m nodemesh.agent` forks its workers right after importing its own module: everything
    # imported by then is shared with the workers, so none of the parent-only modules may be in it.
    loaded = _modules_after("import nodemesh.agent.__main__")
    heavy = sorted(m for m in loaded if m.split(".")[0] in PARENT_ONLY or m in PARENT_ONLY)
    assert heavy == [], heavy


def test_metrics_counts_without_prometheus_and_the_collector_brings_it() -> None:
    # metrics_export imports metrics, never the other way round (no import loop, no lazy attribute).
    assert "prometheus_client" not in _modules_after("import nodemesh.agent.metrics")
    loaded = _modules_after("from nodemesh.agent.metrics_export import SnapshotCollector\nassert SnapshotCollector")
    assert "prometheus_client" in loaded


def test_capture_hook_detection_reads_nat_prerouting_only() -> None:
    from nodemesh.redirector.plan import CHAIN_PREROUTING, hook_present

    hooked = f"*nat\n:PREROUTING ACCEPT\n-A PREROUTING -j KUBE-SERVICES\n-A PREROUTING -j {CHAIN_PREROUTING}\nCOMMIT\n"
    assert hook_present(hooked)
    commented = f'*nat\n-A PREROUTING -m comment --comment "nodemesh hook" -j {CHAIN_PREROUTING} \nCOMMIT\n'
    assert hook_present(commented)
    assert not hook_present(f"*nat\n:{CHAIN_PREROUTING} - [0:0]\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n")
    assert not hook_present(f"*mangle\n-A PREROUTING -j {CHAIN_PREROUTING}\nCOMMIT\n*nat\nCOMMIT\n")
    assert not hook_present(f"*nat\n-A PREROUTING -j {CHAIN_PREROUTING}_OTHER\nCOMMIT\n")
    assert not hook_present("")


def test_agent_parent_without_controller_imports_no_grpc_aiohttp_or_pyroute2() -> None:
    # The parent's telemetry: grpc only when a controller is configured (agent.report is imported
    # lazily), the admin server on httptools, the capture check without the redirector's pyroute2.
    loaded = _modules_after("import nodemesh.agent.node, nodemesh.agent.admin, nodemesh.agent.capture")
    heavy = sorted(m for m in loaded if m.split(".")[0] in ("grpc", "aiohttp", "kubernetes", "pyroute2"))
    assert heavy == [] and "nodemesh.agent.report" not in loaded, heavy
