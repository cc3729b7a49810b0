"""The files `install --sandbox` leaves for the CLI (manifests/sandboxfiles.py): names, format."""

from __future__ import annotations

from pathlib import Path

from nodemesh.api import certs
from nodemesh.manifests import sandboxfiles as sf


def test_sandboxfiles_name_the_controller_ca_the_installer_writes() -> None:
    # sandboxfiles stays standard-library only (every CLI verb imports it): the name is repeated.
    assert sf.CA_FILE == certs.CA_FILE


def test_sandboxfiles_addresses_are_written_whole_and_bracket_ipv6(tmp_path: Path) -> None:
    assert sf.write_controller_address(tmp_path, "10.240.0.1", 8085).read_text() == "10.240.0.1:8085\n"
    assert sf.write_dashboard_address(tmp_path, "fd00::1", 18084).read_text() == "[fd00::1]:18084\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [sf.CONTROLLER_ADDR_FILE, sf.DASHBOARD_ADDR_FILE]


def test_sandboxfiles_token_and_ca(tmp_path: Path) -> None:
    assert sf.first_token("tok-1 admin\ntok-2 stat\n") == "tok-1" and sf.first_token("") == ""
    assert sf.sandbox_ca(tmp_path) is None
    (tmp_path / sf.CA_FILE).write_text("pem")
    assert sf.sandbox_ca(tmp_path) == tmp_path / sf.CA_FILE
