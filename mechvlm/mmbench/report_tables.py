"""Seed 000 Table 1 as text, the output-kind table, and saving results as JSON / CSV.

``results`` is what `evaluate` returns (``{condition: summary}``, one model) or
``{model: that}`` (several models). Table 1 layout: one row per model and knockout mode,
columns ``none | text→img | text→EOI``, cells ``.392 (.488)`` (accuracy, population std
over items); the ``none`` column repeats in each mode's row. Conditions with another
direction (custom hooks) get columns of their own after those three.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from mechvlm.fileio import atomic_write, write_text
from mechvlm.mmbench.conditions import DIRECTIONS
from mechvlm.mmbench.extract import OUTPUT_KINDS

COLUMN_LABELS = {"none": "none", "text→image": "text→img", "text→EOI": "text→EOI"}
ITEM_COLUMNS = ("model", "condition", "direction", "mode", "index", "group", "category", "l2_category",
                "answer", "prediction", "kind", "correct", "stopped", "raw")
SUMMARY_COLUMNS = ("model", "condition", "direction", "mode", "n", "n_items", "accuracy", "std",
                   "vanilla_0_accuracy", "circular_accuracy", "circular_std", "circular_n",
                   *[f"{k}_fraction" for k in OUTPUT_KINDS], *[f"{k}_count" for k in OUTPUT_KINDS])


def by_model(results: Mapping, model: str = "model") -> dict[str, dict[str, dict]]:
    """``{model: {condition: summary}}`` from one model's results or several."""
    if not results:
        raise ValueError("empty results")
    if all(isinstance(v, Mapping) and "accuracy" in v for v in results.values()):
        return {model: dict(results)}
    return {str(m): dict(r) for m, r in results.items()}


def fmt_score(accuracy: float | None, std: float | None = None) -> str:
    """``.392 (.488)`` (the paper's format); ``-`` for no score."""
    def f(x):
        s = f"{x:.3f}"
        return s[1:] if s.startswith("0.") else s
    if accuracy is None:
        return "-"
    return f(accuracy) + (f" ({f(std)})" if std is not None else "")


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _meta(name: str, summary: Mapping) -> tuple[str, str | None]:
    c = summary.get("condition") or {}
    return c.get("direction", name), c.get("mode")


def table1(results: Mapping, *, model: str = "model") -> str:
    """Seed 000 Table 1 as a markdown table (see the module docstring)."""
    return _markdown(*table1_rows(results, model=model))


def table1_rows(results: Mapping, *, model: str = "model") -> tuple[list[str], list[list[str]]]:
    """Seed 000 Table 1 as ``(header, rows)`` of strings (what `table1` prints)."""
    models = by_model(results, model)
    extra = list(dict.fromkeys(d for conds in models.values() for n, s in conds.items()
                               if (d := _meta(n, s)[0]) not in DIRECTIONS))
    columns = list(DIRECTIONS) + extra
    rows = []
    for m, conds in models.items():
        modes = list(dict.fromkeys(_meta(n, s)[1] for n, s in conds.items() if _meta(n, s)[1] is not None))
        for mode in modes or [None]:
            cells = []
            for d in columns:
                match = [s for n, s in conds.items() if _meta(n, s)[0] == d and _meta(n, s)[1] in (mode, None)]
                cells.append(fmt_score(match[0]["accuracy"], match[0]["std"]) if match else "")
            rows.append([m, mode or "", *cells])
    return ["model", "mode", *[COLUMN_LABELS.get(c, c) for c in columns]], rows


def outputs_table(results: Mapping, *, model: str = "model") -> str:
    """Per model and condition: items, accuracy and the fraction of each output kind
    (valid letter / EOS only / other), as a markdown table."""
    rows = []
    for m, conds in by_model(results, model).items():
        for name, s in conds.items():
            fr = s.get("output_fractions") or {}
            rows.append([m, name, str(s.get("n_items", s.get("n", ""))), fmt_score(s["accuracy"]),
                         *[f"{fr.get(k, 0.0):.3f}" for k in OUTPUT_KINDS]])
    return _markdown(["model", "condition", "items", "accuracy", *OUTPUT_KINDS], rows)


def print_report(results: Mapping, *, model: str = "model", file=None) -> None:
    """Print Table 1 and the output-kind table."""
    file = file or sys.stdout
    print("MMBench accuracy (std over items)", file=file)
    print(table1(results, model=model), file=file)
    print("\nOutputs (fraction of items)", file=file)
    print(outputs_table(results, model=model), file=file)


def summary_rows(results: Mapping, *, model: str = "model") -> list[dict]:
    """One flat row per model and condition (the summary CSV)."""
    out = []
    for m, conds in by_model(results, model).items():
        for name, s in conds.items():
            direction, mode = _meta(name, s)
            circ = s.get("circular") or {}
            v0 = s.get("vanilla_0") or {}
            row = {"model": m, "condition": name, "direction": direction, "mode": mode or "",
                   "n": s.get("n"), "n_items": s.get("n_items"), "accuracy": s["accuracy"], "std": s.get("std"),
                   "vanilla_0_accuracy": v0.get("accuracy"), "circular_accuracy": circ.get("accuracy"),
                   "circular_std": circ.get("std"), "circular_n": circ.get("n")}
            for k in OUTPUT_KINDS:
                row[f"{k}_fraction"] = (s.get("output_fractions") or {}).get(k)
                row[f"{k}_count"] = (s.get("outputs") or {}).get(k)
            out.append(row)
    return out


def item_rows(results: Mapping, *, model: str = "model") -> list[dict]:
    """One flat row per item and condition (the items CSV)."""
    out = []
    for m, conds in by_model(results, model).items():
        for name, s in conds.items():
            direction, mode = _meta(name, s)
            for r in s.get("items", []):
                out.append({"model": m, "condition": name, "direction": direction, "mode": mode or "",
                            **{k: r.get(k) for k in ITEM_COLUMNS[4:]}})
    return out


#: A text cell starting with one of these is read as a formula by spreadsheets (OWASP, "CSV
#: injection"): ``=1+1``, ``+cmd``, ``-2+3``, ``@SUM(...)``, and tab / carriage return.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value):
    """A CSV cell that a spreadsheet shows as text: a string starting with
    `FORMULA_STARTS` gets a leading single quote (OWASP's advice); numbers stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def _write_csv(path: Path, columns, rows: list[dict]) -> None:
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else csv_safe(v) for k, v in r.items()})


def save_results(results: Mapping, out_dir: str | os.PathLike, *, prefix: str = "mmbench",
                 model: str = "model") -> dict[str, Path]:
    """Write ``{prefix}.json`` (everything, ``{model: {condition: summary}}``),
    ``{prefix}_items.csv`` (one row per item and condition) and ``{prefix}_summary.csv``
    (one row per model and condition) into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = by_model(results, model)
    paths = {"json": out / f"{prefix}.json", "items": out / f"{prefix}_items.csv",
             "summary": out / f"{prefix}_summary.csv"}
    write_text(paths["json"], json.dumps(models, ensure_ascii=False, indent=1))
    _write_csv(paths["items"], ITEM_COLUMNS, item_rows(models))
    _write_csv(paths["summary"], SUMMARY_COLUMNS, summary_rows(models))
    return paths


def load_results(path: str | os.PathLike) -> dict[str, dict[str, dict]]:
    """Read back the JSON that `save_results` wrote (``{model: {condition: summary}}``)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)
