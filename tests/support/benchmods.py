"""A benchmark script of tests/bench/ as a module, for tests that assert what it counts (the
call-count regression checks of issue 18)."""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType

BENCH_DIR = pathlib.Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str) -> ModuleType:
    """tests/bench/<name>.py, imported (its own imports of its neighbours included)."""
    path = BENCH_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
