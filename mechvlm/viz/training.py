"""Figures of a fine-tuning run (`mechvlm.training`): the loss curve and the Table-2 analog."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["fig_loss_curve", "fig_registering_table"]


def _rows(log) -> list[dict]:
    """A run's step rows: a list of dicts, a path to ``log.jsonl``, or its text."""
    import json
    from pathlib import Path

    if isinstance(log, (str, Path)) and Path(log).is_file():
        log = Path(log).read_text()
    if isinstance(log, str):
        return [json.loads(line) for line in log.splitlines() if line.strip()]
    return list(log)


def fig_loss_curve(log, *, title: str | None = None, smooth: int = 10, width: float = 6.5, height: float = 3.4):
    """Training loss per step (raw and a ``smooth``-step running mean), the validation loss
    at the steps it was measured, and the learning rate on a second axis.

    ``log``: the rows of ``log.jsonl`` (dicts with ``step``, ``loss``, ``lr``, optional
    ``val_loss``), the file's path, or ``{run name: rows}`` (one panel each)."""
    import matplotlib.pyplot as plt

    runs = log.items() if isinstance(log, Mapping) else [(None, log)]
    runs = [(name, _rows(r)) for name, r in runs]
    fig, axes = plt.subplots(1, len(runs), figsize=(width * len(runs), height), squeeze=False)
    for ax, (name, rows) in zip(axes[0], runs):
        train = [r for r in rows if r.get("loss") is not None]
        vals = [r for r in rows if r.get("val_loss") is not None]
        if train:
            steps = np.array([r["step"] for r in train])
            loss = np.array([r["loss"] for r in train], dtype=float)
            ax.plot(steps, loss, color="#4C72B0", alpha=0.3, linewidth=0.8, label="train (per step)")
            k = max(1, min(smooth, len(loss)))
            run = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], run, color="#4C72B0", linewidth=1.6, label=f"train ({k}-step mean)")
        if vals:
            ax.plot([r["step"] for r in vals], [r["val_loss"] for r in vals], "o-", color="#DD8452",
                    markersize=3.5, label="validation")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("caption-token cross-entropy")
        ax.set_yscale("log")
        lr_rows = [r for r in rows if r.get("lr") is not None]
        if lr_rows:
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in lr_rows], [r["lr"] for r in lr_rows], color="#999999", linewidth=0.9,
                     linestyle="--", label="lr")
            ax2.set_ylabel("learning rate", color="#777777")
            ax2.tick_params(axis="y", labelcolor="#777777", labelsize=8)
        ax.legend(fontsize=8, loc="upper right", frameon=False)
        ax.set_title(f"{name + ': ' if name else ''}{title or 'fine-tuning loss'}", fontsize=10)
    fig.tight_layout()
    return fig


def fig_registering_table(table: Mapping[str, Mapping[str, Mapping]], *, width: float = 4.2, height: float = 3.2,
                          variants: Sequence[str] | None = None):
    """Seed 000 Table 2 as bars: MMBench accuracy (error bar: the item std / sqrt(n)) per
    Registering variant, one panel per model, with the output kinds stacked under it.

    ``table``: ``{model: {variant: {"accuracy", "std", "n", "outputs": {kind: fraction}}}}``
    (the ``table2`` entry of the shipped results, `mechvlm.training.table2`)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(width * len(table), height), squeeze=False)
    kinds = ("letter", "eos_only", "other")
    colors = {"letter": "#55A868", "eos_only": "#C44E52", "other": "#8172B3"}
    for ax, (model, rows) in zip(axes[0], table.items()):
        names = [v for v in (variants or rows) if v in rows]
        x = np.arange(len(names))
        acc = np.array([rows[v]["accuracy"] for v in names], dtype=float)
        err = np.array([rows[v]["std"] / max(1, rows[v]["n"]) ** 0.5 for v in names], dtype=float)
        ax.bar(x, acc, width=0.6, color="#4C72B0", yerr=err, capsize=3, label="accuracy")
        for i, v in enumerate(names):
            bottom = 0.0
            for kind in kinds:
                f = float(rows[v].get("outputs", {}).get(kind, 0.0))
                ax.bar(x[i] + 0.36, f, width=0.1, bottom=bottom, color=colors[kind],
                       label=kind if i == 0 else None)
                bottom += f
        ax.axhline(0.25, color="#999999", linestyle=":", linewidth=0.9, label="chance (4 options)")
        ax.set_xticks(x, names, fontsize=8, rotation=15)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("MMBench accuracy / output share")
        ax.set_title(model, fontsize=10)
        ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    fig.tight_layout()
    return fig
