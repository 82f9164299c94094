"""Shared by the benchmark scripts: machine facts, the seeded weight init, interleaved
timing with paired ratios, and the extra peak memory of one call."""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import platform
import random
import re
import statistics
import subprocess
import time
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


# ------------------------------------------------------------------------------ timing --
def sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(contenders: dict, reps: int, warmup: int, device: torch.device, seed: int = 0,
                     log=print, collect: bool = True) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process-CPU ms per call of ``contenders`` (``{key: (label, fn)}``),
    ``reps`` rounds, each in a new (seeded) random order: no contender is always first, nor
    always preceded by the same one. ``collect``: a full ``gc.collect()`` before each call
    (untimed; it can take a good fraction of a second with large libraries loaded)."""
    keys = list(contenders)
    wall = {k: [] for k in keys}
    cpu = {k: [] for k in keys}
    rng = random.Random(seed)
    for r in range(-warmup, reps):
        order = rng.sample(keys, len(keys))
        t_round = time.perf_counter()
        for k in order:
            if collect:
                gc.collect()
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            out = contenders[k][1]()
            sync(device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            del out
            if r >= 0:
                wall[k].append(dt * 1e3)
                cpu[k].append(dc * 1e3)
        label = "warmup" if r < 0 else f"round {r + 1}/{reps}"
        log(f"  {label}: {time.perf_counter() - t_round:.1f}s", flush=True)
    return wall, cpu


def paired_ratios(ta: list[float], tb: list[float]) -> dict:
    """``a / b`` from samples taken in the same rounds: ratio of medians, of mins, and the
    median (and range) of the per-round ratios, the estimate least moved by a drifting load."""
    per_round = [x / y for x, y in zip(ta, tb)]
    return {"ratio_of_medians": statistics.median(ta) / statistics.median(tb),
            "ratio_of_mins": min(ta) / min(tb),
            "median_of_paired_ratios": statistics.median(per_round),
            "paired_ratio_min": min(per_round), "paired_ratio_max": max(per_round)}


# ------------------------------------------------------------------------------ memory --
#: environment for a memory-measuring subprocess: glibc serves allocations >= 128 KiB with
#: mmap and returns them to the OS when freed, so RSS falls back after each call
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def rss_kb(field: str = "VmRSS") -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in KiB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def extra_peak(fn, device: torch.device | str = "cpu") -> dict:
    """Run ``fn()`` once and return its extra peak memory over what was held before it.

    CPU: the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the RSS
    right before the call; CUDA: the allocator's peak minus the memory allocated before.
    Run it in a fresh process that holds only what ``fn`` needs (see ``MALLOC_ENV``)."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return {"extra_peak_mib": (torch.cuda.max_memory_allocated(device) - before) / 2**20,
                "base_mib": before / 2**20, "kind": "cuda allocator"}
    before = rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    peak = rss_kb("VmHWM")
    return {"extra_peak_mib": (peak - before) / 1024, "base_mib": before / 1024, "kind": "rss"}


# ----------------------------------------------------------------------- RESULTS.md --
def _section_markers(name: str) -> tuple[str, str]:
    return f"<!-- section:{name} -->", f"<!-- /section:{name} -->"


def write_results_section(path: str | Path, name: str, markdown: str) -> None:
    """Put ``markdown`` into ``path`` (e.g. RESULTS.md) between the markers of section
    ``name``, replacing that section if present and appending it otherwise; the rest of the
    file is kept. Written atomically."""
    from mechvlm.fileio import write_text

    path = Path(path)
    start, end = _section_markers(name)
    text = path.read_text() if path.is_file() else ""
    block = f"{start}\n{markdown.strip()}\n{end}\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block
    write_text(path, text)


def kept_sections(path: str | Path) -> str:
    """The marked sections (`write_results_section`) of an existing file, to carry over when
    a script rewrites the file's own part."""
    path = Path(path)
    if not path.is_file():
        return ""
    text, out = path.read_text(), []
    for line in text.splitlines():
        if line.startswith("<!-- section:") and line.endswith(" -->"):
            name = line[len("<!-- section:"):-len(" -->")]
            start, end = _section_markers(name)
            if end in text:
                out.append(start + text.split(start, 1)[1].split(end, 1)[0] + end + "\n")
    return ("\n\n" + "\n".join(out)) if out else ""


def save_result(path: str | Path, result: dict, write: bool = True) -> None:
    """The results JSON of a benchmark, written atomically (nothing when ``write`` is False);
    called after each finished part so that a later failure keeps what was measured."""
    if write:
        from mechvlm.fileio import write_json

        write_json(path, result)


def time_before_after(fns: dict, reps: int, device, same) -> dict:
    """Time ``{"report_before": fn, "report_after": fn}`` in ``reps`` interleaved rounds after
    one untimed call each, whose outputs ``same(before, after)`` compares. Returns the
    ``report`` entry of a benchmark result: wall / CPU samples, ``same_table`` and the paired
    after / before ratios."""
    outs = {k: fn() for k, fn in fns.items()}
    same_table = same(outs["report_before"], outs["report_after"])
    del outs
    wall, cpu = time_interleaved({k: (k, fn) for k, fn in fns.items()}, reps, 0, device)
    return {"wall_ms": wall, "cpu_ms": cpu, "same_table": same_table,
            "ratio": paired_ratios(wall["report_after"], wall["report_before"]),
            "cpu_ratio": paired_ratios(cpu["report_after"], cpu["report_before"])}
