"""What the kubelet makes of a container spec: $(VAR), volume paths, tokens, API server events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nodemesh.api.clusterstate import ClusterObjects, write_objects
from nodemesh.sandbox import podspec, tokens
from nodemesh.sandbox.manifests import ManifestError, load_text


def test_expand_vars_like_the_kubelet() -> None:
    env = {"NODE_NAME": "node1", "A": "x"}
    assert podspec.expand_vars("--node $(NODE_NAME)", env) == "--node node1"
    assert podspec.expand_vars("$$(NODE_NAME) $(UNSET) $(A)$(A)", env) == "$(NODE_NAME) $(UNSET) xx"


def test_map_paths_rewrites_mount_paths_once_and_only_at_path_starts() -> None:
    mounts = [("/var/run/secrets/nodemesh", "/run/nodemesh/sandbox/c/pods/p/volumes/token"),
              ("/run/nodemesh", "/run/nodemesh/sandbox/c/pods/p/volumes/run")]
    # the host path of the first starts with the second mount path: one pass, never mapped twice
    assert podspec.map_paths("--token-file /var/run/secrets/nodemesh/token", mounts) == \
        "--token-file /run/nodemesh/sandbox/c/pods/p/volumes/token/token"
    assert podspec.map_paths('--pod-cidr "$(cat /run/nodemesh/pod-cidrs)"', mounts) == \
        '--pod-cidr "$(cat /run/nodemesh/sandbox/c/pods/p/volumes/run/pod-cidrs)"'
    assert podspec.map_paths("/run/nodemeshx /x/run/nodemesh", mounts) == "/run/nodemeshx /x/run/nodemesh"


def test_pod_volumes_and_mounts(tmp_path: Path) -> None:
    pod = {"spec": {"volumes": [{"name": "run", "emptyDir": {}}, {"name": "lock", "hostPath": {"path": "/run/x.lock"}}]}}
    vols = podspec.pod_volumes(pod, tmp_path)
    assert vols["run"].host_path == tmp_path / "volumes" / "run" and vols["lock"].host_path == Path("/run/x.lock")
    mounts = podspec.mount_map({"volumeMounts": [{"name": "run", "mountPath": "/run/a/"},
                                                 {"name": "lock", "mountPath": "/run/a/b"}]}, vols)
    assert mounts == [("/run/a/b", "/run/x.lock"), ("/run/a", str(tmp_path / "volumes" / "run"))]


def test_tokens_review_checks_audience_and_expiry(tmp_path: Path) -> None:
    tok = tokens.mint(tmp_path, "nodemesh", "nodemesh-agent", ["nodemesh-controller"])
    book = tokens.TokenBook(tmp_path)
    ok = book.review(tok, ["nodemesh-controller"])
    assert ok.authenticated and ok.username == "system:serviceaccount:nodemesh:nodemesh-agent"
    assert "system:serviceaccounts:nodemesh" in ok.groups
    assert not book.review(tok, ["other"]).authenticated
    assert not book.review("sbx.nope", ["nodemesh-controller"]).authenticated
    expired = tokens.mint(tmp_path, "ns", "sa", ["a"], ttl_s=-1)
    assert book.review(expired, ["a"]).error == "token expired"


def test_api_server_store_turns_file_changes_into_watch_events(tmp_path: Path) -> None:
    from nodemesh.sandbox.apiserver import Store

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "n", "resourceVersion": "5"}}
    write_objects(tmp_path, ClusterObjects(5, [pod]))
    store = Store(tmp_path)
    assert store.load() and store.rv == 5 and store.oldest_rv == 5 and not store.events
    changed = json.loads(json.dumps(pod))
    changed["metadata"]["resourceVersion"] = "7"
    new = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "b", "namespace": "n", "resourceVersion": "6"}}
    write_objects(tmp_path, ClusterObjects(7, [changed, new]))
    assert store.load()
    assert [(rv, t, o["metadata"]["name"]) for rv, t, o in store.after("Pod", 5)] == [(6, "ADDED", "b"),
                                                                                     (7, "MODIFIED", "a")]
    write_objects(tmp_path, ClusterObjects(8, [changed]))
    assert store.load()
    assert [(rv, t) for rv, t, _ in store.after("Pod", 7)] == [(8, "DELETED")]


_DS = ("kind: DaemonSet\nspec: {selector: {matchLabels: {a: b}}, template: {metadata: {labels: {a: b}}, "
       "spec: {%s}}%s}")


@pytest.mark.parametrize(("doc", "needle"), [
    (_DS % ("containers: [{name: c, command: [x]}]", ", updateStrategy: {rollingUpdate: {maxSurge: 10%}}"),
     "number of pods"),
    (_DS % ("containers: [{name: c, command: [x], volumeMounts: [{name: v, mountPath: /x}]}]", ""),
     "names no volume"),
    (_DS % ("volumes: [{name: v, secret: {}}], containers: [{name: c, command: [x]}]", ""), "exactly one of"),
    (_DS % ("containers: [{name: c, command: [x], readinessProbe: {exec: {command: []}}}]", ""),
     "exec needs a command"),
])
def test_daemonset_validation(doc: str, needle: str) -> None:
    with pytest.raises(ManifestError, match=needle):
        load_text("apiVersion: apps/v1\nmetadata: {name: d}\n" + doc)


def test_the_install_manifests_validate() -> None:
    from nodemesh.manifests.render import InstallValues, render_daemonset

    # As `install --sandbox --as-pods` renders them by default: without the controller's own TLS.
    kinds = {m.kind for m in load_text(render_daemonset(InstallValues(controllerTls=False)))}
    assert kinds == {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment",
                     "Service", "DaemonSet"}
    # The default (controllerTls): the controller's TLS Secret and CA ConfigMap, and its Role.
    assert {m.kind for m in load_text(render_daemonset())} == kinds | {"Secret", "Role", "RoleBinding"}


def test_api_server_updates_configmaps_and_secrets_as_the_controller_fills_them(tmp_path: Path) -> None:
    """PUT of a Secret/ConfigMap (the controller's TLS objects, controlplane/servingtls.py) through the
    real kubernetes client: written into objects.json with a new resourceVersion, a stale one is 409,
    a missing object 404; provisioning twice gives the same CA."""
    import asyncio
    import base64

    from aiohttp import web
    from kubernetes import client
    from nodemesh.controlplane.servingtls import NamedObject, provision_ca
    from nodemesh.sandbox.apiserver import ApiServer
    from nodemesh.sandbox.state import ClusterState

    state = ClusterState(tmp_path)
    with state.objects_txn() as objs:
        objs.put({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tls", "namespace": "nodemesh"},
                  "type": "Opaque"})
        objs.put({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ca", "namespace": "nodemesh"}})

    async def main() -> None:
        server = ApiServer(tmp_path)
        server.store.load()
        runner = web.AppRunner(server.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        api = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}"))
        loop = asyncio.get_running_loop()
        try:
            secret, cm = NamedObject(api, "Secret", "nodemesh", "tls"), NamedObject(api, "ConfigMap", "nodemesh", "ca")
            first = await loop.run_in_executor(None, provision_ca, secret, cm)
            stored = state.objects()
            tls = next(o for o in stored.of_kind("Secret") if o["metadata"]["name"] == "tls")
            assert base64.b64decode(tls["data"]["ca.crt"]) == first.cert_pem
            assert next(o for o in stored.of_kind("ConfigMap"))["data"] == {"ca.crt": first.cert_pem.decode()}
            again = await loop.run_in_executor(None, provision_ca, secret, cm)
            assert again == first
            stale = await loop.run_in_executor(None, secret.read)
            stale.metadata.resource_version = "1"
            assert await loop.run_in_executor(None, secret.write, stale, {"x": b"y"}) is False  # 409
            api_core = client.CoreV1Api(api)
            with pytest.raises(client.ApiException) as err:
                await loop.run_in_executor(None, api_core.replace_namespaced_secret, "nope", "nodemesh",
                                           client.V1Secret(metadata=client.V1ObjectMeta(name="nope")))
            assert err.value.status == 404
        finally:
            api.close()
            await runner.cleanup()

    asyncio.run(main())
