"""mechvlm.viz without a browser: labels, collapsing, widget HTML, attention on the image
(pixel geometry checked on the drawn canvas), per-head thumbnails."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("matplotlib", reason="mechvlm.viz needs the viz extra")
pytest.importorskip("circuitsvis", reason="mechvlm.viz needs the viz extra")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import qwen_batch  # noqa: E402
from viz_helpers import force_text_to_cell, image_with_square  # noqa: E402

from mechvlm import HookedVLM, viz  # noqa: E402
from mechvlm.viz.html import props_json  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# --------------------------------------------------------------------------- labels --
def test_token_labels_two_images_and_padding(qwen_model):
    batch = qwen_batch([[2, (1, 4, 4), 1, (1, 2, 4), 2], [3, (1, 2, 2), 1]], seed=0)
    roles = qwen_model.roles(**batch)
    labels = viz.token_labels(roles, batch["input_ids"], safe=False)
    ids = batch["input_ids"][0].tolist()
    assert labels[:3] == [str(ids[0]), str(ids[1]), "<BOI>"]
    assert labels[3:7] == ["<img0 0,0>", "<img0 0,1>", "<img0 1,0>", "<img0 1,1>"]
    assert labels[7] == "<EOI>" and labels[10:12] == ["<img1 0,0>", "<img1 0,1>"]
    row1 = viz.token_labels(roles, batch["input_ids"], batch_index=1, safe=False)
    n_pad = int(roles.pad[1].sum())
    assert n_pad > 0 and row1[:n_pad] == ["<pad>"] * n_pad
    assert row1.count("<img 0,0>") == 1  # a single image (1x1 tokens) in the row: no index
    # a tokenizer-like object decodes text
    tok = type("Tok", (), {"decode": staticmethod(lambda xs: f"t{xs[0]}")})()
    assert viz.token_labels(roles, batch["input_ids"], tokenizer=tok, safe=False)[0] == f"t{ids[0]}"
    assert viz.token_labels(roles, safe=False)[0] == "#0"


def test_html_safe_labels():
    assert viz.html_safe("<|image_pad|>") == "\u2039|image_pad|\u203a"
    assert viz.html_safe("a&b\n") == "a\uff06b\u21b5"
    assert viz.html_safe("  ") == "\u00b7\u00b7"
    assert "<" not in viz.html_safe("<img 3,5>")


# ----------------------------------------------------------------------- collapsing --
def test_collapse_sums_keys_and_averages_queries(qwen_model):
    batch = qwen_batch([[2, (1, 4, 4), 1, (1, 2, 4), 2]], seed=0)
    roles = qwen_model.roles(**batch)
    _, cache = qwen_model.run_with_cache(**batch)
    p = cache["pattern", 1][0].double()
    groups, names = viz.token_groups(roles, p.shape[-1])
    assert names[2] == "<BOI>" and names[3] == "<image 0 2\u00d72>" and names[7] == "<image 1 1\u00d72>"
    c = viz.collapse(p, groups)
    assert c.shape == (p.shape[0], len(groups), len(groups))
    torch.testing.assert_close(c.sum(-1), torch.ones(c.shape[:2], dtype=c.dtype))
    img0 = list(range(3, 7))
    last = p.shape[-1] - 1
    torch.testing.assert_close(c[:, -1, 3], p[:, last, img0].sum(-1))  # key: summed mass
    torch.testing.assert_close(c[:, 3, 2], p[:, img0, 2].mean(-1))  # query: mean over the image


# --------------------------------------------------------------------------- widgets --
def test_widget_html_closed_rounded_escaped(qwen_model, image_batch):
    roles = qwen_model.roles(**image_batch)
    _, cache = qwen_model.run_with_cache(**image_batch)
    labels = ["</script><b>x</b>"] + [f"#{i}" for i in range(1, roles.shape[1])]
    w = viz.attention_heads(cache, roles, layer=0, labels=labels, decimals=3)
    frag = w.fragment()
    assert re.search(rf'<div id="{w.id}" style="margin: 15px 0;"></div>', frag)  # closed, not "/>"
    assert "</script><b>" not in frag and "/>" not in frag
    payload = re.search(r"var p=(\{.*?\});function go", frag).group(1)
    props = json.loads(payload)
    assert props["tokens"][0] == "\u2039/script\u203a\u2039b\u203ax\u2039/b\u203a"
    vals = np.array(props["attention"])
    assert vals.shape[0] == 4 and np.allclose(vals, np.round(vals, 3))
    assert all(len(repr(v).split(".")[-1]) <= 3 for v in vals.ravel().tolist())
    assert props["attentionHeadNames"] == ["L0H0", "L0H1", "L0H2", "L0H3"]
    assert props["maskUpperTri"] is True
    # the collapsed widget has one column for the image (4x6 patches -> 2x3 tokens)
    groups, _ = viz.token_groups(roles, roles.shape[1])
    assert len(props["tokens"]) == len(groups) == roles.shape[1] - 6 + 1


def test_props_json_escapes_script_end():
    s = props_json({"tokens": ["</script>", "a&b", "\u2028"], "v": float("nan"), "none": None})
    assert "<" not in s and ">" not in s and "&" not in s and "\u2028" not in s
    assert json.loads(s) == {"tokens": ["</script>", "a&b", "\u2028"], "v": None}


def test_page_includes_bundle_once(qwen_model, image_batch):
    roles = qwen_model.roles(**image_batch)
    _, cache = qwen_model.run_with_cache(**image_batch)
    page = viz.Page("three widgets")
    page.add(viz.attention_heads(cache, roles, layer=0))
    page.add(viz.attention_pattern(cache, roles, layer=1, head=2, collapse_images=False))
    page.add(viz.colored_tokens(torch.arange(roles.shape[1]).float(), roles))
    bundle = viz.circuitsvis_bundle()
    assert len(bundle) > 1_000_000
    for doc in (page.html(), page._repr_html_()):
        assert doc.count('data-mechvlm="circuitsvis-bundle"') == 1
        assert doc.count("CircuitsVis.render(") == 3
        assert "unpkg.com" not in doc and 'type="module"' not in doc
    single = viz.attention_pattern(cache, roles, layer=0)._repr_html_()
    assert single.count('data-mechvlm="circuitsvis-bundle"') == 1  # standalone in a notebook
    # a page of figures only needs no bundle
    assert "circuitsvis-bundle" not in viz.Page().add(plt.figure()).html()


def test_expanded_gemma_like_pattern_not_masked():
    a = torch.tensor([[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])
    w = viz.attention_pattern(a, labels=["a", "b", "c"])
    assert w.props["maskUpperTri"] is False
    assert viz.attention_pattern(torch.tril(a), labels=["a", "b", "c"]).props["maskUpperTri"] is True


def test_colored_tokens_values_drop_padding(qwen_model):
    batch = qwen_batch([[3, (1, 2, 2), 1], [6, (1, 2, 2), 4]], seed=2)
    roles = qwen_model.roles(**batch)
    vals = torch.randn(roles.shape)
    w = viz.colored_tokens(vals, roles, batch_index=0, input_ids=batch["input_ids"])
    keep = ~roles.pad[0]
    assert len(w.props["tokens"]) == int(keep.sum())
    assert np.allclose(w.props["values"], np.round(vals[0][keep].double().numpy(), 4))


def test_head_thumbnails_figure(qwen_model, image_batch):
    roles = qwen_model.roles(**image_batch)
    _, cache = qwen_model.run_with_cache(**image_batch)
    fig = viz.head_thumbnails(cache, roles, layer=2, heads=[0, 3], ncols=2)
    axes = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in axes] == ["L2H0", "L2H3"]
    shown = axes[1].images[0].get_array()
    groups, _ = viz.token_groups(roles, roles.shape[1])
    expect = viz.collapse(cache["pattern", 2][0, 3].double(), groups)
    assert np.allclose(np.asarray(shown), expect.numpy())


# ------------------------------------------------------------------ attention on image --
def _hot_pixels_in_data_coords(fig, ax, color, tol=0.05):
    """Canvas pixels of ``ax`` whose RGB is within ``tol`` of ``color``, as data coords."""
    fig.canvas.draw()
    buf = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float) / 255
    hc = buf.shape[0]
    ys, xs = np.nonzero(np.abs(buf - np.asarray(color)).max(-1) < tol)
    disp = np.c_[xs + 0.5, hc - ys - 0.5]
    bb = ax.get_window_extent()
    inside = (disp[:, 0] > bb.x0) & (disp[:, 0] < bb.x1) & (disp[:, 1] > bb.y0) & (disp[:, 1] < bb.y1)
    return ax.transData.inverted().transform(disp[inside])


def _check_peak_on_square(fig, ax, square, size, cmap="viridis", alpha=0.55):
    """The overlay's hottest colour over white (= the square) appears, and only on the
    square's pixels."""
    H, W = size
    hot = (1 - alpha) * np.ones(3) + alpha * np.asarray(matplotlib.colormaps[cmap](1.0)[:3])
    pts = _hot_pixels_in_data_coords(fig, ax, hot)
    fx0, fy0, fx1, fy1 = square
    assert len(pts) > 50, "the hot colour over the bright square was not drawn"
    x, y = pts[:, 0], pts[:, 1]
    on_square = (x > fx0 * W - 2) & (x < fx1 * W + 2) & (y > fy0 * H - 2) & (y < fy1 * H + 2)
    assert on_square.mean() > 0.99
    cx, cy = x.mean(), y.mean()
    assert abs(cx - (fx0 + fx1) / 2 * W) < 3 and abs(cy - (fy0 + fy1) / 2 * H) < 3


