"""The agent's capture check: a failed `iptables-save` is "unknown", not "not installed" — a
transient failure (another writer's transaction) must not make `nodemesh check` report the node
uncaptured. The iptables tools are replaced on PATH by scripts that fail or print a ruleset."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from nodemesh.agent.capture import capture_active
from nodemesh.redirector.plan import CHAIN_PREROUTING

HOOKED = f"*nat\\n:PREROUTING ACCEPT [0:0]\\n-A PREROUTING -j {CHAIN_PREROUTING}\\nCOMMIT\\n"
EMPTY = "*nat\\n:PREROUTING ACCEPT [0:0]\\nCOMMIT\\n"


def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nft: str | None, legacy: str | None) -> None:
    """nft/legacy: the ruleset the tool prints, or None for a tool that fails (exit 4)."""
    for backend, text in (("nft", nft), ("legacy", legacy)):
        script = tmp_path / f"iptables-{backend}-save"
        body = f'printf "{text}"' if text is not None else "echo 'resource busy' >&2; exit 4"
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin:/bin")


@pytest.mark.parametrize(("nft", "legacy", "want"), [
    (HOOKED, EMPTY, True),
    (EMPTY, HOOKED, True),
    (EMPTY, EMPTY, False),
    (None, EMPTY, None),     # nft could not be read: unknown, not "uncaptured"
    (None, HOOKED, True),
])
def test_agent_capture_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nft: str | None, legacy: str | None,
                             want: bool | None) -> None:
    tools(tmp_path, monkeypatch, nft, legacy)
    assert asyncio.run(capture_active()) is want
