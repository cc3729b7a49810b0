"""The Kubernetes cluster source: list + watch through the official `kubernetes` client.

One thread per kind runs the classic informer loop with the synchronous client:

    list (paginated)  -> registry.replace(kind, items), remember the list's resourceVersion
    watch from there  -> registry.apply(event) per ADDED/MODIFIED/DELETED; BOOKMARK moves the
                         resourceVersion on without an object change
    stream ends       -> watch again from the last resourceVersion (server timeout, dropped
                         connection, API server restart: with exponential backoff on errors)
    410 Gone          -> the resourceVersion is too old: list again (a relist replaces the kind,
                         so deletions missed meanwhile are applied too)

Objects stay plain JSON dicts (no model deserialisation), the same shape the sandbox source
reads, so the registry cannot tell the sources apart. Events are handed to the event loop with
`call_soon_threadsafe`, which keeps their order per kind.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from nodemesh.controlplane.registry import WATCHED_KINDS, WorkloadRegistry
from nodemesh.controlplane.sources import ClusterSource

log = logging.getLogger("nodemesh.controlplane.sources.kubernetes")

# kind -> (API class, list method for all namespaces[, leading arguments of that method])
LIST_CALLS: dict[str, tuple[Any, ...]] = {
    "Namespace": (client.CoreV1Api, "list_namespace"),
    "Node": (client.CoreV1Api, "list_node"),
    "Pod": (client.CoreV1Api, "list_pod_for_all_namespaces"),
    "Service": (client.CoreV1Api, "list_service_for_all_namespaces"),
    "ReplicaSet": (client.AppsV1Api, "list_replica_set_for_all_namespaces"),
    "Deployment": (client.AppsV1Api, "list_deployment_for_all_namespaces"),
    "StatefulSet": (client.AppsV1Api, "list_stateful_set_for_all_namespaces"),
    "DaemonSet": (client.AppsV1Api, "list_daemon_set_for_all_namespaces"),
    "Job": (client.BatchV1Api, "list_job_for_all_namespaces"),
    "EndpointSlice": (client.DiscoveryV1Api, "list_endpoint_slice_for_all_namespaces"),
    "HTTPRoute": (client.CustomObjectsApi, "list_cluster_custom_object",
                  ("gateway.networking.k8s.io", "v1", "httproutes")),
    "GRPCRoute": (client.CustomObjectsApi, "list_cluster_custom_object",
                  ("gateway.networking.k8s.io", "v1", "grpcroutes")),
}
assert set(LIST_CALLS) == set(WATCHED_KINDS)
# Kinds a cluster may not serve (CRDs not installed, or no RBAC for them): a 404 or 403 lists them
# as empty, counts as synced (the controller must not wait for them), and is retried this often.
OPTIONAL_KINDS = frozenset(("HTTPRoute", "GRPCRoute"))
OPTIONAL_RETRY_S = 60.0


def load_configuration(kubeconfig: str = "") -> client.Configuration:
    """A client Configuration from a kubeconfig file, or the in-cluster service account."""
    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    return cfg


class _RawWatch(watch.Watch):
    """A Watch that yields the API's JSON objects untouched (`raw_object`), with the client's
    own ERROR-event handling intact (it raises ApiException(410) when the version expired)."""

    def get_return_type(self, func: Callable[..., Any]) -> None:
        return None


class Backoff:
    """Exponential backoff with full jitter, reset after progress."""

    def __init__(self, initial_s: float = 0.2, max_s: float = 10.0) -> None:
        self.initial_s, self.max_s = initial_s, max_s
        self._next = initial_s

    def next_delay(self) -> float:
        delay = random.uniform(self._next / 2, self._next)
        self._next = min(self._next * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self._next = self.initial_s


class KubernetesSource(ClusterSource):
    def __init__(self, configuration: client.Configuration, *, page_size: int = 500,
                 watch_timeout_s: int = 300, backoff_initial_s: float = 0.2, backoff_max_s: float = 10.0,
                 kinds: tuple[str, ...] = WATCHED_KINDS) -> None:
        super().__init__()
        self.configuration = configuration
        self.page_size = page_size
        self.watch_timeout_s = watch_timeout_s
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.kinds = kinds
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watches: dict[str, watch.Watch] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._synced_kinds: set[str] = set()
        # Observable progress, for tests and /metrics: lists done, watches opened, restarts.
        self.stats = {"lists": 0, "relists_410": 0, "watches": 0, "watch_errors": 0, "bookmarks": 0}
        self.resource_versions: dict[str, str] = {}

    async def start(self, registry: WorkloadRegistry) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping.clear()
        for kind in self.kinds:
            t = threading.Thread(target=self._run_kind, args=(registry, kind), name=f"k8s-watch-{kind}",
                                 daemon=True)
            self._threads.append(t)
            t.start()

    async def stop(self) -> None:
        self._stopping.set()
        for w in list(self._watches.values()):
            w.stop()  # shuts the socket down, unblocking a thread stuck in a read
        threads, self._threads = self._threads, []
        await asyncio.get_running_loop().run_in_executor(None, _join_all, threads, 5.0)

    # ------------------------------------------------------------------ per-kind thread
    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed while we were shutting down
            self._stopping.set()

    def _mark_synced(self, registry: WorkloadRegistry, kind: str) -> None:
        self._synced_kinds.add(kind)
        registry.mark_synced([kind])
        if self._synced_kinds >= set(self.kinds):
            self.synced.set()

    def _run_kind(self, registry: WorkloadRegistry, kind: str) -> None:
        api_cls, method, *args = LIST_CALLS[kind]
        api_client = client.ApiClient(self.configuration)
        list_fn = getattr(api_cls(api_client), method)
        if args:
            list_fn = functools.partial(list_fn, *args[0])
        backoff = Backoff(self.backoff_initial_s, self.backoff_max_s)
        rv: str | None = None
        try:
            while not self._stopping.is_set():
                try:
                    if rv is None:
                        items, rv = self._list(list_fn)
                        for obj in items:
                            obj.setdefault("kind", kind)  # list items carry no kind
                        self.stats["lists"] += 1
                        self.resource_versions[kind] = rv
                        self._post(registry.replace, kind, items)
                        self._post(self._mark_synced, registry, kind)
                        backoff.reset()
                        log.info("event=listed kind=%s items=%d rv=%s", kind, len(items), rv)
                    started = time.monotonic()
                    rv, progressed = self._watch(registry, kind, list_fn, rv)
                    if progressed:
                        backoff.reset()
                    elif time.monotonic() - started < 1.0:
                        # An empty watch that ended at once: do not spin against the server.
                        self._stopping.wait(backoff.next_delay())
                except ApiException as exc:
                    if kind in OPTIONAL_KINDS and exc.status in (403, 404) and rv is None:
                        log.info("event=optional_kind_unavailable kind=%s status=%s retry_in_s=%.0f", kind,
                                 exc.status, OPTIONAL_RETRY_S)
                        self._post(registry.replace, kind, [])
                        self._post(self._mark_synced, registry, kind)
                        self._stopping.wait(OPTIONAL_RETRY_S)
                        continue
                    if exc.status == 410:
                        self.stats["relists_410"] += 1
                        log.info("event=watch_expired kind=%s rv=%s action=relist", kind, rv)
                        rv = None
                        continue
                    if rv is not None:
                        rv = self.resource_versions.get(kind, rv)
                    self._error(kind, exc, backoff)
                except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                    # Dropped connection, API server restarting, half-written body: watch again
                    # from the last resourceVersion we saw (events or bookmarks before the
                    # break count), after a pause.
                    if rv is not None:
                        rv = self.resource_versions.get(kind, rv)
                    self._error(kind, exc, backoff)
        finally:
            api_client.close()

    def _error(self, kind: str, exc: BaseException, backoff: Backoff) -> None:
        if self._stopping.is_set():
            return
        self.stats["watch_errors"] += 1
        delay = backoff.next_delay()
        log.warning("event=watch_error kind=%s error=%r retry_in_s=%.2f", kind, str(exc)[:200], delay)
        self._stopping.wait(delay)

    def _list(self, list_fn: Callable[..., Any]) -> tuple[list[dict[str, Any]], str]:
        items: list[dict[str, Any]] = []
        cont = ""
        while True:
            kwargs: dict[str, Any] = {"limit": self.page_size, "_preload_content": False,
                                      "_request_timeout": (10, 60)}
            if cont:
                kwargs["_continue"] = cont
            resp = list_fn(**kwargs)
            data = json.loads(resp.data)
            items.extend(data.get("items") or [])
            meta = data.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                return items, str(meta.get("resourceVersion") or "")

    def _watch(self, registry: WorkloadRegistry, kind: str, list_fn: Callable[..., Any],
               rv: str) -> tuple[str, bool]:
        """One watch request; returns the last resourceVersion and whether anything arrived."""
        w = _RawWatch()
        self._watches[kind] = w
        self.stats["watches"] += 1
        progressed = False
        try:
            # timeout_seconds makes the client hand 410 to us instead of retrying on its own,
            # and bounds how long a silently dead connection can hold us (plus the read timeout).
            stream = w.stream(list_fn, resource_version=rv, allow_watch_bookmarks=True,
                              timeout_seconds=self.watch_timeout_s,
                              _request_timeout=(10, self.watch_timeout_s + 30))
            for event in stream:
                if self._stopping.is_set():
                    break
                etype, obj = event.get("type"), event.get("raw_object") or {}
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if etype == "BOOKMARK":
                    self.stats["bookmarks"] += 1
                elif etype in ("ADDED", "MODIFIED", "DELETED"):
                    obj.setdefault("kind", kind)
                    self._post(registry.apply, etype, obj)
                else:
                    continue
                if new_rv:
                    rv = new_rv
                    self.resource_versions[kind] = rv
                progressed = True
        finally:
            self._watches.pop(kind, None)
        return rv, progressed


def _join_all(threads: list[threading.Thread], timeout: float) -> None:
    for t in threads:
        t.join(timeout)
