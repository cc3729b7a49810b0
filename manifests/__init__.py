"""nodemesh.manifests: the installer.

Beside the YAML it renders (`daemonset.yaml`, the add-ons, `grafana/`: golden outputs of this
code, shipped in the wheel) live the code that renders it (`render.py`, `observability.py`) and
the code that installs the same mesh on the local sandbox (`sandbox_install.py`, which leaves the
files the CLI reads there: `sandboxfiles.py`). The `nodemesh install` verb (cli/install.py) is a
thin face over this room; the room imports `api`, `redirector.plan` and `sandbox`, never `cli`.
"""
