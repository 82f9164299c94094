"""HookedVLM on LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision against HF's own models.

HF is the reference everywhere: eager attention, real-token ``position_ids`` under left
padding; token counts per image from HF's ``get_image_features``; anyres cell coordinates
from HF's ``pack_image_features`` applied to features that encode their own tile, row and
column."""

from __future__ import annotations

import pytest
import torch

from llava_helpers import FAMILIES, hf_kwargs, llava_batch, make_hf_llava
from mechvlm import HookedVLM
from mechvlm.roles import MissingRoleError
from mechvlm.synthetic import LLAVA_IDS
from parity_helpers import assert_parity

torch.set_num_threads(min(2, torch.get_num_threads()))
IMG = LLAVA_IDS["image"]
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# family, config overrides, rows, image sizes (NeXT / OneVision), OneVision batch_num_images
CASES = {
    "llava_three_images_padded": ("llava", {}, [[3, "image", 4, "image", 2], [2, "image", 5]], None, False),
    "llava_cls_kept_two_layers": ("llava", dict(strategy="full", feature_layer=[-2, -1]),
                                  [[2, "image", "image", 3], [4, "image", 1]], None, False),
    "next_three_layouts_padded": ("llava_next", {}, [[3, "image", 2, "image", 3], [4, "image", 2]],
                                  [(10, 60), (50, 50), (84, 10)], False),
    "next_llama3_rope": ("llava_next", dict(rope_parameters=LLAMA3_ROPE, n_layers=3),
                         [[2, "image", 3], [1, "image", 2, "image", 2]], [(60, 30), (28, 28), (30, 90)], False),
    "onevision_anyres_max_and_multi_image_row": ("llava_onevision", {}, [[3, "image", 2], [4, "image", 2, "image", 1]],
                                                 [(50, 70), (20, 40), (40, 20)], True),
    "onevision_sliding_window_tied": ("llava_onevision", dict(tie=True, layer_types=["sliding_attention",
                                                                                      "full_attention"],
                                                              sliding_window=24, use_sliding_window=True),
                                      [[5, "image", 3], [2, "image", 9]], [(90, 40), (56, 84)], False),
}


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family, **kw):
        key = (family, repr(sorted(kw.items())))
        if key not in cache:
            hf = make_hf_llava(family, seed=len(cache), **kw)
            cache[key] = (hf, HookedVLM.from_hf(hf))
        return cache[key]

    return get


@pytest.mark.parametrize("case", CASES)
def test_parity_with_hf_eager(models, case):
    family, kw, rows, sizes, per_row = CASES[case]
    hf, model = models(family, **kw)
    batch = llava_batch(hf, rows, sizes, seed=1, per_row_images=per_row)
    assert batch["input_ids"].shape[1] > 30 and "attention_mask" in batch
    assert_parity(case, hf, model, batch, hf_kwargs(batch))
    if "cls" in case:  # the kept CLS token of each image has no cell; the 4x4 grid follows it
        roles = model.roles(**batch)
        starts = [s.start for s in roles.spans]
        assert len(starts) == 3 and (roles.grid_row[0, starts[0]] == -1) and roles.grid_row[0, starts[0] + 1] == 0
        assert [s.n_tokens for s in roles.spans] == [17] * 3
    if "sliding" in case:  # the window bites: the last query of layer 0 no longer sees the first tokens
        assert model.cfg.window(0) == 24 and model.cfg.window(1) is None and model.unembed.weight is model.embed.W_E
        _, cache = model.run_with_cache(**batch, names_filter=lambda n: n.endswith("hook_pattern"))
        assert (cache["pattern", 0][:, :, -1, :-24] == 0).all() and (cache["pattern", 1][:, :, -1, :-24] > 0).any()


def test_built_after_hf_ran(models):
    """HF installs its hidden-state capture hooks on the tower at the first call; mechvlm's
    private copy drops every hook, and must let HF install them again (else LLaVA's layer
    selection finds no hidden state)."""
    hf, _ = models("llava")
    batch = llava_batch(hf, [[2, "image", 3]], seed=3)  # runs HF's get_image_features first
    assert hf.model.vision_tower._output_capturing_hooks_installed
    model = HookedVLM.from_hf(hf)
    with torch.no_grad():
        assert (model(**batch) - hf(**batch).logits).abs().max() <= 1e-4


