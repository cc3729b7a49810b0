"""The controller's identity path in process (issue 16 item c): the scale harness's synthetic
cluster (N nodes x 50 pods) into a `WorkloadRegistry`, then CPU seconds of the registry's derive,
the routes of the mesh config, its identity entries and the identity feed's diff — what one
identity push costs the controller's loop — first, after one pod changed (5 times), after a
500-pod rollout. No root, no sockets.

    python3 tests/bench/identity_derive.py [NODES]      # default 1000 (50,000 pods)
"""
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scale"))
from cluster import Cluster
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.identityfeed import IdentityFeed
from nodemesh.controlplane.registry import WorkloadRegistry
from nodemesh.controlplane.routeconfig import workload_routes

nodes = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
c = Cluster(nodes, 50)
objs = c.objects()
reg = WorkloadRegistry()
by_kind = {}
for o in objs:
    by_kind.setdefault(o["kind"], []).append(o)
t = time.process_time()
for k, items in by_kind.items():
    reg.replace(k, items)
reg.mark_synced()
print(f"pods {len(by_kind['Pod'])} replace {time.process_time()-t:.2f}s")
feed = IdentityFeed()
cfg = pb.MeshConfig()


def step(label: str) -> float:
    """What the controller does per identity push (controller.refresh_identity): the mesh config
    (routes read the registry), the registry's entries, the feed's diff. CPU ms, printed."""
    t0 = time.process_time(); reg.pods(); t1 = time.process_time()
    routes = workload_routes(reg); t2 = time.process_time()
    e = reg.identity_entries(pb.MeshConfig(routes=routes)); t3 = time.process_time()
    changed = feed.update_entries(e); t4 = time.process_time()
    ms = [1e3 * d for d in (t1 - t0, t2 - t1, t3 - t2, t4 - t3)]
    print(f"{label}: derive {ms[0]:.1f} routes {ms[1]:.1f} entries {ms[2]:.1f} feed {ms[3]:.1f} "
          f"total {sum(ms):.1f} ms changed={changed}")
    return sum(ms)


step("first")
totals = []
for n in range(5):
    pod = copy.deepcopy(by_kind["Pod"][123 + 997 * n])
    pod["metadata"]["resourceVersion"] = str(2 + n)
    pod["status"]["conditions"][0]["status"] = "False"
    reg.apply("MODIFIED", pod)
    totals.append(step(f"one pod modified ({n + 1})"))
print(f"one pod modified: median {statistics.median(totals):.1f} ms")
# a 500-pod rollout: new pods added, old ones deleted (one registry change each, one push after)
for i in range(500):
    new = copy.deepcopy(by_kind["Pod"][i]); new["metadata"]["name"] += "-r"; new["metadata"]["uid"] += "-r"
    reg.apply("ADDED", new); reg.apply("DELETED", by_kind["Pod"][i])
step("500-pod rollout")
