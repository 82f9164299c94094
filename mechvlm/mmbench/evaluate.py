"""Run MMBench under named conditions: generate, extract letters, score.

`evaluate` builds the seed-000 prompt of every item, lets the input builder turn prompts
and images into a batch, decodes a few tokens greedily with each condition's hooks
(`mechvlm.generation.greedy_generate`, over a KV cache; the conditions are callables
``(batch, roles) -> hooks``, so knockouts cover the generated tokens), reads the letter
with VLMEvalKit's rules and scores the items. The conditions share each batch's prefill
where they can (`mechvlm.prefix_sharing`: Table 1's five conditions cost about one).

Items are batched in order of prompt length (``builder.prompt_lengths`` when the builder
has it, else the prompt's length in characters), so that little of a batch is padding; the
records keep the items' order.

The input builder is any object with this protocol (`InputBuilder`)::

    builder.eos_token_ids: list[int]
    builder(prompts: list[str], images: list[list[PIL.Image]]) -> dict   # HookedVLM.forward kwargs,
        # input_ids / attention_mask left-padded, pixel_values, image_grid_thw (Qwen) ...
    builder.decode(ids: list[int]) -> str                                # skips special tokens
    builder.prompt_lengths(prompts, images) -> list[int]                 # optional: tokens per prompt
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from mechvlm.mmbench.conditions import CONDITIONS, Condition, resolve_conditions
from mechvlm.mmbench.extract import DEFAULT_RULES, can_infer, classify_output
from mechvlm.mmbench.prompt import mmbench_prompt
from mechvlm.mmbench.scoring import score_records
from mechvlm.mmbench.tsv import MMBenchItem
from mechvlm.prefix_sharing import generate_conditions

__all__ = ["CONDITIONS", "InputBuilder", "evaluate", "evaluate_condition"]


class InputBuilder(Protocol):
    """Turns prompts and images into ``HookedVLM.forward`` keyword arguments."""

    eos_token_ids: list[int]

    def __call__(self, prompts: list[str], images: list[list]) -> dict: ...

    def decode(self, ids: list[int]) -> str: ...


def _images(item: MMBenchItem) -> list:
    return [item.pil_image()] if item.image is not None else []


def length_order(builder: InputBuilder, items: Sequence[MMBenchItem]) -> list[int]:
    """Item indices sorted by prompt length (stable): ``builder.prompt_lengths(prompts,
    images)`` when the builder has it, else the prompt's length in characters."""
    prompts = [mmbench_prompt(it) for it in items]
    if hasattr(builder, "prompt_lengths"):
        lengths = list(builder.prompt_lengths(prompts, [_images(it) for it in items]))
    else:
        lengths = [len(p) for p in prompts]
    return sorted(range(len(items)), key=lambda i: lengths[i])


def evaluate_condition(model, builder: InputBuilder, items: Sequence[MMBenchItem], condition: Condition, *,
                       batch_size: int = 8, max_new_tokens: int = 4, progress: bool = True,
                       rules: str = DEFAULT_RULES, pad_token_id: int | None = None) -> dict:
    """One condition over ``items``: the scored summary (see `evaluate`)."""
    return evaluate(model, builder, items, {condition.name: condition}, batch_size=batch_size,
                    max_new_tokens=max_new_tokens, progress=progress, rules=rules,
                    pad_token_id=pad_token_id)[condition.name]


def _record(builder, it: MMBenchItem, gen, row: int, rules: str) -> dict:
    tokens = gen.tokens(row)
    raw = builder.decode(tokens)
    prediction = can_infer(raw, it.options, rules)
    return {
        "index": it.index, "group": it.group, "category": it.category,
        "l2_category": it.l2_category, "answer": it.answer, "prediction": prediction,
        "kind": classify_output(raw, prediction, it.options), "raw": raw, "tokens": tokens,
        "stopped": bool(gen.finished[row]),
    }


