"""A small Kubernetes API server on loopback that keeps Secrets and ConfigMaps as a real one does
(resourceVersion on every write, 409 Conflict on a stale update or an existing name, 404 Status
objects, `create` refused with 403 unless allowed — as the install's RBAC refuses it), for tests
that drive the REAL `kubernetes` client: the controller's serving TLS (servingtls.py) and the
workload CA's root Secret (ca.py)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

NS = "nodemesh"

PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<res>secrets|configmaps)(?:/(?P<name>[^/?]+))?")


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


class ApiServer(BaseHTTPRequestHandler):
    """Secrets and ConfigMaps by name, as the API server keeps them."""

    objects: ClassVar[dict[tuple[str, str, str], dict[str, Any]]] = {}
    requests: ClassVar[list[tuple[str, str]]] = []
    version: ClassVar[int] = 100
    allow_create: ClassVar[bool] = False
    # Before the next update of this resource: another writer changes it (a second controller).
    race: ClassVar[Callable[[dict[str, Any]], None] | None] = None
    lock = threading.Lock()

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self) -> tuple[str, str, str | None] | None:
        m = PATH.match(self.path)
        if not m:
            self._send(404, status(404, "NotFound", "the server could not find the requested resource"))
            return None
        return m.group("ns"), m.group("res"), m.group("name")

    def _body(self) -> dict[str, Any]:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    @classmethod
    def _stored(cls, obj: dict[str, Any], res: str) -> dict[str, Any]:
        cls.version += 1
        obj["metadata"]["resourceVersion"] = str(cls.version)
        obj["metadata"].setdefault("uid", f"uid-{obj['metadata']['name']}")
        obj["kind"] = "Secret" if res == "secrets" else "ConfigMap"
        obj["apiVersion"] = "v1"
        return obj

    def do_GET(self) -> None:
        route = self._route()
        if route is None:
            return
        ns, res, name = route
        self.requests.append(("GET", f"{res}/{name}"))
        with self.lock:
            obj = self.objects.get((res, ns, name or ""))
        if obj is None:
            self._send(404, status(404, "NotFound", f'{res} "{name}" not found'))
        else:
            self._send(200, obj)

    def do_POST(self) -> None:
        route = self._route()
        if route is None:
            return
        ns, res, _ = route
        body = self._body()
        name = body["metadata"]["name"]
        self.requests.append(("POST", f"{res}/{name}"))
        if not self.allow_create:  # RBAC: the controller has get/update by name, no create
            self._send(403, status(403, "Forbidden", f'{res} is forbidden: User "system:serviceaccount:nodemesh:'
                                   f'nodemesh-controller" cannot create resource "{res}"'))
            return
        with self.lock:
            if (res, ns, name) in self.objects:
                self._send(409, status(409, "AlreadyExists", f'{res} "{name}" already exists'))
                return
            self.objects[(res, ns, name)] = self._stored(body, res)
            self._send(201, self.objects[(res, ns, name)])

    def do_PUT(self) -> None:
        route = self._route()
        if route is None:
            return
        ns, res, name = route
        body = self._body()
        self.requests.append(("PUT", f"{res}/{name}"))
        with self.lock:
            key = (res, ns, name or "")
            race = type(self).race
            if race is not None and key in self.objects:
                type(self).race = None
                race(self.objects[key])
                self._stored(self.objects[key], res)
            current = self.objects.get(key)
            if current is None:
                self._send(404, status(404, "NotFound", f'{res} "{name}" not found'))
                return
            if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                self._send(409, status(409, "Conflict", f'Operation cannot be fulfilled on {res} "{name}": the '
                                       "object has been modified; please apply your changes to the latest version "
                                       "and try again"))
                return
            self.objects[key] = self._stored(body, res)
            self._send(200, self.objects[key])


def empty_object(res: str, name: str) -> dict[str, Any]:
    """What `kubectl apply` of the install leaves: the object, no data, kubectl's annotation."""
    kind = "Secret" if res == "secrets" else "ConfigMap"
    obj: dict[str, Any] = {"metadata": {"name": name, "namespace": NS, "labels": {"app.kubernetes.io/part-of": "nodemesh"},
                                        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}}}
    if kind == "Secret":
        obj["type"] = "Opaque"
    return ApiServer._stored(obj, res)


def write_kubeconfig(path: Path, port: int, token: str) -> Path:
    """A kubeconfig for an API server on loopback `port`, authenticating with `token`."""
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": token}}],
    }))
    return path


@contextmanager
def api_server(tmp_path: Path, objects: list[tuple[str, str]]) -> Iterator[Path]:
    """Serve `objects` ((resource, name): "secrets"/"configmaps"), each as the install ships it
    (empty); yields a kubeconfig naming the server."""
    ApiServer.objects = {(res, NS, name): empty_object(res, name) for res, name in objects}
    ApiServer.requests = []
    ApiServer.allow_create = False
    ApiServer.race = None
    server = ThreadingHTTPServer(("127.0.0.1", 0), ApiServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    path = write_kubeconfig(tmp_path / "kubeconfig", server.server_port, "controller-sa-token")
    try:
        yield path
    finally:
        server.shutdown()
        server.server_close()


