"""The agent's capture check: a failed read is "unknown", not "not installed" — a transient failure
(another writer's transaction) must not make `nodemesh check` report the node uncaptured — and the
legacy backend is read only when its nat table already exists (reading it would create it). The
iptables tools are replaced on PATH by scripts that fail or print a chain; every call is logged.
(tests/integration/redirector/test_redirector_backend_isolation.py runs the real tools.)"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from nodemesh.agent import capture
from nodemesh.redirector.plan import CHAIN_PREROUTING

HOOKED = f"-P PREROUTING ACCEPT\\n-A PREROUTING -j {CHAIN_PREROUTING}\\n-A PREROUTING -j KUBE-SERVICES\\n"
EMPTY = "-P PREROUTING ACCEPT\\n-A PREROUTING -j KUBE-SERVICES\\n"


def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nft: str | None, legacy: str | None) -> Path:
    """nft/legacy: the chain the tool prints, or None for a tool that fails (exit 4)."""
    calls = tmp_path / "calls"
    for backend, text in (("nft", nft), ("legacy", legacy)):
        script = tmp_path / f"iptables-{backend}"
        body = f'printf "%b" "{text}"' if text is not None else "echo 'resource busy' >&2; exit 4"
        script.write_text(f'#!/bin/sh\necho "{backend} $*" >> {calls}\n{body}\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin:/bin")
    return calls


@pytest.mark.parametrize(("nft", "legacy", "legacy_nat", "want"), [
    (HOOKED, EMPTY, True, True),
    (EMPTY, HOOKED, True, True),
    (EMPTY, HOOKED, False, False),   # no legacy nat table: never read (that would create it)
    (EMPTY, EMPTY, True, False),
    (EMPTY, EMPTY, False, False),
    (None, EMPTY, False, None),      # nft could not be read: unknown, not "uncaptured"
    (None, EMPTY, True, None),
    (EMPTY, None, True, None),       # legacy nat exists but could not be read
    (None, HOOKED, True, True),
])
def test_agent_capture_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nft: str | None, legacy: str | None,
                             legacy_nat: bool, want: bool | None) -> None:
    calls = tools(tmp_path, monkeypatch, nft, legacy)
    monkeypatch.setattr(capture, "legacy_nat_exists", lambda: legacy_nat)
    assert asyncio.run(capture.capture_active()) is want
    called = calls.read_text().splitlines()
    assert called[0] == "nft -w 2 -t nat -S PREROUTING"      # one chain, never the whole table
    if not legacy_nat:
        assert not any(c.startswith("legacy") for c in called), called


def test_agent_capture_legacy_tables_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = tmp_path / "ip_tables_names"
    monkeypatch.setattr(capture, "LEGACY_TABLE_LISTS", (str(names),))
    assert capture.legacy_nat_exists() is False        # no such file: no legacy iptables at all
    names.write_text("filter\nmangle\n")
    assert capture.legacy_nat_exists() is False
    names.write_text("filter\nnat\n")
    assert capture.legacy_nat_exists() is True
