"""The sandbox's API server: the recorded objects over the Kubernetes HTTP API, as a hostNetwork pod.

On a real cluster the API server listens on a node's own address, and every operator reaches it
through the `kubernetes` Service in `default` (10.96.0.1:443 -> <node IP>:6443): a Service whose
endpoint is on the node network, not the pod network. The sandbox runs this module the same way
(`Sandbox.ensure_api_server()`): a pod with `hostNetwork: true` on node1 behind Service
`default/kubernetes`, so a process that talks to "the API server" (the controller's list+watch and
TokenReviews, the agent DaemonSet's init container reading its Node) crosses the same paths it would
on a node, capture included.

What it serves, from `<state>/objects.json` (read-only; the sandbox's `apply` and kubelet write it):
  GET  /api/v1/{namespaces,nodes,pods,services}, /apis/apps/v1/{replicasets,deployments,statefulsets,
       daemonsets}, /apis/batch/v1/jobs, /apis/discovery.k8s.io/v1/endpointslices
       -> a list (resourceVersion = the store's), or with ?watch=true a chunked stream of
       ADDED/MODIFIED/DELETED events after ?resourceVersion (410 Expired when that is older than
       this process), BOOKMARKs with allowWatchBookmarks, ended after ?timeoutSeconds
  GET  /api/v1/nodes/NAME, /api/v1/namespaces/NS/{pods,services,configmaps,secrets}/NAME
  PUT  /api/v1/namespaces/NS/{configmaps,secrets}/NAME: an update, as the controller fills the TLS
       Secret and CA ConfigMap the install created (controlplane/servingtls.py): 409 Conflict when
       metadata.resourceVersion is not the stored one, written into objects.json under the state lock
  POST /apis/authentication.k8s.io/v1/tokenreviews (tokens of sandbox/tokens.py)
  POST /apis/authorization.k8s.io/v1/subjectaccessreviews (resourceAttributes, answered from the
       recorded ClusterRoles/Roles and their bindings: sandbox/rbac.py)
  GET  /healthz /readyz /livez /version
Plain HTTP, no authentication or RBAC on reads and updates (the sandbox is one machine's root); TokenReview is
and SubjectAccessReview are the real checks the mesh depends on. Changes are found by polling the file (50 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from nodemesh.api.clusterstate import objects_path, read_objects
from nodemesh.sandbox import rbac
from nodemesh.sandbox.tokens import TokenBook

log = logging.getLogger("nodemesh.sandbox.apiserver")

PORT = 6443
POLL_S = 0.05
BOOKMARK_S = 5.0
HISTORY = 20000
LIST_PATHS = {
    "/api/v1/namespaces": ("Namespace", "v1"), "/api/v1/nodes": ("Node", "v1"),
    "/api/v1/pods": ("Pod", "v1"), "/api/v1/services": ("Service", "v1"),
    "/apis/apps/v1/replicasets": ("ReplicaSet", "apps/v1"), "/apis/apps/v1/deployments": ("Deployment", "apps/v1"),
    "/apis/apps/v1/statefulsets": ("StatefulSet", "apps/v1"), "/apis/apps/v1/daemonsets": ("DaemonSet", "apps/v1"),
    "/apis/batch/v1/jobs": ("Job", "batch/v1"),
    "/apis/discovery.k8s.io/v1/endpointslices": ("EndpointSlice", "discovery.k8s.io/v1"),
}
Key = tuple[str, str, str]  # kind, namespace, name
WRITABLE = {"configmaps": "ConfigMap", "secrets": "Secret"}


def _key(obj: dict[str, Any]) -> Key:
    return (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


class Store:
    """The objects as last read, and the events between reads (kept for watches to resume from)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.rv = 0
        self.objects: dict[Key, dict[str, Any]] = {}
        self.events: collections.deque[tuple[int, str, dict[str, Any]]] = collections.deque(maxlen=HISTORY)
        self.oldest_rv = 0  # a watch from before this cannot be resumed: 410
        self._stamp: tuple[int, int, int] | None = None
        self.changed = asyncio.Condition()

    def load(self) -> bool:
        """Re-read the file if it changed; queue the differences as events. True if anything did."""
        path = objects_path(self.state_dir)
        try:
            st = path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            return False
        if stamp == self._stamp:
            return False
        try:
            data = read_objects(self.state_dir)
        except (ValueError, OSError):
            return False
        first = self._stamp is None
        self._stamp = stamp
        new = {_key(o): o for o in data.items}
        if first:
            self.objects, self.rv, self.oldest_rv = new, data.resource_version, data.resource_version
            return True
        if data.resource_version == self.rv:
            return False
        events: list[tuple[int, str, dict[str, Any]]] = []
        for key, obj in new.items():
            old = self.objects.get(key)
            rv = int(obj["metadata"].get("resourceVersion", "0"))
            if old is None:
                events.append((rv, "ADDED", obj))
            elif old["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                events.append((rv, "MODIFIED", obj))
        for key, old in self.objects.items():
            if key not in new:
                gone = {**old, "metadata": {**old["metadata"], "resourceVersion": str(data.resource_version)}}
                events.append((data.resource_version, "DELETED", gone))
        events.sort(key=lambda e: e[0])
        if len(self.events) + len(events) > HISTORY and events:
            self.oldest_rv = max(self.oldest_rv, events[0][0] - 1)
        self.events.extend(events)
        self.objects, self.rv = new, data.resource_version
        # When a change's events became watchable: a real API server's write-to-event time is
        # milliseconds, this file re-read is not (the scale harness measures fan-out from here too).
        log.info("event=objects_changed rv=%d events=%d at=%.6f", self.rv, len(events), time.time())
        return True

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for k, o in self.objects.items() if k[0] == kind]

    def after(self, kind: str, rv: int) -> list[tuple[int, str, dict[str, Any]]]:
        return [e for e in self.events if e[0] > rv and e[2]["kind"] == kind]


