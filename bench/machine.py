"""The machine a measurement ran on (recorded with every result) and the process's peak memory."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

VERSIONS = ("sagrt", "torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "onnx", "tensorrt",
            "numpy")


def cpu_model() -> str:
    """lscpu's model name (what the results page calls the machine)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def environment(device: str | None = None) -> dict:
    """Date, machine, cores, load and package versions, recorded with every result."""
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    versions["python"] = platform.python_version()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=cpu_model(), cores=cores,
               torch_threads=torch.get_num_threads(), load_average=list(os.getloadavg()),
               platform=platform.platform(), versions=versions)
    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def reset_peak_rss() -> bool:
    """Resets the kernel's RSS high-water mark of this process to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """RSS high-water mark of this process (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024
