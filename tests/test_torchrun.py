"""`ctxbench sweep --impls ring` under torchrun: 2 ranks on this CPU (gloo), launched by the test.

Rank 0 writes one row per cell with the world size, every rank's peak memory and the share
of time spent waiting for communication; the output is checked against the float64 reference
inside the sweep (err_rel_l2). A bad command line ends every rank with exit status 2.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from sweep_helpers import rows_by_cell


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], cwd: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "ctxbench"] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.ci
def test_ring_sweep_under_torchrun(tmp_path):
    for run, extra in (("causal", ["--mask", "causal"]), ("window", ["--window", "24"])):
        out = torchrun(["sweep", "--impls", "ring", "--lengths", "37,101,512", "--heads", "4", "--kv-heads", "2",
                        "--head-dim", "32", "--rep-ms", "20", "--timeout", "60", "--ppl-max-len", "0",
                        "--out", str(tmp_path), "--run-id", run] + extra, cwd=str(tmp_path))
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        cells = rows_by_cell(os.path.join(str(tmp_path), run))
        assert set(cells) == {("ring", 37), ("ring", 101), ("ring", 512)}
        for (_, n), row in cells.items():
            assert row["status"] == "ok", row["message"]
            assert row["world_size"] == "2"
            per_rank = json.loads(row["peak_mem_rank_bytes"])
            assert len(per_rank) == 2 and int(row["peak_mem_bytes"]) == max(per_rank)
            assert 0.0 <= float(row["comm_fraction"]) <= 1.0
            assert float(row["err_rel_l2"]) < 1e-4 and int(row["err_rows"]) == min(n, 256)
            assert float(row["latency_ms"]) > 0
        assert int(cells[("ring", 512)]["peak_mem_bytes"]) > 0
        # every rank kept its own worker log
        logs = os.listdir(os.path.join(str(tmp_path), run, "logs"))
        assert "ring.log" in logs and "ring.rank1.log" in logs


def test_non_distributed_impl_under_torchrun_is_refused(tmp_path):
    out = torchrun(["sweep", "--impls", "sdpa", "--lengths", "64", "--ppl-max-len", "0", "--out", str(tmp_path)],
                   cwd=str(tmp_path), timeout=120)
    assert out.returncode != 0  # torchrun's own status (it reports the ranks' exit status 2)
    assert out.stderr.count("only distributed implementations run") == 1  # said once, by rank 0
    # the ranks end cleanly (torchrun itself still prints its ChildFailedError traceback)
    assert "[rank0]: Traceback" not in out.stderr and "[rank1]: Traceback" not in out.stderr
    assert "exitcode  : 2" in out.stderr
