"""The prepared GPU check runs its code paths on the CPU (--dry-run), end to end."""

from __future__ import annotations

import os
import subprocess

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    df = pd.read_csv(out / "all_results.csv", keep_default_na=False)
    checks = df[df["run"].str.startswith("check")]
    # Every implementation that ran a check agreed with the float64 reference.
    assert set(checks["status"]) <= {"ok", "unsupported"}, checks[["impl", "status", "message"]]
    assert {"triton", "chunked", "naive", "sdpa", "sliding_window"} <= set(checks[checks["status"] == "ok"]["impl"])
    perf = df[df["run"].str.startswith("perf")]
    assert set(perf["mode"]) == {"fwd", "fwd+bwd"} and set(perf["mask"]) == {"causal", "window"}
    assert (perf[perf["impl"] == "triton"]["status"] == "ok").all()
    assert '"interpreted": true' in perf[perf["impl"] == "triton"]["impl_info"].iloc[0]
    for name in ("perf_tflops.png", "perf_latency.png", "perf_tflops.svg"):
        assert (out / name).stat().st_size > 1000
    # The short table comes last, with the goals.
    assert "## goals" in proc.stdout and "TFLOP/s" in proc.stdout
