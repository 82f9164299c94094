"""Plumbing shared by the metrics: batches, progress bars, role specs, composed hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from jaxtyping import Bool
from torch import Tensor

from mechvlm.hook_points import check_hook_list
from mechvlm.roles import TokenRoles

Batch = Mapping[str, Any]
Hooks = list[tuple[Any, Callable]]
#: Interventions to compose with a metric: a hook list ``[(name_or_filter, fn), ...]`` used
#: for every batch, or a callable ``fwd_hooks(batch, roles) -> hook list`` called once per
#: batch (needed when the hooks depend on the batch, e.g. ``knockout(roles, ...)``).
FwdHooks = Sequence[tuple[Any, Callable]] | Callable[[Batch, TokenRoles], Sequence] | None
#: A token selection: a role name, a bool ``[batch, pos]`` mask, a list of them (union), or a
#: callable ``roles -> any of these`` (for a selection that depends on the batch).
Selection = str | Tensor | Iterable | Callable[[TokenRoles], Any]


def iter_batches(batches: Batch | Iterable[Batch], progress: bool, desc: str):
    """One batch dict or an iterable of them, wrapped in a tqdm bar (``progress=False``: none)."""
    from tqdm.auto import tqdm

    if isinstance(batches, Mapping):
        batches = [batches]
    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, total=total, desc=desc, disable=not progress, unit="batch", leave=False)


def map_batches(fn: Callable[[Batch], Any], batches: Batch | Iterable[Batch], *, progress: bool, desc: str,
                journal=None) -> list:
    """``[fn(batch) for batch in batches]`` (one batch dict or an iterable of them), with a
    progress bar; under a process group sharded over the ranks and gathered in order on
    every rank, resumable with ``journal`` (`mechvlm.distributed.map_units`). ``fn``
    returns small CPU results."""
    from mechvlm.distributed import map_units

    if isinstance(batches, Mapping):
        batches = [batches]
    return map_units(fn, batches, journal=journal, progress=progress, desc=desc)


def select_layers(model, layers: Iterable[int] | int | None) -> list[int]:
    """Sorted unique layer indices (None: all layers); negative indices count from the end."""
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = set()
    for l in layers:
        l = int(l)
        if not -n <= l < n:
            raise ValueError(f"layer {l} does not exist (the model has {n} layers)")
        out.add(l % n)
    if not out:
        raise ValueError("an empty layer selection")
    return sorted(out)


def select_heads(model, heads: Iterable[int] | int | None) -> list[int]:
    n = model.cfg.n_heads
    if heads is None:
        return list(range(n))
    if isinstance(heads, int):
        heads = [heads]
    out = sorted({int(h) for h in heads})
    if not out:
        raise ValueError("an empty head selection")
    if out[0] < 0 or out[-1] >= n:
        raise ValueError(f"heads {out} out of range (the model has {n} heads)")
    return out


def selection_label(spec: Selection, i: int = 0) -> str:
    """A readable name for a selection: the role name, ``"a+b"`` for lists, else ``sel{i}``."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Tensor):
        return f"mask{i}"
    if callable(spec):
        return getattr(spec, "__name__", f"sel{i}")
    return "+".join(selection_label(s, i) for s in spec)


def resolve(roles: TokenRoles, spec: Selection) -> Bool[Tensor, "batch pos"]:
    """The ``[batch, pos]`` bool mask of a selection, on the roles' device."""
    if callable(spec) and not isinstance(spec, Tensor):
        spec = spec(roles)
    return roles.mask(spec)


def user_hooks(fwd_hooks: FwdHooks, batch: Batch, roles: TokenRoles) -> Hooks:
    """The hook list of ``fwd_hooks`` for this batch (a list, or a callable's result); a
    `TypeError` naming the expected form for anything else (a dict, one bare pair)."""
    if fwd_hooks is None:
        return []
    if callable(fwd_hooks):
        return check_hook_list(fwd_hooks(batch, roles), "fwd_hooks(batch, roles)")
    return check_hook_list(fwd_hooks, "fwd_hooks")


def hook_matches(name_or_filter: Any, name: str) -> bool:
    if isinstance(name_or_filter, str):
        return name_or_filter == name
    return bool(name_or_filter(name))


def run_forward(model, batch: Batch, hooks: Hooks) -> None:
    """One forward without the unembedding; ``hooks`` fire in list order at each point."""
    model.run_with_hooks(**batch, fwd_hooks=hooks, return_type=None)


def chunk_rows(model, n_tokens: int, row_elems: int) -> int:
    """How many fp32 rows of ``row_elems`` values to hold at once.

    Budget: the ``[tokens, d_mlp]`` MLP activation the forward materialises anyway, so a
    metric's temporaries stay within the footprint of a plain forward.
    """
    budget = n_tokens * model.cfg.d_mlp * model.dtype.itemsize
    return max(1, budget // (4 * max(1, row_elems)))


def frame(rows: list[dict]):
    """A pandas DataFrame of ``rows`` (pandas is optional: ImportError with a hint)."""
    try:
        import pandas as pd
    except ImportError as e:  # pragma: no cover
        raise ImportError("to_frame() needs pandas; use to_dict() without it") from e
    return pd.DataFrame(rows)


def long_rows(tensor: Tensor, axes: Sequence[tuple[str, Sequence]], value: str) -> list[dict]:
    """Flatten ``tensor`` into long-format rows, one per entry, labelled by ``axes``."""
    import itertools

    flat = tensor.reshape(-1).tolist()
    return [dict(zip([a for a, _ in axes], labels), **{value: v})
            for labels, v in zip(itertools.product(*[list(l) for _, l in axes]), flat)]
