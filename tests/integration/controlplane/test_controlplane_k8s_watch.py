"""The Kubernetes source, driven through the real `kubernetes` client against a real HTTP server.

The server in this file speaks the Kubernetes list/watch protocol over loopback: lists of
recorded API objects (testdata/cluster.json), and watch streams as chunked JSON lines with
ADDED/MODIFIED/DELETED, BOOKMARK, an ERROR 410 Gone, a dropped connection and a full restart of
the server. After each step the workload registry must show the cluster as it now is.
"""

from __future__ import annotations

import asyncio
import copy
import json
import queue
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client
from nodemesh.api.model import WorkloadRef
from nodemesh.controlplane.registry import WorkloadRegistry
from nodemesh.controlplane.sources.kubernetes import KubernetesSource
from waiting import eventually

TESTDATA = Path(__file__).parent / "testdata" / "cluster.json"
PATHS = {
    "Namespace": "/api/v1/namespaces", "Node": "/api/v1/nodes", "Pod": "/api/v1/pods",
    "Service": "/api/v1/services", "ReplicaSet": "/apis/apps/v1/replicasets",
    "Deployment": "/apis/apps/v1/deployments", "StatefulSet": "/apis/apps/v1/statefulsets",
    "DaemonSet": "/apis/apps/v1/daemonsets", "Job": "/apis/batch/v1/jobs",
    "EndpointSlice": "/apis/discovery.k8s.io/v1/endpointslices",
    "HTTPRoute": "/apis/gateway.networking.k8s.io/v1/httproutes",
    "GRPCRoute": "/apis/gateway.networking.k8s.io/v1/grpcroutes",
}
ROUTE_KINDS = {"HTTPRoute", "GRPCRoute"}
GATEWAY_ROUTES = Path(__file__).parent / "testdata" / "gateway_routes.json"
KIND_OF_PATH = {v: k for k, v in PATHS.items()}


