"""Collect benchmarks/bench_*.py as test modules: the project's pytest settings only collect
test_*.py, and the benchmarks are kept out of the default `pytest` run on purpose.

    pytest benchmarks/ --benchmark-only
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
