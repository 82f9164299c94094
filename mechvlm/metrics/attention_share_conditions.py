"""`attention_share` under several conditions, from one prefill per batch (issue 21).

Table 1's knockouts (text queries cut from the image or the EOI) change nothing before a
row's first text token that sees the cut keys, so the attention of the query rows there,
and the keys and values of every position there, are the same under every condition
(`mechvlm.prefix_sharing`). Per batch, `attention_share_conditions`

1. plans the shared prefix as `generate_conditions` does (`plan_conditions`: the same
   fallbacks, a wrapped ``forward``, videos, other per-token inputs, conditions that do not
   declare what they touch);
2. prefills the prefix once into a `VLMKeyValueCache`, with `QueryAttention` hooks reading
   the query rows inside it (the prefix part of Eq. 1's sum, shared by every condition);
3. runs the rest of the prompt per condition over the cache: the knockouts (and ``none``)
   side by side along the batch (`StackedKnockouts` over ``cache.select_rows``), declared
   custom conditions each over the frozen prefix cache; `QueryAttention` there reads the
   earlier keys from the cache (``kv_cache=``) and gets the rows of the new positions;
4. adds both parts: ``raw = prefix part + rest part`` (a sum over query rows).

Conditions that fall back run `attention_share`'s own forward with the condition's hooks
(over ``condition.setup(model, batch)``). Every condition's result equals
``attention_share(model, batch, fwd_hooks=condition)`` to float rounding; masses stream (no
pattern unless a hook at ``hook_pattern`` needs one: that layer reads the real pattern).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mechvlm.metrics._common import Batch, Selection, map_batches, resolve, select_layers, selection_label, user_hooks
from mechvlm.metrics.attention_rows import QueryAttention
from mechvlm.metrics.attention_share import AttentionShareResult, key_role_reduce, share_of_batch


@dataclass
class ConditionsAttentionShare:
    """`attention_share` under each condition.

    Attributes:
        results: ``{condition: AttentionShareResult}`` in the order the conditions were given.
        shared_batches: ``{condition: number of batches}`` run from the shared prefix.
        fallback: ``{condition: {reason: number of batches}}`` run on their own, and why.
        stacked_batches: ``{condition: number of batches}`` among the shared ones run side by
            side along the batch (the others continued the frozen prefix cache one by one).
        n_batches: batches in all.
    """

    results: dict[str, AttentionShareResult]
    shared_batches: dict[str, int] = field(default_factory=dict)
    fallback: dict[str, dict[str, int]] = field(default_factory=dict)
    stacked_batches: dict[str, int] = field(default_factory=dict)
    n_batches: int = 0

    def __getitem__(self, name: str) -> AttentionShareResult:
        return self.results[name]

    def to_dict(self) -> dict:
        return {"results": {k: r.to_dict() for k, r in self.results.items()},
                "shared_batches": dict(self.shared_batches), "fallback": {k: dict(v) for k, v in self.fallback.items()},
                "stacked_batches": dict(self.stacked_batches), "n_batches": self.n_batches}


def _part(qa: QueryAttention, layers: list[int], rows: slice | None = None) -> Tensor:
    raw = torch.stack([qa.results[l].cpu() for l in layers], dim=1)  # [batch, layer, head, key], any devices
    return raw if rows is None else raw[rows]


def _run(model, inputs: dict, hooks: list, qa: QueryAttention, cache) -> None:
    model.run_with_hooks(**inputs, past_kv_cache=cache, fwd_hooks=hooks + qa.hooks(), return_type=None)


def shared_share_of_batch(model, batch: Batch, conditions: Mapping, query: Selection, keys: Sequence[Selection],
                          layers: list[int], *, share_prefix: bool = True, stack: bool = True,
                          query_chunk: int | None = None) -> dict:
    """One batch under every condition: ``{"raw": {name: [batch, layer, head, key]},
    "n_queries": {name: [batch]}, "shared": [...], "stacked": [...], "fallback": {name: reason}}``
    (a condition with a ``prepare`` step may change the batch, hence its own query count)."""
    from mechvlm.kv_cache import VLMKeyValueCache
    from mechvlm.prefix_sharing import (StackedKnockouts, condition_setup, plan_conditions, split_prefix, stack_batch,
                                        stacked_conditions)

    plan = plan_conditions(model, batch, conditions, share_prefix=share_prefix, max_new_tokens=0)
    raw: dict[str, Tensor] = {}
    n_queries: dict[str, Tensor] = {}
    for name in conditions:
        if name not in plan.shared:
            run_batch, hooks = condition_setup(conditions[name], model, batch)
            part = share_of_batch(model, run_batch, query, keys, layers, hooks, query_chunk)
            raw[name], n_queries[name] = part["raw"], part["n_queries"]
    stacked: list[str] = []
    if plan.shared:
        relaid, prefix, width = split_prefix(model, batch, plan)
        roles = model.roles(**relaid)
        qmask = resolve(roles, query)
        kmask = torch.stack([resolve(roles, k) for k in keys]).to(model.device, torch.float32)
        n_queries.update(dict.fromkeys(plan.shared, qmask.sum(-1).cpu()))
        rows = batch["input_ids"].shape[0]
        # the prefix: its query rows are the same under every condition (causal, untouched)
        cache = VLMKeyValueCache.init_cache(model.cfg, model.device, rows)
        if bool(qmask[:, :width].any()):
            qa = QueryAttention(model, layers, qmask[:, :width], key_role_reduce(kmask[:, :, :width]),
                                query_chunk=query_chunk, kv_cache=cache)
            _run(model, prefix, [], qa, cache)
            shared_part = _part(qa, layers)
        else:  # no query inside the prefix (text queries): a plain prefill, SDPA's causal path
            model(**prefix, past_kv_cache=cache, return_type=None)
            shared_part = torch.zeros(rows, len(layers), model.cfg.n_heads, kmask.shape[0])
        rest = {k: relaid[k][:, width:] for k in ("input_ids", "attention_mask")}
        stacked = stacked_conditions(plan, conditions, stack)
        if stacked:
            n = len(stacked)
            stack_cache = cache.select_rows(torch.arange(rows, device=cache.input_ids.device).repeat(n))
            stacked_batch = stack_batch(relaid, n)
            hooks = user_hooks(StackedKnockouts([conditions[k] for k in stacked], rows), stacked_batch,
                               model.roles(**stacked_batch))
            qa = QueryAttention(model, layers, qmask.repeat(n, 1)[:, width:], key_role_reduce(kmask.repeat(1, n, 1)),
                                other_hooks=hooks, query_chunk=query_chunk, kv_cache=stack_cache)
            _run(model, {k: v.repeat(n, 1) for k, v in rest.items()}, hooks, qa, stack_cache)
            del stack_cache
            for i, name in enumerate(stacked):
                raw[name] = shared_part + _part(qa, layers, slice(i * rows, (i + 1) * rows))
        cache.freeze()  # every other condition continues the same prefix without keeping its rest
        for name in (k for k in plan.shared if k not in stacked):
            hooks = user_hooks(conditions[name], relaid, roles)
            qa = QueryAttention(model, layers, qmask[:, width:], key_role_reduce(kmask), other_hooks=hooks,
                                query_chunk=query_chunk, kv_cache=cache)
            _run(model, rest, hooks, qa, cache)
            raw[name] = shared_part + _part(qa, layers)
    return {"raw": {k: raw[k] for k in conditions}, "n_queries": {k: n_queries[k] for k in conditions},
            "shared": list(plan.shared),
            "stacked": stacked, "fallback": dict(plan.fallback)}


def attention_share_conditions(
    model,
    batches: Batch | Iterable[Batch],
    conditions=None,
    query: Selection = "text",
    keys: Sequence[Selection] = ("image", "eoi"),
    layers: Iterable[int] | int | None = None,
    *,
    share_prefix: bool = True,
    stack: bool = True,
    progress: bool = True,
    query_chunk: int | None = None,
    journal=None,
) -> ConditionsAttentionShare:
    """`attention_share` of ``query`` tokens over ``keys`` under each condition, sharing the
    prompt prefix no condition changes (one prefill per batch; see the module docstring).

    Args:
        model: a `HookedVLM`.
        batches: one batch dict or an iterable of them (left-padded).
        conditions: what `mechvlm.mmbench.resolve_conditions` accepts (None: Table 1's five;
            names, `Condition` objects, ``{name: Condition | (batch, roles) -> hooks}``).
        query, keys, layers, query_chunk: as `attention_share`.
        share_prefix: False runs every condition on its own (``attention_share(model, batch,
            fwd_hooks=condition)``: the reference path).
        stack: run the sharing knockouts (and ``none``) side by side along the batch over one
            copy of the prefix cache per condition; False continues each from the frozen cache.
        progress: a tqdm bar over batches.
        journal: a `mechvlm.journal.JournalTask`; one unit per batch holds every condition.

    Returns:
        a `ConditionsAttentionShare`: per condition the `AttentionShareResult` that
        ``attention_share(model, batches, query, keys, layers, fwd_hooks=condition)`` returns
        (to float rounding), and what was shared or run on its own.
    """
    from mechvlm.mmbench.conditions import resolve_conditions

    conds = resolve_conditions(conditions)
    layer_list = select_layers(model, layers)
    keys = list(keys)
    if not keys:
        raise ValueError("attention_share_conditions needs at least one key role")

    def one_batch(batch: Batch) -> dict:
        return shared_share_of_batch(model, batch, conds, query, keys, layer_list, share_prefix=share_prefix,
                                     stack=stack, query_chunk=query_chunk)

    with torch.no_grad():
        parts = map_batches(one_batch, batches, progress=progress, desc="attention_share_conditions",
                            journal=journal)
    for i, p in enumerate(parts):  # a journal's unit recorded for other conditions or layers
        if list(p["raw"]) != list(conds) or any(r.shape[1] != len(layer_list) for r in p["raw"].values()):
            raise ValueError(f"batch {i}: the journal holds conditions {list(p['raw'])} and other layers or "
                             f"conditions than this run's {list(conds)}, layers {layer_list}; start again "
                             "without resume (or with another journal)")
    key_names = [selection_label(k, i) for i, k in enumerate(keys)]
    results = {name: AttentionShareResult.from_raw(torch.cat([p["raw"][name] for p in parts]),
                                                   torch.cat([p["n_queries"][name] for p in parts]),
                                                   layer_list, key_names, selection_label(query))
               for name in conds}
    out = ConditionsAttentionShare(results, n_batches=len(parts))
    for name in conds:
        out.shared_batches[name] = sum(name in p["shared"] for p in parts)
        out.stacked_batches[name] = sum(name in p["stacked"] for p in parts)
        reasons: dict[str, int] = {}
        for p in parts:
            if name in p["fallback"]:
                reasons[p["fallback"][name]] = reasons.get(p["fallback"][name], 0) + 1
        out.fallback[name] = reasons
    return out
