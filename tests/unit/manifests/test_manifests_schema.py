"""Every manifest we ship validates offline against the Kubernetes OpenAPI schemas.

`kubectl apply --dry-run=client` cannot do this without an API server; kubernetes-validate ships
the JSON schemas of each Kubernetes release. We validate in strict mode (unknown fields are
errors, which catches typos such as `readinesProbe`) against the oldest release we support and
the newest one the installed validator ships.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from nodemesh.manifests.render import InstallValues, apply_sets, render_daemonset

REPO = Path(__file__).resolve().parents[3]
OLDEST_SUPPORTED = "1.29"


def _versions() -> list[str]:
    latest = kubernetes_validate.latest_version()
    assert latest >= "1.29", f"kubernetes-validate ships schemas only up to {latest}"
    return sorted({OLDEST_SUPPORTED, latest})


def _manifest_files() -> list[Path]:
    files = sorted((REPO / "manifests").glob("*.yaml"))
    demo = REPO / "demo" / "emojivoto.yml"
    if demo.exists():  # the demo room's file; validated as soon as it lands
        files.append(demo)
    return files


def _validate_all(text: str, origin: str) -> int:
    count = 0
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        for version in _versions():
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                name = doc.get("metadata", {}).get("name")
                pytest.fail(f"{origin}: {doc['kind']}/{name} invalid for Kubernetes {version}: {exc.message} "
                            f"at {'/'.join(str(p) for p in exc.path)}")
        count += 1
    return count


def test_manifests_the_committed_files_are_there() -> None:
    names = {p.name for p in _manifest_files()}
    assert {"daemonset.yaml", "prometheus.yaml", "grafana.yaml"} <= names


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_manifests_file_validates_against_kubernetes_schemas(path: Path) -> None:
    assert _validate_all(path.read_text(), str(path.relative_to(REPO))) > 0


@pytest.mark.parametrize("sets", [
    ["namespace=mesh-system", "image=registry.example/nodemesh:dev", "imagePullPolicy=Always"],
    ["opaquePorts=", "skippedPorts=22,2379", "capturedNamespaces=emojivoto", "drainGraceSeconds=0"],
])
def test_manifests_rendered_variants_validate(sets: list[str]) -> None:
    assert _validate_all(render_daemonset(apply_sets(InstallValues(), sets)), f"install {sets}") >= 10


def test_manifests_validator_catches_a_typo() -> None:
    # Proves strict validation is really on: an unknown field in a container is refused.
    docs: list[dict[str, Any]] = list(yaml.safe_load_all(render_daemonset()))
    ds = next(d for d in docs if d and d["kind"] == "DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"tcpSocket": {"port": 4191}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, OLDEST_SUPPORTED, strict=True)
