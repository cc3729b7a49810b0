"""Helpers of the churn tests (issue 10): manifests for apps that come and go after the mesh is
installed, the timeline that churns them, and the comparison of `stat` with the clients' records.

Reuses the stat room's harness (tests/integration/stat/stat_harness.py): the meshed sandbox, the
real CLI as a subprocess, the bucket arithmetic.
"""

from __future__ import annotations

import json
import math
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodemesh.sandbox import testing
from nodemesh.sandbox.testing import agent_admin_request
from stat_harness import Mesh, bucket_of, true_quantile

HERE = Path(__file__).resolve().parent
SERVER = HERE / "churn_server.py"
CLIENT = HERE / "churn_client.py"
PY = sys.executable

Record = dict[str, Any]


# ---------------------------------------------------------------------------- manifests
def namespace(ns: str) -> str:
    return f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"


def deployment(ns: str, name: str, replicas: int, argv: list[str], port: int | None = None,
               env: dict[str, str] | None = None, annotations: dict[str, str] | None = None) -> str:
    return testing.deployment(name, ns, argv, ports=[("main", port)] if port else [], replicas=replicas,
                              pod_name_env=True, env=env, pod_annotations=annotations)


def service(ns: str, name: str, port: int, cluster_ip: str) -> str:
    return testing.service(name, ns, [(port, "main")], cluster_ip=cluster_ip)


def http_server(ns: str, name: str, replicas: int, version: str = "1") -> str:
    return deployment(ns, name, replicas, [PY, str(SERVER), "http"], 8080, env={"VERSION": version})


def grpc_server(ns: str, name: str, replicas: int, version: str = "1") -> str:
    return deployment(ns, name, replicas, [PY, str(SERVER), "grpc"], 9090, env={"VERSION": version})


def client(ns: str, name: str, out: Path, duration: float, http: str = "", grpc: str = "", host: str = "",
           annotations: dict[str, str] | None = None) -> str:
    argv = [PY, str(CLIENT), "--duration", str(duration), "--out", str(out)]
    if http:
        argv += ["--http", http, "--host", host or "server"]
    if grpc:
        argv += ["--grpc", grpc]
    return deployment(ns, name, 1, argv, annotations=annotations)


def docs(*parts: str) -> str:
    return "\n---\n".join(parts)


# ---------------------------------------------------------------------------- the cluster
def records_of(path: Path, timeout: float) -> list[Record]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"no records at {path} after {timeout:.0f}s")
        time.sleep(0.2)
    return json.loads(path.read_text())["records"]


def agent_metrics(mesh: Mesh) -> list[dict[str, str]]:
    """Every request_total sample of every agent's /metrics (labels + value)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for node in mesh.sb.nodes():
        req = agent_admin_request(mesh.sb.state_dir, f"http://{node.ip}:4191/metrics")
        with urllib.request.urlopen(req, timeout=5) as r:
            text = r.read().decode()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "request_total":
                    out.append({**s.labels, "value": str(s.value), "node": node.name})
    return out


def pod_ips(mesh: Mesh, namespaces: Iterable[str]) -> set[str]:
    wanted = set(namespaces)
    return {p["status"].get("podIP") for p in mesh.sb.pods() if p["metadata"]["namespace"] in wanted} - {"", None}


# ---------------------------------------------------------------------------- comparisons
SUCCESS_TOL = 0.005   # the issue: success within ±0.5 percentage points
RPS_TOL = 0.02        # RPS within ±2 %


def succeeded(r: Record) -> bool:
    if r["kind"] == "grpc":
        return r.get("code") == 0
    return "status" in r and r["status"] < 500


@dataclass
class Compare:
    window_s: int
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def row(self, what: str, row: dict[str, Any] | None, records: Sequence[Record],
            latency_records: Sequence[Record] | None = None) -> None:
        """A stat row against the client records it must describe (all inside the window).

        `stale` records (a request sent on a kept-alive connection that was closed under it, e.g.
        by a draining agent, then retried) are attempts the client cannot classify: a proxy may or
        may not have counted them (as failures). The row matches if it matches the client's
        numbers with any number of them counted, and only them. `latency_records`: the records
        whose latency the row can see (default: all)."""
        real = [r for r in records if not r.get("stale")]
        stale = len(records) - len(real)
        n = len(real)
        if n == 0:
            self.problems.append(f"{what}: no client records to compare with")
            return
        if row is None:
            self.problems.append(f"{what}: no stat row (n={n} client requests)")
            return
        ok = sum(1 for r in real if succeeded(r))
        lat = [r["latency_ms"] for r in (real if latency_records is None else latency_records) if "latency_ms" in r]
        quantiles = {q: true_quantile(lat, q) for q in (0.5, 0.95, 0.99)} if lat else {}
        self.lines.append(f"{what}: n={n}{f' (+{stale} stale)' if stale else ''} success "
                          f"{row['success']}/{ok / n:.4f} rps {row['rps']}/{n / self.window_s:.3f} "
                          + " ".join(f"p{int(q * 100)} {row[f'latency_ms_p{int(q * 100)}']}/{v:.0f}"
                                     for q, v in quantiles.items()) + " (stat/client)")

        def close(m: int) -> tuple[bool, bool]:
            rps = (n + m) / self.window_s
            return (row["success"] is not None and abs(row["success"] - ok / (n + m)) <= SUCCESS_TOL,
                    row["rps"] is not None and abs(row["rps"] - rps) <= RPS_TOL * rps)

        if not any(all(close(m)) for m in range(stale + 1)):
            success_ok, rps_ok = close(0)
            if not success_ok:
                self.problems.append(f"{what}: success {row['success']} vs client {ok / n:.4f} (n={n}, stale={stale})")
            if not rps_ok or success_ok:
                self.problems.append(f"{what}: rps {row['rps']} vs client {n / self.window_s:.3f} (n={n}, "
                                     f"stale={stale})")
        for q, true in quantiles.items():
            key = f"latency_ms_p{int(q * 100)}"
            lower, upper = bucket_of(true)
            got = row[key]
            if got is None or not (lower <= got <= upper):
                self.problems.append(f"{what}: {key} {got} not in the bucket [{lower:g}, {upper:g}] of the "
                                     f"client's {true:.1f}ms (n={n})")

    def check(self, what: str, ok: bool, detail: str = "") -> None:
        if not ok:
            self.problems.append(f"{what} {detail}".rstrip())

    def assert_ok(self) -> None:
        print("\n" + "\n".join(self.lines))
        assert not self.problems, "\n".join(self.problems)


def find_row(rows: list[dict[str, Any]], name: str, kind: str | None = None) -> dict[str, Any] | None:
    hits = [r for r in rows if r["name"] == name and (kind is None or r["kind"] == kind)]
    assert len(hits) <= 1, hits
    return hits[0] if hits else None


def window_holds(first_start: float, queried_at: float, window_s: int) -> bool:
    """The controller's window [floor(now) - W, floor(now)) still holds the first request."""
    return math.floor(queried_at) - window_s + 1 <= math.floor(first_start)
