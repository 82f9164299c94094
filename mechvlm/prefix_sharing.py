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
So does every condition on a model whose ``forward`` is wrapped (an installed Registering
mask builds its edits from the prompt a cache was filled with), and on a batch with videos
(Qwen2.5-VL's text after a video starts below the video's largest time-scaled position,
where a KV-cache continuation would start above it).

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
        stacked: the shared conditions run side by side along the batch (the others each
            continue from a fork of the prefix cache).
    """

    boundary: Int[Tensor, " batch"] | None
    shared: list[str] = field(default_factory=list)
    fallback: dict[str, str] = field(default_factory=dict)
    common: bool = True
    stacked: list[str] = field(default_factory=list)

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


def stackable(condition) -> bool:
    """A knockout `Condition` or one without intervention (no custom hooks, no prepare step):
    its hooks can be restricted to some rows of a batch (`StackedKnockouts`)."""
    return all(hasattr(condition, a) for a in ("key", "query", "mode")) and \
        getattr(condition, "hooks", None) is None and getattr(condition, "prepare", None) is None


class StackedKnockouts:
    """``(batch, roles) -> hooks`` for knockout conditions stacked along the batch: condition
    ``i`` owns rows ``i * rows .. (i + 1) * rows - 1`` and cuts only there. One `knockout` per
    mode, its query / key masks set row by row (rebuilt every generation step from that
    step's roles, so the generated tokens are covered as in each condition's own run)."""

    def __init__(self, conditions: list, rows: int):
        self.conditions, self.rows = conditions, rows

    def __call__(self, batch, roles) -> list:
        from mechvlm.interventions import knockout

        hooks = []
        for mode in sorted({c.mode for c in self.conditions if c.key is not None}):
            query = torch.zeros(roles.shape, dtype=torch.bool, device=roles.image.device)
            key = torch.zeros_like(query)
            for i, c in enumerate(self.conditions):
                if c.key is not None and c.mode == mode:
                    rows = slice(i * self.rows, (i + 1) * self.rows)
                    query[rows], key[rows] = roles.mask(c.query)[rows], roles.mask(c.key)[rows]
            hooks += knockout(roles, query=query, key=key, mode=mode)
        return hooks


def stack_batch(relaid: Mapping, n: int) -> dict:
    """``relaid`` repeated ``n`` times along the batch (what a continuation and its roles need:
    the per-token inputs, and per image / video / row what locates the images; the pixels
    were encoded in the prefill)."""
    keep = (*PER_TOKEN_INPUTS, "image_grid_thw", "video_grid_thw", "image_sizes", "batch_num_images")
    return {k: v.repeat(n, *[1] * (v.ndim - 1)) for k, v in relaid.items()
            if k in keep and isinstance(v, Tensor)}


def _unstack(gen: Generation, i: int, rows: int, batch: Mapping) -> Generation:
    """Condition ``i``'s rows of a stacked generation, cut to the steps its own run takes (it
    stops once all its rows emitted a stop token)."""
    sl = slice(i * rows, (i + 1) * rows)
    new = gen.new_tokens[sl]
    steps = new.shape[1]
    if gen.eos_token_ids:
        hit = torch.isin(new, torch.tensor(gen.eos_token_ids, device=new.device))
        if bool(hit.any(-1).all()):
            steps = min(steps, int(hit.int().argmax(-1).max()) + 1)
    part = Generation(sequences=torch.cat([gen.sequences[sl, :gen.prompt_length], new[:, :steps]], dim=1),
                      prompt_length=gen.prompt_length, finished=gen.finished[sl], eos_token_ids=gen.eos_token_ids,
                      logits=None if gen.logits is None else gen.logits[sl, :steps])
    return _in_batch_layout(part, batch)


def _touched(condition, roles) -> Tensor | None:
    touched = getattr(condition, "touched", None)
    return touched(roles) if callable(touched) else None


def split_prefix(model, batch: Mapping, plan: PrefixPlan) -> tuple[dict, dict, int]:
    """``(relaid, prefix, width)``: the batch re-laid at the plan's boundary (`split_batch`),
    its first ``width`` columns (what the shared prefill runs), and ``width``."""
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    relaid, width = split_batch(batch, plan.boundary, pad)
    prefix = {k: (v[:, :width] if k in PER_TOKEN_INPUTS and v is not None else v) for k, v in relaid.items()}
    return relaid, prefix, width


def stacked_conditions(plan: PrefixPlan, conditions: Mapping, stack: bool) -> list[str]:
    """The shared conditions run side by side along the batch (`stackable` ones, at least two)."""
    names = [k for k in plan.shared if stackable(conditions[k])] if stack else []
    return names if len(names) >= 2 else []


def condition_setup(condition, model, batch):
    setup = getattr(condition, "setup", None)
    return setup(model, batch) if callable(setup) else (batch, condition)


def plan_conditions(model, batch: Mapping, conditions: Mapping[str, object], *, share_prefix: bool = True,
                    max_new_tokens: int = 1) -> PrefixPlan:
    """The `PrefixPlan` of one batch under ``conditions`` (see `generate_conditions`), with
    the cases where nothing is shared: sharing off, a single condition, a wrapped
    ``forward``, videos, other per-token inputs. ``max_new_tokens``: the tokens run after
    the prompt (0 for a metric over the prompt only; the sliding-window check)."""
    names = list(conditions)
    if share_prefix and len(names) > 1 and "forward" in vars(model):
        # an installed wrapper of forward (a Registering model's mask, `apply_registering`) builds
        # its edits from the prompt a cache was filled with: run each condition on its own
        plan = PrefixPlan(None, [], {k: "the model's forward is wrapped (e.g. an installed Registering mask)"
                                     for k in names})
    elif share_prefix and len(names) > 1 and batch.get("video_grid_thw") is not None:
        # Qwen2.5-VL's text after a video starts below the video's largest (time-scaled)
        # position, and a KV-cache continuation starts above it
        plan = PrefixPlan(None, [], {k: "the batch holds videos (text positions after a video do not continue "
                                        "from its largest position)" for k in names})
    elif share_prefix and len(names) > 1:
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
    return plan


@torch.no_grad()
def generate_conditions(model, batch: Mapping, conditions: Mapping[str, object], max_new_tokens: int,
                        eos_token_ids: Iterable[int] | int, *, pad_token_id: int | None = None,
                        output_logits: bool = False, share_prefix: bool = True,
                        stack: bool = True) -> tuple[dict[str, Generation], PrefixPlan]:
    """Greedy generation of one batch under each condition, sharing what they share.

    Args:
        model: a `HookedVLM`.
        batch: ``HookedVLM.forward`` keyword arguments (left-padded).
        conditions: ``{name: condition}``; a condition is a `mechvlm.mmbench.Condition` (or any
            object with ``touched(roles)`` and ``setup(model, batch)``), or plain
            ``fwd_hooks`` (a hook list or callable, which runs on its own).
        max_new_tokens, eos_token_ids, pad_token_id, output_logits: as `greedy_generate`.
        share_prefix: False runs every condition on its own (the reference path).
        stack: run the sharing knockout conditions (and ``none``) side by side along the
            batch, one generation over ``len(conditions) x batch`` rows (`StackedKnockouts`:
            one read of the weights per step for all of them); False (or custom
            conditions) continues each from its own fork of the prefix cache.

    Returns:
        ``({name: Generation}, plan)``: each `Generation` equals what ``greedy_generate(model,
        *condition.setup(model, batch), ...)`` returns (same tokens; logits to float
        rounding), in the same layout.
    """
    names = list(conditions)
    plan = plan_conditions(model, batch, conditions, share_prefix=share_prefix, max_new_tokens=max_new_tokens)
    out: dict[str, Generation] = {}
    for name in names:
        if name not in plan.shared:
            run_batch, hooks = condition_setup(conditions[name], model, batch)
            out[name] = greedy_generate(model, run_batch, max_new_tokens, eos_token_ids, fwd_hooks=hooks,
                                        pad_token_id=pad_token_id, output_logits=output_logits)
    if plan.shared:
        relaid, prefix, _ = split_prefix(model, batch, plan)
        cache = VLMKeyValueCache.init_cache(model.cfg, model.device, batch["input_ids"].shape[0])
        model(**prefix, past_kv_cache=cache, return_type=None)
        rows = batch["input_ids"].shape[0]
        plan.stacked = stacked_conditions(plan, conditions, stack)
        forked = [k for k in plan.shared if k not in plan.stacked]
        for i, name in enumerate(forked):
            fork = cache if i == len(forked) - 1 and not plan.stacked else cache.fork()
            gen = greedy_generate(model, relaid, max_new_tokens, eos_token_ids, fwd_hooks=conditions[name],
                                  pad_token_id=pad_token_id, output_logits=output_logits, past_kv_cache=fork)
            out[name] = _in_batch_layout(gen, batch)
        if plan.stacked:
            n = len(plan.stacked)
            stacked = cache.select_rows(torch.arange(rows, device=cache.input_ids.device).repeat(n))
            del cache
            gen = greedy_generate(model, stack_batch(relaid, n), max_new_tokens, eos_token_ids,
                                  fwd_hooks=StackedKnockouts([conditions[k] for k in plan.stacked], rows),
                                  pad_token_id=pad_token_id, output_logits=output_logits, past_kv_cache=stacked)
            for i, name in enumerate(plan.stacked):
                out[name] = _unstack(gen, i, rows, batch)
    return {k: out[k] for k in names}, plan
