"""The environment a sweep ran in: device, library versions, git commit (CSV columns)."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version

import ctxbench

ENV_FIELDS = ("device_name", "torch_version", "triton_version", "cuda_version", "ctxbench_version",
              "git_commit", "python_version", "hostname", "cpu_count", "torch_threads")


def _pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return ""


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """Commit of the ctxbench source tree, with '-dirty' when it has uncommitted changes; '' if not a checkout."""
    src = os.path.dirname(os.path.dirname(os.path.abspath(ctxbench.__file__)))
    try:
        commit = subprocess.run(["git", "-C", src, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
        if not commit:
            return ""
        dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: str) -> dict[str, str]:
    """Environment columns for rows measured on `device` ('cpu' or 'cuda')."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = cpu_name()
    return {
        "device_name": name,
        "torch_version": torch.__version__,
        "triton_version": _pkg_version("triton"),
        "cuda_version": torch.version.cuda or "",
        "ctxbench_version": ctxbench.__version__,
        "git_commit": git_commit(),
        "python_version": platform.python_version(),
        "hostname": socket.gethostname(),
        "cpu_count": str(os.cpu_count() or ""),
        "torch_threads": str(torch.get_num_threads()),
    }
