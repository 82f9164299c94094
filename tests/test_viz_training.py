"""Figures of a fine-tuning run: what is drawn equals the log's / the table's numbers."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib", reason="mechvlm.viz needs the viz extra")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mechvlm.viz import fig_loss_curve, fig_registering_table  # noqa: E402

ROWS = [{"step": 0, "val_loss": 9.0, "lr": 1e-5}] + [
    {"step": s, "loss": 10.0 / s, "lr": 1e-4 * (1 - s / 30), **({"val_loss": 8.0 / s} if s % 10 == 0 else {})}
    for s in range(1, 31)]


def test_loss_curve_draws_the_log(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    fig = fig_loss_curve(path, smooth=5)
    ax = fig.axes[0]
    lines = {l.get_label(): l for l in ax.get_lines()}
    raw = lines["train (per step)"]
    assert np.allclose(raw.get_ydata(), [10.0 / s for s in range(1, 31)])
    run = lines["train (5-step mean)"]
    assert np.allclose(run.get_ydata()[0], np.mean([10.0 / s for s in range(1, 6)]))
    val = lines["validation"]
    assert list(val.get_xdata()) == [0, 10, 20, 30] and np.allclose(val.get_ydata(), [9.0, 0.8, 0.4, 8 / 30])
    assert np.allclose(fig.axes[1].get_lines()[0].get_ydata()[1:], [r["lr"] for r in ROWS[1:]])
    plt.close(fig)
    assert len(fig_loss_curve({"a": ROWS, "b": ROWS}).axes) == 4  # two panels, each with its lr axis
    plt.close("all")


def test_registering_table_bars():
    table = {"m": {"none": {"accuracy": 0.8, "std": 0.4, "n": 100, "outputs": {"letter": 0.9, "other": 0.1}},
                   "16": {"accuracy": 0.3, "std": 0.46, "n": 100, "outputs": {"letter": 0.5, "eos_only": 0.5}}}}
    fig = fig_registering_table(table, variants=["none", "eoi", "16"])  # a missing variant is skipped
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["none", "16"]
    from matplotlib.container import BarContainer

    bars = [c for c in ax.containers if isinstance(c, BarContainer) and c.get_label() == "accuracy"][0]
    acc = [p.get_height() for p in bars.patches]
    assert np.allclose(acc, [0.8, 0.3])
    plt.close("all")
