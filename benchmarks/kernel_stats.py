"""Registers, spills, shared memory and wgmma count of the Triton kernels, compiled on the CPU.

    python benchmarks/kernel_stats.py --arch sm_90 --head-dim 64,128 --dtype bf16,fp16
    python benchmarks/kernel_stats.py ... --which default|tuned|all|check --mask causal,window --csv OUT
    python benchmarks/kernel_stats.py ... --kernel-file OTHER/triton_attention.py   # another version
    python benchmarks/kernel_stats.py ... --n 4096 --q-len 1000   # fewer queries than keys (KV cache)

No GPU needed: every kernel of one forward + backward (kernels/triton_attention.py) is compiled
exactly as it would be launched, for the target given (sm_90 = Hopper), down to a cubin with the
ptxas that ships with triton. The wrappers run on CPU tensors with the launches captured (their
`launcher`); each launch's arguments go through triton's own binder (so stride 1 and
divisibility specialise as on a GPU). The configurations come from kernels/triton_configs.py.
For each kernel and configuration it prints:

  regs      registers per thread (ptxas -v)
  spill     bytes of spill stores per thread (ptxas -v; loads are in the CSV)
  shared    shared memory per block (bytes, the compiler's allocation)
  wgmma     wgmma.mma_async instructions in the PTX (0: no Hopper tensor-core path)
  mma/tile  matmuls (tt.dot) per tile of the kernel's K/V or Q loops, from its TTIR: the
            backward's total over its kernels is FlashAttention-2's 5 with the fused dQ
  compile   seconds for triton.compile (frontend + LLVM + ptxas) on this machine (wall; the
            CSV also has compile_cpu_s, its CPU time with ptxas', which outside load does not
            inflate)

--which picks the configurations: "default" (launched with autotuning off), "tuned" (every one
the autotuner can pick at --n, after pruning: the default), "all" (the whole space before
pruning), "check" (the fixed list benchmarks/gpu_check.sh tunes over). Kernels are compiled
fresh (TRITON_ALWAYS_COMPILE, a private cache), so compile times are real. --json prints one
JSON object per kernel instead of the table (tests/test_triton.py reads these).
--kernel-file compiles another copy of kernels/triton_attention.py (its configurations and
helpers are this checkout's triton_configs and triton_common), or an older one that held its
configurations itself (before triton_configs existed), to compare versions.
"""

from __future__ import annotations

import os
import sys

# Compile, never interpret, and bypass triton's cache so ptxas runs (and reports) every time;
# this must precede any triton import.
os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
if "TRITON_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="ctxbench-kernel-stats-")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
MASKS = ("none", "causal", "window", "sinks")
# An older single-file kernel (--kernel-file): the kernels it launched directly rather than
# through its _launch, kind -> module attribute.
LEGACY_AUX_KERNELS = {"pre": "_bwd_preprocess", "dq_cast": "_bwd_dq_cast"}
COLUMNS = ["kernel", "dtype", "head_dim", "mask", "config", "default", "regs", "spill", "spill_loads", "stack",
           "shared", "smem_estimate", "wgmma", "mma", "mma_per_tile", "compile_s", "compile_cpu_s", "ok", "ptx_sha", "triton", "arch", "error"]


