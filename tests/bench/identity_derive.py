"""The controller's identity path in process (issue 16 item c): the scale harness's synthetic
cluster (N nodes x 50 pods) into a `WorkloadRegistry`, then CPU seconds of the registry's derive,
its identity entries (or, on an older tree, its snapshot) and the identity feed's diff — first,
after one pod changed, after a 500-pod rollout. No root, no sockets.

    python3 tests/bench/identity_derive.py [NODES]      # default 1000 (50,000 pods)
"""
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scale"))
from cluster import Cluster
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.identityfeed import IdentityFeed
from nodemesh.controlplane.registry import WorkloadRegistry

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
def step(label):
    t0 = time.process_time(); reg.pods(); t1 = time.process_time()
    if hasattr(reg, "identity_entries"):
        e = reg.identity_entries(cfg); t2 = time.process_time(); changed = feed.update_entries(e)
    else:
        snap = reg.identity_snapshot(cfg); t2 = time.process_time(); changed = feed.update(snap)
    t3 = time.process_time()
    print(f"{label}: derive {t1-t0:.2f}s snapshot {t2-t1:.2f}s feed.update {t3-t2:.2f}s changed={changed}")
step("first")
pod = copy.deepcopy(by_kind["Pod"][123]); pod["metadata"]["resourceVersion"] = "2"; pod["status"]["conditions"][0]["status"] = "False"
reg.apply("MODIFIED", pod)
step("one pod modified")
# a 500-pod rollout: new pods added, old ones deleted (one registry change each, one push after)
for i in range(500):
    new = copy.deepcopy(by_kind["Pod"][i]); new["metadata"]["name"] += "-r"; new["metadata"]["uid"] += "-r"
    reg.apply("ADDED", new); reg.apply("DELETED", by_kind["Pod"][i])
step("500-pod rollout")
