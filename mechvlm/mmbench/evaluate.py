"""Run MMBench under named conditions: generate, extract letters, score.

`evaluate` builds the seed-000 prompt of every item, lets the input builder turn prompts
and images into a batch, decodes a few tokens greedily with each condition's hooks
(`mechvlm.generation.greedy_generate`, over a KV cache; the conditions are callables
``(batch, roles) -> hooks``, so knockouts cover the generated tokens), reads the letter
with VLMEvalKit's rules and scores the items.

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

from mechvlm.distributed import fingerprint_of, map_units
from mechvlm.generation import greedy_generate
from mechvlm.mmbench.conditions import CONDITIONS, Condition, resolve_conditions
from mechvlm.mmbench.extract import DEFAULT_RULES, can_infer, classify_output
from mechvlm.mmbench.prompt import mmbench_prompt
from mechvlm.mmbench.scoring import score_records
from mechvlm.mmbench.tsv import MMBenchItem

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
                       rules: str = DEFAULT_RULES, pad_token_id: int | None = None, journal=None) -> dict:
    """One condition over ``items``: the scored summary (see `evaluate`). ``journal``: a
    `mechvlm.journal.JournalTask` with ``per_row=True`` (one line per item)."""
    order = length_order(builder, items)
    groups = [order[s:s + batch_size] for s in range(0, len(items), batch_size)]

    def run_batch(where: list[int]) -> list[dict]:
        chunk = [items[i] for i in where]
        batch = builder([mmbench_prompt(it) for it in chunk], [_images(it) for it in chunk])
        batch, hooks = condition.setup(model, batch)
        gen = greedy_generate(model, batch, max_new_tokens, builder.eos_token_ids, fwd_hooks=hooks,
                              pad_token_id=pad_token_id)
        out = []
        for row, it in enumerate(chunk):
            tokens = gen.tokens(row)
            raw = builder.decode(tokens)
            prediction = can_infer(raw, it.options, rules)
            out.append({
                "index": it.index, "group": it.group, "category": it.category,
                "l2_category": it.l2_category, "answer": it.answer, "prediction": prediction,
                "kind": classify_output(raw, prediction, it.options), "raw": raw, "tokens": tokens,
                "stopped": bool(gen.finished[row]),
            })
        return out

    def fingerprint(where: list[int]) -> str:
        return fingerprint_of([[items[i].index, mmbench_prompt(items[i])] for i in where])

    records: list[dict | None] = [None] * len(items)
    parts = map_units(run_batch, groups, fingerprint=fingerprint, journal=journal, progress=progress,
                      desc=f"MMBench [{condition.name}]")
    for where, part in zip(groups, parts, strict=True):
        for i, record in zip(where, part, strict=True):
            records[i] = record
    summary = {"condition": condition.describe()}
    summary.update(score_records(records))
    summary["settings"] = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "rules": rules,
                           "extraction": "VLMEvalKit can_infer (exact matching)",
                           "batching": "by prompt length, KV cache"}
    summary["items"] = records
    return summary


def evaluate(model, builder: InputBuilder, items: Iterable[MMBenchItem],
             conditions: None | str | Iterable | Mapping = None, *, batch_size: int = 8,
             max_new_tokens: int = 4, progress: bool = True, rules: str = DEFAULT_RULES,
             pad_token_id: int | None = None, journal=None) -> dict[str, dict]:
    """Evaluate ``items`` under every condition.

    Args:
        model: a `HookedVLM`.
        builder: the input builder (`InputBuilder`).
        items: `MMBenchItem` rows (`load_mmbench`).
        conditions: None (all of `CONDITIONS`), names, `Condition` objects, or a mapping
            ``{name: Condition | callable(batch, roles) -> hooks}`` (`resolve_conditions`).
        batch_size: items per forward.
        max_new_tokens: greedy tokens per item.
        progress: tqdm bars (one per condition).
        rules: the VLMEvalKit rule set of `can_infer`.
        pad_token_id: what finished rows continue with (default: the first EOS id).
        journal: a `mechvlm.journal.Journal`: each condition's items are appended to it as
            they are scored (task ``"knockout/<condition>"``, one line per item, fsynced per
            batch) and the batches it already holds are read back instead of recomputed.

    Under an initialised process group (``torchrun``), the batches are shared out over the
    ranks and every rank returns the whole result (`mechvlm.distributed`), equal to a
    one-process run's.

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
    return {name: evaluate_condition(model, builder, items, cond, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, progress=progress, rules=rules,
                                     pad_token_id=pad_token_id,
                                     journal=journal.task(f"knockout/{name}", per_row=True) if journal else None)
            for name, cond in resolve_conditions(conditions).items()}
