"""The Executor protocol (ctxbench.engine.executor): the local, Ray and torchrun executors all have it."""

from __future__ import annotations

import inspect
import sys
import types

from ctxbench.engine import torchrun
from ctxbench.engine.executor import Executor, LocalExecutor
from ctxbench.engine.ray_executor import RayExecutor

METHODS = ("submit", "wait", "close", "__enter__", "__exit__")


def _params(fn) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


def _executors(monkeypatch) -> list[object]:
    fake_ray = types.SimpleNamespace(is_initialized=lambda: True, remote=lambda **_: (lambda fn: fn))
    monkeypatch.setitem(sys.modules, "ray", fake_ray)  # no cluster: only the object is checked
    monkeypatch.setattr(torchrun, "init_driver_group", lambda: None)  # no torchrun group
    return [LocalExecutor(None), RayExecutor(None, None, "cpu"), torchrun.DistributedExecutor(None)]


def test_every_executor_is_an_executor(monkeypatch):
    for ex in _executors(monkeypatch):
        try:
            assert isinstance(ex, Executor), type(ex).__name__
            assert isinstance(ex.name, str) and isinstance(ex.capacity, int) and ex.capacity >= 1
            assert ex.in_flight == 0
            for method in METHODS:
                assert _params(getattr(type(ex), method)) == _params(getattr(Executor, method)), (ex, method)
        finally:
            ex.close()


def test_distributed_executor_shares_the_local_queue():
    # one queue (LocalExecutor's): the torchrun executor only changes how a cell is measured
    for member in ("submit", "wait", "in_flight"):
        assert member not in vars(torchrun.DistributedExecutor)


def test_not_an_executor_is_told_apart():
    assert not isinstance(object(), Executor)
