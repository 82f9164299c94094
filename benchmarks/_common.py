"""Shared by the benchmark scripts: machine facts and the seeded weight init."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info(device: torch.device | str = "cpu") -> dict:
    """Date, CPU/GPU, library versions and the mechvlm commit, for a results file."""
    import transformers

    device = torch.device(device)
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cores_available": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    with contextlib.suppress(Exception):
        from importlib.metadata import version
        info["transformer_lens"] = version("transformer-lens")
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "mechvlm"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["mechvlm_git"] = rev + ("+dirty" if dirty else "")
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def init_weights_(model: torch.nn.Module, seed: int) -> None:
    """Seeded, explicit init: every weight / bias ~ N(0, 0.02); 1-D ``*.weight`` (norms) = 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            if p.ndim == 1 and name.endswith("weight"):
                p.fill_(1.0)
            else:  # drawn in fp32 then cast: the same weights whatever the dtype
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=g))
