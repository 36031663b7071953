"""What ctxbench's worker adds to a kernel's latency: the same call timed in a worker (as a sweep
measures it) and in a plain Python process (as a user would time it), interleaved.

    OMP_NUM_THREADS=1 python benchmarks/harness_overhead.py --lengths 4096,16384 \\
        --impls naive,chunked,sliding_window,sdpa --mask window --window 1024 --trials 5 --csv OUT.csv

Per implementation and length, each trial times the call twice, in turn (worker then plain
process, and the other way round the next trial), each in a fresh process of its own, both
pinned to the same CPU (trial t on CPU t mod the CPUs): on the 2-core CI machine a process
the OS keeps on the busier CPU measures 10-30% slower whatever it runs, which unpinned made
single trials range 0.67-1.37 for the same call:

  worker  ctxbench.engine.executor.Worker measures the cell as a sweep does (setup, first call,
          memory pass, error check, then the timed loop), with --repeats calls timed;
  plain   a Python process makes the same inputs (ctxbench.measurements.kernel.measure.make_inputs,
          the same seed), prepares the implementation, warms it up for 100 ms and times --repeats
          calls with perf_counter under torch.no_grad.

It prints per cell the median over trials of worker / plain (each side's median of its calls),
with the trials' range, and writes every trial to --csv. docs/performance.md keeps the figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def config(args: argparse.Namespace):
    from ctxbench.core.cell import Config

    return Config(batch=1, heads=args.heads, kv_heads=args.heads, head_dim=args.head_dim, dtype="float32",
                  mask=args.mask, window=args.window if args.mask == "window" else None, device="cpu")


def plain(impl_name: str, n: int, args: argparse.Namespace) -> float:
    """Median (ms) of args.repeats calls timed in this process, as a user's own script would."""
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    import torch

    from ctxbench.core import registry
    from ctxbench.core.cell import Cell
    from ctxbench.measurements.kernel.measure import make_inputs

    cell = Cell.of(config(args), impl_name, n, "kernel")
    impl = registry.resolve(impl_name)
    q, k, v, _ = make_inputs(cell, 0, False)
    run = impl.prepare(q, k, v, cell.attention_mask)
    with torch.no_grad():
        start = time.perf_counter()
        while True:
            run(q, k, v)
            if (time.perf_counter() - start) * 1e3 >= 100:
                break
        samples = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run(q, k, v)
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def in_plain_process(impl_name: str, n: int, args: argparse.Namespace, cpu: int | None) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--plain", impl_name, "--lengths", str(n),
           "--mask", args.mask, "--window", str(args.window), "--heads", str(args.heads),
           "--head-dim", str(args.head_dim), "--repeats", str(args.repeats)] + (["--cpu", str(cpu)] if cpu is not None else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def in_worker(impl_name: str, n: int, args: argparse.Namespace, log: str, cpu: int | None) -> dict:
    from ctxbench.core.cell import Cell, Settings
    from ctxbench.engine.executor import WorkerPool

    cell = Cell.of(config(args), impl_name, n, "kernel")
    settings = Settings(warmup_ms=100.0, rep_ms=0.0, min_repeats=args.repeats, max_repeats=args.repeats, pin_cpu=cpu)
    with WorkerPool(None, reuse=False) as pool:
        return pool.run_cell(cell, settings, timeout_s=1800, log_path=log)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default="naive,chunked,sliding_window,sdpa")
    p.add_argument("--lengths", default="4096")
    p.add_argument("--mask", default="window")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--csv", default=None)
    p.add_argument("--plain", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.plain:
        print(plain(args.plain, lengths[0], args))
        return
    rows = []
    log = os.path.join(tempfile.mkdtemp(prefix="ctxbench-overhead-"), "worker.log")
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}; {args.mask} mask"
          + (f" W={args.window}" if args.mask == "window" else "") + f"; H={args.heads} D={args.head_dim} fp32; "
          f"median of {args.repeats} calls per side, {args.trials} interleaved trials")
    for n in lengths:
        for impl in args.impls.split(","):
            ratios = []
            cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [None]
            for t in range(args.trials):
                sides = ("worker", "plain") if t % 2 == 0 else ("plain", "worker")
                cpu = cpus[t % len(cpus)]
                got = {}
                for side in sides:
                    if side == "plain":
                        got[side] = in_plain_process(impl, n, args, cpu)
                    else:
                        result = in_worker(impl, n, args, log, cpu)
                        if result.get("status") != "ok":
                            raise SystemExit(f"{impl} N={n}: worker {result.get('status')}: {result.get('message')}")
                        got[side] = float(result["latency_ms"])
                ratio = got["worker"] / got["plain"]
                ratios.append(ratio)
                rows.append({"impl": impl, "n": n, "trial": t, "cpu": cpu, "worker_ms": got["worker"],
                             "plain_ms": got["plain"], "ratio": ratio, "first": sides[0]})
            print(f"{impl:>15} N={n:<6} worker/plain {statistics.median(ratios):.3f} "
                  f"(trials {min(ratios):.3f}..{max(ratios):.3f}: {', '.join(f'{r:.3f}' for r in ratios)})", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    print(json.dumps({"log": log}))


if __name__ == "__main__":
    main()