class FakeCluster:
    """The API server's state, shared across server restarts: objects, resourceVersion, and per
    kind a queue of what the next watch stream must send."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.lock = threading.Lock()
        self.rv = 2000
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in PATHS}
        for obj in items:
            self.objects[obj["kind"]][_key(obj)] = obj
        self.scripts: dict[str, queue.Queue[tuple[str, Any]]] = {k: queue.Queue() for k in PATHS}
        self.requests: list[tuple[str, dict[str, str]]] = []
        # What the server serves: a cluster without the Gateway API CRDs answers 404 for routes.
        self.served = set(PATHS) - ROUTE_KINDS

    def _bump(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        return obj

    def emit(self, etype: str, obj: dict[str, Any]) -> str:
        """Change the state and send the change on the kind's watch stream."""
        with self.lock:
            obj = self._bump(copy.deepcopy(obj))
            store = self.objects[obj["kind"]]
            if etype == "DELETED":
                store.pop(_key(obj), None)
            else:
                store[_key(obj)] = obj
            self.scripts[obj["kind"]].put(("event", {"type": etype, "object": obj}))
            return obj["metadata"]["resourceVersion"]

    def change_unseen(self, etype: str, obj: dict[str, Any]) -> None:
        """Change the state without telling any watch (as if the events were compacted away)."""
        with self.lock:
            obj = self._bump(copy.deepcopy(obj))
            if etype == "DELETED":
                self.objects[obj["kind"]].pop(_key(obj), None)
            else:
                self.objects[obj["kind"]][_key(obj)] = obj

    def bookmark(self, kind: str) -> str:
        with self.lock:
            self.rv += 1
            rv = str(self.rv)
        self.scripts[kind].put(("event", {"type": "BOOKMARK", "object": {
            "kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv}}}))
        return rv

    def expire(self, kind: str) -> None:
        self.scripts[kind].put(("event", {"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version: 1 (2001)", "reason": "Expired", "code": 410}}))
        self.scripts[kind].put(("end", None))

    def drop(self, kind: str) -> None:
        self.scripts[kind].put(("drop", None))

    def list_body(self, kind: str) -> bytes:
        with self.lock:
            items = []
            for obj in self.objects[kind].values():
                item = copy.deepcopy(obj)
                item.pop("kind", None)  # real list items carry neither kind nor apiVersion
                item.pop("apiVersion", None)
                items.append(item)
            return json.dumps({"kind": f"{kind}List", "apiVersion": "v1",
                               "metadata": {"resourceVersion": str(self.rv)}, "items": items}).encode()

    def requests_for(self, kind: str, watch: bool) -> list[dict[str, str]]:
        return [q for p, q in list(self.requests)
                if p == PATHS[kind] and (q.get("watch") == "true") == watch]


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


class FakeApiServer:
    def __init__(self, cluster: FakeCluster, port: int = 0) -> None:
        self.cluster = cluster
        self.stopping = threading.Event()
        self.sockets: set[socket.socket] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                cluster.requests.append((url.path, query))
                kind = KIND_OF_PATH.get(url.path)
                if kind is None or kind not in cluster.served:
                    self.send_error(404)
                    return
                if query.get("watch") != "true":
                    body = cluster.list_body(kind)
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                server.sockets.add(self.connection)
                try:
                    self._stream(kind)
                except OSError:  # the client went away (or we cut it off): nothing to tell
                    self.close_connection = True
                finally:
                    server.sockets.discard(self.connection)

            def _stream(self, kind: str) -> None:
                script = cluster.scripts[kind]
                while not server.stopping.is_set():
                    try:
                        action, payload = script.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    if action == "event":
                        line = json.dumps(payload).encode() + b"\n"
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                        self.wfile.flush()
                    elif action == "end":
                        break
                    elif action == "drop":
                        # Half a chunk, then the connection dies: what a crashing server or a
                        # broken network path looks like to the client.
                        self.wfile.write(b"40\r\n{\"type\":")
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self, abrupt: bool = True) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if abrupt:
            for s in list(self.sockets):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.stopping.set()
        self.thread.join(5)


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster(json.loads(TESTDATA.read_text())["items"])


@pytest.fixture
def api_server(cluster: FakeCluster):
    server = FakeApiServer(cluster)
    holder = {"server": server}
    try:
        yield holder
    finally:
        holder["server"].stop()


def source_for(port: int) -> KubernetesSource:
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{port}"
    return KubernetesSource(cfg, watch_timeout_s=60, backoff_initial_s=0.05, backoff_max_s=0.5)


def obj_named(cluster: FakeCluster, kind: str, name: str) -> dict[str, Any]:
    return copy.deepcopy(next(o for (_, n), o in cluster.objects[kind].items() if n == name))


def run(coro_fn: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 60))


def test_list_then_watch_events(cluster: FakeCluster, api_server: dict) -> None:
    async def main() -> None:
        reg = WorkloadRegistry()
        source = source_for(api_server["server"].port)
        await source.start(reg)
        try:
            assert await source.wait_synced(10)
            await eventually(lambda: len(reg.pods()) == 11)
            assert reg.pod("emojivoto", "web-5f7c9d8b6-x2vqm").workload == WorkloadRef("emojivoto", "deployment",
                                                                                        "web")
            # The workload identity (SPIFFE .../sa/<this>) as both sources deliver it (api.workloads).
            assert reg.pod("emojivoto", "web-5f7c9d8b6-x2vqm").service_account == "web"
            assert reg.pod("emojivoto", "db-0").service_account == "default"
            assert {n.name for n in reg.nodes()} == {"node-1", "node-2"}
            assert reg.synced

            # ADDED: a ReplicaSet scale-up brings a new web pod.
            new_pod = obj_named(cluster, "Pod", "web-5f7c9d8b6-x2vqm")
            new_pod["metadata"]["name"] = "web-5f7c9d8b6-zzzzz"
            new_pod["status"]["podIP"] = "10.244.2.30"
            new_pod["spec"]["nodeName"] = "node-2"
            cluster.emit("ADDED", new_pod)
            await eventually(lambda: reg.pod("emojivoto", "web-5f7c9d8b6-zzzzz") is not None)
            assert [p.name for p in reg.resource("deployment", "emojivoto", "web").pods] == [
                "web-5f7c9d8b6-x2vqm", "web-5f7c9d8b6-zzzzz"]

            # MODIFIED: the voting endpoint turns unready.
            es = obj_named(cluster, "EndpointSlice", "voting-svc-abc12")
            es["endpoints"][0]["conditions"]["ready"] = False
            cluster.emit("MODIFIED", es)

            def voting_unready() -> bool:
                svc = next(s for s in reg.services() if s.name == "voting-svc")
                return not svc.endpoints[0].ready
            await eventually(voting_unready)

            # DELETED: the bare debug pod goes away.
            cluster.emit("DELETED", obj_named(cluster, "Pod", "debug"))
            await eventually(lambda: reg.pod("emojivoto", "debug") is None)
            assert source.stats["lists"] == 10 and source.stats["relists_410"] == 0
        finally:
            await source.stop()
    run(main)


def test_bookmark_then_dropped_connection_rewatches_from_last_version(cluster: FakeCluster,
                                                                     api_server: dict) -> None:
    async def main() -> None:
        reg = WorkloadRegistry()
        source = source_for(api_server["server"].port)
        await source.start(reg)
        try:
            assert await source.wait_synced(10)
            await eventually(lambda: len(cluster.requests_for("Pod", watch=True)) == 1)
            bookmark_rv = cluster.bookmark("Pod")
            await eventually(lambda: source.resource_versions.get("Pod") == bookmark_rv)
            cluster.drop("Pod")
            # While the client is reconnecting, a pod changes; the new watch must deliver it.
            pod = obj_named(cluster, "Pod", "db-0")
            pod["status"]["podIP"] = "10.244.2.77"
            cluster.emit("MODIFIED", pod)
            await eventually(lambda: reg.pod("emojivoto", "db-0").ip == "10.244.2.77")
            watches = cluster.requests_for("Pod", watch=True)
            assert len(watches) >= 2
            assert watches[1]["resourceVersion"] == bookmark_rv  # resumed, not relisted
            assert watches[1].get("allowWatchBookmarks") == "true"
            assert len(cluster.requests_for("Pod", watch=False)) == 1
            assert source.stats["watch_errors"] >= 1
        finally:
            await source.stop()
    run(main)


def test_410_gone_forces_a_relist_that_catches_missed_changes(cluster: FakeCluster, api_server: dict) -> None:
    async def main() -> None:
        reg = WorkloadRegistry()
        source = source_for(api_server["server"].port)
        await source.start(reg)
        try:
            assert await source.wait_synced(10)
            assert reg.pod("emojivoto", "logger-7xk2d") is not None
            # Changes the watch never reports (compacted): a deletion and a new deployment.
            cluster.change_unseen("DELETED", obj_named(cluster, "Pod", "logger-7xk2d"))
            dep = obj_named(cluster, "Deployment", "web")
            dep["metadata"]["name"] = "web-canary"
            cluster.change_unseen("ADDED", dep)
            cluster.expire("Pod")
            cluster.expire("Deployment")
            await eventually(lambda: reg.pod("emojivoto", "logger-7xk2d") is None)
            await eventually(lambda: reg.get("Deployment", "emojivoto", "web-canary") is not None)
            assert source.stats["relists_410"] == 2
            assert len(cluster.requests_for("Pod", watch=False)) == 2
            # After the relist, watching goes on from the new list's version.
            relist_rv = str(cluster.rv)
            await eventually(lambda: any(q.get("resourceVersion") == relist_rv
                                         for q in cluster.requests_for("Pod", watch=True)))
            cluster.emit("DELETED", obj_named(cluster, "Pod", "debug"))
            await eventually(lambda: reg.pod("emojivoto", "debug") is None)
        finally:
            await source.stop()
    run(main)


def test_survives_an_api_server_restart(cluster: FakeCluster, api_server: dict) -> None:
    async def main() -> None:
        reg = WorkloadRegistry()
        server: FakeApiServer = api_server["server"]
        source = source_for(server.port)
        await source.start(reg)
        try:
            assert await source.wait_synced(10)
            await eventually(lambda: len(cluster.requests_for("Pod", watch=True)) == 1)
            port = server.port
            server.stop()
            await asyncio.sleep(0.5)  # the client sees refused connections and backs off
            pod = obj_named(cluster, "Pod", "emoji-6b8f4c7d9-q9z4t")
            pod["status"]["phase"] = "Failed"
            cluster.emit("MODIFIED", pod)
            cluster.scripts["Pod"].queue.clear()  # a restarted server does not replay a lost stream
            cluster.change_unseen("MODIFIED", pod)
            cluster.expire("Pod")  # ... and has compacted the old version away
            api_server["server"] = FakeApiServer(cluster, port)
            await eventually(lambda: reg.pod("emojivoto", "emoji-6b8f4c7d9-q9z4t").phase == "Failed", 15)
            assert source.stats["watch_errors"] >= 1
            assert not reg.pod("emojivoto", "emoji-6b8f4c7d9-q9z4t").running
        finally:
            await source.stop()
    run(main)


def test_gateway_routes_are_listed_watched_and_become_mesh_config_routes(cluster: FakeCluster,
                                                                         api_server: dict) -> None:
    """HTTPRoute/GRPCRoute through the real client (a cluster with the Gateway API CRDs): their rules
    reach MeshConfig.routes for the workloads behind their parent Services; a watch event renames."""
    from nodemesh.controlplane.config import ControllerConfig
    from nodemesh.controlplane.controller import Controller

    for obj in json.loads(GATEWAY_ROUTES.read_text())["items"]:
        cluster.objects[obj["kind"]][_key(obj)] = obj
    cluster.served = set(PATHS)

    def routes(c: Controller) -> dict[tuple[str, str], list[tuple[str, ...]]]:
        return {(w.workload.type, w.workload.name): [(r.name, r.method, r.path, r.path_type, r.grpc_service,
                                                      r.grpc_method) for r in w.rules]
                for w in c.mesh_config().routes}

    async def main() -> None:
        reg = WorkloadRegistry()
        source = source_for(api_server["server"].port)
        await source.start(reg)
        try:
            assert await source.wait_synced(10)
            await eventually(lambda: len(reg.objects("HTTPRoute")) == 2 and len(reg.objects("GRPCRoute")) == 1)
            controller = Controller(ControllerConfig(), registry=reg)
            assert routes(controller) == {
                ("deployment", "voting"): [("doughnut", "", "", "", "emojivoto.v1.VotingService", "VoteDoughnut")],
                ("deployment", "web"): [("vote", "GET", "/api/vote", "prefix", "", ""),
                                        ("web-routes", "", "/api/list", "exact", "", ""),
                                        ("web-routes", "", "/api/emoji/[a-z]+", "regex", "", "")],
            }  # the Gateway-parented route is north-south: not the mesh's
            renamed = obj_named(cluster, "GRPCRoute", "voting-grpc")
            renamed["spec"]["rules"][0]["name"] = "the-doughnut-vote"
            cluster.emit("MODIFIED", renamed)
            await eventually(lambda: routes(controller)[("deployment", "voting")][0][0] == "the-doughnut-vote")
            assert source.stats["lists"] == 12
        finally:
            await source.stop()
    run(main)


def test_a_cluster_without_the_gateway_api_syncs_without_routes(cluster: FakeCluster, api_server: dict) -> None:
    async def main() -> None:
        reg = WorkloadRegistry()
        source = source_for(api_server["server"].port)
        await source.start(reg)
        try:
            assert await source.wait_synced(10)  # 404 for the route kinds does not hold the controller
            assert reg.synced and reg.objects("HTTPRoute") == []
            assert cluster.requests_for("HTTPRoute", watch=False)  # asked, answered 404
        finally:
            await source.stop()
    run(main)
