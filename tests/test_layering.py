"""The layering rules, read from the source: which package may import which, measurement code
never imports the driver side, the engine never names a measurement kind, no module imports
another's private names, and the CLI's entry stays light.

Imports are read with `ast` from every file under ctxbench/ and kernels/, recursively,
function-level imports included (a lazy import is still a dependency). The layers:

    core          ctxbench.core.*: imports only core (the registries, the cell, masks, formulas)
    models        ctxbench.models.*: core and models
    kernels       ctxbench.kernels.* (the kernels/ folder): core, the public ctxbench.registry, kernels
    kinds         ctxbench.measurements.* except report modules: core, models, kinds (a kind's
                  declaration and the code its worker runs: never the engine or the reports)
    kind reports  ctxbench.measurements.*.report: core, kinds, reports, engine.results
    engine        ctxbench.engine.*: core and engine (it looks kinds up, never imports one)
    reports       ctxbench.reports.*: core, reports, engine.results (sections are looked up too)
    entry         ctxbench.cli, ctxbench.__main__, ctxbench.registry, ctxbench.kernels: anything
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import tomllib

import pytest

from ctxbench.core import kinds

ROOT = pathlib.Path(__file__).resolve().parents[1]

LAYERS = {
    "core": ("ctxbench.core",),
    "models": ("ctxbench.core", "ctxbench.models"),
    "kernels": ("ctxbench.core", "ctxbench.registry", "ctxbench.kernels"),
    "kinds": ("ctxbench.core", "ctxbench.models", "ctxbench.measurements"),
    "kind reports": ("ctxbench.core", "ctxbench.measurements", "ctxbench.reports", "ctxbench.engine.results"),
    "engine": ("ctxbench.core", "ctxbench.engine"),
    "reports": ("ctxbench.core", "ctxbench.reports", "ctxbench.engine.results"),
}
ENTRY = {"ctxbench.cli", "ctxbench.__main__", "ctxbench.registry", "ctxbench.kernels", "ctxbench"}


def module_files() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name: ctxbench/ recursively, kernels/ as ctxbench.kernels."""
    files = {}
    for path in sorted((ROOT / "ctxbench").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        files[f"ctxbench.kernels.{path.stem}"] = path
    return files


def layer_of(module: str) -> str:
    if module in ENTRY:
        return "entry"
    if module.startswith("ctxbench.kernels."):
        return "kernels"
    if module.startswith("ctxbench.measurements"):
        return "kind reports" if module.endswith(".report") else "kinds"
    for layer in ("core", "models", "engine", "reports"):
        if module == f"ctxbench.{layer}" or module.startswith(f"ctxbench.{layer}."):
            return layer
    raise AssertionError(f"{module} is in no layer: place it in tests/test_layering.py")


def imports(path: pathlib.Path) -> list[tuple[str, str, int]]:
    """(module, imported name or "", line) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
    return found


def ctxbench_imports(path: pathlib.Path) -> list[tuple[str, int]]:
    """The ctxbench modules a file imports (`from ctxbench.x import y` counts as ctxbench.x.y when y is a module)."""
    files = module_files()
    out = []
    for mod, name, line in imports(path):
        if mod != "ctxbench" and not mod.startswith("ctxbench."):
            continue
        full = f"{mod}.{name}" if name and f"{mod}.{name}" in files else mod
        out.append((full, line))
    return list(dict.fromkeys(out))


def test_the_tree_has_modules_and_every_one_has_a_layer() -> None:
    files = module_files()
    # a walk that found nothing would make every rule below vacuous
    assert len(files) > 40 and any(m.startswith("ctxbench.kernels.") for m in files), sorted(files)
    for layer in ("core", "models", "kernels", "kinds", "kind reports", "engine", "reports"):
        assert any(layer_of(m) == layer for m in files), f"no module in layer {layer}"
    for module in files:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(m for m in module_files() if layer_of(m) != "entry"))
def test_imports_follow_the_layers(module: str) -> None:
    path = module_files()[module]
    allowed = LAYERS[layer_of(module)]
    bad = [f"{path.relative_to(ROOT)}:{line} imports {mod}" for mod, line in ctxbench_imports(path)
           if mod != "ctxbench" and not any(mod == a or mod.startswith(a + ".") for a in allowed)]
    assert not bad, f"{module} ({layer_of(module)}) may import only {', '.join(allowed)}: " + "; ".join(bad)


def test_no_private_names_across_modules() -> None:
    bad = []
    for path in module_files().values():
        for mod, name, line in imports(path):
            if mod.startswith("ctxbench") and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}.{name}")
    assert not bad, "private names imported across modules: " + "; ".join(bad)


def compared_strings(path: pathlib.Path) -> set[str]:
    """The string literals a file compares with (==, !=, in, not in: a branch on a value)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                found |= {c.value for c in ast.walk(side) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return found


def test_only_a_kinds_own_package_branches_on_it() -> None:
    """No module outside a kind's package compares anything with the kind's name: the engine, the
    reports and the other kinds look kinds up in ctxbench.core.kinds instead of branching on them."""
    files = module_files()
    found = []
    for name, kind in kinds.all_kinds().items():
        own = kind.module  # e.g. ctxbench.measurements.ruler: the kind's package
        for module, path in files.items():
            if module == own or module.startswith(own + "."):
                continue
            if name in compared_strings(path):
                found.append(f"{module} branches on {name!r}")
    assert not found, "; ".join(found)


def test_every_package_is_installed() -> None:
    """pyproject.toml lists every package (a folder with modules) under ctxbench/."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.relative_to(ROOT).parts) for p in (ROOT / "ctxbench").rglob("*")
               if p.is_dir() and any(p.glob("*.py"))} | {"ctxbench"}
    assert folders | {"ctxbench.kernels"} == listed


def test_cli_entry_is_light() -> None:
    """`ctxbench --help` must not load torch, rich, pandas or matplotlib (it took 1.4 s with torch),
    although it lists every kind's flags."""
    code = ("import sys; from ctxbench.cli import cli; "
            "heavy = [m for m in ('torch', 'rich', 'pandas', 'matplotlib', 'seaborn', 'scipy', 'numpy', 'transformers') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing ctxbench.cli loads {out}"
