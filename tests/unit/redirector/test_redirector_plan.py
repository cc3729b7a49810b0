"""The rule plan, pinned by golden files (regenerate: UPDATE_GOLDEN=1 pytest tests/unit/redirector)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from nodemesh.redirector.apply import iptables_changes, parse_table, removal_script
from nodemesh.redirector.config import CaptureConfig, ConfigError
from nodemesh.redirector.plan import COMMENT_PREFIX, build_plan, render_dry_run, render_iptables

TESTDATA = Path(__file__).parent / "testdata"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

CONFIGS: dict[str, CaptureConfig] = {
    "dnat_default": CaptureConfig(node_ip="10.240.0.1", pod_cidrs=("10.244.1.0/24",)),
    "dnat_excluded_skipped": CaptureConfig(
        node_ip="10.240.0.2", pod_cidrs=("10.244.2.0/24",), skip_ports=(22, 10250),
        excluded_ips=("10.244.2.9", "10.244.2.10"), ignore_marks=(0x2000,)),
    "dnat_two_cidrs_no_bridge": CaptureConfig(
        node_ip="192.168.50.3", pod_cidrs=("10.42.0.0/24", "10.43.0.0/24"), bridge_replies=False),
    "dnat_heartbeat": CaptureConfig(node_ip="10.240.0.1", pod_cidrs=("10.244.1.0/24",), agent_heartbeat=True),
    "tproxy_default": CaptureConfig(node_ip="10.240.0.1", pod_cidrs=("10.244.1.0/24",), mechanism="tproxy",
                                    excluded_ips=("10.244.1.7",)),
}


def _golden(name: str, text: str) -> None:
    path = TESTDATA / f"{name}.golden"
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing {path}; run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path} differs; review and regenerate with UPDATE_GOLDEN=1"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_redirector_plan_golden(name: str) -> None:
    _golden(name, render_dry_run(build_plan(CONFIGS[name])))


def test_redirector_cli_dry_run_prints_the_plan() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nodemesh.redirector", "plan", "--dry-run", "--node-ip", "10.240.0.2",
         "--pod-cidr", "10.244.2.0/24", "--skip-ports", "22,10250", "--exclude-ip", "10.244.2.9,10.244.2.10",
         "--ignore-mark", "0x2000"],
        capture_output=True, text=True, check=True).stdout
    assert out == (TESTDATA / "dnat_excluded_skipped.golden").read_text()


def test_redirector_cli_rejects_bad_config() -> None:
    res = subprocess.run([sys.executable, "-m", "nodemesh.redirector", "plan", "--node-ip", "not-an-ip",
                          "--pod-cidr", "10.244.1.0/24"], capture_output=True, text=True, check=False)
    assert res.returncode == 1
    assert res.stderr.startswith("error:") and res.stderr.count("\n") == 1


def test_redirector_every_rule_says_why() -> None:
    for config in CONFIGS.values():
        plan = build_plan(config)
        for rule in plan.rules:
            assert rule.comment and '"' not in rule.comment and "'" not in rule.comment
            assert f'--comment "{COMMENT_PREFIX}' in rule.spec
        for hook in plan.hooks:
            assert hook.position == 1 and COMMENT_PREFIX in hook.spec


def test_redirector_plan_shape() -> None:
    plan = build_plan(CONFIGS["dnat_excluded_skipped"])
    nat = [r.save_line() for r in plan.rules_in("nat")]
    # Excluded pods: as source of outbound, as destination of inbound, ahead of the DNAT.
    outbound = [line for line in nat if line.startswith("-A NODEMESH_OUTBOUND")]
    assert "-s 10.244.2.9/32" in outbound[0] and "-s 10.244.2.10/32" in outbound[1]
    assert "DNAT --to-destination 10.240.0.2:4140" in outbound[-1]
    inbound = [line for line in nat if line.startswith("-A NODEMESH_INBOUND")]
    assert inbound[0].startswith("-A NODEMESH_INBOUND -s 10.244.2.0/24")   # local callers are outbound
    assert "DNAT --to-destination 10.240.0.2:4143" in inbound[-1]
    # Skipped ports always include the agent's own.
    assert any("--dports 22,4140,4143,4191,10250" in line for line in nat)
    assert CaptureConfig(node_ip="10.0.0.1", pod_cidrs=("10.1.0.0/24",)).effective_skip_ports == \
        (4140, 4143, 4191)


def test_redirector_config_validation() -> None:
    with pytest.raises(ConfigError):
        CaptureConfig(node_ip="10.0.0.1", pod_cidrs=())
    with pytest.raises(ConfigError):
        CaptureConfig(node_ip="10.0.0.1", pod_cidrs=("10.1.0.0/33",))
    with pytest.raises(ConfigError):
        CaptureConfig(node_ip="10.0.0.1", pod_cidrs=("10.1.0.0/24",), mechanism="redirect")  # type: ignore[arg-type]
    c = CaptureConfig(node_ip="10.0.0.1", pod_cidrs=("10.1.0.7/24",)).with_excluded(["10.1.0.10", "10.1.0.9",
                                                                                    "10.1.0.10"])
    assert c.excluded_ips == ("10.1.0.9", "10.1.0.10") and c.networks == ("10.1.0.0/24",)


def _state_after(plan_text: str) -> dict:
    """What iptables-save would print after restoring the plan into empty tables (hooks appended)."""
    text = plan_text.replace("-I PREROUTING 1 ", "-A PREROUTING ").replace("-I OUTPUT 1 ", "-A OUTPUT ")
    return {t: parse_table(text, t) for t in ("raw", "mangle", "nat", "filter")}


def test_redirector_changes_are_minimal() -> None:
    plan = build_plan(CONFIGS["dnat_default"])
    empty = {t: parse_table("", t) for t in ("raw", "mangle", "nat", "filter")}
    assert iptables_changes(plan, empty, capture=True) != ""
    installed = _state_after(render_iptables(plan))
    # Same plan again: nothing to write.
    assert iptables_changes(plan, installed, capture=True) == ""
    # Fail-open: only the capture hook goes; the return-path hooks stay.
    assert iptables_changes(plan, installed, capture=False) == (
        '*nat\n-D PREROUTING -m comment --comment "nodemesh: capture pod TCP ahead of kube-proxy so '
        'ClusterIPs stay visible" -j NODEMESH_PREROUTING\nCOMMIT\n')
    # A new excluded IP rewrites our chains of that table only, in one transaction.
    changed = iptables_changes(build_plan(CONFIGS["dnat_default"].with_excluded(["10.244.1.5"])), installed,
                               capture=True)
    assert changed.startswith("*nat\n:NODEMESH_PREROUTING - [0:0]") and "*mangle" not in changed
    assert "-s 10.244.1.5/32" in changed and "-I PREROUTING" not in changed


def test_redirector_hook_moved_back_to_first() -> None:
    plan = build_plan(CONFIGS["dnat_default"])
    installed = _state_after(render_iptables(plan))
    hook = plan.hooks_in("nat")[0]
    installed["nat"].rules["PREROUTING"].insert(0, "-j KUBE-SERVICES")
    script = iptables_changes(plan, installed, capture=True)
    assert script == f"*nat\n-D PREROUTING {hook.spec}\n-I PREROUTING 1 {hook.spec}\nCOMMIT\n"


def test_redirector_removal_touches_only_ours() -> None:
    save = (
        "*nat\n:PREROUTING ACCEPT\n:KUBE-SERVICES -\n:NODEMESH_PREROUTING -\n"
        '-A PREROUTING -m comment --comment "nodemesh: capture" -j NODEMESH_PREROUTING\n'
        "-A PREROUTING -j KUBE-SERVICES\n"
        '-A KUBE-SERVICES -m comment --comment "kube: svc" -j RETURN\n'
        '-A NODEMESH_PREROUTING -m comment --comment "nodemesh: x" -j RETURN\nCOMMIT\n')
    script = removal_script({"nat": parse_table(save, "nat")})
    assert script == ('*nat\n-D PREROUTING -m comment --comment "nodemesh: capture" -j NODEMESH_PREROUTING\n'
                      "-F NODEMESH_PREROUTING\n-X NODEMESH_PREROUTING\nCOMMIT\n")