def test_attention_on_image_qwen_peak_on_square(qwen_model):
    batch = qwen_batch([[4, (1, 8, 12), 6]], seed=1)  # merged grid 4 x 6
    cell = (2, 4)
    roles, cache, target = force_text_to_cell(qwen_model, batch, layer=1, image=0, cell=cell)
    assert torch.all(cache["pattern", 1][0][:, roles.text[0], target] == 1.0)  # the edit was cached
    r = viz.received_per_position(cache, roles, layer=1, queries="text")
    (span, grid), = viz.image_grids(r, roles)
    assert grid.shape == (4, 6) and np.unravel_index(grid.argmax(), grid.shape) == cell
    assert grid[cell] == pytest.approx(int(roles.text[0].sum()))
    assert viz.model_pixel_size(span, qwen_model.cfg) == (4 * 28, 6 * 28)

    image, square = image_with_square(250, 170, (4, 6), cell)  # not the processor's size
    fig = viz.attention_on_image(cache, roles, [image], layer=1, cfg=qwen_model.cfg, cmap="viridis")
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (224, 336, 3)  # resized to h*28 x w*28, shown 2x (min_side)
    assert ax.images[0].get_extent() == ax.images[1].get_extent() == [0, 168, 112, 0]
    _check_peak_on_square(fig, ax, square, (112, 168))
    # the numpy composite: the heat's peak pixels are the cell holding the square
    heat = viz.heat_pixels(grid, (112, 168))
    ys, xs = np.nonzero(heat == heat.max())
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (56, 83, 112, 139)
    comp = viz.overlay(image, grid, size=(112, 168), cmap="viridis")
    sq = comp[int(square[1] * 112) + 3, int(square[0] * 168) + 3]
    assert sq.tolist() == pytest.approx([254, 242, 135], abs=3)
    # precomputed values draw the same grid; an embeddable <img>
    fig2 = viz.attention_on_image(r, roles, [image], cfg=qwen_model.cfg)
    assert np.allclose(np.asarray(fig2.axes[0].images[1].get_array()), grid)
    tag = viz.attention_on_image_html(cache, roles, [image], layer=1, cfg=qwen_model.cfg)
    assert tag.startswith('<img src="data:image/png;base64,')


