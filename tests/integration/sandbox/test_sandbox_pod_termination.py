"""Pods leave in Kubernetes' order, and a freed IP can be forced onto a new pod whose status lags
(sandbox/lifecycle.py, docs/sandbox.md "Pod lifecycle"): what the churn tests stand on."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import pytest
from nodemesh.sandbox import lifecycle, objects
from nodemesh.sandbox.testing import FETCH, WHOAMI_APP, running_sandbox

pytestmark = pytest.mark.root

SLEEPER = """
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: shop}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata:
      labels: {{app: {name}}}
      annotations: {annotations}
    spec:
      containers:
      - name: c
        command: ["python3", "-m", "http.server", "8080"]
        ports: [{{containerPort: 8080, name: http}}]
"""


def sleeper(name: str, **annotations: str) -> str:
    return SLEEPER.format(name=name, annotations=json.dumps(annotations))


def only(pods: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    (pod,) = [p for p in pods if p["metadata"]["name"].startswith(prefix)]
    return pod


@pytest.mark.parametrize("cni", ["bridge", "routed"])
def test_graceful_termination_order_and_forced_ip_reuse(cni: str) -> None:
    with running_sandbox(nodes=2, cni=cni, manifests=[WHOAMI_APP]) as sb:
        ip = str(sb.plan.pod_cidr(1).network_address + 150)
        sb.apply(text=sleeper("old", **{objects.POD_IP_ANNOTATION: ip}))
        sb.wait_ready(timeout=30)
        old = only(sb.pods("shop"), "old-")
        assert old["status"]["podIP"] == ip and old["spec"]["nodeName"] == "node1"
        with pytest.raises(Exception, match="in use"):
            sb.apply(text=sleeper("thief", **{objects.POD_IP_ANNOTATION: ip}))

        # Watch the recorded objects while the pod is terminated: the order is Kubernetes'.
        seen: list[tuple[float, str]] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                pods = [p for p in sb.pods("shop") if p["metadata"]["name"] == old["metadata"]["name"]]
                if not pods:
                    seen.append((time.monotonic(), "gone"))
                    return
                p = pods[0]
                eps = [e for s in sb.objects().of_kind("EndpointSlice") for e in s["endpoints"]
                       if e["addresses"] == [ip]]
                states = {k for cs in p["status"]["containerStatuses"] for k in cs["state"]}
                seen.append((time.monotonic(), json.dumps({
                    "terminating": bool(p["metadata"].get("deletionTimestamp")), "states": sorted(states),
                    "released": bool(p["metadata"].get("annotations", {}).get(objects.IP_RELEASED_ANNOTATION)),
                    "ready_endpoint": any(e["conditions"]["ready"] for e in eps)})))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        lifecycle.terminate_pods(sb, [("shop", old["metadata"]["name"])], pre_stop_s=0.5, linger_s=0.3)
        watcher.join(10)
        stop.set()
        phases = [json.loads(s) if s != "gone" else s for _, s in seen]
        states = [p for p in phases if p != "gone"]
        assert phases[-1] == "gone"
        # Terminating while still running (preStop), and never a ready endpoint from then on.
        assert any(p["terminating"] and p["states"] == ["running"] for p in states)
        assert not any(p["terminating"] and p["ready_endpoint"] for p in states)
        # Containers terminated before the network went, the object lingered after.
        released = [p for p in states if p["released"]]
        assert released and all(p["states"] == ["terminated"] for p in released)
        first_terminated = next(i for i, p in enumerate(states) if p["states"] == ["terminated"])
        assert not any(p["released"] for p in states[:first_terminated])

        # The freed IP goes to a new pod whose status (with the IP) is written 0.5 s after it runs.
        sb.apply(text=sleeper("new", **{objects.POD_IP_ANNOTATION: ip, objects.STATUS_DELAY_ANNOTATION: "0.5"}))
        new = only(sb.pods("shop"), "new-")
        assert new["status"]["podIP"] == "" and new["metadata"]["annotations"][objects.ASSIGNED_IP_ANNOTATION] == ip
        deadline = time.monotonic() + 30  # (not wait_ready: `old`'s Deployment keeps wanting its pod)
        while not objects.pod_ready(new := only(sb.pods("shop"), "new-")):
            assert time.monotonic() < deadline, new["status"]
            time.sleep(0.05)
        assert new["status"]["podIP"] == ip
        # Reachable at once from another pod (the node forgot the old pod's MAC for this IP).
        client = only(sb.pods("shop"), "client-")["metadata"]["name"]
        started = time.monotonic()
        res = sb.exec("shop", client, [sys.executable, "-c", FETCH, f"http://{ip}:8080/"], capture_output=True,
                      text=True, timeout=20)
        assert res.returncode == 0, res.stderr
        assert time.monotonic() - started < 3.0


def test_rollout_surges_then_terminates_the_old_pods() -> None:
    with running_sandbox(nodes=2, manifests=[WHOAMI_APP]) as sb:
        before = {p["metadata"]["name"] for p in sb.pods("shop") if p["metadata"]["name"].startswith("web-")}
        changed = WHOAMI_APP.replace("labels: {app: web}\n    spec:", "labels: {app: web, v: '2'}\n    spec:")
        assert changed != WHOAMI_APP
        ready_web: list[int] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                pods = [p for p in sb.pods("shop") if p["metadata"]["name"].startswith("web-")]
                ready_web.append(sum(1 for p in pods if objects.pod_ready(p) and not p["metadata"].get("deletionTimestamp")))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        lifecycle.rollout(sb, changed, "shop", "web", pre_stop_s=0.3)
        stop.set()
        watcher.join(5)
        after = {p["metadata"]["name"] for p in sb.pods("shop") if p["metadata"]["name"].startswith("web-")}
        assert len(after) == 2 and not after & before
        assert min(ready_web) >= 2, "never fewer ready replicas than wanted (maxUnavailable 0)"
        assert len([r for r in sb.objects().of_kind("ReplicaSet") if r["metadata"]["name"].startswith("web-")]) == 1
