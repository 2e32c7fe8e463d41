"""Result records: one JSON per run, written only when the run succeeded."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path

import torch

from ptq.errors import disk_space_for


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    from ptq import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "datasets": _version("datasets"),
        "lm_eval": _version("lm_eval") or _version("lm-eval"),
        "ptq": __version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "argv": sys.argv,
    }


def peak_memory(device: torch.device) -> dict:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024
    gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_gpu_bytes": gpu, "peak_rss_bytes": rss}


def write_json(path: Path, record: dict) -> Path:
    """Write atomically, so a crash never leaves a half-written record behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with disk_space_for(path):
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
