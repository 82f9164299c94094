"""Seed 000 Table 1: knockout accuracy as a bar plot and an HTML table.

These take a plain mapping: ``{model: {condition: (accuracy, std)}}`` or ``{condition:
(accuracy, std)}``; a value may also be a dict with ``accuracy``, ``std``, ``n`` and
``outputs`` (counts per output kind), which is what `mechvlm.mmbench.evaluate` returns per
condition (pass its result, or ``{model: result}``, as it is).
"""

from __future__ import annotations

import html
from collections.abc import Mapping

import numpy as np

from mechvlm.viz.html import HTMLFragment
from mechvlm.viz.table1 import annotate_bars, untangle_ticks, wilson_ci95, wrap_label
from mechvlm.viz.text import plain


def normalize_knockout(table: Mapping) -> dict[str, dict[str, dict]]:
    """The knockout input as ``{model: {condition: {"accuracy", "std", "n", "outputs"}}}``.

    Accepted values per condition: ``(accuracy, std)``, ``(accuracy, std, n)``, a bare
    accuracy, or a dict with ``accuracy`` and optional ``std``, ``n`` (items) and
    ``outputs`` (counts per output kind, e.g. ``{"letter": 410, "eos_only": 500,
    "other": 90}``). The table is ``{condition: value}`` (one model) or
    ``{model: {condition: value}}``.
    """
    def entry(v) -> dict:
        if isinstance(v, Mapping):
            if "accuracy" not in v:
                raise ValueError(f"a knockout entry needs 'accuracy', got keys {sorted(v)}")
            acc = v["accuracy"]  # None: not scored (a test split without answers)
            return {"accuracy": None if acc is None else float(acc), "std": v.get("std"), "n": v.get("n"),
                    "outputs": dict(v["outputs"]) if v.get("outputs") else None}
        if isinstance(v, (tuple, list)):
            if not 1 <= len(v) <= 3:
                raise ValueError(f"a knockout entry is (accuracy, std[, n]), got {v!r}")
            return {"accuracy": float(v[0]), "std": float(v[1]) if len(v) > 1 and v[1] is not None else None,
                    "n": int(v[2]) if len(v) > 2 else None, "outputs": None}
        return {"accuracy": float(v), "std": None, "n": None, "outputs": None}

    if not table:
        raise ValueError("an empty knockout table")
    nested = all(isinstance(v, Mapping) and "accuracy" not in v for v in table.values())
    rows = table if nested else {"": table}
    return {str(m): {str(c): entry(v) for c, v in conds.items()} for m, conds in rows.items()}


def _fmt(x: float | None, missing: str = "") -> str:
    if x is None:
        return missing
    s = f"{x:.3f}"
    return s[1:] if s.startswith("0.") else s


