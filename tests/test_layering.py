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
MEASUREMENT = {"ctxbench.worker", "ctxbench.measure", "ctxbench.perplexity", "ctxbench.passkey",
               "ctxbench.sharded", "ctxbench.reference", "ctxbench.flops", "ctxbench.lm",
               "ctxbench.model_attention", "ctxbench.bandwidth", "ctxbench.kv_layout", "ctxbench.decoding",
               "ctxbench.kv_policies", "ctxbench.kv_compression", "ctxbench.ruler", "ctxbench.words"}
# What plans, schedules, records and reports cells: measurement code must not import these.
DRIVER = {"ctxbench.cli", "ctxbench.options", "ctxbench.sweep", "ctxbench.executor", "ctxbench.ray_executor",
          "ctxbench.torchrun", "ctxbench.results", "ctxbench.report", "ctxbench.plots", "ctxbench.summary",
          "ctxbench.fits", "ctxbench.compare", "ctxbench.markdown", "ctxbench.kv_memory", "ctxbench.ruler_report"}


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
    shared = {"ctxbench.plan", "ctxbench.masks", "ctxbench.registry", "ctxbench.formatting", "ctxbench.procfs", "ctxbench.shards",
              "ctxbench.env", "ctxbench.__main__"}
    unplaced = {m for m in module_files() if m.startswith("ctxbench.") and not m.startswith("ctxbench.kernels.")
                } - MEASUREMENT - DRIVER - shared
    assert not unplaced, f"place these modules in tests/test_layering.py: {sorted(unplaced)}"


@pytest.mark.parametrize("module", sorted(MEASUREMENT | {m for m in module_files() if ".kernels." in m}
                                          | {"ctxbench.plan", "ctxbench.masks", "ctxbench.registry"}))
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