def test_attention_on_image_qwen_two_images(qwen_model):
    batch = qwen_batch([[2, (1, 4, 4), 2, (1, 4, 8), 4]], seed=3)  # grids 2x2 and 2x4
    roles, cache, _ = force_text_to_cell(qwen_model, batch, layer=2, image=1, cell=(1, 3))
    im0, _ = image_with_square(60, 60, (2, 2), (0, 0))
    im1, square = image_with_square(200, 90, (2, 4), (1, 3))
    fig = viz.attention_on_image(cache, roles, {0: im0, 1: im1}, layer=2, cfg=qwen_model.cfg, cmap="viridis")
    panels = [ax for ax in fig.axes if len(ax.images) == 2]
    assert len(panels) == 2
    assert panels[0].images[0].get_extent() == [0, 56, 56, 0]
    assert panels[1].images[0].get_extent() == [0, 112, 56, 0]
    assert panels[1].images[0].get_array().shape == (112, 224, 3)  # long side >= min_side 224
    _check_peak_on_square(fig, panels[1], square, (56, 112))
    assert len(_hot_pixels_in_data_coords(fig, panels[0], [0.997, 0.948, 0.529])) == 0
    with pytest.raises(ValueError, match="2 image"):
        viz.attention_on_image(cache, roles, [im0], layer=2)


def test_attention_on_image_gemma3_square_grid():
    from test_gemma3 import batch_from, make_hf

    model = HookedVLM.from_hf(make_hf(seed=0, n_layers=3, mm_tokens=16, layer_types=None))
    batch = batch_from([[2, "image", 1, "image", 3]], mm=16, seed=0)
    roles, cache, _ = force_text_to_cell(model, batch, layer=2, image=0, cell=(3, 1))
    spans = [s for s, _ in viz.image_grids(torch.zeros(roles.shape[1]), roles)]
    assert [s.grid for s in spans] == [(1, 4, 4), (1, 4, 4)]
    assert viz.model_pixel_size(spans[0], model.cfg) == (28, 28)  # the tiny config's image_size
    image, square = image_with_square(120, 80, (4, 4), (3, 1))  # a non-square original
    other, _ = image_with_square(50, 50, (4, 4), (0, 0), seed=1)
    fig = viz.attention_on_image(cache, roles, [image, other], layer=2, cfg=model.cfg, cmap="viridis",
                                 size=5)
    ax = fig.axes[0]
    assert ax.images[0].get_extent() == [0, 28, 28, 0]  # squashed to the processor's square
    assert ax.images[0].get_array().shape == (224, 224, 3)
    _check_peak_on_square(fig, ax, square, (28, 28))