def fig_knockout(table: Mapping, *, error: str | None = "auto", width: float | None = None,
                 height: float = 3.4, title: str | None = "Attention knockout accuracy"):
    """Seed 000 Table 1 as grouped bars: accuracy per knockout condition (bars) and model
    (groups), annotated ``.356 (.479)`` (accuracy, std over items) as in the paper.

    Expected input (`mechvlm.mmbench.evaluate`'s result as it is, or see
    `normalize_knockout`): ``{"Qwen2.5-VL 3B": {"none": (.392, .488), "text->img":
    (.176, .381), "text->EOI": (.207, .405)}, ...}`` or ``{condition: (acc, std)}``; a dict
    value may add ``n`` (items) and ``outputs`` (counts per output kind: letter / EOS only
    / other). ``error``: ``"sem"`` error bars ``std / sqrt(n)`` (needs ``n``), ``"ci95"``
    (95 % Wilson score interval over the ``n`` items, `mechvlm.viz.table1.wilson_ci95`),
    ``"std"``, None, or ``"auto"`` (sem where ``n`` is given, else none; the std over 0/1
    items is ~0.5 and would swamp the bars); say in the caption which one is drawn. Value
    labels sit inside the bars (above short ones) and the legends outside the axes, so no
    text overlaps (`mechvlm.viz.layout.layout_problems`). When ``outputs`` are given, a second panel shows the
    output distribution per model and condition (stacked, as fractions).
    """
    import matplotlib.pyplot as plt

    rows = normalize_knockout(table)
    models = list(rows)
    conds = list(dict.fromkeys(c for m in models for c in rows[m]))
    has_outputs = any(e["outputs"] for m in models for e in rows[m].values())
    w = width or max(4.5, 1.1 * len(models) * max(1, len(conds)) * 0.6 + 2)
    n_panels = 2 if has_outputs else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(w * n_panels, height), squeeze=False)
    ax = axes[0, 0]
    bw = 0.8 / max(1, len(conds))
    palette = ["#8c8c8c", "#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3"]
    labelled = []
    for j, c in enumerate(conds):
        xs, ys, errs, notes = [], [], [], []
        for i, m in enumerate(models):
            e = rows[m].get(c)
            if e is None:
                continue
            xs.append(i + (j - (len(conds) - 1) / 2) * bw)
            if e["accuracy"] is None:  # not scored: no bar, a note
                ys.append(0.0)
                errs.append(0.0)
                notes.append("n/a")
                continue
            ys.append(e["accuracy"])
            err = None
            if error == "std" or (error == "sem" and e["n"] is None):
                err = e["std"]
            if error in ("sem", "auto") and e["n"] and e["std"] is not None:
                err = e["std"] / np.sqrt(e["n"])
            if error == "ci95" and e["n"]:
                lo, hi = wilson_ci95(e["accuracy"], int(e["n"]))
                err = (max(0.0, e["accuracy"] - lo), max(0.0, hi - e["accuracy"]))
            errs.append(err if err is not None else 0.0)
            notes.append(_fmt(e["accuracy"]) + (f" ({_fmt(e['std'])})" if e["std"] is not None else ""))
        pairs = [e if isinstance(e, tuple) else (e, e) for e in errs]
        yerr = np.array(pairs).T if any(any(p) for p in pairs) else None
        bars = ax.bar(xs, ys, width=bw * 0.95, color=palette[j % len(palette)], label=plain(c), yerr=yerr,
                      capsize=2)
        labelled.append((bars, notes, [y + p[1] for y, p in zip(ys, pairs)]))
    ax.set_xticks(range(len(models)), [wrap_label(plain(m or "model")) for m in models])
    ax.set_ylabel("accuracy")
    top = max([e["accuracy"] for m in models for e in rows[m].values() if e["accuracy"] is not None],
              default=0.0)
    ax.set_ylim(0, min(1.0, top * 1.35 + 0.05))
    ax.legend(title="knockout", fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0.0, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    if has_outputs:
        ax2 = axes[0, 1]
        kinds = list(dict.fromkeys(k for m in models for e in rows[m].values() if e["outputs"]
                                   for k in e["outputs"]))
        labels, fracs = [], []
        for m in models:
            for c in conds:
                e = rows[m].get(c)
                if e is None or not e["outputs"]:
                    continue
                tot = sum(e["outputs"].values()) or 1
                labels.append(plain(f"{m}\n{c}" if m else c))
                fracs.append([e["outputs"].get(k, 0) / tot for k in kinds])
        fr = np.array(fracs)
        left = np.zeros(len(labels))
        kind_colors = ["#55A868", "#C44E52", "#8172B3", "#CCB974", "#64B5CD"]
        for k_i, k in enumerate(kinds):
            ax2.barh(range(len(labels)), fr[:, k_i], left=left, color=kind_colors[k_i % len(kind_colors)],
                     label=plain(k))
            left += fr[:, k_i]
        ax2.set_yticks(range(len(labels)), labels, fontsize=7)
        ax2.invert_yaxis()
        ax2.set_xlim(0, 1)
        ax2.set_xlabel("fraction of outputs")
        ax2.set_title("output kinds", fontsize=10)
        ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
        fig.set_size_inches(fig.get_size_inches()[0], max(height, 0.9 + 0.28 * len(labels)))
    fig.tight_layout()
    untangle_ticks(fig, [ax])
    fig.canvas.draw()
    for bars, notes, tops in labelled:
        annotate_bars(ax, bars, notes, tops, fontsize=6)
    return fig


def knockout_table_html(table: Mapping, *,
                        caption: str | None = "Attention knockout (accuracy, std)") -> HTMLFragment:
    """The knockout input (see `fig_knockout`) as an HTML table in the paper's format:
    one row per model, one column per condition, ``.356 (.479)``."""
    rows = normalize_knockout(table)
    conds = list(dict.fromkeys(c for m in rows for c in rows[m]))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in conds)
    body = []
    for m, entries in rows.items():
        cells = []
        for c in conds:
            e = entries.get(c)
            cells.append("<td></td>" if e is None else
                         f"<td>{_fmt(e['accuracy'], 'n/a')}" + (f" ({_fmt(e['std'])})" if e["std"] is not None else "")
                         + "</td>")
        body.append(f"<tr><th>{html.escape(m or 'model')}</th>{''.join(cells)}</tr>")
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return HTMLFragment(f'<table class="mechvlm-table">{cap}<tr><th>model</th>{head}</tr>{"".join(body)}</table>')


# --------------------------------------------------------------------------- logit lens --
