"""In-process replay of simulated agents' reports into the controller (no gRPC, one loop).

The quiet way to measure the controller's ingest on a busy machine (docs/scale.md): the scale
harness's synthetic cluster (tests/scale/cluster.py) encodes each node's report series once, as
the agent link sends them (series refs, or columns when the controller offers them), and this
replays `--reports` intervals of `--nodes` agents from bytes through `Controller.ingest_report`
(the decode included), timing CPU with `time.process_time`. Prints CPU µs per series, ms per
report, the controller's RSS growth, and the keys held.

    python3 tests/bench/controller_ingest.py --nodes 50 --pods 50 --reports 20 [--encoding refs|columns|labels]
        [--downsample-after 120|0] [--coarsen-after 900|0]  (a --reports past them shows downsampling's memory)
        [--stat]  (then `stat deploy -A` / `stat po -n X` / `stat deploy -A --to deploy/Y` CPU, the
                   cluster's objects in the registry; then `edges deploy -A` and the dashboard's
                   workload page of deploy/Y)
        [--stat-repeat N]  (N more of each, a second apart)  [--stat-profile FILE]
        [--checkpoint 300]  (every 300 simulated seconds: the store's bytes per tier and the RSS)

Simulated time: report `seq` of every agent is stamped and ingested at `now + seq` (one report
per agent per simulated second, no sleeping), and the controller's housekeeping (`prune`, which
downsamples) runs every 10 simulated seconds, so `--reports 3600` is an hour of history.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scale"))
from cluster import Cluster, NodeTraffic
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import LATENCY_BUCKETS_MS
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import Controller


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def n_series(report: pb.MetricsReport) -> int:
    n = len(report.series)
    cols = getattr(report, "columns", None)
    if cols is not None:
        n += len(cols.refs) // 4 + len(cols.hist_refs) // 4
    return n


def checkpoint(agg: object, seq: int, ms_per_report: float) -> None:
    """One line: the simulated second, the RSS, and the store's bytes (per tier when it has them)."""
    gc.collect()
    line = f"checkpoint t={seq} s  rss={rss_mb():.0f} MB  ms/report={ms_per_report:.3f}"
    stored = getattr(agg, "stored_bytes", None)
    if stored is not None:
        line += f"  store={stored() / 1e6:.0f} MB entries={agg.stored_entries()}"  # type: ignore[attr-defined]
        tiers = getattr(agg, "tier_bytes", None)
        if tiers is not None:
            line += "  " + " ".join(f"{w}s:{n / 1e6:.0f}MB" for w, n in tiers().items())
    print(line, flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=50)
    p.add_argument("--pods", type=int, default=50)
    p.add_argument("--reports", type=int, default=20)
    p.add_argument("--encoding", choices=("labels", "refs", "columns"), default="refs")
    p.add_argument("--active", type=float, default=0.2)
    p.add_argument("--profile", default="")
    p.add_argument("--downsample-after", type=int, default=ControllerConfig.downsample_after_s,
                   help="seconds; 0: never")
    p.add_argument("--coarsen-after", type=int, default=getattr(ControllerConfig, "coarsen_after_s", 0),
                   help="seconds (minute blocks into 5-minute blocks); 0: never (a tree without: ignored)")
    p.add_argument("--checkpoint", type=int, default=0, metavar="SECONDS",
                   help="every this many simulated seconds print the store's bytes and the RSS")
    p.add_argument("--stat", action="store_true", help="time `stat deploy -A` and `stat po -n X` after the ingest")
    p.add_argument("--stat-repeat", type=int, default=1, help="with --stat: more queries, a second apart")
    p.add_argument("--stat-profile", default="", help="with --stat: cProfile the queries after the first two (edges and the page after the first)")
    a = p.parse_args()
    cluster = Cluster(a.nodes, a.pods, 3)
    pairs = cluster.calls()
    streams = []
    for i in range(a.nodes):
        traffic = NodeTraffic(cluster, cluster.node_names[i], pairs, a.active, seed=i)
        extra = {"columns": True} if a.encoding == "columns" else {}
        streams.append(traffic.encoded_intervals(pb, a.encoding != "labels", **extra))
    tiers = {"coarsen_after_s": a.coarsen_after} if hasattr(ControllerConfig, "coarsen_after_s") else {}
    c = Controller(ControllerConfig(downsample_after_s=a.downsample_after, **tiers))
    start = c.started_ms + 1000
    sessions = [c.agent_connected(pb.AgentHello(agent_id=f"a{i}", node=cluster.node_names[i],
                                                start_time_ms=start)) for i in range(a.nodes)]
    gc.collect()
    rss0 = rss_mb()
    now = time.time()

    def messages():  # type: ignore[no-untyped-def]
        for seq in range(1, a.reports + 1):
            for i in range(a.nodes):
                first, variants = streams[i]
                body = first if seq == 1 else variants[seq % len(variants)]
                head = pb.MetricsReport(agent_id=f"a{i}", seq=seq, time_ms=int((now + seq) * 1000),
                                        latency_bounds_ms=list(LATENCY_BUCKETS_MS), increments=True)
                yield i, seq, head.SerializeToString() + body

    series = {1: 0, 2: 0}
    cpu = {1: 0.0, 2: 0.0}   # 1: the first report of each stream (defines refs), 2: the others
    prune_cpu = 0.0
    steady_prune, steady_from = 0.0, a.downsample_after + 120  # past the horizon: seal + downsample
    prof = cProfile.Profile() if a.profile else None
    stat_prof = cProfile.Profile() if a.stat_profile else None
    rss_first = 0.0
    for i, seq, data in messages():
        phase = 1 if seq == 1 else 2
        if seq == 2 and i == 0:
            gc.collect()
            rss_first = rss_mb()   # every stream's refs defined, one second of traffic held
            if a.checkpoint:
                print(f"refs defined: rss={rss_first:.0f} MB (from {rss0:.0f} MB)", flush=True)
        t0 = time.process_time()
        if prof and phase == 2:
            prof.enable()
        report = pb.MetricsReport.FromString(data)
        c.ingest_report(sessions[i], report, now=now + seq + 0.5)
        if prof and phase == 2:
            prof.disable()
        cpu[phase] += time.process_time() - t0
        series[phase] += n_series(report)
        if i == a.nodes - 1 and seq % 10 == 0:  # the controller's housekeeping, every 10 s
            t0 = time.process_time()
            c.aggregator.prune(now=now + seq + 0.9)
            prune_cpu += time.process_time() - t0
            if seq > steady_from:
                steady_prune += time.process_time() - t0
            if a.checkpoint and seq % a.checkpoint == 0:
                checkpoint(c.aggregator, seq, cpu[2] / max(a.nodes * (seq - 1), 1) * 1000)
    gc.collect()
    rss1 = rss_mb()
    n2 = a.nodes * (a.reports - 1)
    print(f"encoding={a.encoding} nodes={a.nodes} reports={a.reports} keys={len(c.aggregator)}")
    print(f"steady: {series[2] / n2:.0f} series/report  {cpu[2] / n2 * 1000:.2f} ms/report  "
          f"{cpu[2] / max(series[2], 1) * 1e6:.2f} us/series")
    print(f"first:  {series[1] / a.nodes:.0f} series/report  {cpu[1] / a.nodes * 1000:.2f} ms/report")
    agg = c.aggregator
    if hasattr(agg, "stored_entries"):   # the columnar store (numpy blocks)
        held = f"entries={agg.stored_entries()} ({agg.stored_bytes() / 1e6:.0f} MB)"
        minutes = [b for sec, bs in agg._blocks.items() if sec < agg._coarse_before for b in bs]
        if minutes:
            n_min = len({sec for sec in agg._blocks if sec < agg._coarse_before})
            held += (f", of which {n_min} downsampled blocks: {sum(len(b.cols) for b in minutes)} entries "
                     f"({sum(b.nbytes for b in minutes) / 1e6:.0f} MB)")
    else:                                # a tree with a Bucket per key and second
        held = f"buckets={sum(len(h.buckets) + len(h.coarse) for h in agg._history.values())}"
    print(f"rss: {rss0:.0f} -> {rss_first:.0f} (refs defined) -> {rss1:.0f} MB  {held}  "
          f"prune+downsample CPU {prune_cpu:.2f} s")
    if a.reports > steady_from + 60:
        minutes = (a.reports - steady_from) / 60
        print(f"prune past the horizon: {steady_prune / minutes * 1000:.0f} ms CPU per minute of traffic")
    end = now + a.reports + 1
    for window in (60, 3600):
        t0 = time.process_time()
        c.aggregator.totals_by_key(window, now=end)
        print(f"totals_by_key({window}) first: {(time.process_time() - t0) * 1000:.1f} ms")
    if a.stat:
        # `stat deploy -A` and `stat po -n X` as the controller answers them (the cluster's objects in
        # its registry): the 60 s window kept by the call above, then one second later (it slides).
        by_kind: dict[str, list[dict]] = {}  # type: ignore[type-arg]
        for o in cluster.objects():
            by_kind.setdefault(o["kind"], []).append(o)
        for kind, items in by_kind.items():
            c.registry.replace(kind, items)
        c.registry.mark_synced()
        ns = min(c.registry.namespaces())
        deploy = min(r.name for r in c.registry.resources("deployment", ns))
        me = pb.Resource(namespace=ns, type="deployment", name=deploy)
        queries = [("stat deploy -A", pb.StatRequest(selector=pb.Resource(type="deploy"), all_namespaces=True)),
                   (f"stat po -n {ns}", pb.StatRequest(selector=pb.Resource(type="po", namespace=ns))),
                   (f"stat deploy -A --to deploy/{deploy}",
                    pb.StatRequest(selector=pb.Resource(type="deploy"), all_namespaces=True, to=me))]
        for what, req in queries:
            for at in (end + i for i in range(2 + a.stat_repeat)):
                t0 = time.process_time()
                if stat_prof and at > end + 1:
                    stat_prof.enable()
                resp = c.stat(req, now=at)
                if stat_prof:
                    stat_prof.disable()
                print(f"{what} at +{at - end:.0f} s: {(time.process_time() - t0) * 1000:.1f} ms CPU, "
                      f"{len(resp.rows)} rows, {sum(r.has_traffic for r in resp.rows)} with traffic {resp.error}")
        # edges -A, and the dashboard's workload page of one deployment (its edges, a stat --from/--to
        # per peer, its routes and its hour of time series), a second apart as the page polls.
        from nodemesh.controlplane.dashboard import views
        edges_req = pb.EdgesRequest(selector=pb.Resource(type="deploy"), all_namespaces=True)
        at = end + 2 + a.stat_repeat
        for k in range(1 + a.stat_repeat):
            t0 = time.process_time()
            if stat_prof and k:
                stat_prof.enable()
            got = c.edges(edges_req, now=at)
            print(f"edges deploy -A at +{at - end:.0f} s: {(time.process_time() - t0) * 1000:.1f} ms CPU, "
                  f"{len(got.edges)} edges {got.error}")
            t0 = time.process_time()
            page = views.workload(c, me, 60, 60, "", now=at)
            if stat_prof:
                stat_prof.disable()
            print(f"dashboard deploy/{deploy} at +{at - end:.0f} s: {(time.process_time() - t0) * 1000:.1f} ms CPU, "
                  f"{len(page['callers'])} callers {len(page['callees'])} callees")  # type: ignore[arg-type]
            at += 1
        if stat_prof:
            stat_prof.dump_stats(a.stat_profile)
            pstats.Stats(a.stat_profile).sort_stats("cumtime").print_stats(25)
    if prof:
        prof.dump_stats(a.profile)
        pstats.Stats(a.profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
