"""The device's memory bandwidth: the denominator of bw_fraction (decode is memory-bound).

    python -m ctxbench.engine.bandwidth [cpu|cuda]     (prints the probe's JSON)

CUDA: the datasheet HBM peak of the GPU when ctxbench knows it (H200 4.8 TB/s, H100 SXM
3.35 TB/s; the same convention as the TFLOP/s peaks of ctxbench.core.flops), and a measured
device-to-device copy beside it (bytes read plus bytes written, per second), which is what
a kernel can actually reach; without a datasheet entry the copy is the denominator.
CPU: no datasheet figure means anything on a shared or virtual machine, so the denominator is
measured: the read bandwidth of summing a tensor far larger than the caches, with the thread
count the workers use (the same environment, so torch picks the same number of threads).

The CPU estimator is the best pass, as STREAM reports its best time: interference (another
process, a descheduled thread) only ever slows a pass, so the fastest pass of many is the
figure that moves least, and it is what a kernel can at best reach. One probe is CPU_PROBE_REPEATS
passes; PROBES probes, with pauses between them, give the denominator (the best of all) and the
spread (the slowest and fastest probe's best), both recorded with the run. A single median of 7
passes read 25.9 and 32.5 GB/s minutes apart on the 2-core CI machine.

The sweep runs the probe once per run (ctxbench.engine.sweep) and keeps it in the run's Settings, so
every row of a run, resumed or not, is divided by the same figure.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

# Datasheet HBM bandwidth (GB/s) by device-name fragment, most specific first.
HBM_PEAK_GBPS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),   # SXM (HBM3)
    ("A100-PCIE-40GB", 1555.0),
    ("A100", 2039.0),   # 80 GB SXM
    ("L40S", 864.0),
    ("A10G", 600.0),
)
# Bytes the CPU read probe sums: many times any last-level cache, small enough to run in
# well under a second (512 MiB read at 26 GB/s here: 20 ms per pass).
CPU_PROBE_BYTES = 512 * 2**20
CUDA_PROBE_BYTES = 2 * 2**30
PROBE_REPEATS = 7
# CPU probes per run, of CPU_PROBE_REPEATS passes each, and the pause between them (s): 15 passes
# in under a second, where one probe of 7 passes took 0.2 s (every sweep pays it).
PROBES = 5
CPU_PROBE_REPEATS = 3
PROBE_PAUSE_S = 0.05


def peak_hbm_gbps(device_name: str) -> float | None:
    """Datasheet memory bandwidth (GB/s) of a CUDA device name, or None when unknown."""
    for fragment, gbps in HBM_PEAK_GBPS:
        if fragment in device_name:
            return gbps
    return None


def cpu_read_gbps(nbytes: int = CPU_PROBE_BYTES, repeats: int = CPU_PROBE_REPEATS, probes: int = 1,
                  pause_s: float = 0.0) -> list[float]:
    """Read bandwidth (GB/s, 1e9 bytes) of summing an fp32 tensor of `nbytes` bytes, with torch's
    current thread count: per probe, the best of `repeats` passes (after one warm-up pass), for
    `probes` probes `pause_s` seconds apart."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32)  # written once: its pages are resident
    x.sum()
    bests = []
    for i in range(probes):
        if i:
            time.sleep(pause_s)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            x.sum()
            times.append(time.perf_counter() - t0)
        bests.append(x.numel() * 4 / min(times) / 1e9)
    return bests


def cuda_copy_gbps(nbytes: int = CUDA_PROBE_BYTES, repeats: int = PROBE_REPEATS) -> float:
    """Device-to-device copy bandwidth (GB/s: bytes read + bytes written per second), the median
    of `repeats` copies of `nbytes` bytes timed with CUDA events."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return 2 * nbytes / statistics.median(times) / 1e9


def probe(device: str) -> dict[str, Any]:
    """{bandwidth_gbps (the denominator of bw_fraction), bandwidth_probe_gbps (measured here),
    bandwidth_source (where the denominator comes from)} for `device`, all GB/s."""
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
        measured = cuda_copy_gbps()
        peak = peak_hbm_gbps(name)
        if peak is None:
            return {"bandwidth_gbps": measured, "bandwidth_probe_gbps": measured,
                    "bandwidth_source": f"measured device copy ({name} has no datasheet entry)"}
        return {"bandwidth_gbps": peak, "bandwidth_probe_gbps": measured,
                "bandwidth_source": f"datasheet HBM peak of {name}"}
    import torch

    bests = cpu_read_gbps(probes=PROBES, pause_s=PROBE_PAUSE_S)
    best = max(bests)
    return {"bandwidth_gbps": best, "bandwidth_probe_gbps": statistics.median(bests),
            "bandwidth_source": f"best pass of {PROBES} probes x {CPU_PROBE_REPEATS} reads of {CPU_PROBE_BYTES // 2**20} "
                                f"MiB, {torch.get_num_threads()} threads (probes' best {min(bests):.1f}-{best:.1f} GB/s, "
                                f"median {statistics.median(bests):.1f})"}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    print(json.dumps(probe(args[0] if args else "cpu")))


if __name__ == "__main__":
    main()
