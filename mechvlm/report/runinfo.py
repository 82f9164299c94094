"""What the report's footer says about the run: versions, device, dtype, wall time, and
the command line that reproduces it."""

from __future__ import annotations

import platform
import shlex
from importlib import metadata

import torch

PACKAGES = ("mechvlm", "torch", "transformers", "transformer-lens", "circuitsvis", "matplotlib")


def versions() -> dict[str, str]:
    """Installed versions of Python and the packages the report depends on."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_name(device: str) -> str:
    """A readable name of ``device``: the GPU's model, or the CPU's architecture."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.machine()}, {torch.get_num_threads()} torch threads)"


def reproduce_command(cfg) -> str:
    """The ``mechvlm report`` command line that recomputes this run (defaults left out)."""
    from .run import ReportConfig

    default = ReportConfig()
    args = ["mechvlm", "report"]
    for m in ([cfg.model] if cfg.model else []) + list(cfg.models):
        args += ["--model", str(m)]
    for flag, name in (("--mmbench", "mmbench"), ("--limit", "limit"), ("--device", "device"),
                       ("--device-map", "device_map"),
                       ("--dtype", "dtype"), ("--batch-size", "batch_size"),
                       ("--max-new-tokens", "max_new_tokens"), ("--examples", "examples"),
                       ("--out", "out")):
        value = getattr(cfg, name)
        if value is not None and value != getattr(default, name):
            args += [flag, str(value)]
    if tuple(cfg.conditions) != tuple(default.conditions):
        args += ["--conditions", ",".join(cfg.conditions)]
    if cfg.analyses:
        args += ["--analyses", ",".join(cfg.analyses)]
    return shlex.join(args)


def run_info(cfg, *, wall_s: float, runs=()) -> dict:
    """The footer's content (also ``results["run"]``)."""
    return {"versions": versions(), "device": device_name(cfg.device), "dtype": cfg.dtype,
            "wall_s": wall_s, "wall_s_per_model": {r.label: r.wall_s for r in runs},
            "command": reproduce_command(cfg),
            "platform": platform.platform()}
