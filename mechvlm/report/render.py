"""Write the report: ``report.html`` (self-contained: PNG figures embedded, HTML tables),
``results.json`` (every number), the MMBench CSVs, and a printed summary.

``results.json`` holds one entry per model under ``"models"`` (in ``--model`` order) and
the run info under ``"run"``. The keys of the one-model format stay at the top level and
describe the **first** model (``model``, ``model_type``, ``attention_share``,
``received_attention``, ``knockout``, ``analyses``, ``skipped``: the conditions the model
cannot run, with why); ``mmbench``, ``n_items``, ``config``
and ``wall_s`` (the whole run) are shared.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..fileio import write_json, write_text
from ..mmbench.report_tables import outputs_table, save_results, table1
from .page import MODE_NOTE, NOT_SCORED_NOTE, build_page, scored  # noqa: F401  (kept for importers)


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, float):
        return None if math.isnan(x) else round(x, 6)  # NaN -> null
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def metric_summary(share, received) -> dict:
    """The metric numbers of the JSON: example means per layer (and head), and per-example
    head-level values (no per-token arrays)."""
    return {
        "attention_share": {
            "layers": share.layers, "keys": share.keys, "query": share.query,
            "mean_head_share": share.mean_head_share, "mean_head_mean_share": share.mean_head_mean_share,
            "mean_share_per_head": share.mean_share, "head_share_per_example": share.head_share,
            "n_queries": share.n_queries},
        "received_attention": {
            "layers": received.layers, "thresholds": list(received.thresholds),
            "query": received.query, "key": received.key,
            "mean_frac_tokens": received.mean_frac_tokens,
            "mean_frac_tokens_per_head": received.mean_frac_tokens_per_head,
            "curve_x": received.curve_x, "mean_curve": received.mean_curve,
            "frac_tokens_per_example": received.frac_tokens_head_mean},
    }


def model_entry(run) -> dict:
    """One model's part of ``results.json``."""
    examples = [{k: v for k, v in e.items() if k not in ("figure_html",)} for e in run.examples]
    return {"label": run.label, "model": run.path, "model_type": run.model_type, "n_layers": run.n_layers,
            **metric_summary(run.share, run.received), "knockout": run.knockout, "analyses": run.analyses,
            "examples": examples, "wall_s": run.wall_s, "skipped": dict(run.skipped)}


def results_dict(runs, cfg, items, info: dict) -> dict:
    """The content of ``results.json`` (see the module docstring)."""
    import dataclasses

    models = [model_entry(r) for r in runs]
    first = models[0]
    return {
        "model": first["model"], "model_type": first["model_type"], "mmbench": str(cfg.tsv()),
        "n_items": len(items),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "attention_share": first["attention_share"], "received_attention": first["received_attention"],
        "knockout": first["knockout"], "analyses": first["analyses"], "skipped": first["skipped"],
        "wall_s": info["wall_s"],
        "labels": [r.label for r in runs], "models": models, "run": info,
    }


def label_of(results: dict) -> str:
    return Path(results["model"]).name


def write_outputs(runs, cfg, items, out: Path, info: dict) -> dict:
    """Write report.html, results.json and the MMBench CSVs into ``out``; returns the
    results dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = results_dict(runs, cfg, items, info)
    write_json(out / "results.json", _jsonable(results))
    save_results({r.label: r.knockout for r in runs}, out)
    chance = sum(1 / max(1, len(it.options)) for it in items) / len(items)
    page = build_page(runs, n_items=len(items), tsv=str(cfg.tsv()), info=info, chance=chance)
    write_text(out / "report.html", page.html())
    return results


def print_summary(results: dict, out: Path) -> None:
    ko = {m["label"]: m["knockout"] for m in results["models"]}
    print(table1(ko))
    print()
    print(outputs_table(ko))
    if not any(scored(k) for k in ko.values()):
        print("\naccuracy: not available (the benchmark has no answers)")
    for m in results["models"]:
        for name, why in m.get("skipped", {}).items():
            print(f"{m['label']}: not run: {name} ({why})")
    for m in results["models"]:
        share = m["attention_share"]
        v = torch.as_tensor(share["mean_head_share"])
        print(f"\n{m['label']}: attention share of the text (" + " / ".join(share["keys"])
              + "), head-summed, per layer:")
        print("  " + "  ".join(f"L{layer} " + "/".join(f"{x:.2f}" for x in v[i].tolist())
                               for i, layer in enumerate(share["layers"])))
    print(f"\nwrote {out / 'report.html'} and {out / 'results.json'} ({results['wall_s']} s)")
