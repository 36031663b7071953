"""The layering rules, read from the source: measurement code never imports the driver side,
no module imports another's private names, and the CLI's entry stays light.

Imports are read with `ast` from every file, function-level imports included (a lazy import
is still a dependency).
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# What runs inside a worker to measure a cell, and what it may lean on.
MEASUREMENT = {"ctxbench.engine.worker", "ctxbench.measurements.kernel.measure", "ctxbench.measurements.perplexity.measure", "ctxbench.measurements.passkey.measure",
               "ctxbench.measurements.kernel.sharded", "ctxbench.core.reference", "ctxbench.core.flops", "ctxbench.models.lm",
               "ctxbench.models.attention", "ctxbench.engine.bandwidth", "ctxbench.core.kv_layout", "ctxbench.measurements.decode.measure",
               "ctxbench.measurements.ruler.policies", "ctxbench.measurements.ruler.compression", "ctxbench.measurements.ruler.prompts", "ctxbench.measurements.ruler.words"}
# What plans, schedules, records and reports cells: measurement code must not import these.
DRIVER = {"ctxbench.cli", "ctxbench.engine.options", "ctxbench.engine.sweep", "ctxbench.engine.executor", "ctxbench.engine.ray_executor",
          "ctxbench.engine.torchrun", "ctxbench.engine.results", "ctxbench.reports.report", "ctxbench.reports.plots", "ctxbench.reports.summary",
          "ctxbench.reports.fits", "ctxbench.reports.compare", "ctxbench.reports.markdown", "ctxbench.reports.kv_memory", "ctxbench.measurements.ruler.report"}


def module_files() -> dict[str, pathlib.Path]:
    files = {f"ctxbench.{p.stem}": p for p in (ROOT / "ctxbench").glob("*.py") if p.stem != "__init__"}
    files.update({f"ctxbench.kernels.{p.stem}": p for p in (ROOT / "kernels").glob("*.py") if p.stem != "__init__"})
    return files


def imports(path: pathlib.Path) -> list[tuple[str, str, int]]:
    """(module, imported name or "", line) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
    return found


def test_every_module_is_placed() -> None:
    """A new ctxbench module must be put on one side (or be a shared leaf) deliberately."""
    shared = {"ctxbench.engine.plan", "ctxbench.core.masks", "ctxbench.registry", "ctxbench.core.formatting", "ctxbench.core.procfs", "ctxbench.core.shards",
              "ctxbench.core.env", "ctxbench.__main__"}
    unplaced = {m for m in module_files() if m.startswith("ctxbench.") and not m.startswith("ctxbench.kernels.")
                } - MEASUREMENT - DRIVER - shared
    assert not unplaced, f"place these modules in tests/test_layering.py: {sorted(unplaced)}"


@pytest.mark.parametrize("module", sorted(MEASUREMENT | {m for m in module_files() if ".kernels." in m}
                                          | {"ctxbench.engine.plan", "ctxbench.core.masks", "ctxbench.registry"}))
def test_measurement_never_imports_the_driver(module: str) -> None:
    path = module_files()[module]
    bad = [f"{path.name}:{line} imports {mod}" + (f".{name}" if name else "")
           for mod, name, line in imports(path)
           if mod in DRIVER or (mod == "ctxbench" and f"ctxbench.{name}" in DRIVER)]
    assert not bad, "measurement code imports the driver side: " + "; ".join(bad)


def test_no_private_names_across_modules() -> None:
    bad = []
    for module, path in module_files().items():
        for mod, name, line in imports(path):
            if mod.startswith("ctxbench") and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}.{name}")
    assert not bad, "private names imported across modules: " + "; ".join(bad)


def test_cli_entry_is_light() -> None:
    """`ctxbench --help` must not load torch, rich, pandas or matplotlib (it took 1.4 s with torch)."""
    code = ("import sys; from ctxbench.cli import cli; "
            "heavy = [m for m in ('torch', 'rich', 'pandas', 'matplotlib', 'seaborn', 'scipy', 'numpy') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing ctxbench.cli loads {out}"
