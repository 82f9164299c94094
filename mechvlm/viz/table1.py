"""Seed 000 Table 1 as a figure, in the table's own shape: one panel per knockout mode,
one group of bars per model, one bar per direction (none, text→image, text→EOI).

`fig_table1` takes ``{model: evaluate(...) result}`` (`mechvlm.mmbench.evaluate`: each
condition's summary carries its ``direction`` and ``mode``); the ``none`` condition has no
mode and is drawn in every panel, as Table 1 repeats it in each mode's row.

Error bars are 95 % Wilson score intervals of the accuracy over the scored items
(`wilson_ci95`): unlike the normal interval they stay inside [0, 1] and do not collapse to
zero width at an accuracy of 0 or 1 (the toys score 1.000 without a knockout).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from mechvlm.viz.text import plain

__all__ = ["wilson_ci95", "fig_table1", "table1_entries", "annotate_bars", "untangle_ticks", "wrap_label", "DIRECTION_LABELS"]

Z95 = 1.959963984540054
DIRECTION_LABELS = {"none": "none", "text→image": "text→img", "text→EOI": "text→EOI"}
DIRECTION_COLORS = {"none": "#8c8c8c", "text→image": "#4C72B0", "text→EOI": "#DD8452"}
EXTRA_COLORS = ["#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3"]


def wilson_ci95(accuracy: float, n: int) -> tuple[float, float]:
    """The 95 % Wilson score interval ``(low, high)`` of a proportion ``accuracy`` over
    ``n`` items: the ``p0`` with ``|accuracy - p0| <= z sqrt(p0 (1 - p0) / n)``."""
    if n <= 0:
        raise ValueError(f"a confidence interval needs at least one item, got n={n}")
    z2 = Z95 * Z95
    centre = (accuracy + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(accuracy * (1 - accuracy) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def table1_entries(results: Mapping) -> tuple[list[str], list[str], list[str], dict]:
    """``(models, modes, directions, {(model, mode, direction): summary})`` of
    ``{model: {condition name: summary}}``. A condition without a mode (``none``, a custom
    one) fills that direction in every mode; conditions without ``condition`` metadata
    count as their own direction without a mode."""
    from mechvlm.mmbench.conditions import DIRECTIONS

    cells, modes, dirs = {}, [], []
    for m, conds in results.items():
        for name, s in conds.items():
            meta = s.get("condition") or {}
            d, mode = meta.get("direction", name), meta.get("mode")
            if mode is not None and mode not in modes:
                modes.append(mode)
            if d not in dirs:
                dirs.append(d)
    modes = modes or [None]
    dirs = [d for d in DIRECTIONS if d in dirs] + [d for d in dirs if d not in DIRECTIONS]
    for m, conds in results.items():
        for name, s in conds.items():
            meta = s.get("condition") or {}
            d, mode = meta.get("direction", name), meta.get("mode")
            for target in ([mode] if mode is not None else modes):
                cells.setdefault((m, target, d), s)
    return list(results), modes, dirs, cells


def annotate_bars(ax, bars, notes, tops, *, fontsize: float = 6.5) -> None:
    """Value labels read bottom-up (rotated 90°): inside the bar from its base when the bar
    is tall enough to hold the label, else above ``tops`` (the bar's error-bar top), so no
    label reaches the title or covers an error bar."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    y_per_px = (ax.get_ylim()[1] - ax.get_ylim()[0]) / max(1.0, ax.get_window_extent(renderer).height)
    for b, note, top in zip(bars, notes, tops):
        x = b.get_x() + b.get_width() / 2
        t = ax.text(x, 0, note, rotation=90, ha="center", va="bottom", fontsize=fontsize)
        need = t.get_window_extent(renderer).height * y_per_px
        if b.get_height() > need * 1.15 + 0.02:
            t.set_position((x, 0.01))
            t.set_color("white")
        else:
            t.set_position((x, top + 0.015))


def fig_table1(results: Mapping, *, chance: float | None = 0.25, panel_width: float | None = None,
               height: float = 3.4, error: str | None = "ci95", annotate: bool = True):
    """Table 1 as grouped bars, one panel per knockout mode (see the module docstring).

    ``results``: ``{model: {condition: summary}}`` with each summary's ``accuracy``, ``std``,
    ``n`` and ``condition`` (direction, mode). ``error``: ``"ci95"`` (Wilson 95 % interval
    over the ``n`` scored items) or None. ``chance``: a dashed line (e.g. 0.25 for four
    options; None for none). Bars with no accuracy (no answers in the TSV) are not drawn.
    Returns the Figure.
    """
    import matplotlib.pyplot as plt

    models, modes, dirs, cells = table1_entries(results)
    colors = {d: DIRECTION_COLORS.get(d, EXTRA_COLORS[i % len(EXTRA_COLORS)]) for i, d in enumerate(dirs)}
    pw = panel_width or max(3.2, 0.42 * len(models) * len(dirs) + 1.2)
    fig, axes = plt.subplots(1, len(modes), figsize=(pw * len(modes) + 1.6, height), squeeze=False,
                             sharey=True)
    bw = 0.8 / max(1, len(dirs))
    labelled = []  # (ax, bars, notes, tops): labelled once the layout is final
    for ax, mode in zip(axes[0], modes):
        ax.set_ylim(0, 1.0)
        for j, d in enumerate(dirs):
            xs, ys, lo, hi, notes = [], [], [], [], []
            for i, m in enumerate(models):
                s = cells.get((m, mode, d))
                if s is None or s.get("accuracy") is None:
                    continue
                acc, n = float(s["accuracy"]), s.get("n")
                xs.append(i + (j - (len(dirs) - 1) / 2) * bw)
                ys.append(acc)
                a, b = wilson_ci95(acc, int(n)) if (error == "ci95" and n) else (acc, acc)
                lo.append(max(0.0, acc - a))
                hi.append(max(0.0, b - acc))
                std = s.get("std")
                notes.append(_fmt(acc) + (f" ({_fmt(std)})" if std is not None else ""))
            if not xs:
                continue
            bars = ax.bar(xs, ys, width=bw * 0.92, color=colors[d], label=plain(DIRECTION_LABELS.get(d, d)),
                          yerr=np.array([lo, hi]) if error else None, capsize=2,
                          error_kw={"elinewidth": 0.8, "ecolor": "black"})
            labelled.append((ax, bars, notes, [y + h for y, h in zip(ys, hi)]))
        if chance is not None:
            ax.axhline(chance, ls="--", lw=0.8, color="black", alpha=0.6, zorder=0)
        ax.set_xticks(range(len(models)), [wrap_label(plain(m)) for m in models], fontsize=8)
        ax.set_xlim(-0.6, len(models) - 0.4)
        ax.set_title(plain(f"knockout mode: {mode}") if mode else "accuracy", fontsize=9)
    axes[0, 0].set_ylabel("MMBench accuracy")
    handles, labels = axes[0, -1].get_legend_handles_labels()
    if chance is not None:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], ls="--", lw=0.8, color="black", alpha=0.6))
        labels.append(f"chance ({chance:.3g})")
    axes[0, -1].legend(handles, labels, title="blocked", fontsize=7, title_fontsize=7, loc="upper left",
                       bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    fig.tight_layout()
    untangle_ticks(fig, axes[0])
    if annotate:
        fig.canvas.draw()
        for ax, bars, notes, tops in labelled:
            annotate_bars(ax, bars, notes, tops)
    return fig


def wrap_label(label: str, width: int = 14) -> str:
    """``label`` broken into lines of at most ~``width`` characters after ``-``, ``_``,
    ``/`` or a space (a checkpoint name stays readable under a narrow bar group)."""
    import re

    parts, lines, line = re.findall(r"[^-_/ ]+[-_/ ]?", label) or [label], [], ""
    parts = [p[i:i + width] for p in parts for i in range(0, len(p), width)]  # no part longer than width
    for p in parts:
        if line and len(line) + len(p) > width:
            lines.append(line)
            line = ""
        line += p
    return "\n".join(lines + [line])


def untangle_ticks(fig, axes) -> None:
    """Rotate the model names of every panel by 90° when they still overlap each other."""
    from mechvlm.viz.layout import TextBox

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in axes:
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        boxes = [TextBox(t.get_text(), *t.get_window_extent(renderer).extents) for t in labels]
        if any(a.overlap(b) > 0 for i, a in enumerate(boxes) for b in boxes[i + 1:]):
            for t in labels:
                t.set_rotation(90)
            fig.canvas.draw()
            grow = max(t.get_window_extent(renderer).height for t in labels) / fig.dpi
            fig.set_size_inches(fig.get_size_inches()[0], fig.get_size_inches()[1] + grow)
    fig.tight_layout()


def _fmt(x: float | None) -> str:
    if x is None:
        return ""
    s = f"{x:.3f}"
    return s[1:] if s.startswith("0.") else s
