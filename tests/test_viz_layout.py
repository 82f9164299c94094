"""Text layout of the figures: the overlap checker itself, and the report's figures (Table 1
bars, the two attention-share readings, the per-layer heatmap rows) drawn clean with up to
six models and long checkpoint names. Plus the Wilson interval of the error bars, against a
brute-force inversion of the score test."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("matplotlib", reason="mechvlm.viz needs the viz extra")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from conftest import qwen_batch  # noqa: E402  (at import: later, 'conftest' is tests/tl_compat's)
from mechvlm.mmbench.conditions import CONDITIONS  # noqa: E402
from mechvlm.viz import knockout as K  # noqa: E402
from mechvlm.viz.layout import layout_problems, legend_overlaps, text_boxes, text_overlaps  # noqa: E402
from mechvlm.viz.table1 import fig_table1, wilson_ci95  # noqa: E402

LONG = ["Qwen2.5-VL-7B-Instruct", "gemma-3-12b-it-long-checkpoint-name", "Qwen2.5-VL-3B-Instruct",
        "gemma-3-4b-it", "x" * 40, "llava-onevision-qwen2-7b-ov"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _toy_results(models, accs=(1.0, .275, .333, 1.0, 1.0), n=400):
    out = {}
    for m in models:
        out[m] = {}
        for (name, cond), a in zip(CONDITIONS.items(), accs):
            out[m][name] = {"accuracy": a, "std": math.sqrt(a * (1 - a)), "n": n, "condition": cond.describe()}
    return out


def test_checker_sees_overlaps_and_covering_legends():
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.set_title("a title")
    ax.text(0.5, 1.0, "on the title", transform=ax.transAxes, ha="center", va="bottom")
    assert any({a.text, b.text} == {"a title", "on the title"} for a, b in text_overlaps(fig))
    fig2, ax2 = plt.subplots(figsize=(3, 2))
    ax2.bar([0, 1, 2], [1, 1, 1], label="bars")
    ax2.set_ylim(0, 1)
    ax2.legend(loc="upper right")
    assert legend_overlaps(fig2) and layout_problems(fig2)
    ax2.get_legend().remove()
    ax2.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    assert legend_overlaps(fig2) == []


def test_checker_counts_only_drawn_text():
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.set_xticks([0, 0.5, 1, 5], ["0", "half", "1", "outside"])
    ax.set_xlim(0, 1)  # tick 5 is now outside the view: not drawn
    ax.text(0.5, 0.5, "   ")  # blank
    hidden = ax.text(0.2, 0.2, "hidden")
    hidden.set_visible(False)
    texts = [b.text for b in text_boxes(fig)]
    assert "half" in texts and "outside" not in texts and "hidden" not in texts and "   " not in texts
    assert layout_problems(fig) == []


def test_wilson_interval_inverts_the_score_test():
    grid = np.linspace(0, 1, 200001)
    for p, n in [(0.275, 400), (1.0, 12), (0.0, 8), (0.5, 3), (0.083, 12)]:
        lo, hi = wilson_ci95(p, n)
        z = 1.959963984540054
        inside = grid[np.abs(p - grid) <= z * np.sqrt(grid * (1 - grid) / n)]
        assert lo == pytest.approx(inside.min(), abs=2e-5) and hi == pytest.approx(inside.max(), abs=2e-5)
    with pytest.raises(ValueError, match="at least one item"):
        wilson_ci95(0.5, 0)


@pytest.mark.parametrize("n_models", [1, 2, 4, 6])
def test_table1_figure_is_clean_and_draws_the_numbers(n_models):
    res = _toy_results(LONG[:n_models])
    fig = fig_table1(res)
    assert layout_problems(fig) == []
    assert [ax.get_title() for ax in fig.axes] == ["knockout mode: pre_softmax_mask", "knockout mode: post_softmax_zero"]
    ax = fig.axes[1]  # post_softmax_zero: none, text→image:post (.333), text→EOI:post (1.0) per model
    heights = sorted(round(p.get_height(), 3) for p in ax.patches)
    assert heights == sorted([1.0, .333, 1.0] * n_models)
    # the error bars are the Wilson intervals over the n items
    lo, hi = wilson_ci95(.333, 400)
    segs = [s for c in ax.containers if getattr(c, "has_yerr", False) for s in c.lines[2][0].get_segments()]
    assert any(np.allclose([s[0][1], s[1][1]], [lo, hi], atol=1e-9) for s in segs)
    labels = {t.get_text() for t in ax.texts}
    assert ".333 (.471)" in labels and "1.000 (.000)" in labels


def test_fig_knockout_labels_and_legend_stay_clear():
    """main's chart put the labels of 1.000 bars into the title and the legend over the bars."""
    table = {m: {c: {"accuracy": a, "std": math.sqrt(a * (1 - a)), "n": 400,
                     "outputs": {"letter": 360, "eos_only": 40, "other": 0}}
                 for c, a in {"none": 1.0, "text->img": .275, "text->EOI": 1.0}.items()} for m in LONG[:4]}
    fig = K.fig_knockout(table, error="ci95")
    assert layout_problems(fig) == []
    assert {".275 (.447)", "1.000 (.000)"} <= {t.get_text() for t in fig.axes[0].texts}


def test_attention_share_two_readings_side_by_side(qwen_model):
    from mechvlm import metrics
    from mechvlm.viz import fig_attention_share

    res = metrics.attention_share(qwen_model, [qwen_batch([[4, (1, 8, 12), 6]], seed=s) for s in range(2)],
                                  progress=False)
    fig = fig_attention_share({"(a)": res, "(b)": res}, reading=("head_sum", "head_mean"), title=LONG[1],
                              width=3.6, height=3.0)
    assert layout_problems(fig) == []
    n = len(res.layers)
    for ax, expect in zip(fig.axes[:2], (res.mean_head_share, res.mean_head_mean_share)):
        assert np.allclose([p.get_height() for p in ax.patches[:n]], expect[:, 0].double().numpy())
    assert "head sum" in fig.axes[0].get_title() and "head mean" in fig.axes[1].get_title()
    with pytest.raises(ValueError, match="readings"):
        fig_attention_share({"a": res}, reading=("head_sum", "head_mean"))


def test_heatmap_row_has_one_scale_and_every_layer():
    from PIL import Image

    from mechvlm.viz import attention_on_image_layers

    grids = [np.arange(16.0).reshape(4, 4) / 100 * (k + 1) for k in range(4)]
    fig = attention_on_image_layers(grids, [0, 1, 2, 3], Image.new("RGB", (112, 112), "grey"),
                                    label="mean attention weight")
    assert layout_problems(fig) == []
    panels = [ax for ax in fig.axes if ax.get_title().startswith("layer")]
    assert [ax.get_title() for ax in panels] == ["layer 0", "layer 1", "layer 2", "layer 3"]
    heat = [ax.get_images()[-1] for ax in panels]
    assert [im.norm.vmax for im in heat] == pytest.approx([0.6] * 4)  # 15 / 100 * 4: the row's maximum
    assert [im.norm.vmin for im in heat] == [0.0] * 4
    assert len(fig.axes) == len(panels) + 1  # one colour bar for the row
    with pytest.raises(ValueError, match="one grid per layer"):
        attention_on_image_layers(grids, [0, 1], None)
