"""The figures of the K/V probes, key artifacts, head attribution and causal tracing draw the
results' own numbers (results built by hand)."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib", reason="mechvlm.viz needs the viz extra")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mechvlm.analyses.causal_tracing import CausalTraceResult  # noqa: E402
from mechvlm.analyses.head_attribution import HeadAttributionResult  # noqa: E402
from mechvlm.analyses.key_artifacts import KeyArtifactResult  # noqa: E402
from mechvlm.analyses.probes import ProbeResult  # noqa: E402
from mechvlm.viz import fig_causal_trace, fig_head_attribution, fig_key_artifacts, fig_probe_scores  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_fig_probe_scores_draws_the_table():
    rows = [{"task": "segmentation", "kind": k, "layer": l, "head": "all", "score": s, "chance": 0.4, "n": 8}
            for k, l, s in (("key", 0, .5), ("key", 1, .7), ("value", 0, .6), ("value", 1, .9), ("vision", None, .8))]
    rows.append({"task": "segmentation", "kind": "key", "layer": 0, "head": 1, "score": .99, "chance": .4, "n": 8})
    fig = fig_probe_scores(ProbeResult(rows))
    lines = {l.get_label(): list(l.get_ydata()) for l in fig.axes[0].get_lines()}
    assert lines == {"key": [.5, .7], "value": [.6, .9], "vision encoder": [.8, .8], "chance": [.4, .4]}


def test_fig_head_attribution_and_causal_trace_draw_the_matrices():
    w = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    res = HeadAttributionResult(weights=w, ci_low=w - 1, ci_high=w + 1, intercept=0.0, r2_train=1.0, r2_test=0.9,
                                masks=torch.zeros(3, 2, 2, dtype=torch.bool), drops=torch.zeros(3, 1),
                                clean=torch.zeros(1), targets=torch.zeros(1), single=-w, attention=w.abs(),
                                n_forwards=1, wall_s=0.0, settings={"ablation": "image_kv", "unit": "query_head"})
    fig = fig_head_attribution(res)
    images = [ax.get_images()[0].get_array() for ax in fig.axes if ax.get_images()]
    assert len(images) == 3
    np.testing.assert_allclose(images[0], w.numpy())
    np.testing.assert_allclose(images[1], -w.numpy())
    np.testing.assert_allclose(images[2], w.abs().numpy())
    p = torch.tensor([[[0.2, 0.6], [1.0, 0.2]]])  # one example, 2 layers x 2 groups
    tr = CausalTraceResult(p=p, p_heads=None, p_clean=torch.tensor([1.0]), p_corrupt=torch.tensor([0.2]),
                           targets=torch.zeros(1), layers=[0, 1], groups=["image row 0", "last"], kind="resid",
                           window=1, corruption="noise", n_forwards=1, wall_s=0.0)
    fig = fig_causal_trace(tr)
    np.testing.assert_allclose(fig.axes[0].get_images()[0].get_array(), [[0.0, 0.5], [1.0, 0.0]], atol=1e-6)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["image row 0", "last"]


def test_fig_key_artifacts_boxes_the_artifacts():
    cons = torch.zeros(2, 2, 2, 1)
    cons[1, 0, 0, 0] = 0.95
    cons[1, 1, 1, 0] = 0.91
    res = KeyArtifactResult(consistency=cons, value_consistency=None, threshold=0.9, layers=[0, 3], grid=(2, 2),
                            n_images=4)
    fig = fig_key_artifacts(res)
    panels = [ax for ax in fig.axes if ax.get_images()][:2]
    np.testing.assert_allclose(panels[1].get_images()[0].get_array(), cons[1, :, :, 0].numpy())
    assert [len(ax.patches) for ax in panels] == [0, 2]
    assert res.fraction.tolist() == [0.0, 0.5]
