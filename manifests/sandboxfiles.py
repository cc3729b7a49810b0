"""What `nodemesh install --sandbox` leaves in the sandbox's state directory for the CLI.

The installer writes these files, the CLI reads them (cli/client.py finds the controller by
`controller.addr`, cli/dashboard.py the dashboard by `dashboard.addr`): one definition of their
names and format, on the installer's floor, so the CLI imports down to it and the installer never
imports up into the CLI. Standard library only: every CLI verb imports this.
"""

from __future__ import annotations

import os
from pathlib import Path

CONTROLLER_ADDR_FILE = "controller.addr"
DASHBOARD_ADDR_FILE = "dashboard.addr"
TOKEN_FILE = "controller.token"
# The controller's CA when it speaks TLS (api/certs.py CA_FILE, written by write_controller_pki).
CA_FILE = "controller-ca.crt"
# The name the controller's certificate carries when it is not the address in controller.addr
# (`--as-pods` with controllerTls=true: the certificate names the Service, the address is a node's).
SERVER_NAME_FILE = "controller.servername"


def hostport(host: str, port: int) -> str:
    """`host:port` as grpc and URLs take it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def write_controller_address(state_dir: str | Path, host: str, port: int) -> Path:
    """Record where the sandbox's controller serves its gRPC API (`controller.addr`)."""
    return _write_address(Path(state_dir) / CONTROLLER_ADDR_FILE, host, port)


def write_dashboard_address(state_dir: str | Path, host: str, port: int) -> Path:
    """Record where its dashboard is (`dashboard.addr`), for installers whose controller serves it
    elsewhere than controller host:8084 (a port-forward)."""
    return _write_address(Path(state_dir) / DASHBOARD_ADDR_FILE, host, port)


def _write_address(path: Path, host: str, port: int) -> Path:
    """Atomically, so a concurrent `nodemesh stat` never reads half an address. Removed on uninstall."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{hostport(host, port)}\n")
    os.replace(tmp, path)
    return path


def first_token(text: str) -> str:
    """The token a client sends from a token file: its first word (a controller's token file may
    list more tokens, each with its roles: docs/controlplane.md)."""
    return next(iter(text.split()), "")


def sandbox_ca(state_dir: str | Path) -> Path | None:
    """The CA of a sandbox controller that speaks TLS (`nodemesh install --sandbox` wrote it)."""
    ca = Path(state_dir) / CA_FILE
    return ca if ca.is_file() else None


def sandbox_server_name(state_dir: str | Path) -> str | None:
    """The TLS server name to verify the sandbox's controller under, when it is not its address."""
    try:
        return (Path(state_dir) / SERVER_NAME_FILE).read_text().strip() or None
    except OSError:
        return None
