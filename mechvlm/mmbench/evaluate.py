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

from mechvlm.distributed import fingerprint_of, map_units
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
                       rules: str = DEFAULT_RULES, pad_token_id: int | None = None, journal=None) -> dict:
    """One condition over ``items``: the scored summary (see `evaluate`). ``journal``: a
    `mechvlm.journal.JournalTask` with ``per_row=True`` (one line per item)."""
    return _evaluate(model, builder, list(items), {condition.name: condition},
                     {condition.name: journal} if journal is not None else None, batch_size=batch_size,
                     max_new_tokens=max_new_tokens, progress=progress, rules=rules,
                     pad_token_id=pad_token_id, share_prefix=False)[condition.name]


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


class ConditionJournals:
    """The journal of a batch run under several conditions at once (`map_units`' ``journal``):
    each condition keeps its own task (one line per item), so a resumed run reads back what
    any earlier run recorded, shared or not; a batch counts as done when every condition
    has it."""

    def __init__(self, tasks: Mapping):
        self.tasks = dict(tasks)

    def get(self, unit: int, fingerprint: str):
        if not all([task.has(unit, fingerprint) for task in self.tasks.values()]):
            return None  # computed again; put appends only what is missing
        return {name: task.get(unit, fingerprint) for name, task in self.tasks.items()}

    def put(self, unit: int, fingerprint: str, result: Mapping) -> None:
        for name, task in self.tasks.items():
            if not task.has(unit, fingerprint):
                task.put(unit, fingerprint, result[name])


def _evaluate(model, builder, items: list, conds: Mapping[str, Condition], tasks: Mapping | None, *,
              batch_size: int, max_new_tokens: int, progress: bool, rules: str, pad_token_id: int | None,
              share_prefix: bool) -> dict[str, dict]:
    order = length_order(builder, items)
    groups = [order[s:s + batch_size] for s in range(0, len(items), batch_size)]

    def run_batch(where: list[int]) -> dict[str, list[dict]]:
        chunk = [items[i] for i in where]
        batch = builder([mmbench_prompt(it) for it in chunk], [_images(it) for it in chunk])
        gens, _ = generate_conditions(model, batch, conds, max_new_tokens, builder.eos_token_ids,
                                      pad_token_id=pad_token_id, share_prefix=share_prefix)
        return {name: [_record(builder, it, gen, row, rules) for row, it in enumerate(chunk)]
                for name, gen in gens.items()}

    def fingerprint(where: list[int]) -> str:
        return fingerprint_of([[items[i].index, mmbench_prompt(items[i])] for i in where])

    label = next(iter(conds)) if len(conds) == 1 else f"{len(conds)} conditions"
    parts = map_units(run_batch, groups, fingerprint=fingerprint,
                      journal=ConditionJournals(tasks) if tasks else None, progress=progress,
                      desc=f"MMBench [{label}]")
    out = {}
    for name, cond in conds.items():
        records: list[dict | None] = [None] * len(items)
        for where, part in zip(groups, parts, strict=True):
            for i, record in zip(where, part[name], strict=True):
                records[i] = record
        summary = {"condition": cond.describe()}
        summary.update(score_records(records))
        summary["settings"] = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "rules": rules,
                               "extraction": "VLMEvalKit can_infer (exact matching)",
                               "batching": "by prompt length, KV cache",
                               "shared_prefix": share_prefix and len(conds) > 1}
        summary["items"] = records
        out[name] = summary
    return out


def evaluate(model, builder: InputBuilder, items: Iterable[MMBenchItem],
             conditions: None | str | Iterable | Mapping = None, *, batch_size: int = 8,
             max_new_tokens: int = 4, progress: bool = True, rules: str = DEFAULT_RULES,
             pad_token_id: int | None = None, journal=None, share_prefix: bool = True) -> dict[str, dict]:
    """Evaluate ``items`` under every condition.

    The conditions run batch by batch: per batch, the prompt prefix that none of them can
    change (everything before the first text token that a text-query knockout reaches: the
    system prefix, the images, the EOI) is prefilled once and the conditions continue from
    it (`mechvlm.prefix_sharing.generate_conditions`: the knockouts side by side along the
    batch, other declared conditions from forks of the KV cache); conditions that cannot say
    what they touch (custom hooks, token removal) run on their own. The results are those
    of running each condition by itself (same tokens).

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
        journal: a `mechvlm.journal.Journal`: each condition's items are appended to it as
            they are scored (task ``"knockout/<condition>"``, one line per item, fsynced per
            batch) and the batches it already holds are read back instead of recomputed.
        share_prefix: False runs every condition on its own (the reference path).

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
    conds = resolve_conditions(conditions)
    tasks = {name: journal.task(f"knockout/{name}", per_row=True) for name in conds} if journal else None
    return _evaluate(model, builder, items, conds, tasks, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     progress=progress, rules=rules, pad_token_id=pad_token_id, share_prefix=share_prefix)
