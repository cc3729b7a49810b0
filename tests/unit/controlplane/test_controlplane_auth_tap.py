"""Tap is its own permission: token-file roles, and RBAC asked with a SubjectAccessReview.

The SubjectAccessReview path runs the REAL `kubernetes` client of the controller's
TokenReviewAuthenticator against the sandbox's API server (sandbox/apiserver.py on loopback),
which reviews tokens minted by sandbox/tokens.py and answers SubjectAccessReviews from recorded
ClusterRoles/Roles and their bindings (sandbox/rbac.py) — the manifest's own nodemesh-tap role.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from kubernetes import client
from nodemesh.api.clusterstate import ClusterObjects, write_objects
from nodemesh.controlplane.auth import (
    AccessPolicy,
    AuthError,
    StaticTokenAuthenticator,
    TokenReviewAuthenticator,
    tap_resource,
)
from nodemesh.manifests.render import InstallValues, daemonset_documents
from nodemesh.sandbox import rbac, tokens
from nodemesh.sandbox.apiserver import ApiServer

AUDIENCE = "nodemesh-controller"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_controlplane_auth_tap_token_file_roles(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# the sandbox's own token first: it may do everything\nadmin-tok\n"
                    "stats-tok stats\ntap-tok role=stats,tap\nagent-tok agent\nscrape-tok metrics\n")
    auth = StaticTokenAuthenticator(str(path))
    for method in ("Connect", "StatSummary", "Tap", "Metrics"):
        run(auth.authenticate("admin-tok", method))
    run(auth.authenticate("stats-tok", "StatSummary"))
    run(auth.authenticate("tap-tok", "Tap"))
    run(auth.authorize_tap("tap-tok", "rt", "deployment", "web"))
    with pytest.raises(AuthError) as err:
        run(auth.authenticate("stats-tok", "Tap"))
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.message == "this token may not call Tap: it needs role tap, the token has stats"
    with pytest.raises(AuthError):
        run(auth.authorize_tap("stats-tok", "rt", "deployment", "web"))
    for token, method in (("agent-tok", "StatSummary"), ("stats-tok", "Connect"), ("scrape-tok", "Edges"),
                          ("tap-tok", "Metrics")):
        with pytest.raises(AuthError) as err:
            run(auth.authenticate(token, method))
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED, (token, method)
    with pytest.raises(AuthError) as err:
        run(auth.authenticate("stats", "StatSummary"))  # a role name is not a token
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    (tmp_path / "bad").write_text("tok superuser\n")
    with pytest.raises(ValueError, match="unknown role 'superuser'"):
        StaticTokenAuthenticator(str(tmp_path / "bad"))


def test_controlplane_auth_tap_rbac_rules() -> None:
    objs = [
        {"kind": "ClusterRole", "metadata": {"name": "tap"},
         "rules": [{"apiGroups": ["tap.nodemesh.io"], "resources": ["*"], "verbs": ["watch"]}]},
        {"kind": "ClusterRoleBinding", "metadata": {"name": "tap"}, "roleRef": {"kind": "ClusterRole", "name": "tap"},
         "subjects": [{"kind": "Group", "name": "oncall"}]},
        {"kind": "Role", "metadata": {"name": "web-tap", "namespace": "rt"},
         "rules": [{"apiGroups": ["tap.nodemesh.io"], "resources": ["deployments"], "verbs": ["watch"],
                    "resourceNames": ["web"]}]},
        {"kind": "RoleBinding", "metadata": {"name": "web-tap", "namespace": "rt"},
         "roleRef": {"kind": "Role", "name": "web-tap"},
         "subjects": [{"kind": "ServiceAccount", "name": "dev"}]},
    ]
    attrs = {"verb": "watch", "group": "tap.nodemesh.io", "resource": "deployments", "namespace": "rt", "name": "web"}
    dev = "system:serviceaccount:rt:dev"
    assert rbac.allowed(objs, "bob", ["oncall"], attrs)[0]
    assert rbac.allowed(objs, "bob", ["oncall"], {**attrs, "namespace": ""})[0]
    assert rbac.allowed(objs, dev, [], attrs)[0]
    assert not rbac.allowed(objs, dev, [], {**attrs, "name": "db"})[0]             # resourceNames
    assert not rbac.allowed(objs, dev, [], {**attrs, "namespace": "other"})[0]     # a Role is its namespace's
    assert not rbac.allowed(objs, dev, [], {**attrs, "verb": "create"})[0]
    assert not rbac.allowed(objs, "system:serviceaccount:other:dev", [], attrs)[0]
    assert rbac.allowed(objs, "nobody", [], attrs) == (False, "no RBAC rule allows it")
    assert (tap_resource("deployment"), tap_resource("all"), tap_resource("namespace")) == (
        "deployments", "*", "namespaces")


@pytest.fixture
def sandbox_api(tmp_path: Path) -> Iterator[tuple[client.ApiClient, Path]]:
    """The sandbox's API server on loopback, serving the manifest's RBAC objects."""
    docs = [d for d in daemonset_documents(InstallValues()) if d["kind"].endswith(("Role", "RoleBinding"))]
    docs.append({"kind": "RoleBinding", "apiVersion": "rbac.authorization.k8s.io/v1",
                 "metadata": {"name": "team-tap", "namespace": "rt"},
                 "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "nodemesh-tap"},
                 "subjects": [{"kind": "ServiceAccount", "name": "team", "namespace": "rt"}]})
    write_objects(tmp_path, ClusterObjects(1, docs))
    server = ApiServer(tmp_path)
    server.store.load()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        runner = web.AppRunner(server.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        box["runner"], box["port"] = runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(serve()), loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(10)
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{box['port']}"
    api = client.ApiClient(cfg)
    try:
        yield api, tmp_path
    finally:
        api.close()
        asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_controlplane_auth_tap_subject_access_review(sandbox_api: tuple[client.ApiClient, Path]) -> None:
    api, state = sandbox_api
    policy = AccessPolicy.for_namespace("nodemesh", readers=["system:serviceaccount:nodemesh:nodemesh-cli",
                                                             "system:serviceaccount:rt:team",
                                                             "system:serviceaccount:nodemesh:stats-only"])
    auth = TokenReviewAuthenticator(api, (AUDIENCE,), policy)
    cli = tokens.mint(state, "nodemesh", "nodemesh-cli", [AUDIENCE])
    team = tokens.mint(state, "rt", "team", [AUDIENCE])
    stats_only = tokens.mint(state, "nodemesh", "stats-only", [AUDIENCE])
    pod = tokens.mint(state, "rt", "default", [AUDIENCE])

    async def scenario() -> None:
        # nodemesh-cli: the manifest's ClusterRoleBinding of nodemesh-tap, every namespace.
        await auth.authorize_tap(cli, "rt", "deployment", "web")
        await auth.authorize_tap(cli, "", "all", "")
        # team: a RoleBinding in rt only.
        await auth.authorize_tap(team, "rt", "namespace", "rt")
        with pytest.raises(AuthError) as err:
            await auth.authorize_tap(team, "other", "deployment", "web")
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.message == ("system:serviceaccount:rt:team may not tap deployment/web in namespace other: "
                                     "RBAC must allow verb watch on tap.nodemesh.io deployments "
                                     "(e.g. bind the ClusterRole nodemesh-tap)")
        # a reader without the tap binding may read stats, never tap
        await auth.authenticate(stats_only, "StatSummary")
        with pytest.raises(AuthError) as err:
            await auth.authorize_tap(stats_only, "rt", "deployment", "web")
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        # a pod's own token: authenticated, on no list: nothing at all
        for method in ("StatSummary", "Tap", "Connect", "Metrics"):
            with pytest.raises(AuthError) as err:
                await auth.authenticate(pod, method)
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        reviews = auth.access_reviews
        await auth.authorize_tap(cli, "rt", "deployment", "web")  # cached
        assert auth.access_reviews == reviews

    run(scenario())
