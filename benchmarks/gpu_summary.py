"""Summary of a GPU check folder (benchmarks/gpu_check.sh): plots, one combined CSV, a short table.

    python benchmarks/gpu_summary.py OUTDIR

Reads every OUTDIR/*/results.csv (runs named check* are the correctness checks, every other
run a performance stage; a stage stopped at its budget simply has fewer rows), its kernel rows
only (column `kind`; `task` in files written before kinds had that name; neither in the first
ones, all kernel rows); writes
OUTDIR/all_results.csv, OUTDIR/perf_tflops.png|svg and OUTDIR/perf_latency.png|svg; prints the
correctness verdicts, a TFLOP/s table per mask and mode, and the issue's performance goals with
the measured ratio for each.
"""

from __future__ import annotations

import glob
import os
import sys

import pandas as pd


def kernel_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The kernel rows of one results.csv: column `kind`, or `task` as files written before kinds
    called it; a file with neither (or an empty cell) is of kernel rows, the first ctxbench's only kind."""
    df = df.rename(columns={"task": "kind"}) if "kind" not in df.columns else df.drop(columns="task", errors="ignore")
    kind = df["kind"].fillna("kernel") if "kind" in df.columns else pd.Series("kernel", index=df.index)
    return df[kind == "kernel"].assign(kind="kernel")


def load(out: str) -> pd.DataFrame:
    frames = []
    for path in sorted(glob.glob(os.path.join(out, "*", "results.csv"))):
        df = kernel_rows(pd.read_csv(path, keep_default_na=False, na_values=[""]))
        run = os.path.basename(os.path.dirname(path))
        df["run"] = run
        if run.endswith("-fuseddq"):
            # gpu_check.sh's stage with CTXBENCH_TRITON_FUSED_DQ=1: triton's other backward
            df["impl"] = df["impl"].replace({"triton": "triton_fuseddq"})
        frames.append(df)
    if not frames:
        sys.exit(f"gpu_summary: no results.csv under {out}")
    return pd.concat(frames, ignore_index=True)


def checks(df: pd.DataFrame) -> None:
    chk = df[df["run"].str.startswith("check")]
    print("\n## correctness (status per implementation, over the check shapes)")
    if chk.empty:
        print("(no check ran)")
        return
    table = chk.pivot_table(index="impl", columns="status", values="n", aggfunc="count", fill_value=0)
    print(table.to_string())
    bad = chk[~chk["status"].isin(["ok", "unsupported", "skipped"])]
    for _, r in bad.iterrows():
        print(f"  NOT OK: {r['run']} {r['impl']} N={r['n']} {r['dtype']} {r['mask']} -> {r['status']}: {r['message']}")
    worst = chk[chk["status"].isin(["ok", "wrong"])].groupby(["impl", "dtype"])[["err_rel_l2", "grad_err_rel_l2"]].max()
    print("\nworst relative L2 error (output, gradients) per implementation and dtype:")
    print(worst.to_string(float_format=lambda x: f"{x:.2e}"))


def decode(df: pd.DataFrame) -> None:
    """The decode stages (one query token against a ragged KV cache): GB/s, the share of the
    device bandwidth, and paged against contiguous, per implementation and length."""
    d = df[df["run"].str.startswith("decode")]
    if d.empty:
        return
    print("\n## decode, 1 query token, ragged batch: GB/s (share of the device bandwidth)")
    bw = d["device_bw_gbps"].dropna()
    if not bw.empty:
        print(f"device bandwidth {bw.iloc[0]:.0f} GB/s ({d['device_bw_source'].dropna().iloc[0]}); "
              f"measured copy {d['device_bw_probe_gbps'].dropna().iloc[0]:.0f} GB/s")
    shown = d.assign(layout=d["run"].map(lambda r: "paged" if r.endswith("paged") else "contiguous"),
                     v=d.apply(lambda r: f"{r['gbps']:.0f} ({100 * r['bw_fraction']:.0f}%)"
                               if r["status"] == "ok" and pd.notna(r.get("bw_fraction")) else r["status"], axis=1))
    print(shown.pivot_table(index=["impl", "layout"], columns="n", values="v", aggfunc="last").to_string())
    ok = d[d["status"] == "ok"].assign(paged=d["run"].str.endswith("paged"))
    for n in sorted(ok["n"].unique()):
        for impl in ("triton_decode",):
            a = ok[(ok["impl"] == impl) & (ok["n"] == n) & ~ok["paged"]]
            b = ok[(ok["impl"] == impl) & (ok["n"] == n) & ok["paged"]]
            if not a.empty and pd.notna(a["bw_fraction"].iloc[0]):
                line = (f"{impl} N={n}: {a['gbps'].iloc[0]:.0f} GB/s = {100 * a['bw_fraction'].iloc[0]:.0f}% of the "
                        "bandwidth (goal at 128K >= 70%)")
                if not b.empty:
                    line += (f"; paged {b['latency_ms'].iloc[0] * 1e3:.0f} us vs contiguous "
                             f"{a['latency_ms'].iloc[0] * 1e3:.0f} us -> {a['latency_ms'].iloc[0] / b['latency_ms'].iloc[0]:.2f}x "
                             "(goal >= 0.90)")
                print(line)


