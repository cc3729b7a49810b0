"""`nodemesh tap` end to end: the lines Linkerd users know, pinned by goldens; clean Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from cli_testkit import EMOJI, VOTING, WEB, Served, assert_golden, tap_request_events

GRPC_OK = tap_request_events("3:1", WEB, EMOJI)
HTTP_PLAIN = tap_request_events("4:0", WEB, VOTING, method="GET", path="/healthz",
                                authority="voting-svc.emojivoto:8080", status=200, latency_us=812,
                                duration_us=950, grpc_status=None, length=2)
GRPC_FAIL = tap_request_events("3:3", WEB, EMOJI, status=200, grpc_status=14, latency_us=20345,
                               duration_us=20400, length=0)
RESET = tap_request_events("5:1", WEB, EMOJI, status=0, reset="CANCEL", duration_us=30011, length=0)
INBOUND = tap_request_events("7:1", WEB, EMOJI, direction="inbound", latency_us=1200, duration_us=1300)
EVENTS = GRPC_OK + HTTP_PLAIN + GRPC_FAIL + RESET + INBOUND


def test_cli_tap_lines(controller: Served) -> None:
    controller.fake.tap_events = EVENTS
    result = controller.run("tap", "deploy/web", "-n", "emojivoto")
    assert result.exit_code == 0, result.output
    assert_golden("tap", result.stdout)
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "req id=3:1 proxy=out src=10.244.1.5:43210 dst=10.244.2.7:8080 tls=no_identity :method=POST "
        ":authority=emoji-svc.emojivoto:8080 :path=/emojivoto.v1.EmojiService/ListAll")
    assert lines[1].endswith(":status=200 latency=1500µs")
    assert lines[2].endswith("grpc-status=OK duration=1800µs response-length=2161B")
    # plain HTTP: no grpc-status at all, as Linkerd
    assert lines[5].startswith("end id=4:0") and "grpc-status" not in lines[5]
    assert "grpc-status=Unavailable" in lines[8]
    assert "reset-error=CANCEL duration=30011µs response-length=0B" in lines[10]
    assert "proxy=in  src=" in lines[11]


def test_cli_tap_wide(controller: Served) -> None:
    controller.fake.tap_events = GRPC_OK
    result = controller.run("tap", "deploy/web", "-n", "emojivoto", "-o", "wide")
    assert result.exit_code == 0, result.output
    assert_golden("tap_wide", result.stdout)
    assert result.stdout.splitlines()[0].endswith(
        " src_res=deploy/web src_ns=emojivoto dst_res=deploy/emoji dst_ns=emojivoto")


def test_cli_tap_wide_unknown_peer_has_no_resource(controller: Served) -> None:
    outside = {"ip": "fd00::9", "port": 5555}
    controller.fake.tap_events = tap_request_events("1:1", outside, EMOJI, grpc_status=None)
    result = controller.run("tap", "deploy/emoji", "-n", "emojivoto", "-o", "wide")
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert "src=[fd00::9]:5555 " in first and "src_res" not in first and "dst_res=deploy/emoji" in first


def test_cli_tap_json(controller: Served) -> None:
    controller.fake.tap_events = GRPC_OK + RESET
    result = controller.run("tap", "deploy/web", "-n", "emojivoto", "-o", "json")
    assert result.exit_code == 0, result.output
    assert_golden("tap_json", result.stdout)
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(objects) == 5
    assert objects[0]["requestInitEvent"]["id"] == {"base": 3, "stream": 1}
    assert objects[0]["proxyDirection"] == "OUTBOUND"
    assert objects[2]["responseEndEvent"]["grpcStatusCode"] == 0
    assert objects[4]["responseEndEvent"]["resetErrorCode"] == "CANCEL"


def test_cli_tap_request_carries_filter(controller: Served) -> None:
    result = controller.run(
        "tap", "deploy", "web", "-n", "emojivoto", "--to", "deploy/voting", "--to-namespace", "other",
        "--method", "get", "--path", "/api", "--authority", "web-svc:80", "--scheme", "HTTP", "--max-rps", "5")
    assert result.exit_code == 0, result.output
    flt = controller.fake.requests[0].filter
    assert (flt.target.namespace, flt.target.type, flt.target.name) == ("emojivoto", "deployment", "web")
    assert (flt.to.namespace, flt.to.type, flt.to.name) == ("other", "deployment", "voting")
    assert (flt.method, flt.path_prefix, flt.authority, flt.scheme, flt.max_rps) == (
        "GET", "/api", "web-svc:80", "http", 5.0)


def test_cli_tap_ctrl_c_closes_stream_and_exits_zero(controller: Served) -> None:
    """A real process, a real SIGINT: the stream is cancelled at the server, no traceback, exit 0."""
    controller.fake.tap_events = GRPC_OK
    controller.fake.tap_hold_open = True
    env = {**os.environ, "NODEMESH_CONTROLLER": controller.address, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodemesh.cli.main", "tap", "deploy/web", "-n", "emojivoto"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()  # the stream is live once the first event is out
        assert first.startswith("req id=3:1 proxy=out"), first
        # All three events out (on a loaded machine they came after a fixed 0.2 s), the stream held open.
        printed = [first, proc.stdout.readline(), proc.stdout.readline()]
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and err == ""
        assert controller.fake.tap_cancelled.wait(5), "the controller never saw the tap close"
        assert len("".join(printed).splitlines()) == 3 and out == "", (printed, out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_tap_closed_pipe_ends_quietly(controller: Served) -> None:
    """`nodemesh tap ... | head -2`: the reader leaves, tap cancels the stream and exits 0 silently."""
    for i in range(2000):
        controller.fake.tap_events += tap_request_events(f"1:{i}", WEB, EMOJI)
    controller.fake.tap_hold_open = True
    env = {**os.environ, "NODEMESH_CONTROLLER": controller.address}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodemesh.cli.main", "tap", "deploy/web"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().startswith("req id=1:0 ")
        proc.stdout.close()
        assert proc.wait(timeout=15) == 0
        assert proc.stderr.read() == ""
        assert controller.fake.tap_cancelled.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
