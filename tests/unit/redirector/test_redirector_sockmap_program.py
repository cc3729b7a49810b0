"""`--accelerate sockmap` without a kernel: where it pins, how it versions, what it files."""

from __future__ import annotations

import struct

from nodemesh.redirector import sockmap


def test_redirector_sockmap_pins_beside_the_capture_not_inside_it() -> None:
    # eBPF capture's removal unpins all it finds in its directory: ours must not be there.
    assert sockmap.accel_dir("/run/x/node1") == "/run/x/node1-sockmap"
    assert sockmap.accel_dir("/sys/fs/bpf/nodemesh/") == "/sys/fs/bpf/nodemesh-sockmap"


def test_redirector_sockmap_program_versions_by_text_and_pairs_by_side() -> None:
    text = sockmap.program_text()
    assert "PAIRS_MAX" not in text and str(sockmap.PAIRS_MAX) in text
    assert len(sockmap.program_hash()) == 12
    # Both ends of a connection are filed under the pod's view of it, told apart by side; a send
    # looks for the other side, and a direction that once went to the stack stays there.
    assert "BPF_F_INGRESS" in text and "nm_taint.update(&self" in text and "BPF_NOEXIST" in text


def test_redirector_sockmap_conf_layout_matches_the_program_struct() -> None:
    # struct nm_aconf { u64 host_ns; u32 node_ip, outbound_port, pod_net, pod_mask, outbound_pairs, enabled; }
    assert struct.calcsize("=Q4sI4s4sII") == 32
    assert "u32 outbound_pairs; u32 enabled; }" in sockmap.PROGRAM


def test_redirector_sockmap_netns_cookie_is_this_namespace() -> None:
    assert sockmap.netns_cookie() == sockmap.netns_cookie() > 0
