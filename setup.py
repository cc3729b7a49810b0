"""Lists nodemesh's packages: the repository root is `nodemesh`, each room a sub-package.

Everything else lives in pyproject.toml; only the package list needs code, because the
rooms sit at the top level instead of under one source folder.
"""

import os

from setuptools import setup

ROOMS = ("api", "agent", "redirector", "controlplane", "manifests", "cli", "sandbox", "demo")


def room_packages() -> list[str]:
    packages = ["nodemesh"]
    for room in ROOMS:
        for dirpath, dirnames, filenames in os.walk(room):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            if "__init__.py" in filenames:
                packages.append("nodemesh." + dirpath.replace(os.sep, "."))
    return packages


setup(
    packages=room_packages(),
    # The installer's golden YAML and Grafana dashboards ship beside the code that renders them.
    package_data={"": ["*.proto", "*.yml", "*.yaml", "*.json", "*.html", "*.js", "*.css", "*.golden", "*.c"],
                  "nodemesh.manifests": ["grafana/*.json"]},
)
