"""Data-parallel loops on torch.distributed: work units sharded by rank, gathered in order.

Under an initialised process group (``torchrun --nproc-per-node N ...``: gloo on CPU, NCCL
on GPU, see `init_from_env`), `map_units(fn, units)` runs ``fn`` on this rank's share of
``units`` (unit ``i`` goes to rank ``i % world_size``) and returns the results of all units,
in order, on every rank. A unit (one batch of a metric, one batch of MMBench items) is
computed exactly as a one-process run computes it and the results are combined in the same
order, so a sharded result equals the one-process result exactly. The results travel as
pickles over a gloo group (`all_gather_object`; a separate gloo group under NCCL), so they
should be small (CPU tensors, lists, dicts).

Every rank must pass the same units: their fingerprints are compared and a disagreement
raises (instead of merging halves of two different data sets). An exception on one rank
is raised on every rank, naming that rank, so no rank waits forever. Inside `local()`,
loops run unsharded on each process (e.g. a metric inside a DDP training step).

With a journal task (`mechvlm.journal`), units already done are read back instead of
recomputed, and every unit computed is appended to this rank's journal file.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

_LOCAL = contextvars.ContextVar("mechvlm_distributed_local", default=False)
_GLOO_GROUPS: dict[int, Any] = {}
_OWNED: list[bool] = []  # non-empty once `init_from_env` created the process group


def active() -> bool:
    """True inside an initialised process group of more than one process (and not in `local`)."""
    return not _LOCAL.get() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group or inside `local()`."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes the outputs."""
    return rank_world()[0] == 0


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Within this block, loops are not sharded: each process computes all its units."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def init_from_env(device: str = "cpu") -> str:
    """Join the process group ``torchrun`` / ``srun torchrun`` describe (``WORLD_SIZE`` > 1 in
    the environment): NCCL for a CUDA ``device``, gloo otherwise. Returns this rank's device:
    ``"cuda"`` becomes ``cuda:{LOCAL_RANK}``. Without ``WORLD_SIZE`` (or with an existing
    group) nothing is initialised."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        _OWNED.append(True)
    return str(dev)


def shutdown() -> None:
    """Leave the process group `init_from_env` joined (after a last barrier); a group the
    caller initialised stays."""
    if _OWNED and dist.is_initialized():
        dist.barrier(group=_object_group())
        dist.destroy_process_group()
        _GLOO_GROUPS.clear()
    _OWNED.clear()


def _object_group():
    """The group for object collectives: the default one under gloo, a gloo twin under NCCL
    (created on first use; every rank reaches it in the same order)."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _GLOO_GROUPS:
        _GLOO_GROUPS[key] = dist.new_group(backend="gloo")
    return _GLOO_GROUPS[key]


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_object_group())
    return out


def barrier() -> None:
    if active():
        dist.barrier(group=_object_group())


class RankFailed(RuntimeError):
    """Another rank raised; this one stops too."""


def _raise_if_any_failed(errors: list, own: BaseException | None) -> None:
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    if own is not None:
        raise own
    r, message = failed[0]
    raise RankFailed(f"rank {r} failed: {message}")


def run_on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only (e.g. checking and preparing an output folder); its exception
    is raised on every rank. Returns ``fn()`` on rank 0, None elsewhere."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    _raise_if_any_failed(gather_objects(None if error is None else f"{type(error).__name__}: {error}"), error)
    return result


def fingerprint_of(value) -> str:
    """A short digest of a unit's content: tensors by dtype, shape and bytes; mappings,
    sequences and scalars by their structure."""
    h = hashlib.sha256()

    def feed(v) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            h.update(b"{")
            for k in sorted(v, key=str):
                h.update(repr(k).encode())
                feed(v[k])
            h.update(b"}")
        elif isinstance(v, (list, tuple, range)):
            h.update(b"[")
            for x in v:
                feed(x)
            h.update(b"]")
        else:
            h.update(repr(v).encode())

    feed(value)
    return h.hexdigest()[:16]


def map_units(fn: Callable[[Any], Any], units: Iterable, *, fingerprint: Callable[[Any], str] = fingerprint_of,
              journal=None, progress: bool = False, desc: str = "", unit: str = "batch") -> list:
    """``[fn(u) for u in units]``, sharded over the ranks of the process group (see the
    module doc) and resumable with ``journal`` (a `mechvlm.journal.JournalTask`).

    ``fingerprint(u)`` identifies a unit's content (compared across ranks, and with the
    journal's record of the unit); it is computed only when sharding or journaling.
    """
    from tqdm.auto import tqdm

    rank, world = rank_world()
    check = world > 1 or journal is not None
    total = len(units) if isinstance(units, Sequence) else None
    mine = None if total is None else len(range(rank, total, world))
    bar = tqdm(total=mine, desc=desc, unit=unit, disable=not progress or rank != 0, leave=False)
    results: dict[int, Any] = {}
    prints: list[str] = []
    error: BaseException | None = None
    try:
        for i, u in enumerate(units):
            fp = fingerprint(u) if check else ""
            prints.append(fp)
            if i % world != rank:
                continue
            got = journal.get(i, fp) if journal is not None else None
            if got is None:
                got = fn(u)
                if journal is not None:
                    journal.put(i, fp, got)
            results[i] = got
            bar.update()
    except Exception as e:  # noqa: BLE001 - every rank learns of it below
        error = e
    finally:
        bar.close()
    if world == 1:
        if error is not None:
            raise error
        return [results[i] for i in range(len(results))]
    gathered = gather_objects((None if error is None else f"{type(error).__name__}: {error}", prints, results))
    _raise_if_any_failed([g[0] for g in gathered], error)
    for r, (_, other, _) in enumerate(gathered):
        if other != prints:
            raise ValueError(f"ranks passed different work to a sharded loop ({desc or 'map_units'}): rank {rank} "
                             f"has {len(prints)} units, rank {r} {len(other)}, or their contents differ. Every rank "
                             "must pass the same units (it takes its share itself); to compute each process's "
                             "own units, use mechvlm.distributed.local()")
    merged: dict[int, Any] = {}
    for _, _, part in gathered:
        merged.update(part)
    return [merged[i] for i in range(len(prints))]


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """SIGTERM (``kill``, SLURM's time limit, torchrun stopping the other ranks) raises
    `SystemExit` within this block, so atomic writes clean up and journals stay whole;
    the previous handler is restored after."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
