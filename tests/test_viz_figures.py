"""matplotlib figures of the metric results: what is drawn equals the result's numbers."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib", reason="mechvlm.viz needs the viz extra")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import qwen_batch  # noqa: E402

from mechvlm.viz import figures as F  # noqa: E402
from mechvlm.viz import knockout as K  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

# seed 000, Table 1 (MMBench accuracy, std over items): the expected input format
TABLE1 = {
    "Gemma3 4B": {"none": (.356, .479), "text->img": (.169, .375), "text->EOI": (.224, .418)},
    "Qwen2.5-VL 7B": {"none": (.410, .492), "text->img": (.086, .281), "text->EOI": (.001, .026)},
}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---------------------------------------------------------------------------- knockout --
def test_normalize_knockout_forms():
    one = K.normalize_knockout({"none": (.4, .49), "text->img": 0.1})
    assert one == {"": {"none": {"accuracy": .4, "std": .49, "n": None, "outputs": None},
                        "text->img": {"accuracy": .1, "std": None, "n": None, "outputs": None}}}
    nested = K.normalize_knockout({"m": {"none": {"accuracy": .5, "std": .5, "n": 100,
                                                  "outputs": {"letter": 90, "eos_only": 10}}}})
    assert nested["m"]["none"]["n"] == 100 and nested["m"]["none"]["outputs"]["eos_only"] == 10
    with pytest.raises(ValueError, match="accuracy"):
        K.normalize_knockout({"model": {"none": {"acc": .5}}})
    with pytest.raises(ValueError, match="empty"):
        K.normalize_knockout({})


def test_fig_knockout_bars_and_labels():
    fig = K.fig_knockout(TABLE1)
    ax = fig.axes[0]
    heights = sorted(round(p.get_height(), 3) for p in ax.patches)
    assert heights == sorted([.356, .169, .224, .410, .086, .001])
    notes = {t.get_text() for t in ax.texts}
    assert {".356 (.479)", ".001 (.026)", ".086 (.281)"} <= notes
    assert [t.get_text() for t in ax.get_xticklabels()] == list(TABLE1)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["none", "text->img", "text->EOI"]
    assert len(fig.axes) == 1  # no output kinds given


def test_fig_knockout_sem_and_outputs():
    table = {"none": {"accuracy": .4, "std": .49, "n": 400, "outputs": {"letter": 380, "eos_only": 20}},
             "text->img": {"accuracy": .1, "std": .3, "n": 400, "outputs": {"letter": 100, "eos_only": 300}}}
    fig = K.fig_knockout(table)
    ax, ax2 = fig.axes
    caps = [c for c in ax.containers if hasattr(c, "has_yerr") and c.has_yerr]
    assert caps, "sem error bars expected when n is given"
    seg = caps[0].lines[2][0].get_segments()[0]
    assert seg[1][1] - seg[0][1] == pytest.approx(2 * .49 / np.sqrt(400), rel=1e-6)
    widths = [round(p.get_width(), 3) for p in ax2.patches]
    assert widths == [.95, .25, .05, .75]  # letter (none, ko) then eos_only (none, ko)
    html = K.knockout_table_html(TABLE1).html
    assert "<td>.356 (.479)</td>" in html and "<th>Qwen2.5-VL 7B</th>" in html


# -------------------------------------------------------- figures of metric results --
@pytest.fixture(scope="module")
def metric_results(qwen_model):
    from mechvlm import metrics

    batches = [qwen_batch([[4, (1, 8, 12), 6]], seed=s) for s in range(2)]
    return dict(
        batches=batches,
        share=metrics.attention_share(qwen_model, batches, progress=False),
        received=metrics.received_attention(qwen_model, batches, progress=False),
        lens=metrics.logit_lens(qwen_model, batches, k=3, labels=list(range(5, 40)), progress=False),
        sim=metrics.visual_text_similarity(qwen_model, batches, progress=False),
    )


def test_fig_attention_share_stacks_the_shares(metric_results):
    res = metric_results["share"]
    fig = F.fig_attention_share(res)
    ax = fig.axes[0]
    n_layers = len(res.layers)
    bars = [p for p in ax.patches]
    assert len(bars) == n_layers * len(res.keys)
    expect = res.mean_head_mean_share.double().numpy()
    for k in range(len(res.keys)):
        got = [b.get_height() for b in bars[k * n_layers:(k + 1) * n_layers]]
        assert np.allclose(got, expect[:, k])
    tops = [b.get_y() + b.get_height() for b in bars[-n_layers:]]
    assert np.allclose(tops, 1.0)  # image + EOI shares stack to 1
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["text\u2192image", "text\u2192EOI"]
    # other readings and one panel per model
    fig2 = F.fig_attention_share({"a": res, "b": res}, reading=1, keys=["eoi"])
    assert len(fig2.axes) == 2
    assert np.allclose([b.get_height() for b in fig2.axes[1].patches], res.mean_share[:, 1, 1].double().numpy())
    with pytest.raises(ValueError, match="reading"):
        F.fig_attention_share(res, reading="median")


def test_fig_received_attention_curves(metric_results):
    res = metric_results["received"]
    fig = F.fig_received_attention(res, layers=[0, 2])
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 3  # two layers + the diagonal
    assert np.allclose(lines[1].get_ydata(), res.mean_curve[2].double().numpy())
    assert np.allclose(lines[0].get_xdata(), res.curve_x.double().numpy())
    frac = res.mean_frac_tokens[0].tolist()
    assert ax.get_legend().get_texts()[0].get_text() == "L0 (" + "/".join(f"{v:.2f}" for v in frac) + ")"
    head = F.fig_received_attention(res, head=1, thresholds=False)
    assert np.allclose(head.axes[0].get_lines()[0].get_ydata(), res.curve_per_head_mean[0, 1].double().numpy())
    with pytest.raises(ValueError, match="not measured"):
        F.fig_received_attention(res, layers=[7])


def test_fig_logit_lens_grid_and_on_image(metric_results, qwen_model):
    res = metric_results["lens"]
    tok = type("Tok", (), {"decode": staticmethod(lambda xs: f"w{xs[0]}")})()
    fig = F.fig_logit_lens(res, example=1, tokenizer=tok, max_positions=12)
    ax = fig.axes[0]
    sel = (res.example == 1).nonzero()[:, 0][:12]
    assert np.allclose(ax.images[0].get_array(), res.top_probs[sel][:, :, 0].T.double().numpy())
    assert ax.texts[0].get_text() == f"w{int(res.top_ids[sel[0], 0, 0])}"
    assert len(fig.axes) == 3  # grid, colour bar, alignment
    assert np.allclose(fig.axes[1].get_lines()[0].get_xdata(), res.alignment.double().numpy())
    roles = qwen_model.roles(**metric_results["batches"][1])
    fig = F.fig_logit_lens(res, example=1, roles=roles, batch_index=0, max_positions=8)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][:7] == \
        ["0,0", "0,1", "0,2", "0,3", "0,4", "0,5", "1,0"]

    fig = F.fig_logit_lens_on_image(res, roles, layer=1, example=1, batch_index=0, tokenizer=tok,
                                    cfg=qwen_model.cfg)
    ax = fig.axes[0]
    pos = res.position[(res.example == 1)].tolist()
    first = (res.example == 1).nonzero()[0, 0]
    li = res.layers.index(1)
    t = ax.texts[0]
    r, c = int(roles.grid_row[0, pos[0]]), int(roles.grid_col[0, pos[0]])
    assert t.get_text() == f"w{int(res.top_ids[first, li, 0])}"
    assert t.get_position() == pytest.approx(((c + 0.5) * 28, (r + 0.5) * 28))


def test_fig_visual_text_similarity(metric_results):
    res = metric_results["sim"]
    fig = F.fig_visual_text_similarity({"tiny": res})
    ax = fig.axes[0]
    mx, mean = ax.get_lines()
    assert np.allclose(mx.get_ydata(), np.nanmean(res.max.double().numpy(), 0))
    assert np.allclose(mean.get_ydata(), np.nanmean(res.mean.double().numpy(), 0))
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(l) for l in res.layers]
    assert len(F.fig_visual_text_similarity(res, stat="max", show_examples=True).axes[0].get_lines()) == 3
