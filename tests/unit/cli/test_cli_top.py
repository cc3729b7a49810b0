"""`nodemesh top`: the sans-IO aggregation, and the plain (non-tty) snapshot end to end."""

from __future__ import annotations

from cli_testkit import EMOJI, VOTING, WEB, Served, assert_golden, tap_request_events
from nodemesh.cli.top import TopTable, top_snapshot


def _feed(table: TopTable, events: list) -> None:
    for e in events:
        table.add(e)


def test_cli_top_aggregates_by_source_destination_method_path() -> None:
    table = TopTable()
    _feed(table, tap_request_events("1:1", WEB, EMOJI, duration_us=3000))
    _feed(table, tap_request_events("1:3", WEB, EMOJI, duration_us=1000))
    _feed(table, tap_request_events("1:5", WEB, EMOJI, duration_us=2000, grpc_status=2))
    _feed(table, tap_request_events("2:0", WEB, VOTING, method="GET", path="/", grpc_status=None, status=503,
                                    duration_us=500))
    rows = table.rows()
    assert [(r.destination, r.count) for r in rows] == [("emoji-5c6b-fghij", 3), ("voting-6f4d-klmno", 1)]
    emoji = rows[0]
    assert (emoji.best_us, emoji.worst_us, emoji.last_us) == (1000, 3000, 2000)
    assert (emoji.successes, emoji.failures) == (2, 1)
    assert rows[1].success_rate == 0.0  # HTTP 503 is a failure


def test_cli_top_interleaved_streams_and_orphans() -> None:
    table = TopTable()
    a = tap_request_events("1:1", WEB, EMOJI, duration_us=100)
    b = tap_request_events("1:3", WEB, EMOJI, duration_us=200, reset="CANCEL", status=0)
    # interleave two requests on one connection; an end without a start is ignored
    _feed(table, [a[0], b[0], a[1], b[1], a[2]])
    _feed(table, tap_request_events("9:9", WEB, EMOJI)[2:])
    rows = table.rows()
    assert len(rows) == 1 and rows[0].count == 2 and rows[0].failures == 1


def test_cli_top_outstanding_requests_are_bounded() -> None:
    table = TopTable(max_outstanding=10)
    for i in range(50):
        table.add(tap_request_events(f"1:{i}", WEB, EMOJI)[0])
    table.add(tap_request_events("1:0", WEB, EMOJI)[2])  # long evicted: not counted
    table.add(tap_request_events("1:49", WEB, EMOJI)[2])
    assert [r.count for r in table.rows()] == [1]


def test_cli_top_snapshot_golden() -> None:
    table = TopTable()
    for i in range(3):
        _feed(table, tap_request_events(f"1:{i}", WEB, EMOJI, duration_us=[850, 12_400, 1_600_000][i]))
    _feed(table, tap_request_events("2:1", WEB, VOTING, path="/emojivoto.v1.VotingService/VoteDoughnut",
                                    grpc_status=2, duration_us=4000))
    assert_golden("top_snapshot", top_snapshot(table))


def test_cli_top_plain_output_end_to_end(controller: Served) -> None:
    events = []
    for i in range(4):
        events += tap_request_events(f"1:{i}", WEB, EMOJI, duration_us=1000 * (i + 1))
    events += tap_request_events("2:0", WEB, VOTING, method="GET", path="/healthz", grpc_status=None,
                                 duration_us=700)
    controller.fake.tap_events = events
    result = controller.run("top", "deploy/web", "-n", "emojivoto", "--interval", "60")
    assert result.exit_code == 0, result.output
    assert_golden("top_plain", result.stdout)
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["Source", "Destination", "Method", "Path"]
    assert lines[1].split()[4:8] == ["4", "1ms", "4ms", "4ms"]