def load_module(path: str | None):
    """kernels/triton_attention.py as installed, or the copy at `path` (to compare versions)."""
    if path is None:
        from ctxbench.kernels import triton_attention as ta
        return ta
    spec = importlib.util.spec_from_file_location("ctxbench_kernel_stats_probe", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # triton's jit resolves globals through the module
    spec.loader.exec_module(mod)
    return mod


def _inputs(dtype: torch.dtype, head_dim: int, mask: str, n: int, q_len: int | None):
    """q, k, v and (causal, window, sinks) of the captured call: n keys, q_len queries."""
    causal, window = mask != "none", (300 if mask in ("window", "sinks") else None)
    sinks = 4 if mask == "sinks" else 0
    q = torch.randn(2, 4, n if q_len is None else q_len, head_dim, dtype=dtype)
    k, v = (torch.randn(2, 2, n, head_dim, dtype=dtype) for _ in range(2))
    return q, k, v, (causal, window, sinks)


def kernel_api(ta) -> SimpleNamespace:
    """What this script needs of a kernel module, in one shape: its kernels by kind, the
    autotuned kinds, capture(dtype, head_dim, mask, n, q_len) -> [(kind, args, meta)] of one
    forward + backward, and the configuration functions (kernels/triton_configs.py's, or an older
    single-file kernel's own)."""
    if hasattr(ta, "KERNELS"):
        from ctxbench.kernels import triton_configs as tc

        def capture(dtype, head_dim, mask, n, q_len=None):
            captured = []

            def launcher(kind, rows, cols, args, meta):
                captured.append((kind, args, meta))
                return ""
            q, k, v, (causal, window, sinks) = _inputs(dtype, head_dim, mask, n, q_len)
            o, lse = ta.attention_forward(q, k, v, causal, window, None, sinks, launcher=launcher)
            ta.attention_backward(torch.randn_like(o), q, k, v, o, lse, causal, window, None, sinks, launcher=launcher)
            return captured

        return SimpleNamespace(
            kernels=dict(ta.KERNELS), kinds=tc.KINDS, capture=capture, space=tc.tuning_space,
            check_space=tc.CHECK_SPACE, fp32_space=tc.FP32_IEEE_SPACE, prune=tc.prune, to_triton=tc.to_triton,
            describe=tc.describe, smem_estimate=tc.smem_estimate,
            fma=lambda q, meta: tc.uses_fma(q.dtype, meta["PRECISION"]),
            default=lambda kind, fma, meta: tc.default_config(kind, fma, meta["BLOCK_D"], meta.get("FUSED_DQ", False)))
    return _legacy_api(ta)


def _legacy_api(ta) -> SimpleNamespace:
    """kernel_api of a kernels/triton_attention.py from before triton_configs: its launches
    captured by replacing its _launch and its directly launched kernels for the call."""

    def capture(dtype, head_dim, mask, n, q_len=None):
        captured = []

        class _Capture:
            def __init__(self, kind):
                self.kind = kind

            def __getitem__(self, grid):
                return lambda *args, **meta: captured.append((self.kind, args, meta))

        saved = {"_launch": ta._launch}
        ta._launch = lambda kind, rows, cols, args, meta: (captured.append((kind, args, meta)) or (0, 0, ""))
        for kind, name in LEGACY_AUX_KERNELS.items():
            if hasattr(ta, name):
                saved[name] = getattr(ta, name)
                setattr(ta, name, _Capture(kind))
        try:
            q, k, v, (causal, window, sinks) = _inputs(dtype, head_dim, mask, n, q_len)
            o, lse = ta.attention_forward(q, k, v, causal, window, None, sinks)
            ta.attention_backward(torch.randn_like(o), q, k, v, o, lse, causal, window, None, sinks)
        finally:
            for name, value in saved.items():
                setattr(ta, name, value)
        return captured

    def default(kind, fma, meta):
        if hasattr(ta, "default_config"):
            return ta.default_config(kind, fma, meta["BLOCK_D"], meta.get("FUSED_DQ", False))
        return ta.FP32_IEEE_SPACE[kind][0] if fma else ta.DEFAULT_CONFIGS[kind]

    def smem_estimate(kind, bm, bn, stages, block_d, size, fused=False):
        extra = {"fused": True} if fused else {}  # the oldest files lack it
        return ta._smem_estimate(kind, bm, bn, stages, block_d, size, **extra)

    kernels = dict(ta._PLAIN)
    kernels.update({kind: getattr(ta, name) for kind, name in LEGACY_AUX_KERNELS.items() if hasattr(ta, name)})
    return SimpleNamespace(
        kernels=kernels, kinds=tuple(ta._PLAIN), capture=capture, space=ta._space, check_space=ta.CHECK_SPACE,
        fp32_space=ta.FP32_IEEE_SPACE, prune=lambda kind, configs, named, **meta: ta._prune(kind)(configs, named, **meta),
        to_triton=lambda c: ta._config(*c), describe=lambda c: ta._describe(*c), smem_estimate=smem_estimate,
        fma=ta._fma, default=default)


def configs_for(api, which: str, kind: str, args: tuple, meta: dict, n: int, q_len: int | None = None) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, warps, stages) tuples of `kind` for --which."""
    fma = api.fma(args[0], meta)
    default = api.default(kind, fma, meta)
    if which == "default":
        return [default]
    if which == "all":
        return list(api.space(kind))
    if which == "check":
        space = api.check_space[kind] if not fma else api.fp32_space[kind]
        configs = [api.to_triton(c) for c in space]
    else:
        configs = [api.to_triton(c) for c in api.space(kind)]
    named = {"N": n, "Q": args[0]}
    if q_len is not None:
        named["N_Q"] = q_len
    kept = api.prune(kind, configs, named, **meta)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]


def _ptx_sha(ptx: str) -> str:
    """A hash of the PTX without debug information (.loc/.file lines, debug sections), so two
    sources that compile to the same code have the same hash."""
    body = ptx.split("\t.section\t.debug", 1)[0]
    lines = [ln for ln in body.splitlines()
             if not ln.lstrip().startswith((".loc", ".file", "//")) and "$L__tmp" not in ln
             and "$L__func_begin" not in ln and "$L__func_end" not in ln]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def dots_per_loop(ttir: str) -> list[int]:
    """tt.dot ops directly inside each innermost scf.for of a kernel's TTIR (tile bodies are
    inlined there, before pipelining): the matmuls per tile, one entry per loop with any."""
    counts, stack, depth = [], [], 0
    for line in ttir.splitlines():
        if "scf.for" in line:
            stack.append([depth, 0])
        if stack and re.search(r"\btt\.dot\b", line):
            stack[-1][1] += 1
        depth += line.count("{") - line.count("}")
        while stack and depth <= stack[-1][0]:
            _, n = stack.pop()
            if n:
                counts.append(n)
    return counts


def _ptxas_numbers(log: str) -> dict:
    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None

    return dict(regs=grab(r"Used (\d+) registers"), spill=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"), stack=grab(r"(\d+) bytes stack frame"))


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): a compile's cost without the
    waiting that other load on the machine adds to its wall time."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compile_one(ta, fn, args: tuple, meta: dict, config: tuple, capability: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    bm, bn, warps, stages = config
    kw = dict(meta, num_warps=warps, num_stages=stages)
    if bm is not None:
        kw.update(BLOCK_M=bm, BLOCK_N=bn)
    row: dict = {}
    buf = io.StringIO()
    try:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, options = binder(*args, **kw)
        options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, options)
        triton.knobs.nvidia.dump_ptxas_log = True
        t0, c0 = time.perf_counter(), _cpu_seconds()
        with contextlib.redirect_stdout(buf):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        row["compile_cpu_s"] = round(_cpu_seconds() - c0, 2)
        ptx = kernel.asm["ptx"]
        row.update(_ptxas_numbers(buf.getvalue()))
        loops = dots_per_loop(kernel.asm["ttir"])
        row["mma_per_tile"] = max(loops) if loops else 0
        row.update(ok=True, shared=kernel.metadata.shared, wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                   mma="wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "fma"),
                   ptx_sha=_ptx_sha(ptx))
    except Exception as exc:  # noqa: BLE001 - reported in the row; the caller decides
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:400]}")
    finally:
        triton.knobs.nvidia.dump_ptxas_log = False
    return row


def stats(api, dtype: torch.dtype, head_dim: int, mask: str, which: str, n: int, capability: int,
          kinds: set | None = None, q_len: int | None = None):
    """Yield one row per (kernel, configuration) of one forward + backward (api: kernel_api)."""
    import triton

    seen = set()
    for kind, args, meta in api.capture(dtype, head_dim, mask, n, q_len):
        if kinds and kind not in kinds:
            continue
        meta = dict(meta)
        tuned = kind in api.kinds
        if tuned:
            configs = configs_for(api, which, kind, args, meta, n, q_len)
            default = api.default(kind, api.fma(args[0], meta), meta)
        else:
            configs = [(None, None, meta.pop("num_warps", 4), meta.pop("num_stages", 1))]
            default = configs[0]
        for config in configs:
            if (kind, config) in seen:
                continue
            seen.add((kind, config))
            row = dict(kernel=kind, dtype=DTYPE_NAMES[dtype], head_dim=head_dim, mask=mask,
                       config=api.describe(config) if config[0] is not None else f"warps={config[2]}",
                       default=config == default, triton=triton.__version__, arch=f"sm_{capability}")
            if tuned and dtype != torch.float32:  # what pruning assumes the kernel needs
                fused = kind == "dkdv" and bool(meta.get("FUSED_DQ"))
                row["smem_estimate"] = api.smem_estimate(kind, config[0], config[1], config[3], meta["BLOCK_D"],
                                                         args[0].element_size(), fused)
            row.update(compile_one(api, api.kernels[kind], args, meta, config, capability))
            yield row


def _table(rows: list[dict]) -> str:
    cols = ["kernel", "dtype", "head_dim", "mask", "config", "default", "regs", "spill", "shared", "wgmma",
            "mma_per_tile", "compile_s", "compile_cpu_s"]
    head = {"head_dim": "D", "compile_s": "compile s", "compile_cpu_s": "cpu s", "spill": "spill B",
            "shared": "smem B", "mma_per_tile": "mma/tile"}
    cells = [[head.get(c, c) for c in cols]]
    for r in rows:
        if not r.get("ok"):
            cells.append([str(r[c]) for c in cols[:6]] + ["FAILED: " + r.get("error", "")[:80]])
            continue
        cells.append(["*" if (c == "default" and r[c]) else ("" if c == "default" else str(r.get(c, "")))
                      for c in cols])
    width = [max(len(row[i]) for row in cells if i < len(row)) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(width[i]) for i, v in enumerate(row)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in width))
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per kernel, dtype and head dim: configurations, how many spill, and compile seconds."""
    groups: dict = {}
    for r in rows:
        g = groups.setdefault((r["kernel"], r["dtype"], r["head_dim"], r["mask"]), [0, 0, 0.0, 0, 0.0])
        g[0] += 1
        g[1] += bool(r.get("ok") and r.get("spill"))
        g[2] += r.get("compile_s") or 0.0
        g[3] += not r.get("ok")
        g[4] += r.get("compile_cpu_s") or 0.0
    out = ["kernel   dtype  D    mask    configs  spilling  failed  compile s  cpu s (sums)"]
    for (kind, dt, d, mask), (cnt, spill, secs, bad, cpu) in groups.items():
        out.append(f"{kind:<8} {dt:<6} {d:<4} {mask:<7} {cnt:<8} {spill:<9} {bad:<7} {secs:<10.1f} {cpu:.1f}")
    total = sum(r.get("compile_s") or 0.0 for r in rows)
    cpu = sum(r.get("compile_cpu_s") or 0.0 for r in rows)
    out.append(f"total: {len(rows)} kernels, {sum(bool(r.get('ok') and r.get('spill')) for r in rows)} spilling, "
               f"{sum(not r.get('ok') for r in rows)} failed, {total:.1f} s of compilation ({cpu:.1f} s CPU)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90", help="target, e.g. sm_90 (Hopper), sm_80 (Ampere)")
    p.add_argument("--head-dim", default="64,128")
    p.add_argument("--dtype", default="bf16,fp16", help="among bf16, fp16, fp32")
    p.add_argument("--mask", default="causal", help=f"among {', '.join(MASKS)}")
    p.add_argument("--which", default="tuned", choices=["default", "tuned", "all", "check"])
    p.add_argument("--cases", default="", help="DTYPE:HEAD_DIM:MASK,... instead of the product of --dtype, "
                   "--head-dim and --mask (e.g. fp32:64:causal,bf16:80:none)")
    p.add_argument("--kernels", default="", help="only these kinds (e.g. fwd,dkdv); all by default")
    p.add_argument("--n", type=int, default=4096, help="sequence length the launches are captured at (the keys)")
    p.add_argument("--q-len", type=int, default=None,
                   help="queries, if fewer than --n: the last ones, as against a KV cache (default: --n)")
    p.add_argument("--csv", help="also write the rows to this CSV file")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of the table")
    p.add_argument("--kernel-file", help="a copy of kernels/triton_attention.py to compile instead")
    a = p.parse_args(argv)

    try:
        import triton  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError as exc:
        print(f"kernel_stats: needs triton with create_function_from_signature ({exc})")
        return 3
    m = re.fullmatch(r"sm_(\d+)a?", a.arch)
    if not m:
        p.error(f"--arch must look like sm_90 (got {a.arch})")
    capability = int(m.group(1))
    api = kernel_api(load_module(a.kernel_file))
    if not hasattr(api.kernels["fwd"], "_pack_args"):
        print("kernel_stats: this triton has no JITFunction._pack_args")
        return 3
    kinds = set(filter(None, a.kernels.split(",")))
    rows = []
    t0 = time.perf_counter()
    if a.cases:
        cases = [tuple(c.split(":")) for c in a.cases.split(",")]
    else:
        cases = [(dt, d, mask) for dt in a.dtype.split(",") for d in a.head_dim.split(",") for mask in a.mask.split(",")]
    for dt, d, mask in cases:
        if mask not in MASKS or dt not in DTYPES:
            p.error(f"unknown mask {mask} or dtype {dt}")
        for row in stats(api, DTYPES[dt], int(d), mask, a.which, a.n, capability, kinds, a.q_len):
            rows.append(row)
            if a.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"  compiled {row['kernel']} {row['dtype']} D={row['head_dim']} {row['mask']} "
                      f"{row['config']}: {row.get('regs')} regs, {row.get('spill')} B spilled, "
                      f"{row.get('compile_s')} s" + ("" if row.get("ok") else " FAILED"),
                      file=sys.stderr, flush=True)
    if a.csv:
        os.makedirs(os.path.dirname(os.path.abspath(a.csv)), exist_ok=True)
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    if not a.json:
        import triton
        q_len = "" if a.q_len is None else f"Lq={a.q_len}, "
        print(f"# kernel_stats: triton {triton.__version__}, {a.arch}, --which {a.which}, N={a.n}, {q_len}"
              f"{time.perf_counter() - t0:.0f} s; * = default config (autotuning off)")
        print(_table(rows))
        print()
        print(summary(rows))
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
