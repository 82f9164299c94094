"""Several conditions from one prefill: share the prompt prefix no condition can change.

A knockout from text queries changes nothing before the first text token that sees its
keys: the system prefix, the image tokens and the EOI compute identically under every such
condition, and they are most of a VLM prompt. `generate_conditions` therefore

1. asks every condition which positions its hooks edit directly (``condition.touched(roles)``,
   a ``[batch, pos]`` mask; `mechvlm.mmbench.Condition.touched`); all positions before a
   row's first touched one are shared (attention is causal);
2. plans a boundary per row (`plan_shared_prefix`): the shared prefix holds every image
   (a KV-cache continuation takes text only) and stops at the first position any sharing
   condition touches (or before the prompt's last token);
3. prefills that prefix once per batch into a `VLMKeyValueCache`, forks the cache per
   condition and runs each condition's rest of the prompt plus its greedy generation
   (`mechvlm.generation.generate` with ``past_kv_cache``).

Conditions that cannot say what they touch (``touched`` is None: arbitrary user hooks,
token removal, edits of the image embeddings), and those touching a position inside the
prefix, run on their own (`greedy_generate` on the whole prompt): correct by construction.

Layout. Rows of a left-padded batch end their images at different columns; when one
common column fits every row (all images before it, no touched position before it), the
batch is split there and nothing moves. Otherwise each row is split at its own boundary:
the prefixes are left-padded to a common length and the rests as well, so padding columns
sit between a row's prefix and its rest. They are masked keys, and the positions (RoPE)
count real tokens only, so results agree to float rounding; sliding windows count columns,
so that layout is used only when no window can cut (prompt + new tokens <= window), else
the conditions run on their own. The returned `Generation` objects are in the batch's own
layout (prompt columns, then the generated ones), exactly as `greedy_generate` returns them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor

from mechvlm.generation import Generation, greedy_generate
from mechvlm.kv_cache import VLMKeyValueCache

#: Inputs with one entry per token (``[batch, pos]``), split with the prompt.
PER_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class PrefixPlan:
    """How one batch is run under several conditions.

    Attributes:
        boundary: ``[batch]`` per row, the first column not shared (the shared prefix is the
            columns before it); None when nothing is shared.
        shared: the conditions that run from the shared prefix.
        fallback: ``{condition: reason}`` for the ones that run on their own.
        common: True when one column splits every row (no padding moves).
    """

    boundary: Int[Tensor, " batch"] | None
    shared: list[str] = field(default_factory=list)
    fallback: dict[str, str] = field(default_factory=dict)
    common: bool = True

    @property
    def shared_columns(self) -> int:
        """Columns the shared prefill runs (0 when nothing is shared)."""
        return 0 if self.boundary is None or not self.shared else int(self.boundary.max())


def _first(mask: Tensor, none: int) -> Tensor:
    """``[batch]`` the first True column of each row (``none`` where a row has none)."""
    n = mask.shape[-1]
    cols = torch.arange(n, device=mask.device).expand_as(mask)
    return torch.where(mask, cols, torch.full_like(cols, none)).min(-1).values


def plan_shared_prefix(roles, touched: Mapping[str, Tensor | None], *, sliding_window: int | None = None,
                       max_new_tokens: int = 1) -> PrefixPlan:
    """Plan the shared prefix of one batch.

    Args:
        roles: `TokenRoles` of the batch (its image tokens must all lie in the prefix).
        touched: ``{condition: [batch, pos] bool | None}``, what each condition's hooks edit
            directly (None: cannot say).
        sliding_window: the model's sliding window (None: no sliding layer); with one, rows
            are split at different columns only when no window can cut.
        max_new_tokens: the generation length (for the window check).

    Returns:
        a `PrefixPlan`; fewer than two sharing conditions share nothing.
    """
    b, n = roles.shape
    fallback: dict[str, str] = {}
    image = roles.image.cpu()
    last_image = torch.where(image, torch.arange(n).expand(b, n), torch.full((b, n), -1)).max(-1).values
    lowest = last_image + 1  # the prefix holds every image token
    firsts: dict[str, Tensor] = {}
    for name, t in touched.items():
        if t is None:
            fallback[name] = "does not declare the positions it touches (custom hooks or a prepare step)"
            continue
        t = t.cpu().bool()
        if tuple(t.shape) != (b, n):
            raise ValueError(f"condition {name!r}: touched positions have shape {tuple(t.shape)}, "
                             f"the batch is {(b, n)}")
        first = _first(t, n)
        bad = (first < lowest).nonzero().flatten().tolist()
        if bad:
            fallback[name] = f"touches a position before the end of an image (row {bad[0]})"
            continue
        firsts[name] = first
    if len(firsts) < 2:
        fallback.update({k: "no other condition to share a prefix with" for k in firsts})
        return PrefixPlan(None, [], fallback)
    highest = torch.stack(list(firsts.values())).min(0).values.clamp(max=n - 1)  # >= 1 token left to run
    if bool((highest < lowest).any()):
        fallback.update({k: "a prompt ends with an image token (nothing after the image to run apart)"
                         for k in firsts})
        return PrefixPlan(None, [], fallback)
    if int(lowest.max()) <= int(highest.min()):
        return PrefixPlan(torch.full((b,), int(highest.min()), dtype=torch.long), list(firsts), fallback, True)
    relaid = n + int(highest.max() - highest.min())
    if sliding_window is not None and relaid + max_new_tokens > sliding_window:
        fallback.update({k: f"rows split at different columns and the sliding window ({sliding_window}) "
                            "counts columns" for k in firsts})
        return PrefixPlan(None, [], fallback)
    return PrefixPlan(highest, list(firsts), fallback, False)


def split_batch(batch: Mapping, boundary: Tensor, pad_id: int) -> tuple[dict, int]:
    """The batch re-laid so that every row's shared prefix ends at one column.

    Row ``r``'s columns before ``boundary[r]`` are left-padded to ``boundary.max()`` columns;
    its remaining columns follow, left-padded to ``n - boundary.min()``. Returns the re-laid
    batch (other inputs unchanged) and the number of prefix columns."""
    ids = batch["input_ids"]
    b, n = ids.shape
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    bound = boundary.tolist()
    width_prefix, width_rest = max(bound), n - min(bound)
    out = dict(batch, attention_mask=mask)
    for key in PER_TOKEN_INPUTS:
        t = out.get(key)
        if t is None:
            continue
        fill = pad_id if key == "input_ids" else 0
        new = t.new_full((b, width_prefix + width_rest), fill)
        for r, c in enumerate(bound):
            new[r, width_prefix - c:width_prefix] = t[r, :c]
            new[r, width_prefix + width_rest - (n - c):] = t[r, c:]
        out[key] = new
    return out, width_prefix


def _in_batch_layout(gen: Generation, batch: Mapping) -> Generation:
    """``gen`` (run on a re-laid batch) with the original prompt columns in front."""
    ids = batch["input_ids"].to(gen.sequences.device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(ids.device, ids.dtype)
    new = gen.new_tokens
    return Generation(sequences=torch.cat([ids, new], dim=1), prompt_length=ids.shape[1],
                      finished=gen.finished, eos_token_ids=gen.eos_token_ids, logits=gen.logits,
                      attention_mask=torch.cat([mask, torch.ones_like(new)], dim=1),
                      inputs={k: v for k, v in batch.items()
                              if k not in ("input_ids", "attention_mask") and v is not None})


def _touched(condition, roles) -> Tensor | None:
    touched = getattr(condition, "touched", None)
    return touched(roles) if callable(touched) else None


def _setup(condition, model, batch):
    setup = getattr(condition, "setup", None)
    return setup(model, batch) if callable(setup) else (batch, condition)


@torch.no_grad()
def generate_conditions(model, batch: Mapping, conditions: Mapping[str, object], max_new_tokens: int,
                        eos_token_ids: Iterable[int] | int, *, pad_token_id: int | None = None,
                        output_logits: bool = False, share_prefix: bool = True) -> tuple[dict[str, Generation], PrefixPlan]:
    """Greedy generation of one batch under each condition, sharing what they share.

    Args:
        model: a `HookedVLM`.
        batch: ``HookedVLM.forward`` keyword arguments (left-padded).
        conditions: ``{name: condition}``; a condition is a `mechvlm.mmbench.Condition` (or any
            object with ``touched(roles)`` and ``setup(model, batch)``), or plain
            ``fwd_hooks`` (a hook list or callable, which runs on its own).
        max_new_tokens, eos_token_ids, pad_token_id, output_logits: as `greedy_generate`.
        share_prefix: False runs every condition on its own (the reference path).

    Returns:
        ``({name: Generation}, plan)``: each `Generation` equals what ``greedy_generate(model,
        *condition.setup(model, batch), ...)`` returns (same tokens; logits to float
        rounding), in the same layout.
    """
    names = list(conditions)
    if share_prefix and len(names) > 1:
        roles = model.roles(**batch)
        extra = [k for k, v in batch.items() if k not in PER_TOKEN_INPUTS and isinstance(v, Tensor)
                 and v.ndim >= 2 and tuple(v.shape[:2]) == tuple(roles.shape)]
        touched = {k: (None if extra else _touched(c, roles)) for k, c in conditions.items()}
        plan = plan_shared_prefix(roles, touched, sliding_window=model.cfg.sliding_window,
                                  max_new_tokens=max_new_tokens)
        if extra:
            plan.fallback = {k: f"the batch has other per-token inputs {extra}" for k in names}
    else:
        plan = PrefixPlan(None, [], {k: "prefix sharing off" for k in names})
    out: dict[str, Generation] = {}
    for name in names:
        if name not in plan.shared:
            run_batch, hooks = _setup(conditions[name], model, batch)
            out[name] = greedy_generate(model, run_batch, max_new_tokens, eos_token_ids, fwd_hooks=hooks,
                                        pad_token_id=pad_token_id, output_logits=output_logits)
    if plan.shared:
        pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
        relaid, width = split_batch(batch, plan.boundary, pad)
        prefix = {k: (v[:, :width] if k in PER_TOKEN_INPUTS and v is not None else v) for k, v in relaid.items()}
        cache = VLMKeyValueCache.init_cache(model.cfg, model.device, batch["input_ids"].shape[0])
        model(**prefix, past_kv_cache=cache, return_type=None)
        for i, name in enumerate(plan.shared):
            fork = cache if i == len(plan.shared) - 1 else cache.fork()
            gen = greedy_generate(model, relaid, max_new_tokens, eos_token_ids, fwd_hooks=conditions[name],
                                  pad_token_id=pad_token_id, output_logits=output_logits, past_kv_cache=fork)
            out[name] = _in_batch_layout(gen, batch)
    return {k: out[k] for k in names}, plan
