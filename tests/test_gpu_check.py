"""The prepared GPU check runs its code paths on the CPU (--dry-run), end to end."""

from __future__ import annotations

import os
import subprocess

import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.ci
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The estimate comes first, then one line per stage with its time, in priority order.
    lines = (out / "stages.txt").read_text().splitlines()
    assert lines[0].startswith("gpu_check estimate: compiling the ") and "kernels it launches" in lines[0], lines
    stages = [ln.split(":")[0].removeprefix("== ") for ln in lines[1:-1]]
    assert stages == ["causal-fwd-long", "decode", "decode-paged", "check1", "check2", "check3", "check4", "causal-fwdbwd-long",
                      "engines-check", "engines-fwd-long", "window-fwd-long", "window-fwdbwd-long", "causal-fwdbwd-long-fuseddq", "causal-fwd-short",
                      "math"], lines
    assert all(" s since start" in ln for ln in lines[1:-1]), lines
    # The last dry-run stage cannot finish within its budget: it is stopped, and says so,
    # and the cells it finished are in its folder like every other stage's.
    assert "STOPPED at its budget" in lines[-2] and "STOPPED" not in "".join(lines[1:-2]), lines
    for stage in stages:
        assert (out / f"{stage}.log").exists()
    df = pd.read_csv(out / "all_results.csv", keep_default_na=False)
    checks = df[df["run"].str.startswith("check")]
    # Every implementation that ran a check agreed with the float64 reference.
    assert set(checks["status"]) <= {"ok", "unsupported"}, checks[["impl", "status", "message"]]
    assert {"triton", "chunked", "naive", "sdpa", "sliding_window"} <= set(checks[checks["status"] == "ok"]["impl"])
    # flex, flashinfer and xformers have stages of their own: on the CPU flashinfer and xformers are
    # unsupported (CUDA only) and flex runs forward only, compiled
    engines = df[df["run"].str.startswith("engines")]
    assert set(engines[engines["impl"].isin(["flashinfer", "xformers"])]["status"]) == {"unsupported"}
    flex = engines[engines["impl"] == "flex"].set_index("mode")
    assert flex.loc["fwd+bwd", "status"] == "unsupported" and "forward-only" in flex.loc["fwd+bwd", "message"]
    assert set(engines[(engines["impl"] == "flex") & (engines["mode"] == "fwd")]["status"]) == {"ok"}
    assert "flex" not in set(checks["impl"])
    # decode: one query token against a ragged cache, contiguous and paged, every implementation ok,
    # with GB/s and the share of the bandwidth; paged and contiguous the same lengths
    dec = df[df["run"].str.startswith("decode")]
    assert set(dec["status"]) == {"ok"}, dec[["impl", "status", "message"]]
    # (read with keep_default_na=False: a column that is empty for the prefill stages holds text)
    assert set(dec["impl"]) == {"triton_decode", "sdpa", "chunked"} and {float(x) for x in dec["query_len"]} == {1.0}
    assert (dec["gbps"].astype(float) > 0).all() and (dec["bw_fraction"].astype(float) > 0).all()
    assert {float(x) for x in dec[dec["run"] == "decode-paged"]["page_size"]} == {16.0}
    assert "## decode" in proc.stdout
    perf = df[~df["run"].str.startswith(("check", "engines", "decode"))]
    assert set(perf["mode"]) == {"fwd", "fwd+bwd"} and set(perf["mask"]) == {"causal", "window"}
    assert (perf[perf["impl"] == "triton"]["status"] == "ok").all()
    assert (perf[perf["impl"] == "triton_fuseddq"]["status"] == "ok").all() and "triton_fuseddq" in set(perf["impl"])
    assert '"interpreted": true' in perf[perf["impl"] == "triton"]["impl_info"].iloc[0]
    assert (out / "causal-fwd-long" / "results.csv").exists()
    for name in ("perf_tflops.png", "perf_latency.png", "perf_tflops.svg"):
        assert (out / name).stat().st_size > 1000
    # The short table comes last, with the goals; nothing is packed into an archive.
    assert "## goals" in proc.stdout and "TFLOP/s" in proc.stdout
    assert not list(out.glob("*.tgz")) and not list(out.glob("*.tar*"))
