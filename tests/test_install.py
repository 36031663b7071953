"""Nothing in the checkout shadows an installed package: from the repository root (which Python
puts first on sys.path for `python -c` and `python -m`), `import kernels` is PyPI's package that
transformers imports, not the checkout's kernels/ folder, and ctxbench still finds its built-in
implementations there as ctxbench.kernels."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

import lm_helpers as H

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def at_root(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_kernels_from_the_root_is_the_installed_package_or_a_namespace():
    done = at_root("-c", "import importlib.util as u; s = u.find_spec('kernels'); "
                         "print(s.origin if s.origin else 'namespace:' + ';'.join(s.submodule_search_locations))")
    assert done.returncode == 0, done.stderr
    where = done.stdout.strip()
    installed = [p for p in sys.path[1:] if p and os.path.isfile(os.path.join(p, "kernels", "__init__.py"))]
    if installed:  # transformers' dependency: the checkout's folder must yield to it
        assert where.startswith(installed[0]) and not where.startswith(os.path.join(ROOT, "kernels")), where
    else:
        assert where == "namespace:" + os.path.join(ROOT, "kernels"), where


def test_the_builtins_come_from_the_kernels_folder():
    done = at_root("-c", "from ctxbench import registry, kernels; import os; "
                         "print(kernels.__path__[0]); print(','.join(sorted(registry.all_impls())))")
    assert done.returncode == 0, done.stderr
    folder, names = done.stdout.split()
    assert os.path.samefile(folder, os.path.join(ROOT, "kernels"))
    assert {"naive", "chunked", "sdpa", "sliding_window", "triton", "triton_decode", "flex"} <= set(names.split(","))


@pytest.mark.slow
@pytest.mark.ci  # transformers' model code imported in three interpreters and a sweep with perplexity: about 35 s
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_transformers_loads_a_model_from_the_root(tmp_path):
    """transformers 5.x imports `kernels` when it loads a model; from the root it once got the
    checkout's folder (ImportError: cannot import name 'CUDAProperties' from 'kernels')."""
    done = at_root("-c", "import transformers.modeling_utils")
    assert done.returncode == 0, done.stderr[-2000:]
    model = H.checkpoint(str(tmp_path / "tiny"))
    done = at_root("-m", "ctxbench", "sweep", "--device", "cpu", "--lengths", "64", "--impls", "sdpa", "--heads", "2",
                   "--head-dim", "16", "--rep-ms", "5", "--ppl-max-len", "64", "--ppl-tokens", "64", "--model", model,
                   "--out", str(tmp_path / "runs"), "--run-id", "root")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with open(tmp_path / "runs" / "root" / "results.csv") as f:
        rows = f.read().splitlines()
    assert len(rows) == 3 and all(",ok," in r for r in rows[1:]), rows