def perf(df: pd.DataFrame) -> pd.DataFrame:
    p = df[~df["run"].str.startswith("check") & ~df["run"].str.startswith("decode")].copy()
    # one row per (impl, mask, mode, n): the latest, should stages overlap
    p = p.drop_duplicates(subset=["impl", "mask", "mode", "n"], keep="last")
    for (mask, mode), g in p.groupby(["mask", "mode"]):
        print(f"\n## TFLOP/s, {mask}{' W=' + str(int(g['window'].iloc[0])) if mask == 'window' else ''}, {mode}")
        shown = g.assign(v=g.apply(lambda r: f"{r['tflops']:.3g}" if r["status"] == "ok" else r["status"], axis=1))
        print(shown.pivot(index="impl", columns="n", values="v").to_string())
    return p


def goals(p: pd.DataFrame) -> None:
    print("\n## goals (H200, bf16, D=128)")
    ok = p[p["status"] == "ok"].set_index(["impl", "mask", "mode", "n"])["latency_ms"]

    def lat(impl: str, mask: str, mode: str, n: int) -> float | None:
        return ok.get((impl, mask, mode, n))

    for n in sorted(p["n"].unique()):
        if n < 8192:
            continue
        t, f, c = lat("triton", "causal", "fwd", n), lat("sdpa_flash", "causal", "fwd", n), lat("sdpa_cudnn", "causal", "fwd", n)
        if t and f:
            line = f"causal fwd N={n}: triton {t:.3f} ms, sdpa_flash {f:.3f} ms -> {f / t:.2f}x flash's speed (goal >= 1.00)"
            if c:
                line += f"; cudnn {c:.3f} ms -> {c / t:.2f}x cudnn's (stretch >= 0.90)"
            print(line)
    for n in sorted(p["n"].unique()):
        t, f = lat("triton", "causal", "fwd+bwd", n), lat("triton_fuseddq", "causal", "fwd+bwd", n)
        if t and f and n >= 8192:
            print(f"causal fwd+bwd N={n}: triton (default backward) {t:.3f} ms, with dQ fused into dK/dV "
                  f"{f:.3f} ms -> the fused backward is {t / f:.2f}x as fast")
    for n in sorted(p["n"].unique()):
        f = lat("sdpa_flash", "causal", "fwd", n)
        others = [(e, lat(e, "causal", "fwd", n)) for e in ("flex", "flashinfer", "xformers")]
        if f and n >= 8192 and any(x for _, x in others):
            print(f"causal fwd N={n}, other engines against sdpa_flash ({f:.3f} ms): "
                  + ", ".join(f"{e} {x:.3f} ms ({f / x:.2f}x its speed)" for e, x in others if x))
    nmax = int(p["n"].max())
    for mode in ("fwd", "fwd+bwd"):
        causal, window = lat("triton", "causal", mode, nmax), lat("triton", "window", mode, nmax)
        if causal and window:
            print(f"triton window vs causal, {mode}, N={nmax}: {causal / window:.2f}x faster (goal >= 3.5)")


def plots(p: pd.DataFrame, out: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.ticker
        import seaborn as sns
    except ImportError as exc:
        print(f"(no plots: {exc})")
        return
    ok = p[p["status"] == "ok"].copy()
    if ok.empty:
        return
    ok["setting"] = ok["mask"] + " " + ok["mode"]
    for metric, label, name in (("tflops", "TFLOP/s", "perf_tflops"), ("latency_ms", "latency (ms, median)", "perf_latency")):
        g = sns.relplot(data=ok, x="n", y=metric, hue="impl", col="setting", kind="line", marker="o",
                        col_wrap=2, height=3.4, aspect=1.3, facet_kws={"sharey": False})
        g.set(xscale="log", xlabel="context length N (tokens)", ylabel=label)
        if metric == "latency_ms":
            g.set(yscale="log")
        for ax in g.axes.flat:
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xticks(sorted(ok["n"].unique()))
            ax.set_xticklabels([f"{n // 1024}K" if n >= 1024 else str(n) for n in sorted(ok["n"].unique())])
        g.figure.suptitle(f"{ok['device_name'].iloc[0]}: {label} vs context length", y=1.02)
        for ext in ("png", "svg"):
            g.savefig(os.path.join(out, f"{name}.{ext}"), bbox_inches="tight")
    print(f"\nplots: {out}/perf_tflops.png, {out}/perf_latency.png")


def main() -> None:
    out = sys.argv[1]
    df = load(out)
    df.to_csv(os.path.join(out, "all_results.csv"), index=False)
    print(f"# GPU check: {df['device_name'].iloc[0]}, torch {df['torch_version'].iloc[0]}, "
          f"triton {df['triton_version'].iloc[0]}, commit {df['git_commit'].iloc[0]}")
    checks(df)
    decode(df)
    p = perf(df)
    plots(p, out)
    goals(p)


if __name__ == "__main__":
    main()
