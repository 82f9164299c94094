"""Issue 16's token removal on the issue-20 inputs, against HF by hand: a Qwen2.5-VL image
pruned next to a video (the video keeps HF's temporal positions), LLaVA-1.5 images pruned
(1-D positions of the shorter sequence); and the analyses refuse, naming why, what they
cannot rank by grid cell (videos, anyres images)."""

from __future__ import annotations

import pytest
import torch

from llava_helpers import hf_kwargs as llava_hf_kwargs
from llava_helpers import llava_batch, make_hf_llava
from mechvlm import HookedVLM
from mechvlm.analyses import token_budget
from mechvlm.interventions import mask_image_keys, remove_image_tokens
from mechvlm.synthetic import LLAVA_IDS, QWEN_IDS
from test_qwen_video import hf_kw, video_batch
from test_token_pruning import _random_drop, _shorter_positions, _shorter_rows

torch.set_num_threads(min(2, torch.get_num_threads()))
TOL = 1e-4


def _scatter(emb, ids, token_id, feats):
    return emb.masked_scatter((ids == token_id)[..., None], feats)


def test_removed_qwen_image_next_to_a_video_equals_hf(qwen_hf, qwen_model):
    batch = video_batch([[2, (1, 4, 6), 2, ("video", 2, 4, 4), 3], [1, (1, 4, 4), 2]], seed=5, seconds=[0.5])
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    drop = _random_drop(ids, QWEN_IDS["image"], seed=4)
    assert int(drop.sum()) >= 4
    roles = qwen_model.roles(**batch)
    pb = remove_image_tokens(batch, roles, drop)
    assert len(pb.batch["image_cells"]) == 2  # the images only: the video keeps every token
    with torch.no_grad():
        ours = qwen_model(**pb.batch)
    kw = hf_kw(batch)
    full_pos, _ = qwen_hf.model.get_rope_index(ids, kw["mm_token_type_ids"], batch["image_grid_thw"],
                                               batch["video_grid_thw"], second_per_grid_ts=[0.5],
                                               attention_mask=batch["attention_mask"])
    new_ids, new_mask, cols = _shorter_rows(ids, real, drop, QWEN_IDS["pad"])
    pos = _shorter_positions(full_pos, new_ids, cols)
    with torch.no_grad():
        img = torch.cat(qwen_hf.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
        vid = torch.cat(qwen_hf.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])
                        .pooler_output)
        emb = qwen_hf.get_input_embeddings()(new_ids)
        emb = _scatter(emb, new_ids, QWEN_IDS["image"], img[~drop[ids == QWEN_IDS["image"]]])
        emb = _scatter(emb, new_ids, QWEN_IDS["video"], vid)
        ref = qwen_hf(inputs_embeds=emb, attention_mask=new_mask, position_ids=pos).logits
    assert torch.equal(pb.batch["input_ids"], new_ids)
    assert (ours - ref)[new_mask.bool()].abs().max() <= TOL
    with torch.no_grad():  # a real change
        assert (qwen_model(**batch)[:, -1] - ours[:, -1]).abs().max() > 1e-3
    # the video's roles and cells survive the removal
    after = qwen_model.roles(**pb.batch)
    assert int(after.video.sum()) == int(roles.video.sum()) == 2 * 2 * 2  # 2 frames, 4x4 patches merged 2x2
    assert int(after.image.sum()) == int(roles.image.sum()) - int(drop.sum())


@pytest.fixture(scope="module")
def llava():
    hf = make_hf_llava("llava", seed=3)
    return hf, HookedVLM.from_hf(hf)


