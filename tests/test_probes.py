"""Probe scores on hand-made grids with known answers, the estimators against closed forms,
and the probes on the shipped toy Qwen2.5-VL."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechvlm.analyses.estimators import bootstrap, kmeans, logistic_probe, r_squared, ridge_fit
from mechvlm.analyses.image_kv import ImageKV
from mechvlm.analyses.probe_data import grid_box, grid_coverage, grid_mask, grid_points
from mechvlm.analyses.probe_metrics import majority_labels, miou, pck, pck_chance
from mechvlm.analyses.probes import correspondence_scores, segmentation_scores

torch.set_num_threads(min(2, torch.get_num_threads()))


# ----------------------------------------------------------------- hand-made grids --
def test_miou_on_hand_made_grids():
    truth = torch.tensor([[1, 0], [0, 0]])
    pred = torch.tensor([[1, 1], [0, 0]])
    # object: |{0}| / |{0, 1}| = 1/2; background: |{2, 3}| / |{1, 2, 3}| = 2/3
    assert miou(pred, truth) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert miou(truth, truth) == 1.0
    assert miou(1 - truth, truth) == 0.0
    assert miou(torch.zeros(4), torch.zeros(4)) == 1.0  # the absent class is skipped
    assert miou(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 1]), n_classes=3) == pytest.approx((1 + .5 + .5) / 3)


def test_majority_labels():
    clusters = torch.tensor([0, 0, 0, 1, 1, 2])
    truth = torch.tensor([1, 1, 0, 0, 0, 1])
    assert majority_labels(clusters, truth).tolist() == [1, 1, 1, 0, 0, 1]


def test_pck_and_its_chance_on_a_4x4_grid():
    truth = torch.tensor([[0, 0], [1, 1], [3, 2]])
    pred = torch.tensor([[0, 0], [1, 2], [0, 0]])
    assert pck(pred, truth, (4, 4), alpha=0.0) == pytest.approx(1 / 3)
    assert pck(pred, truth, (4, 4), alpha=0.25) == pytest.approx(2 / 3)  # within one cell
    assert pck_chance(torch.tensor([[0, 0]]), (4, 4), 0.0) == pytest.approx(1 / 16)
    # one cell: corner -> itself + 2 neighbours, inner cell -> itself + 4
    assert pck_chance(torch.tensor([[0, 0]]), (4, 4), 0.25) == pytest.approx(3 / 16)
    assert pck_chance(torch.tensor([[1, 1]]), (4, 4), 0.25) == pytest.approx(5 / 16)
    # a 2 x 4 grid: the threshold is alpha * max(h, w) = 0.25 * 4 = 1 cell (min would give 0.5)
    assert pck(torch.tensor([[0, 1], [1, 3]]), torch.tensor([[0, 0], [0, 0]]), (2, 4), alpha=0.25) == pytest.approx(0.5)
    assert pck_chance(torch.tensor([[0, 0]]), (2, 4), 0.25) == pytest.approx(3 / 8)


def test_pixel_masks_and_points_on_the_token_grid():
    m = np.zeros((4, 4), dtype=bool)
    m[0, :2] = True
    assert grid_coverage(m, 2, 2).tolist() == [[0.5, 0.0], [0.0, 0.0]]
    m3 = np.zeros((3, 3), dtype=bool)
    m3[0, 0] = True  # pixel (0, 0) of a 3x3 image: cell (0, 0) of a 2x2 grid spans 1.5 x 1.5 px
    assert grid_coverage(m3, 2, 2)[0, 0].item() == pytest.approx(1 / 2.25)
    m3[1, 1] = True  # the centre pixel is split four ways
    torch.testing.assert_close(grid_coverage(m3, 2, 2), torch.tensor([[1.25, .25], [.25, .25]],
                                                                      dtype=torch.float64) / 2.25)
    assert grid_mask(m, 2, 2, 0.5).tolist() == [[True, False], [False, False]]
    big = np.zeros((112, 112), dtype=bool)
    big[30:60, 60:100] = True
    assert grid_box(big, 4, 4).nonzero().tolist() == [[1, 2], [1, 3], [2, 2], [2, 3]]
    assert grid_points(np.array([[0, 0], [111.9, 55], [56, 111]]), (112, 112), 4, 4).tolist() == \
        [[0, 0], [1, 3], [3, 2]]
    from mechvlm.toy.scenes import make_scene

    s = make_scene("color", np.random.default_rng(3))
    assert torch.equal(grid_mask(s.object_mask, 4, 4, 0.5), torch.from_numpy(s.token_mask()))


# ----------------------------------------------------------------------- estimators --
def test_estimators_against_closed_forms():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64) + 0.7
    w, b = ridge_fit(x, y, alpha=0.0)
    ref = torch.linalg.lstsq(torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], 1), y[:, None]).solution[:, 0]
    torch.testing.assert_close(w, ref[:5])
    assert b == pytest.approx(float(ref[5]))
    w2, _ = ridge_fit(x, y, alpha=10.0)  # the normal equations with the penalty
    xc, yc = x - x.mean(0), y - y.mean()
    torch.testing.assert_close(w2, torch.linalg.solve(xc.T @ xc + 10 * torch.eye(5, dtype=torch.float64), xc.T @ yc))
    assert r_squared(y, x @ w + b) == pytest.approx(1.0)
    lo, hi = bootstrap(lambda idx: y[idx].mean(), 200, samples=300)
    assert lo < y.mean() < hi
    pts = torch.cat([torch.randn(30, 2, generator=g) * 0.1 + c for c in (torch.tensor([0., 0.]), torch.tensor([5., 5.]))])
    labels = kmeans(pts, 2)
    assert len(set(labels[:30].tolist())) == 1 and len(set(labels[30:].tolist())) == 1 and labels[0] != labels[-1]
    many = kmeans(torch.stack([pts, pts.flip(0)]), 2)  # a leading batch axis clusters each set
    assert many.shape == (2, 60) and torch.equal(many[0] == many[0, 0], many[1].flip(0) == many[1, -1])
    predict = logistic_probe(pts, torch.tensor([0] * 30 + [1] * 30))
    assert predict(torch.tensor([[0.1, -0.1], [4.9, 5.2]])).tolist() == [0, 1]


# ------------------------------------------------------------ probes on known features --
def _kv(features: torch.Tensor, grid=(2, 2)) -> ImageKV:
    """An ImageKV of ``features [image, h*w, d]`` under the table name ``value.0``."""
    n, t, d = features.shape
    return ImageKV(features={"value.0": features.reshape(n * t, 1, d)}, image_example=torch.arange(n),
                   image_slot=torch.zeros(n, dtype=torch.long), image_grid=torch.tensor([[1, *grid]] * n),
                   image_offset=torch.arange(n) * t, layers=[0], kinds=["value"])


def test_segmentation_and_correspondence_on_known_features():
    g = torch.Generator().manual_seed(1)
    masks = [torch.tensor([[1, 0], [0, 0]]), torch.tensor([[0, 1], [1, 0]]), torch.tensor([[0, 0], [1, 1]]),
             torch.tensor([[1, 1], [0, 1]])] * 3
    fg, bg = torch.randn(8, generator=g), torch.randn(8, generator=g)
    feats = torch.stack([torch.stack([fg if v else bg for v in m.flatten().tolist()]) for m in masks])
    feats = feats + 0.01 * torch.randn(feats.shape, generator=g)
    for method in ("kmeans", "linear"):
        (row,) = segmentation_scores(_kv(feats), masks, method=method, k=2)
        assert row["score"] == pytest.approx(1.0) and row["chance"] < 0.9, (method, row)
    # correspondence: a cell's feature names the cell (one-hot), image b is image a moved by one column
    eye = torch.eye(4)
    a, b = eye, eye[[1, 0, 3, 2]]  # b's cell (r, c) holds a's cell (r, 1 - c)
    rows = correspondence_scores(_kv(torch.stack([a, b])), [(0, 1)], [torch.tensor([[0, 0], [1, 1]])],
                                 [torch.tensor([[0, 1], [1, 0]])])
    assert rows[0]["score"] == 1.0 and rows[0]["chance"] == pytest.approx(1 / 4)
    wrong = correspondence_scores(_kv(torch.stack([a, b])), [(0, 1)], [torch.tensor([[0, 0], [1, 1]])],
                                  [torch.tensor([[0, 0], [1, 1]])])
    assert wrong[0]["score"] == 0.0


# --------------------------------------------------------------------------- the toy --
@pytest.fixture(scope="module")
def toy():
    from mechvlm import HookedVLM
    from mechvlm.processing import InputBuilder
    from mechvlm.toy.checkpoint import SHIPPED

    return HookedVLM.from_pretrained(str(SHIPPED["qwen2_5_vl"])), InputBuilder.from_pretrained(SHIPPED["qwen2_5_vl"])


def test_text_prefix_goes_before_the_image(toy):
    model, builder = toy
    from mechvlm.analyses.probe_data import toy_segmentation

    image = toy_segmentation(1)[0].image
    from PIL import Image

    with_prefix = builder(["What color is the shape?"], [[Image.fromarray(image)]], prefixes="Look at the image carefully.")
    tok = builder.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": [
        {"type": "text", "text": "Look at the image carefully."}, {"type": "image"},
        {"type": "text", "text": "What color is the shape?"}]}], add_generation_prompt=True, tokenize=False)
    want = tok(text.replace("<|image_pad|>", "<|image_pad|>" * 16), add_special_tokens=False)["input_ids"]
    assert with_prefix["input_ids"][0].tolist() == want
    roles = model.roles(**with_prefix)
    assert tok.convert_tokens_to_ids("Look at the image carefully.") in with_prefix["input_ids"][0][roles.prefix[0]].tolist()
    plain = builder(["What color is the shape?"], [[Image.fromarray(image)]])
    assert torch.equal(builder(["x"], [[Image.fromarray(image)]], prefixes=[None])["input_ids"],
                       builder(["x"], [[Image.fromarray(image)]])["input_ids"])
    assert with_prefix["input_ids"].shape[1] == plain["input_ids"].shape[1] + 1


def test_probes_find_the_object_on_the_toy(toy):
    from mechvlm.analyses.probe_data import toy_correspondence, toy_referring, toy_segmentation
    from mechvlm.analyses.probes import run_probes

    model, builder = toy
    res = run_probes(model, builder, segmentation=toy_segmentation(16, 0), correspondence=toy_correspondence(8, 1),
                     referring=toy_referring(16, 2), method="linear", progress=False)
    for task in ("segmentation", "correspondence", "referring"):
        best = res.best(task)
        assert best["score"] > best["chance"] + 0.15, (task, best)
    kinds, layers, table = res.table("correspondence")
    assert kinds == ["key", "value", "vision"] and layers == [0, 1, 2, 3] and table.shape == (3, 4)
    # the vision row: nearest neighbours on the encoder output find the moved object exactly
    assert res.score("correspondence", "vision") == 1.0


def test_referring_hits_on_hand_made_queries_and_keys():
    from mechvlm.analyses.probes import _score_rows

    d = 4
    e = torch.eye(d, dtype=torch.float64)
    keys = torch.stack([e[0], e[1], e[2], e[3]])[:, None]  # 4 image tokens on a 2x2 grid, one KV head
    got = {"q0": [None], "k0": [keys], "vq0": [None], "vi0": [keys], "embed": [None], "vision": [None]}
    got["q0"] = torch.stack([10 * e[2], 5 * e[1]])[None]       # head 0 looks at cell 2, head 1 (less sharply) at 1
    got["vq0"] = e[3][None, None]                               # the value matches cell 3
    got["embed"] = e[0][None]
    got["vision"] = [torch.stack([-e[0], e[1], e[2], e[0]])]    # the embedding matches cell 3
    box = torch.tensor([[False, False], [True, True]])           # cells 2 and 3
    hits, chance = {}, []
    n = _score_rows(got, [box], 0, 1, [0], 2, 1.0, chance,
                    lambda key, hit: hits.setdefault(key, []).append(float(hit)))
    assert n == 1 and chance == [0.5]
    assert hits[("key", 0, 0)] == [1.0] and hits[("key", 0, 1)] == [0.0]
    assert hits[("value", 0, "all")] == [1.0] and hits[("vision", None, "all")] == [1.0]
    assert hits[("key", 0, "all")] == [1.0]  # the head-mean attention peaks at the sharper head's cell
