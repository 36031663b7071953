"""Append to a copy of kernels/chunked.py a re-registration of chunked whose runner busy-waits a
fraction of its own call time after each call: a planted slowdown for the regression gate's
sensitivity runs (benchmarks/gate_sensitivity.sh, docs/reports.md "The CI gate").

    python benchmarks/plant_slowdown.py kernels/chunked.py 0.10     # every call 10% longer

A busy wait rather than a sleep: a sleep of a tenth of a 2 ms call is below the kernel's timer slack.
"""

from __future__ import annotations

import sys

PLANT = '''

# planted by benchmarks/plant_slowdown.py: every call takes {frac:g}x its own time longer (busy wait)
import time as _time

_orig = next(f for f in list(globals().values()) if getattr(getattr(f, "__ctxbench_impl__", None), "name", "") == "chunked")
_i = _orig.__ctxbench_impl__


def _slow(*args, **kwargs):
    run = _orig(*args, **kwargs)

    def timed(*a, **kw):
        t0 = _time.perf_counter()
        out = run(*a, **kw)
        end = _time.perf_counter() + {frac!r} * (_time.perf_counter() - t0)
        while _time.perf_counter() < end:
            pass
        return out
    return timed


register("chunked", devices=_i.devices, dtypes=_i.dtypes, masks=_i.masks, modes=_i.modes, gqa=_i.gqa,
         sinks=_i.sinks, kv_cache=_i.kv_cache, ragged=_i.ragged, paged=_i.paged, setup=True)(_slow)
'''


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: python benchmarks/plant_slowdown.py PATH/kernels/chunked.py FRACTION")
    path, frac = sys.argv[1], float(sys.argv[2])
    with open(path, "a") as f:
        f.write(PLANT.format(frac=frac))


if __name__ == "__main__":
    main()