def test_llama3_rope_is_hf_s_and_not_the_default(models):
    hf, model = models("llava_next", rope_parameters=LLAMA3_ROPE, n_layers=3)
    assert model.cfg.rope_type == "llama3"
    ours = model._rotary["full_attention"].inv_freq
    theirs = hf.model.language_model.rotary_emb.inv_freq
    default = 1.0 / (5e5 ** (torch.arange(0, 16, 2).float() / 16))
    assert torch.equal(ours, theirs.float()) and not torch.allclose(ours, default)


def test_rejects_unsupported_rope_and_towers():
    from mechvlm.models import LLAVA
    from mechvlm.synthetic import llava_config

    cfg = llava_config("llava", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(NotImplementedError, match="rope_type 'dynamic' is not supported"):
        LLAVA.config_from_hf(cfg, dtype=torch.float32, device="cpu")
    cfg = llava_config("llava", tower="siglip", strategy="default")
    with pytest.raises(NotImplementedError, match="drops the first patch"):
        LLAVA.config_from_hf(cfg, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_cells_match_hf_pack_image_features(models, family):
    """Every token's (tile, row, col) == where HF's packing takes its feature from: features
    that hold their own canvas coordinates, packed by HF (OneVision's bilinear downsampling
    interpolates them: the token's cell must be the canvas cell under its value)."""
    from mechvlm.image_layout import ImageSpan, span_cells
    from mechvlm.models.llava_next import anyres_layout, num_tiles

    hf, model = models(family)
    cfg = model.cfg
    n = cfg.extra["tile_side"]
    sizes = [(10, 60), (50, 50), (84, 10), (50, 70), (90, 40), (56, 84), (28, 28), (33, 100)]
    shrunk = 0
    for size in sizes:
        tiles = num_tiles(cfg, size) - 1
        layout = anyres_layout(cfg, size, max_patches=cfg.extra.get("max_patches"))
        nph, npw = layout.views[1].tiles.tile_grid
        assert nph * npw == tiles
        t = torch.arange(tiles)
        r, c = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        canvas_y = (t // npw)[:, None] * n + r.reshape(1, -1)  # [tiles, n*n]
        canvas_x = (t % npw)[:, None] * n + c.reshape(1, -1)
        feats = torch.stack([canvas_y, canvas_x], -1).float()
        base = torch.full((1, n * n, 2), -5.0)
        kwargs = {"vision_feature_select_strategy": hf.config.vision_feature_select_strategy} \
            if family == "llava_next" else {"vision_aspect_ratio": hf.config.vision_aspect_ratio}
        (packed,), _ = hf.model.pack_image_features([torch.cat([base, feats])], torch.tensor([size]),
                                                    image_newline=torch.tensor([-1.0, -1.0]), **kwargs)
        span = ImageSpan(0, 0, 0, layout.n_tokens, layout.grid, views=layout.views)  # one image at position 0
        cells = span_cells(span)
        assert packed.shape[0] == layout.n_tokens
        newline = (packed == -1).all(-1)
        assert torch.equal(cells["newline"], newline)
        tiled = (cells["tile"] > 0)
        assert torch.equal(cells["tile"] == 0, (packed == -5).all(-1))
        tr, tc = (cells["tile"][tiled] - 1) // npw, (cells["tile"][tiled] - 1) % npw
        ours = torch.stack([tr * n + cells["row"][tiled], tc * n + cells["col"][tiled]], -1).float()
        assert (ours - packed[tiled]).abs().max() <= 0.5 + 1e-4, size
        shrunk += int(layout.views[1].tiles.scale != (1.0, 1.0))
        if layout.views[1].tiles.scale == (1.0, 1.0):
            assert torch.equal(ours, packed[tiled])
    assert shrunk >= (1 if family == "llava_onevision" else 0)


def test_llava_roles_by_hand(models):
    hf, model = models("llava")
    # BOS t t I*16 t I*16 t t : a 4x4 grid per image, no EOI, no image start
    batch = llava_batch(hf, [[2, "image", 1, "image", 2]], seed=2)
    roles = model.roles(**batch)
    assert roles.image[0].nonzero().squeeze(1).tolist() == list(range(3, 19)) + list(range(20, 36))
    assert roles.bos[0].nonzero().squeeze(1).tolist() == [0]
    assert roles.prefix[0].nonzero().squeeze(1).tolist() == [0, 1, 2]
    assert roles.text[0].nonzero().squeeze(1).tolist() == [19, 36, 37]
    assert not roles.eoi.any() and not roles.image_start.any() and not roles.newline.any()
    assert roles.grid_row[0, 3:19].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert roles.grid_col[0, 20:24].tolist() == [0, 1, 2, 3] and roles.image_index[0, 20].item() == 1
    assert set(roles.missing) == {"eoi", "image_start", "video", "newline"}


def test_llava_next_roles_tiles_and_newlines(models):
    hf, model = models("llava_next")
    # (10, 60): pinpoint 28x84, 1x3 tiles of 4x4; the 4x12 canvas unpadded to its 2 middle rows
    batch = llava_batch(hf, [[1, "image", 2]], [(10, 60)], seed=3)
    roles = model.roles(**batch)
    img = roles.image[0].nonzero().squeeze(1)
    assert len(img) == 16 + 2 * 13
    tiles = img[16:]
    assert roles.newline[0, tiles].nonzero().squeeze(1).tolist() == [12, 25]
    cells = tiles[~roles.newline[0, tiles]]
    assert roles.grid_tile[0, cells].tolist() == ([1] * 4 + [2] * 4 + [3] * 4) * 2
    assert roles.grid_row[0, cells].tolist() == [1] * 12 + [2] * 12  # canvas rows 1, 2 of each tile
    assert roles.grid_col[0, cells].tolist() == [0, 1, 2, 3] * 6
    assert (roles.grid_tile[0, img[:16]] == 0).all() and (roles.grid_row[0, roles.newline[0]] == -1).all()
    from mechvlm import viz

    labels = viz.token_labels(roles, safe=False)
    assert labels[img[0]] == "<img b 0,0>" and labels[cells[5]] == "<img t2 1,1>" and labels[tiles[12]] == "<img nl>"


def test_missing_eoi_is_an_error_not_a_no_op(models):
    from mechvlm import attention_share
    from mechvlm.interventions import insert_registers, knockout, register_mask
    from mechvlm.mmbench.conditions import CONDITIONS

    hf, model = models("llava")
    batch = llava_batch(hf, [[2, "image", 3]], seed=4)
    roles = model.roles(**batch)
    for mode in ("post_softmax_zero", "pre_softmax_mask"):
        with pytest.raises(MissingRoleError, match="no 'eoi' role: LlavaForConditionalGeneration has no end-of-image"):
            knockout(roles, "text", "eoi", mode=mode)
    with pytest.raises(MissingRoleError, match="'eoi'"):
        register_mask(roles)
    with pytest.raises(MissingRoleError, match="'eoi'"):
        insert_registers(batch["input_ids"], 2, roles=roles, token_id=5)
    with pytest.raises(MissingRoleError, match="'eoi'"):
        attention_share(model, batch, progress=False)  # default keys image, eoi
    with pytest.raises(MissingRoleError, match="'eoi'"):
        CONDITIONS["text→EOI:pre_softmax_mask"](batch, roles)
    with pytest.raises(MissingRoleError, match="'image_start'"):
        roles.mask(["image", "image_start"])
    assert knockout(roles, "text", "image")  # the image role is there


def test_input_errors(models):
    hf, model = models("llava_next")
    batch = llava_batch(hf, [[1, "image", 2]], [(50, 50)], seed=5)
    with pytest.raises(ValueError, match="image_sizes is None"):
        model(batch["input_ids"], batch["pixel_values"])
    with pytest.raises(ValueError, match="input_ids hold 88 image tokens .* give 42 features"):
        model(**{**batch, "image_sizes": torch.tensor([[10, 60]])})
    with pytest.raises(ValueError, match="pixel_values .* must hold 1 image"):
        model(**{**batch, "pixel_values": batch["pixel_values"][:, :2]})
    with pytest.raises(ValueError, match="video_grid_thw is not used by LLaVA-NeXT"):
        model(**batch, video_grid_thw=torch.tensor([[1, 2, 2]]))
    hf_ov, ov = models("llava_onevision")
    two = llava_batch(hf_ov, [[1, "image", "image", 2]], [(20, 40), (40, 20)], seed=6, per_row_images=True)
    with pytest.raises(ValueError, match="batch_num_images is given"):
        ov(**{k: v for k, v in two.items() if k != "batch_num_images"})
    rows = llava_batch(hf_ov, [[1, "image", "image", 2], [5]], [(20, 40), (40, 20)], seed=6, per_row_images=True)
    assert rows["batch_num_images"].tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"batch_num_images \[0, 2\] disagrees with the images per row .* \[2, 0\]"):
        ov(**{**rows, "batch_num_images": torch.tensor([0, 2])})
    with pytest.raises(NotImplementedError, match="does not support video"):
        ov(**two, pixel_values_videos=torch.zeros(1, 2, 3, 28, 28))


def test_anyres_heatmap_panels(models):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mechvlm import viz

    hf, model = models("llava_next")
    batch = llava_batch(hf, [[1, "image", 2]], [(50, 50)], seed=7)  # 2x2 tiles, 8x8 canvas, no crop
    roles = model.roles(**batch)
    hit = (roles.grid_tile[0] == 4) & (roles.grid_row[0] == 1) & (roles.grid_col[0] == 2)  # tile (1, 1)
    values = torch.zeros(roles.shape[1])
    values[hit] = 1.0
    base, tiles = viz.image_panels(values, roles)
    assert (base.view.name, base.grid.shape, tiles.view.name, tiles.grid.shape) == ("base", (4, 4), "tiles", (8, 8))
    assert tiles.grid[4 + 1, 4 + 2] == 1.0 and tiles.grid.sum() == 1.0 and base.grid.sum() == 0
    fig = viz.attention_on_image(values, roles, cfg=model.cfg)
    titles = [ax.get_title() for ax in fig.axes if len(ax.images) == 2]
    assert titles == ["image 0 base: 4\u00d74 tokens", "image 0 tiles: 8\u00d78 tokens"]
    assert viz.model_pixel_size(tiles.span, model.cfg, tiles.view) == (56, 56)
    plt.close("all")


def test_generation_matches_hf_greedy(models):
    from mechvlm.generation import greedy_generate

    hf, model = models("llava_next")
    batch = llava_batch(hf, [[3, "image", 2], [1, "image", 4]], [(10, 60), (50, 50)], seed=8)
    gen = greedy_generate(model, batch, max_new_tokens=3, eos_token_ids=[LLAVA_IDS["eos"]])
    ids, am = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for _ in range(3):
            nxt = hf(**hf_kwargs({**batch, "input_ids": ids, "attention_mask": am}), use_cache=False).logits[:, -1]
            ids = torch.cat([ids, nxt.argmax(-1)[:, None]], 1)
            am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
    assert gen.sequences.tolist() == ids.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_crosscheck_with_nnsight(models, family):
    pytest.importorskip("nnsight")
    from mechvlm.crosscheck import crosscheck

    hf, _ = models(family)
    sizes = None if family == "llava" else [(20, 40), (50, 50), (40, 20)]
    batch = llava_batch(hf, [[2, "image", 3, "image", 1], [3, "image", 2]], sizes, seed=9,
                        per_row_images=family == "llava_onevision")
    report = crosscheck(hf, batch)
    assert report.passed, report.table()
    assert set(report.skipped) == {"text->eoi"} and "share/text" in {r.quantity for r in report.rows}
    assert min(report.effects.values()) > 1e-2


def test_vlmbatch_row_selection_keeps_image_sizes(models):
    """TransformerLens-style row selection of a LLaVA-NeXT batch: the chosen rows' images and
    their image_sizes; images written back to back cannot be assigned to rows and raise."""
    from mechvlm.forward_args import VLMBatch

    hf, model = models("llava_next")
    batch = llava_batch(hf, [[2, "image", 3, "image", 1], [3, "image", 2]], [(20, 40), (50, 50), (40, 20)], seed=10)
    rows = VLMBatch(batch, image_token_id=IMG)[1:2]
    assert rows["image_sizes"].tolist() == [[40, 20]] and rows["pixel_values"].shape[0] == 1
    with torch.no_grad():
        assert (model(**rows)[0] - model(**batch)[1]).abs().max() <= 1e-5
    adjacent = llava_batch(hf, [[2, "image", "image", 1]], [(20, 40), (50, 50)], seed=10)
    with pytest.raises(ValueError, match="1 runs of image tokens but 2 images"):
        VLMBatch(adjacent, image_token_id=IMG)[0:1]