def evaluate(model, builder: InputBuilder, items: Iterable[MMBenchItem],
             conditions: None | str | Iterable | Mapping = None, *, batch_size: int = 8,
             max_new_tokens: int = 4, progress: bool = True, rules: str = DEFAULT_RULES,
             pad_token_id: int | None = None, share_prefix: bool = True) -> dict[str, dict]:
    """Evaluate ``items`` under every condition.

    The conditions run batch by batch: per batch, the prompt prefix that none of them can
    change (everything before the first text token that a text-query knockout reaches: the
    system prefix, the images, the EOI) is prefilled once and its KV cache forked for each
    condition (`mechvlm.prefix_sharing.generate_conditions`); conditions that cannot say
    what they touch (custom hooks, token removal) run on their own. The results are those of
    running each condition by itself (same tokens).

    Args:
        model: a `HookedVLM`.
        builder: the input builder (`InputBuilder`).
        items: `MMBenchItem` rows (`load_mmbench`).
        conditions: None (all of `CONDITIONS`), names, `Condition` objects, or a mapping
            ``{name: Condition | callable(batch, roles) -> hooks}`` (`resolve_conditions`).
        batch_size: items per forward.
        max_new_tokens: greedy tokens per item.
        progress: a tqdm bar over the batches.
        rules: the VLMEvalKit rule set of `can_infer`.
        pad_token_id: what finished rows continue with (default: the first EOS id).
        share_prefix: False runs every condition on its own (the reference path).

    Returns:
        ``{condition name: summary}``; a summary holds ``condition`` (its description),
        ``accuracy``, ``std`` (population std over scored items), ``n``, ``n_items``,
        ``n_unscored``, ``per_category`` / ``per_l2_category`` (``{name: {accuracy, std,
        n}}``), ``vanilla_0`` and ``circular`` (None without circular copies), ``outputs``
        (counts: letter / eos_only / other) and ``output_fractions``, ``settings`` and
        ``items`` (per item: index, group, category, l2_category, answer, prediction, kind,
        correct, raw (decoded output), tokens (generated ids before EOS), stopped (an EOS
        was emitted)). Plain JSON-serialisable data; `mechvlm.viz.fig_knockout` accepts it
        (one model) or ``{model: it}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    items = list(items)
    if not items:
        raise ValueError("no MMBench items to evaluate")
    from tqdm.auto import tqdm

    conds = resolve_conditions(conditions)
    records: dict[str, list] = {name: [None] * len(items) for name in conds}
    shared_batches = {name: 0 for name in conds}
    reasons: dict[str, set] = {name: set() for name in conds}
    order = length_order(builder, items)
    starts = range(0, len(items), batch_size)
    label = next(iter(conds)) if len(conds) == 1 else f"{len(conds)} conditions"
    for start in tqdm(starts, desc=f"MMBench [{label}]", unit="batch", disable=not progress):
        where = order[start:start + batch_size]
        chunk = [items[i] for i in where]
        batch = builder([mmbench_prompt(it) for it in chunk], [_images(it) for it in chunk])
        gens, plan = generate_conditions(model, batch, conds, max_new_tokens, builder.eos_token_ids,
                                         pad_token_id=pad_token_id, share_prefix=share_prefix)
        for name, gen in gens.items():
            shared_batches[name] += name in plan.shared
            if name in plan.fallback:
                reasons[name].add(plan.fallback[name])
            for row, (i, it) in enumerate(zip(where, chunk)):
                records[name][i] = _record(builder, it, gen, row, rules)
    out = {}
    for name, cond in conds.items():
        summary = {"condition": cond.describe()}
        summary.update(score_records(records[name]))
        summary["settings"] = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "rules": rules,
                               "extraction": "VLMEvalKit can_infer (exact matching)",
                               "batching": "by prompt length, KV cache",
                               "shared_prefix": {"batches": shared_batches[name], "of": len(starts),
                                                 "not_shared_because": sorted(reasons[name])}}
        summary["items"] = records[name]
        out[name] = summary
    return out
