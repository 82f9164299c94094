"""Scoring: accuracy and its std over items, per category, circular groups, output kinds.

All results are plain dicts of floats / ints / strings (JSON-serialisable).

* Accuracy is the mean of the 0/1 hit vector and ``std`` its *population* standard
  deviation, ``sqrt(p (1 - p))``, as in seed 000 Table 1 (``.392 (.488)``).
* Items without an answer (test split) are not scored; they still count in the output
  breakdown.
* Circular evaluation (VLMEvalKit ``mcq_circular_eval``): when any index is at least
  1e6, every original question (``index < 1e6``) forms a group with its copies
  ``index + k * 1e6``; a group is correct only if every copy is. Copies whose original
  is absent are ignored (VLMEvalKit scores groups of the rows it finds with
  ``index == index % 1e6``). ``vanilla_0`` is the accuracy over the originals only.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

from mechvlm.mmbench.extract import OUTPUT_KINDS
from mechvlm.mmbench.tsv import CIRCULAR_OFFSET


def is_correct(prediction: str | None, answer: str | None) -> bool:
    """An item is correct when the extracted letter equals the answer letter."""
    return answer is not None and prediction is not None and prediction == answer


def accuracy_std(hits: Sequence[bool | int]) -> dict:
    """``{"accuracy", "std", "n"}`` of a 0/1 vector (population std; None when empty)."""
    n = len(hits)
    if n == 0:
        return {"accuracy": None, "std": None, "n": 0}
    p = sum(1 for h in hits if h) / n
    return {"accuracy": p, "std": math.sqrt(max(0.0, p * (1.0 - p))), "n": n}


def _by(records: Iterable[Mapping], key: str) -> dict[str, dict]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        groups[str(r.get(key) or "")].append(bool(r["correct"]))
    return {k: accuracy_std(v) for k, v in sorted(groups.items())}


def circular_groups(records: Sequence[Mapping]) -> dict[int, list[Mapping]]:
    """``{original index: [its rows]}`` for the originals present (copies of a missing
    original are dropped); empty when no row is a circular copy."""
    if not any(int(r["index"]) >= CIRCULAR_OFFSET for r in records):
        return {}
    groups: dict[int, list[Mapping]] = {int(r["index"]): [] for r in records
                                        if int(r["index"]) < CIRCULAR_OFFSET}
    for r in records:
        g = int(r["index"]) % CIRCULAR_OFFSET
        if g in groups:
            groups[g].append(r)
    return groups


def output_breakdown(kinds: Iterable[str]) -> tuple[dict[str, int], dict[str, float]]:
    """Counts and fractions per output kind (`OUTPUT_KINDS`, every kind present)."""
    counts = Counter(kinds)
    unknown = set(counts) - set(OUTPUT_KINDS)
    if unknown:
        raise ValueError(f"unknown output kind(s) {sorted(unknown)}; kinds are {OUTPUT_KINDS}")
    total = sum(counts.values())
    out = {k: counts.get(k, 0) for k in OUTPUT_KINDS}
    return out, {k: (v / total if total else 0.0) for k, v in out.items()}


def score_records(records: Sequence[Mapping]) -> dict:
    """Score per-item records.

    Each record needs ``index``, ``answer``, ``prediction`` and ``kind``; ``category`` and
    ``l2_category`` are optional. ``correct`` is (re)computed and written into each record.

    Returns ``{"accuracy", "std", "n", "n_items", "n_unscored", "per_category",
    "per_l2_category", "vanilla_0", "circular", "outputs", "output_fractions"}``;
    ``vanilla_0`` and ``circular`` (``{"accuracy", "std", "n" (groups), "per_category"}``)
    are None without circular copies.
    """
    for r in records:
        r["correct"] = is_correct(r.get("prediction"), r.get("answer"))
    scored = [r for r in records if r.get("answer") is not None]
    out = accuracy_std([r["correct"] for r in scored])
    out["n_items"] = len(records)
    out["n_unscored"] = len(records) - len(scored)
    out["per_category"] = _by(scored, "category")
    out["per_l2_category"] = _by(scored, "l2_category")
    groups = circular_groups(scored)
    if groups:
        originals = [r for r in scored if int(r["index"]) < CIRCULAR_OFFSET]
        out["vanilla_0"] = accuracy_std([r["correct"] for r in originals])
        group_rows = [{"category": next(x for x in rows if int(x["index"]) == g).get("category"),
                       "correct": all(x["correct"] for x in rows)}
                      for g, rows in sorted(groups.items())]
        out["circular"] = accuracy_std([g["correct"] for g in group_rows])
        out["circular"]["per_category"] = _by(group_rows, "category")
    else:
        out["vanilla_0"] = None
        out["circular"] = None
    out["outputs"], out["output_fractions"] = output_breakdown(r["kind"] for r in records)
    return out