def test_removed_llava_images_equal_hf_on_shorter_input(llava):
    hf, model = llava
    img = LLAVA_IDS["image"]
    batch = llava_batch(hf, [[3, "image", 4, "image", 2], [2, "image", 5]], seed=2)
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    drop = _random_drop(ids, img, seed=6)
    assert int(drop.sum()) >= 4
    pb = remove_image_tokens(batch, model.roles(**batch), drop)
    with torch.no_grad():
        ours = model(**pb.batch)
        feats = torch.cat(list(hf.model.get_image_features(batch["pixel_values"]).pooler_output))
        new_ids, new_mask, _ = _shorter_rows(ids, real, drop, LLAVA_IDS["pad"])
        emb = hf.get_input_embeddings()(new_ids.masked_fill(new_ids == img, 0))
        emb = _scatter(emb, new_ids, img, feats[~drop[ids == img]])
        kw = llava_hf_kwargs({"attention_mask": new_mask})
        ref = hf(inputs_embeds=emb, attention_mask=new_mask, position_ids=kw["position_ids"]).logits
    assert (ours - ref)[new_mask.bool()].abs().max() <= TOL
    with torch.no_grad():
        assert (model(**batch)[:, -1] - ours[:, -1]).abs().max() > 1e-3
    roles = model.roles(**pb.batch)  # the kept tokens keep their cells
    kept = ~drop[ids == img]
    n = hf.config.vision_config.image_size // hf.config.vision_config.patch_size
    cells = torch.cat([torch.arange(n * n)] * 3)[kept]
    assert torch.equal(roles.grid_row[roles.image], cells // n) and torch.equal(roles.grid_col[roles.image], cells % n)


def test_token_budget_runs_on_llava(llava):
    hf, model = llava
    batch = llava_batch(hf, [[3, "image", 4, 2], [2, "image", 5, 3]], seed=7)
    target = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    target[:, -2:] = True
    res = token_budget(model, (batch, target), fractions=[0.25, 1.0], strategies=("random", "first"), draws=1,
                       progress=False)
    loss = res.to_frame()
    assert len(loss) and loss["loss"].notna().all()
    full = res.to_dict()
    assert full  # serialisable


def test_analyses_refuse_videos_and_anyres_images_by_name(qwen_model):
    batch = video_batch([[2, (1, 4, 4), 2, ("video", 2, 4, 4), 3]], seed=1)
    roles = qwen_model.roles(**batch)
    with pytest.raises(NotImplementedError, match="drop selects video tokens"):
        remove_image_tokens(batch, roles, roles.video)
    target = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    target[:, -2:] = True
    with pytest.raises(NotImplementedError, match="token_budget handles images only"):
        token_budget(qwen_model, (batch, target), fractions=[0.5], progress=False)
    assert len(mask_image_keys(roles, roles.video))  # masking keys works on any token

    hf = make_hf_llava("llava_next", seed=1)
    model = HookedVLM.from_hf(hf)
    nb = llava_batch(hf, [[2, "image", 3]], [(20, 40)], seed=1)
    nroles = model.roles(**nb)
    with pytest.raises(NotImplementedError, match="one-grid images; image 0 .* views"):
        remove_image_tokens(nb, nroles, nroles.image & (nroles.grid_row == 0))
    with pytest.raises(NotImplementedError, match="image_cells .* needs one-grid images"):
        model(**nb, image_cells=[[0, 1]])


def test_contribution_and_categories_on_llava_and_refused_on_video(llava, qwen_model):
    from mechvlm.analyses import embedlens_categories, massive_activation_categories, token_contribution

    hf, model = llava
    batch = llava_batch(hf, [[3, "image", 4, 2]], seed=8)
    target = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    target[:, -2:] = True
    n = hf.config.vision_config.image_size // hf.config.vision_config.patch_size
    res = token_contribution(model, (batch, target), unit="token", progress=False)
    assert tuple(res.maps[0].shape) == (1, n, n) and res.maps[0].abs().max() > 0
    cats = embedlens_categories(model, batch, sink_ids=[1], dead_ids=[LLAVA_IDS["pad"]], progress=False)
    assert cats.category[0].shape == (n * n,)
    massive = massive_activation_categories(model, batch, threshold=5.0, first_layer=1, progress=False)
    assert massive.category[0].shape == (n * n,)

    video = video_batch([[2, ("video", 2, 4, 4), 3]], seed=1)
    vt = torch.zeros_like(video["input_ids"], dtype=torch.bool)
    vt[:, -2:] = True
    with pytest.raises(NotImplementedError, match="token_contribution handles images only"):
        token_contribution(qwen_model, (video, vt), progress=False)
    with pytest.raises(NotImplementedError, match="embedlens_categories handles images only"):
        embedlens_categories(qwen_model, video, sink_ids=[1], dead_ids=[0], progress=False)


def test_kv_probes_and_tracing_groups_on_llava_and_refused_on_video(llava, qwen_model):
    from mechvlm.analyses import image_kv
    from mechvlm.analyses.causal_tracing import default_groups

    hf, model = llava
    batch = llava_batch(hf, [[3, "image", 4, 2]], seed=8)
    n = hf.config.vision_config.image_size // hf.config.vision_config.patch_size
    kv = image_kv(model, batch, layers=[0], progress=False)
    assert kv.grid("key", 0, 0).shape[:2] == (n, n)
    groups = default_groups(model.roles(**batch))
    assert "eoi" not in groups  # LLaVA has no EOI: no empty group tracing to a plausible 0
    assert sum(int(groups[f"image row {r}"].sum()) for r in range(n)) == n * n

    video = video_batch([[2, ("video", 2, 4, 4), 3]], seed=1)
    with pytest.raises(NotImplementedError, match="image_kv handles images only"):
        image_kv(qwen_model, video, layers=[0], progress=False)
    with pytest.raises(NotImplementedError, match="default groups .* handles images only"):
        default_groups(qwen_model.roles(**video))
