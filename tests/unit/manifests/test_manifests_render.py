"""`nodemesh install` renders exactly the committed manifests, and `--set` changes what it should.

Regenerate the committed files after an intended change with:
    NODEMESH_REGEN_MANIFESTS=1 python3 -m pytest tests/unit/manifests -q
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from nodemesh.agent.config import DEFAULT_OPAQUE_PORTS as AGENT_OPAQUE_PORTS
from nodemesh.agent.config import AgentConfig
from nodemesh.cli.main import cli
from nodemesh.manifests import render as manifest
from nodemesh.manifests.render import InstallValues, ManifestError, apply_sets, render_daemonset

REPO = Path(__file__).resolve().parents[3]
DAEMONSET = REPO / "manifests" / "daemonset.yaml"
REGEN = os.environ.get("NODEMESH_REGEN_MANIFESTS") == "1"


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container(docs: list[dict[str, Any]], kind: str, container: str) -> dict[str, Any]:
    spec = _find(docs, kind)["spec"]["template"]["spec"]
    (found,) = [c for c in spec["containers"] if c["name"] == container]
    return found


def test_manifests_install_with_defaults_equals_committed_daemonset() -> None:
    result = CliRunner().invoke(cli, ["install"])
    assert result.exit_code == 0, result.output
    if REGEN:
        DAEMONSET.write_text(result.output)
    assert result.output == DAEMONSET.read_text(), (
        "manifests/daemonset.yaml is stale: regenerate with NODEMESH_REGEN_MANIFESTS=1"
    )


DAEMONSET_EBPF = REPO / "manifests" / "daemonset-ebpf.yaml"


def test_manifests_install_capture_ebpf_equals_committed_daemonset_ebpf() -> None:
    result = CliRunner().invoke(cli, ["install", "--capture", "ebpf"])
    assert result.exit_code == 0, result.output
    if REGEN:
        DAEMONSET_EBPF.write_text(result.output)
    assert result.output == DAEMONSET_EBPF.read_text(), (
        "manifests/daemonset-ebpf.yaml is stale: regenerate with NODEMESH_REGEN_MANIFESTS=1"
    )
    assert CliRunner().invoke(cli, ["install", "--set", "capture=ebpf"]).output == result.output


def test_manifests_capture_ebpf_adds_exactly_the_bpf_privileges_and_mounts() -> None:
    """Issue 14 item 4: eBPF capture adds CAP_BPF (+ PERFMON for the redirector, which loads the
    programs), the host's bpffs (pins outlive the pod), its cgroup v2 tree (read-only: attaching is a
    bpf(2) call) and the kernel headers bcc compiles against; nothing else changes."""
    plain = _find(_docs(render_daemonset(InstallValues())), "DaemonSet")["spec"]["template"]["spec"]
    ebpf = _find(_docs(render_daemonset(InstallValues(capture="ebpf"))), "DaemonSet")["spec"]["template"]["spec"]
    assert not any(c["securityContext"].get("privileged") for c in ebpf["containers"])

    def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {i["name"]: i for i in items}

    added_volumes = {k: v for k, v in by_name(ebpf["volumes"]).items() if k not in by_name(plain["volumes"])}
    assert {k: v["hostPath"]["path"] for k, v in added_volumes.items()} == {
        "bpffs": "/sys/fs/bpf", "cgroup2": "/sys/fs/cgroup", "modules": "/lib/modules", "usr-src": "/usr/src"}
    containers = by_name(ebpf["containers"]) | by_name(ebpf["initContainers"])
    before = by_name(plain["containers"]) | by_name(plain["initContainers"])
    expected_caps = {"agent": ["BPF"], "redirector": ["BPF", "PERFMON"], "fail-open": ["BPF", "PERFMON"]}
    expected_mounts = {"agent": {"bpffs"}, "redirector": {"bpffs", "cgroup2", "modules", "usr-src"},
                       "fail-open": {"bpffs"}}
    for name, c in containers.items():
        old = before[name]
        caps = c["securityContext"].get("capabilities", {}).get("add", [])
        old_caps = old["securityContext"].get("capabilities", {}).get("add", [])
        assert [x for x in caps if x not in old_caps] == expected_caps.get(name, []), name
        mounts = {m["name"] for m in c.get("volumeMounts", [])} - {m["name"] for m in old.get("volumeMounts", [])}
        assert mounts == expected_mounts.get(name, set()), name
        read_only = {m["name"]: m.get("readOnly", False) for m in c.get("volumeMounts", [])}
        assert all(read_only[m] for m in mounts if m in ("cgroup2", "modules", "usr-src")), name
    assert "--capture" in containers["redirector"]["args"]
    assert {"name": "NODEMESH_BPF_DIR", "value": "/sys/fs/bpf/nodemesh"} in containers["agent"]["env"]


def test_manifests_uninstall_prints_the_same_objects_for_kubectl_delete() -> None:
    result = CliRunner().invoke(cli, ["uninstall"])
    assert result.exit_code == 0, result.output
    assert result.output == DAEMONSET.read_text()


@pytest.mark.parametrize("addon", ["prometheus", "grafana"])
def test_manifests_install_addon_prints_the_committed_addon(addon: str) -> None:
    result = CliRunner().invoke(cli, ["install", "--addon", addon])
    assert result.exit_code == 0, result.output
    assert result.output == (REPO / "manifests" / f"{addon}.yaml").read_text()
    moved = CliRunner().invoke(cli, ["install", "--addon", addon, "--set", "namespace=mesh-system"])
    assert "namespace: mesh-system" in moved.output and "namespace: nodemesh\n" not in moved.output


def test_manifests_rendering_is_deterministic() -> None:
    values = apply_sets(InstallValues(), ["opaquePorts=6379,25,3306", "tapMaxRps=5"])
    assert render_daemonset(values) == render_daemonset(values)


def test_manifests_defaults_match_the_agent_defaults() -> None:
    assert manifest.DEFAULT_OPAQUE_PORTS == AGENT_OPAQUE_PORTS
    assert InstallValues().drainGraceSeconds == AgentConfig(node="n").drain_grace_s
    assert InstallValues().tapMaxRps == AgentConfig(node="n").tap_max_rps


def test_manifests_set_namespace_moves_every_namespaced_object_and_reference() -> None:
    docs = _docs(render_daemonset(apply_sets(InstallValues(), ["namespace=mesh-system"])))
    assert _find(docs, "Namespace")["metadata"]["name"] == "mesh-system"
    for doc in docs:
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == "mesh-system", doc["kind"]
    for binding in (d for d in docs if d["kind"] == "ClusterRoleBinding"):
        assert binding["subjects"][0]["namespace"] == "mesh-system"
    agent = _container(docs, "DaemonSet", "agent")
    controller_arg = agent["args"][agent["args"].index("--controller") + 1]
    assert controller_arg == "nodemesh-controller.mesh-system.svc.cluster.local:8085"
    config = yaml.safe_load(_find(docs, "ConfigMap", "nodemesh-config")["data"]["config.yaml"])
    assert "mesh-system" in config["excludedNamespaces"]  # the mesh never captures itself
    text = render_daemonset(apply_sets(InstallValues(), ["namespace=mesh-system"]))
    assert "namespace: nodemesh\n" not in text and ".nodemesh.svc" not in text


def test_manifests_set_config_keys_land_in_the_configmap_and_roll_the_pods() -> None:
    default_docs = _docs(render_daemonset())
    values = apply_sets(InstallValues(), [
        "opaquePorts=5432, 3306", "skippedPorts=[22]", "excludedNamespaces=kube-system,monitoring",
        "capturedNamespaces=emojivoto", "tapMaxRps=25", "tapMaxTaps=3", "logLevel=debug",
        "tapRedactHeaders=X-Api-Key", "tapRedactQuery=true",
    ])
    docs = _docs(render_daemonset(values))
    config = yaml.safe_load(_find(docs, "ConfigMap", "nodemesh-config")["data"]["config.yaml"])
    assert config == {
        "capturedNamespaces": ["emojivoto"],
        "excludedNamespaces": ["kube-system", "monitoring", "nodemesh"],
        "skippedPorts": [22],
        "opaquePorts": [3306, 5432],
        "tapMaxRps": 25.0,
        "tapMaxTaps": 3,
        "tapRedactHeaders": ["x-api-key"],
        "tapShowHeaders": [],
        "tapRedactQuery": True,
        "drainGraceSeconds": 30,
        "logLevel": "debug",
    }
    args = _container(docs, "Deployment", "controller")["args"]
    assert args[args.index("--tap-redact-headers") + 1] == "x-api-key" and "--tap-redact-query" in args
    assert "--tap-show-headers" not in args
    for kind in ("DaemonSet", "Deployment"):
        old = _find(default_docs, kind)["spec"]["template"]["metadata"]["annotations"]
        new = _find(docs, kind)["spec"]["template"]["metadata"]["annotations"]
        assert old["nodemesh.io/config-checksum"] != new["nodemesh.io/config-checksum"], kind


def test_manifests_set_image_and_workers() -> None:
    values = apply_sets(InstallValues(), ["image=registry.example/nodemesh:dev", "imagePullPolicy=Always",
                                          "agentWorkers=4"])
    docs = _docs(render_daemonset(values))
    for kind, name in (("DaemonSet", "agent"), ("DaemonSet", "redirector"), ("Deployment", "controller")):
        c = _container(docs, kind, name)
        assert (c["image"], c["imagePullPolicy"]) == ("registry.example/nodemesh:dev", "Always")
    agent = _container(docs, "DaemonSet", "agent")
    assert agent["args"][agent["args"].index("--workers") + 1] == "4"


def test_manifests_drain_grace_sets_termination_grace_with_margin() -> None:
    ds = _find(_docs(render_daemonset(apply_sets(InstallValues(), ["drainGraceSeconds=60"]))), "DaemonSet")
    assert ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60 + manifest.TERMINATION_MARGIN_S


def test_manifests_capabilities_are_net_admin_and_net_raw_only() -> None:
    docs = _docs(render_daemonset())
    for name in ("agent", "redirector"):
        container = _container(docs, "DaemonSet", name)
        assert container["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
        assert container["securityContext"]["privileged"] is False


def test_manifests_only_the_sysctl_init_container_is_privileged() -> None:
    """/proc/sys is read-only unless privileged: the one privileged container sets the node's
    net.ipv4.tcp_migrate_req and nothing else — no volume, no env, no token; it runs right after
    fail-open (which must come first: it removes capture left behind by a dead node's agent)."""
    docs = _docs(render_daemonset())
    spec = _find(docs, "DaemonSet")["spec"]["template"]["spec"]
    privileged = [c["name"] for d in docs if d["kind"] in ("DaemonSet", "Deployment")
                  for c in d["spec"]["template"]["spec"].get("initContainers", []) + d["spec"]["template"]["spec"][
                      "containers"] if c["securityContext"].get("privileged")]
    assert privileged == ["node-sysctls"]
    assert [c["name"] for c in spec["initContainers"]][:2] == ["fail-open", "node-sysctls"]
    init = spec["initContainers"][1]
    assert init["command"] == ["python", "-m", "nodemesh.redirector", "sysctls"]
    assert not ({"volumeMounts", "env", "envFrom", "args"} & set(init))


@pytest.mark.parametrize("assignment, message", [
    ("opaquePorts=70000", "out of range"),
    ("opaquePorts=http", "expected an integer"),
    ("namespace=Bad_Name", "not a valid namespace"),
    ("ebpf=true", "unknown key"),  # eBPF capture is not built (docs/kubernetes.md)
    ("colour=blue", "unknown key"),
    ("image", "expected key=value"),
    ("tapMaxRps=0", "tapMaxRps"),
    ("imagePullPolicy=Sometimes", "imagePullPolicy"),
])
def test_manifests_bad_set_is_refused_with_a_clear_message(assignment: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        apply_sets(InstallValues(), [assignment])
    result = CliRunner().invoke(cli, ["install", "--set", assignment])
    assert result.exit_code == 2
    assert message in result.output


def test_manifests_captured_namespaces_and_tap_limit_reach_the_controller() -> None:
    from nodemesh.controlplane.main import parse_args

    def controller_config(sets: list[str]):  # type: ignore[no-untyped-def]
        args = _container(_docs(render_daemonset(apply_sets(InstallValues(), sets))), "Deployment", "controller")["args"]
        return parse_args(args)

    default = controller_config([])
    assert default.captured_namespaces == () and default.tap_max_taps == 10
    chosen = controller_config(["capturedNamespaces=emojivoto,shop", "tapMaxTaps=3"])
    assert chosen.captured_namespaces == ("emojivoto", "shop") and chosen.tap_max_taps == 3
    assert (default.prometheus_url, default.stat_backend) == ("", "memory")
    url = "http://nodemesh-prometheus.nodemesh.svc:9090"
    prom = controller_config([f"prometheusUrl={url}", "statBackend=prometheus"])
    assert (prom.prometheus_url, prom.stat_backend) == (url, "prometheus") and prom.ingest and default.ingest
    only = controller_config([f"prometheusUrl={url}", "statBackend=prometheus", "ingest=false"])
    assert (only.stat_backend, only.ingest) == ("prometheus", False)   # --no-ingest, parsed by the controller


@pytest.mark.parametrize("sets, message", [
    (["statBackend=prometheus"], "needs prometheusUrl"),
    (["prometheusUrl=nodemesh-prometheus:9090"], r"expected http\(s\)://host:port"),
    (["statBackend=mongo"], "expected memory or prometheus"),
    (["ingest=false"], "ingest=false needs statBackend=prometheus"),
])
def test_manifests_stat_backend_sets_are_checked(sets: list[str], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        apply_sets(InstallValues(), sets)


def test_manifests_accelerate_sockmap_adds_the_redirector_bpf_privileges_only() -> None:
    """Issue 14 item 2: `--accelerate sockmap` is the redirector's (it loads and attaches the
    programs; the agent never touches their maps): with iptables capture the redirector gets what
    eBPF capture gives it, the agent nothing; with eBPF capture only the flag is added."""
    plain = _find(_docs(render_daemonset(InstallValues())), "DaemonSet")["spec"]["template"]["spec"]
    accel = _find(_docs(render_daemonset(InstallValues(accelerate="sockmap"))), "DaemonSet")["spec"]["template"]["spec"]
    ebpf = _find(_docs(render_daemonset(InstallValues(capture="ebpf"))), "DaemonSet")["spec"]["template"]["spec"]
    both = _find(_docs(render_daemonset(InstallValues(capture="ebpf", accelerate="sockmap"))),
                 "DaemonSet")["spec"]["template"]["spec"]

    def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {i["name"]: i for i in items}

    a, p = by_name(accel["containers"]), by_name(plain["containers"])
    assert a["agent"] == p["agent"]
    assert a["redirector"]["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW", "BPF", "PERFMON"]
    assert {m["name"] for m in a["redirector"]["volumeMounts"]} - {m["name"] for m in p["redirector"]["volumeMounts"]} \
        == {"bpffs", "cgroup2", "modules", "usr-src"}
    args = a["redirector"]["args"]
    assert args[args.index("--accelerate") + 1] == "sockmap" and "--capture" not in args
    assert "--cgroup-root" in args and "--bpf-dir" in args
    b, e = by_name(both["containers"]), by_name(ebpf["containers"])
    assert b["agent"] == e["agent"]
    assert [x for x in b["redirector"]["args"] if x not in e["redirector"]["args"]] == ["--accelerate", "sockmap"]
    assert both["volumes"] == ebpf["volumes"]
    result = CliRunner().invoke(cli, ["install", "--accelerate", "sockmap"])
    assert result.exit_code == 0, result.output
    assert result.output == CliRunner().invoke(cli, ["install", "--set", "accelerate=sockmap"]).output
    with pytest.raises(ManifestError, match="accelerate: expected none or sockmap"):
        apply_sets(InstallValues(), ["accelerate=splice"])
