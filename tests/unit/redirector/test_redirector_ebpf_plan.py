"""`--capture ebpf`: the iptables plan keeps inbound capture and the return path and leaves outbound
to the eBPF programs; bad combinations are refused; the program text names its pins."""

from __future__ import annotations

import os

import pytest
from nodemesh.redirector import ebpf
from nodemesh.redirector.config import CaptureConfig, ConfigError
from nodemesh.redirector.plan import CHAIN_INBOUND, CHAIN_OUTBOUND, build_plan, render_iptables


def _config(**kw: object) -> CaptureConfig:
    return CaptureConfig(node_ip="10.240.0.1", pod_cidrs=("10.244.1.0/24",), **kw)  # type: ignore[arg-type]


def test_redirector_ebpf_plan_has_inbound_capture_and_return_path_but_no_outbound_jump() -> None:
    iptables = render_iptables(build_plan(_config()))
    ebpf_mode = render_iptables(build_plan(_config(capture="ebpf")))
    outbound_jump = f"-s 10.244.1.0/24 -p tcp -m comment --comment \"nodemesh: TCP leaving a local pod is outbound\" -j {CHAIN_OUTBOUND}"
    assert outbound_jump in iptables
    assert outbound_jump not in ebpf_mode
    assert "-d 10.244.1.0/24 -p tcp" in ebpf_mode and f"-j {CHAIN_INBOUND}" in ebpf_mode
    # everything else is the same plan, line for line
    assert sorted(set(iptables.splitlines()) - set(ebpf_mode.splitlines())) == [f"-A NODEMESH_PREROUTING {outbound_jump}"]


def test_redirector_ebpf_config_refuses_what_cannot_work() -> None:
    with pytest.raises(ConfigError, match="tproxy"):
        _config(capture="ebpf", mechanism="tproxy")
    with pytest.raises(ConfigError, match="unknown capture"):
        _config(capture="bpf")


def test_redirector_ebpf_program_pins_in_its_directory_and_versions_by_text() -> None:
    text = ebpf.program_text("/run/x/node1")
    assert '"/run/x/node1/nm_agent"' in text and "PIN/" not in text
    assert ebpf.program_hash("/run/x/node1") != ebpf.program_hash("/run/x/node2")


def test_redirector_ebpf_netns_addresses_of_a_process() -> None:
    assert "127.0.0.1" in ebpf.netns_ipv4(os.getpid())
    assert ebpf.netns_ipv4(2**22 + 12345) == set()   # no such process: nothing, no error
