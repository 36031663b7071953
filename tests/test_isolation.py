"""The harness survives implementations that raise, abort, exhaust memory, hang or lie."""

from __future__ import annotations

import math

from sweep_helpers import MISBEHAVING, only_run_dir, rows_by_cell, run_cli


def test_each_failure_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    impls = ["raises", "aborts", "hogs_memory", "sleeps", "wrong"]
    args = ["sweep", "--device", "cpu", "--lengths", "32,64,128", "--heads", "4", "--kv-heads", "2",
            "--head-dim", "32", "--impls", "sdpa", "--timeout", "10", "--memory-limit", "2",
            "--rep-ms", "20", "--ppl-max-len", "0", "--out", str(tmp_path)]
    for name in impls:
        args += ["--impl", f"{MISBEHAVING}:{name}"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    cells = rows_by_cell(only_run_dir(str(tmp_path)))
    spec = {name: f"{MISBEHAVING}:{name}" for name in impls}

    expected_at_trigger = {"raises": "error", "aborts": "error", "hogs_memory": "oom", "sleeps": "timeout",
                           "wrong": "wrong"}
    for name, status in expected_at_trigger.items():
        row = cells[(spec[name], 64)]
        assert row["status"] == status, (name, row["status"], row["message"])
        assert row["message"], f"{name}: a failure must say what happened"
        assert "\n" not in row["message"]
        # Below the trigger every implementation worked, measured like any other.
        assert cells[(spec[name], 32)]["status"] == "ok", cells[(spec[name], 32)]["message"]

    assert "deliberate failure" in cells[(spec["raises"], 64)]["message"]
    assert "SIGABRT" in cells[(spec["aborts"], 64)]["message"]
    assert float(cells[(spec["wrong"], 64)]["err_rel_l2"]) > 1e-3
    assert math.isfinite(float(cells[(spec["wrong"], 64)]["latency_ms"]))  # still timed
    # After a crash or a wrong answer the next length is attempted; after oom or timeout it is skipped.
    for name in ("raises", "aborts", "wrong"):
        assert cells[(spec[name], 128)]["status"] == "ok"
    for name in ("hogs_memory", "sleeps"):
        assert cells[(spec[name], 128)]["status"] == "skipped"
        assert "N=64" in cells[(spec[name], 128)]["message"]
    # The well-behaved implementation is unaffected by its neighbours.
    assert all(cells[("sdpa", n)]["status"] == "ok" for n in (32, 64, 128))
    # Tracebacks are kept in a log, not on the user's screen.
    assert "Traceback" not in out + err
    assert cells[(spec["raises"], 64)]["log"].endswith(".log")
