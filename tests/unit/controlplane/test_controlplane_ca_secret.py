"""The workload CA's root in a Kubernetes Secret (controlplane/ca.py `SecretRootStore`), through the
REAL `kubernetes` client against tests/support/secrets_api.py's API server: the install ships the
Secret empty and grants get/update on it and no `create` (manifests/render.py); the controller
fills it on first start, keeps kubectl's annotation, reuses it on restart, rewrites it at rotation,
and a second controller starting at the same moment adopts the first one's root instead of
overwriting it."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from nodemesh.controlplane.ca import SecretRootStore, WorkloadCA
from nodemesh.controlplane.sources.kubernetes import load_configuration
from secrets_api import NS, ApiServer, api_server

SECRET = "nodemesh-workload-ca"


@pytest.fixture
def store_factory(tmp_path: Path) -> Iterator[Any]:
    with api_server(tmp_path, [("secrets", SECRET)]) as kubeconfig:
        yield lambda: SecretRootStore(client.ApiClient(load_configuration(str(kubeconfig))), NS, SECRET)


def stored() -> dict[str, Any]:
    return ApiServer.objects[("secrets", NS, SECRET)]


def test_ca_secret_filled_on_first_start_without_create_and_reused(store_factory: Any) -> None:
    ca = WorkloadCA(store_factory(), "mesh.test")
    obj = stored()
    data = {k: base64.b64decode(v) for k, v in obj["data"].items()}
    assert data["ca.crt"] == ca.material.cert_pem and data["ca.key"] == ca.material.key_pem
    assert "kubectl.kubernetes.io/last-applied-configuration" in obj["metadata"]["annotations"]
    assert not [r for r in ApiServer.requests if r[0] == "POST"], ApiServer.requests   # no create needed
    version = obj["metadata"]["resourceVersion"]
    again = WorkloadCA(store_factory(), "mesh.test")   # a restart: the same root, nothing written
    assert again.material.cert_pem == ca.material.cert_pem
    assert stored()["metadata"]["resourceVersion"] == version
    again.rotate()   # a rotation rewrites it: the new root, the old one kept in the bundle
    assert base64.b64decode(stored()["data"]["ca.crt"]) == again.material.cert_pem != ca.material.cert_pem
    assert ca.material.cert_pem in base64.b64decode(stored()["data"]["previous.pem"])


def test_ca_secret_second_controller_adopts_the_first_ones_root(store_factory: Any) -> None:
    first: dict[str, Any] = {}

    def other_controller(obj: dict[str, Any]) -> None:
        # Between our read and our update, another controller fills the Secret with its root.
        other = WorkloadCA(_Memory(), "mesh.test")
        first["cert"] = other.material.cert_pem
        obj["data"] = {k: base64.b64encode(v).decode() for k, v in
                       (("ca.crt", other.material.cert_pem), ("ca.key", other.material.key_pem),
                        ("previous.pem", b""))}

    ApiServer.race = other_controller
    ca = WorkloadCA(store_factory(), "mesh.test")
    assert ca.material.cert_pem == first["cert"]                       # adopted, not overwritten
    assert base64.b64decode(stored()["data"]["ca.crt"]) == first["cert"]


def test_ca_secret_missing_and_create_forbidden_is_a_clear_error(store_factory: Any) -> None:
    del ApiServer.objects[("secrets", NS, SECRET)]   # an install that did not ship it (older manifest)
    with pytest.raises(client.ApiException) as err:
        WorkloadCA(store_factory(), "mesh.test")
    assert err.value.status == 403
    ApiServer.allow_create = True                     # with its own grant: created
    ca = WorkloadCA(store_factory(), "mesh.test")
    assert base64.b64decode(stored()["data"]["ca.crt"]) == ca.material.cert_pem


class _Memory:
    def __init__(self) -> None:
        self.material: Any = None

    def load(self) -> Any:
        return self.material

    def save(self, material: Any) -> None:
        self.material = material
