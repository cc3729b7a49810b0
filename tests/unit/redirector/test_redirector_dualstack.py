"""Dual-stack nodes: node.spec.podCIDRs (what the DaemonSet's init container hands over) and the
agent's /capture answer carry IPv6 entries too. Capture is IPv4 (iptables), so the redirector
captures the IPv4 part instead of refusing to start (it crash-looped: no capture at all)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from nodemesh.redirector.apply import Netfilter, Redirector
from nodemesh.redirector.cli import _capture_config, _parser
from nodemesh.redirector.config import CaptureConfig, ConfigError
from nodemesh.redirector.runner import FailOpenRunner, RunnerConfig


def test_redirector_dualstack_pod_cidrs_capture_the_ipv4_part() -> None:
    args = _parser().parse_args(["run", "--node-ip", "192.0.2.10", "--pod-cidr", "10.42.1.0/24,fd00:42:1::/64"])
    assert _capture_config(args).pod_cidrs == ("10.42.1.0/24",)
    out = subprocess.run([sys.executable, "-m", "nodemesh.redirector", "plan", "--node-ip", "192.0.2.10",
                          "--pod-cidr", "10.42.1.0/24,fd00:42:1::/64"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert "-s 10.42.1.0/24 -p tcp" in out.stdout and "fd00" not in out.stdout


def test_redirector_ipv6_only_pod_cidrs_are_one_clear_error() -> None:
    args = _parser().parse_args(["run", "--node-ip", "192.0.2.10", "--pod-cidr", "fd00:42:1::/64"])
    with pytest.raises(ConfigError, match="IPv4"):
        _capture_config(args)


class _Agent(BaseHTTPRequestHandler):
    answer: ClassVar[dict[str, Any]] = {}

    def do_GET(self) -> None:
        body = json.dumps(self.answer).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def agent_admin() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Agent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_redirector_excluded_ips_keep_the_ipv4_ones_of_a_dualstack_answer(agent_admin: str) -> None:
    _Agent.answer = {"excluded_ips": ["10.42.1.7", "fd00:42:1::7", "10.42.1.3"]}
    config = RunnerConfig(CaptureConfig(node_ip="192.0.2.10", pod_cidrs=("10.42.1.0/24",)), agent_admin=agent_admin)
    logged: list[str] = []
    runner = FailOpenRunner(config, Redirector(Netfilter()), log=lambda event, **_: logged.append(event))
    assert runner.excluded_ips() == ("10.42.1.3", "10.42.1.7")
    assert "capture_answer_invalid" not in logged
