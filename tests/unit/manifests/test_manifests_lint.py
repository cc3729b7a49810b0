"""What CI can check of the parts it cannot run: the Vagrantfile (ruby -c), the shell scripts
(shellcheck), and the Dockerfile with its .dockerignore (the build context keeps the package).

ruby and shellcheck come from Debian (scripts/bootstrap.sh --test installs them).
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
VAGRANT = REPO / "vagrant"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/bootstrap.sh --test (Debian package)")
    return path


def _shell_scripts() -> list[Path]:
    scripts = sorted(VAGRANT.rglob("*.sh")) + sorted((REPO / "scripts").glob("*.sh"))
    return scripts + [REPO / ".ci" / "run"]


def test_manifests_vagrantfile_is_valid_ruby() -> None:
    out = subprocess.run([_tool("ruby"), "-c", str(VAGRANT / "Vagrantfile")], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0 and "Syntax OK" in out.stdout, out.stderr


def test_manifests_vagrantfile_defines_one_server_two_agents_on_both_providers() -> None:
    text = (VAGRANT / "Vagrantfile").read_text()
    roles = re.findall(r'name: "(\w+)", ip: "[^"]+", role: "(server|agent)"', text)
    assert sorted(r for _, r in roles) == ["agent", "agent", "server"]
    assert 'config.vm.provider "virtualbox"' in text and 'config.vm.provider "libvirt"' in text
    for script in re.findall(r'path: "(provision/[^"#]+)"', text):
        assert (VAGRANT / script).exists(), script
    for role in ("server", "agent"):
        assert (VAGRANT / "provision" / f"k3s-{role}.sh").exists()


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: str(p.relative_to(REPO)))
def test_manifests_shell_script_passes_shellcheck(script: Path) -> None:
    out = subprocess.run([_tool("shellcheck"), "-S", "warning", "-x", "--source-path=SCRIPTDIR", str(script)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_manifests_shell_scripts_are_strict() -> None:
    for script in sorted(VAGRANT.rglob("*.sh")):
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), script
        if script.name != "lib.sh":  # sourced, inherits the caller's options
            assert "set -euo pipefail" in text, script


def _ignored(rel: str, patterns: list[str]) -> bool:
    # Docker's .dockerignore semantics, for the plain patterns we use: a pattern matches the path
    # or any of its parent directories; `**/` matches at any depth.
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or (
                    pattern.startswith("**/") and fnmatch.fnmatch(prefix.split("/")[-1], pattern[3:])):
                return True
    return False


def test_manifests_dockerignore_keeps_what_the_wheel_build_needs() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "keep the matcher in this test in step"
    for needed in ("pyproject.toml", "setup.py", "README.md", "__init__.py"):
        assert not _ignored(needed, patterns), needed
    rooms = re.search(r"ROOMS = \(([^)]*)\)", (REPO / "setup.py").read_text())
    assert rooms
    for room in re.findall(r'"(\w+)"', rooms.group(1)):
        for source in (REPO / room).rglob("*.py"):
            rel = str(source.relative_to(REPO))
            if "__pycache__" not in rel:
                assert not _ignored(rel, patterns), f"{rel} would be missing from the image"
    assert _ignored("tests/unit/x.py", patterns) and _ignored(".git/HEAD", patterns)
    assert _ignored("agent/__pycache__/x.pyc", patterns)


def test_manifests_dockerfile_builds_one_image_for_every_process() -> None:
    """The static half; tests/integration/image/ builds the image for real and runs it."""
    text = (REPO / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert froms and all(f == "${BASE_IMAGE}" for f in froms)
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", text, re.MULTILINE)
    apt = re.findall(r"apt-get install -y --no-install-recommends ([^\\&\n]+)", text)
    assert any(set(a.split()) >= {"python3", "python3-venv", "iptables", "ebtables", "iproute2", "conntrack"}
               for a in apt)
    # Every pip step takes wheels only: the image has no compiler, a missing wheel must fail the build.
    pips = re.findall(r"pip (?:install|wheel) [^\n]*", text)
    assert pips and all("--only-binary=:all:" in p for p in pips), pips
    assert re.search(r"^ARG WITH_BCC=0$", text, re.MULTILINE) and "python3-bpfcc" in text
    # The image proves at build time that every entry point the manifests use imports.
    assert "import nodemesh.agent, nodemesh.redirector, nodemesh.controlplane" in text
    assert "nodemesh --version" in text