def _status(code: int, reason: str, message: str) -> web.Response:
    return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                              "message": message, "reason": reason, "code": code}, status=code)


class ApiServer:
    def __init__(self, state_dir: Path) -> None:
        self.store = Store(state_dir)
        self.tokens = TokenBook(state_dir)
        self.watches = 0

    async def poll(self) -> None:
        while True:
            try:
                if self.store.load():
                    async with self.store.changed:
                        self.store.changed.notify_all()
            except Exception:
                log.exception("event=load_failed")
            await asyncio.sleep(POLL_S)

    def app(self) -> web.Application:
        app = web.Application()
        for path in LIST_PATHS:
            app.router.add_get(path, self.list_or_watch)
        app.router.add_get("/api/v1/nodes/{name}", self.get_node)
        app.router.add_get("/api/v1/namespaces/{ns}/{resource}/{name}", self.get_namespaced)
        app.router.add_put("/api/v1/namespaces/{ns}/{resource}/{name}", self.replace_namespaced)
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self.token_review)
        app.router.add_post("/apis/authorization.k8s.io/v1/subjectaccessreviews", self.access_review)
        for path in ("/healthz", "/readyz", "/livez"):
            app.router.add_get(path, self.healthy)
        app.router.add_get("/version", self.version)
        return app

    @staticmethod
    async def healthy(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    @staticmethod
    async def version(_request: web.Request) -> web.Response:
        return web.json_response(
            {"major": "1", "minor": "30", "gitVersion": "v1.30.0-nodemesh-sandbox", "platform": "linux/amd64"})

    async def list_or_watch(self, request: web.Request) -> web.StreamResponse:
        kind, api_version = LIST_PATHS[request.path]
        if request.query.get("watch") in ("true", "1"):
            return await self.watch(request, kind)
        items = []
        for obj in self.store.of_kind(kind):
            item = dict(obj)
            item.pop("kind", None)  # list items carry neither kind nor apiVersion
            item.pop("apiVersion", None)
            items.append(item)
        return web.json_response({"kind": f"{kind}List", "apiVersion": api_version,
                                  "metadata": {"resourceVersion": str(self.store.rv)}, "items": items})

    async def watch(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            rv = int(request.query.get("resourceVersion") or 0)
            timeout = float(request.query.get("timeoutSeconds") or 1800)
        except ValueError:
            return _status(400, "BadRequest", "resourceVersion and timeoutSeconds must be numbers")
        bookmarks = request.query.get("allowWatchBookmarks") in ("true", "1")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        self.watches += 1
        store = self.store
        deadline = time.monotonic() + timeout

        async def send(etype: str, obj: dict[str, Any]) -> None:
            await resp.write(json.dumps({"type": etype, "object": obj}).encode() + b"\n")

        try:
            if rv == 0:  # no version: the current state as ADDED, then changes
                for obj in store.of_kind(kind):
                    await send("ADDED", obj)
                rv = store.rv
            elif rv < store.oldest_rv:
                await send("ERROR", {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                     "message": f"too old resource version: {rv} ({store.oldest_rv})",
                                     "reason": "Expired", "code": 410})
                return resp
            last_bookmark = time.monotonic()
            while time.monotonic() < deadline:
                for ev_rv, etype, obj in store.after(kind, rv):
                    await send(etype, obj)
                    rv = ev_rv
                if bookmarks and time.monotonic() - last_bookmark > BOOKMARK_S:
                    rv = max(rv, store.rv)
                    await send("BOOKMARK", {"kind": kind, "apiVersion": "v1",
                                            "metadata": {"resourceVersion": str(rv)}})
                    last_bookmark = time.monotonic()
                async with store.changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(store.changed.wait(), min(1.0, max(0.0, deadline - time.monotonic())))
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.watches -= 1
        return resp

    async def get_node(self, request: web.Request) -> web.Response:
        obj = self.store.objects.get(("Node", "", request.match_info["name"]))
        if obj is None:
            return _status(404, "NotFound", f'nodes "{request.match_info["name"]}" not found')
        return web.json_response(obj)

    async def get_namespaced(self, request: web.Request) -> web.Response:
        kinds = {"pods": "Pod", "services": "Service", "configmaps": "ConfigMap", "serviceaccounts": "ServiceAccount",
                 "secrets": "Secret"}
        kind = kinds.get(request.match_info["resource"])
        name = request.match_info["name"]
        obj = self.store.objects.get((kind, request.match_info["ns"], name)) if kind else None
        if obj is None:
            return _status(404, "NotFound", f'{request.match_info["resource"]} "{name}" not found')
        return web.json_response(obj)

    async def replace_namespaced(self, request: web.Request) -> web.Response:
        from nodemesh.sandbox.state import ClusterState

        resource, ns, name = request.match_info["resource"], request.match_info["ns"], request.match_info["name"]
        kind = WRITABLE.get(resource)
        if kind is None:
            return _status(405, "MethodNotAllowed", f"the sandbox's API server updates only {', '.join(WRITABLE)}")
        try:
            body = await request.json()
            meta = body["metadata"]
            assert isinstance(meta, dict) and meta.get("name") == name
        except (ValueError, KeyError, TypeError, AssertionError):
            return _status(400, "BadRequest", f"the body must be a {kind} named {name!r}")
        with ClusterState(self.store.state_dir).objects_txn() as objs:
            current = objs.get(kind, ns, name)
            if current is None:
                return _status(404, "NotFound", f'{resource} "{name}" not found')
            if meta.get("resourceVersion") != current["metadata"].get("resourceVersion"):
                return _status(409, "Conflict", f'Operation cannot be fulfilled on {resource} "{name}": the object '
                               "has been modified; please apply your changes to the latest version and try again")
            body.update({"kind": kind, "apiVersion": "v1"})
            meta["namespace"] = ns
            meta.pop("resourceVersion", None)
            stored = objs.put(body)
        self.store.load()  # a read right after the write sees it
        return web.json_response(stored)

    async def token_review(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            spec = body["spec"]
            token = str(spec["token"])
            audiences = [str(a) for a in spec.get("audiences") or []]
        except (ValueError, KeyError, TypeError):
            return _status(400, "BadRequest", "a TokenReview needs spec.token")
        review = self.tokens.review(token, audiences)
        status: dict[str, Any] = {"authenticated": review.authenticated}
        if review.authenticated:
            status["user"] = {"username": review.username, "groups": list(review.groups)}
            status["audiences"] = list(review.audiences)
        else:
            status["error"] = review.error
        return web.json_response({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                  "metadata": {"creationTimestamp": None}, "spec": spec, "status": status},
                                 status=201)


    async def access_review(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            spec = body["spec"]
            user = str(spec["user"])
            groups = [str(g) for g in spec.get("groups") or []]
            attrs = spec["resourceAttributes"]
            if not isinstance(attrs, dict):
                raise TypeError(attrs)
        except (ValueError, KeyError, TypeError):
            return _status(400, "BadRequest", "a SubjectAccessReview needs spec.user and spec.resourceAttributes")
        ok, reason = rbac.allowed(self.store.objects.values(), user, groups, attrs)
        status: dict[str, Any] = {"allowed": ok, "reason": reason}
        return web.json_response({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                                  "metadata": {"creationTimestamp": None}, "spec": spec, "status": status},
                                 status=201)


async def serve(state_dir: Path, host: str, port: int) -> None:
    server = ApiServer(state_dir)
    server.store.load()
    poller = asyncio.create_task(server.poll())
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    log.info("event=apiserver_listening addr=%s:%d rv=%d", host, port, server.store.rv)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    poller.cancel()
    await runner.cleanup()


def manifest(state_dir: Path, cluster_ip: str, node: str, python: str = "python") -> str:
    """The API server pod (hostNetwork, on `node`) and the `kubernetes` Service in front of it."""
    argv = [python, "-m", "nodemesh.sandbox.apiserver", "--state-dir", str(state_dir), "--port", str(PORT)]
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata:
  name: kube-apiserver
  namespace: kube-system
  labels: {{component: kube-apiserver}}
spec:
  replicas: 1
  selector:
    matchLabels: {{component: kube-apiserver}}
  template:
    metadata:
      labels: {{component: kube-apiserver, tier: control-plane}}
    spec:
      hostNetwork: true
      automountServiceAccountToken: false
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      containers:
      - name: kube-apiserver
        command: {json.dumps(argv)}
        ports: [{{containerPort: {PORT}, name: https}}]
        readinessProbe:
          httpGet: {{path: /readyz, port: https}}
          periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata:
  name: kubernetes
  namespace: default
  labels: {{component: apiserver, provider: kubernetes}}
spec:
  clusterIP: {cluster_ip}
  selector: {{component: kube-apiserver}}
  ports:
  - {{name: https, port: 443, targetPort: {PORT}}}
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nodemesh.sandbox.apiserver")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--listen", default="0.0.0.0")
    p.add_argument("--port", type=int, default=PORT)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="ts=%(asctime)s level=%(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(Path(a.state_dir), a.listen, a.port))


if __name__ == "__main__":
    main()
