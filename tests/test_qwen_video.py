"""Qwen2.5-VL videos against HF's own model: positions (HF get_rope_index), fp32 parity
(logits, every residual and pattern), roles, knockout / attention share / received
attention on video tokens, per-frame heatmaps, generation and the nnsight cross-check.

HF gets ``mm_token_type_ids`` (1 on image, 2 on video tokens), built here from the ids:
without it HF silently falls back to 1-D positions."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_with_attention_edit
from mechvlm import attention_share, received_attention
from mechvlm.interventions import knockout
from mechvlm.synthetic import QWEN_IDS, left_pad, qwen_pixel_values, qwen_video_prompt
from parity_helpers import FP32_TOL, assert_parity, real_tokens

torch.set_num_threads(min(2, torch.get_num_threads()))
VID, IMG = QWEN_IDS["video"], QWEN_IDS["image"]


def video_batch(rows: list[list], seed: int = 0, seconds=None) -> dict:
    """Inputs from segments per row (`qwen_video_prompt`); several rows are left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids, igrids, vgrids = [], [], []
    for segs in rows:
        row, ig, vg = qwen_video_prompt(segs, generator=g)
        ids.append(row[0])
        igrids += [] if ig is None else [ig]
        vgrids += [] if vg is None else [vg]
    input_ids, mask = (ids[0][None], None) if len(ids) == 1 else left_pad(ids, QWEN_IDS["pad"])
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if igrids:
        batch["image_grid_thw"] = torch.cat(igrids)
        batch["pixel_values"] = qwen_pixel_values(batch["image_grid_thw"], generator=g)
    if vgrids:
        batch["video_grid_thw"] = torch.cat(vgrids)
        batch["pixel_values_videos"] = qwen_pixel_values(batch["video_grid_thw"], generator=g)
    if seconds is not None:
        batch["second_per_grid_ts"] = seconds
    return {k: v for k, v in batch.items() if v is not None}


def hf_kw(batch: dict) -> dict:
    ids = batch["input_ids"]
    return {**batch, "mm_token_type_ids": (ids == IMG).long() + 2 * (ids == VID).long()}


CASES = {
    "video_alone": ([[3, ("video", 3, 4, 4), 5]], None),
    "video_and_image": ([[2, (1, 4, 6), 2, ("video", 2, 4, 4), 3]], torch.tensor([0.5])),
    "two_videos_left_padded": ([[2, ("video", 2, 4, 4), 4], [1, ("video", 4, 4, 6), 2]], [0.5, 1.25]),
    "image_row_and_video_row": ([[2, (1, 4, 4), 3], [1, ("video", 2, 6, 4), 2, ("video", 1, 4, 4), 1]],
                                torch.tensor([2.0, 0.3])),
}


@pytest.mark.parametrize("case", CASES)
def test_video_parity_with_hf_eager(qwen_hf, qwen_model, case):
    rows, seconds = CASES[case]
    batch = video_batch(rows, seed=1, seconds=seconds)
    assert_parity(f"qwen video {case}", qwen_hf, qwen_model, batch, hf_kw(batch))


@pytest.mark.parametrize("seconds", [None, [0.5, 1.3], torch.tensor([2.0, 0.04])])
def test_video_positions_match_hf_get_rope_index(qwen_hf, qwen_model, seconds):
    batch = video_batch([[1, ("video", 3, 4, 4), 2, (1, 4, 6), 1], [2, ("video", 2, 4, 6), 3]], seed=2,
                        seconds=seconds)
    kw = hf_kw(batch)
    ref, _ = qwen_hf.model.get_rope_index(batch["input_ids"], kw["mm_token_type_ids"], batch["image_grid_thw"],
                                     batch["video_grid_thw"], second_per_grid_ts=seconds,
                                     attention_mask=batch["attention_mask"])
    visual = {k: batch[k] for k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts") if k in batch}
    ours = qwen_model.prepare_inputs(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                                batch["attention_mask"], **visual).position_ids
    assert torch.equal(ours, ref)
    # the temporal rows really are spaced: T of the first video's frames (row 0, after 1 text + start)
    t_rows = ours[0, 0][batch["attention_mask"][0].bool()][2:2 + 12].tolist()
    step = int(4 * (1 if seconds is None else float(seconds[0])))  # tokens_per_second 4 in the tiny config
    assert t_rows[::4] == [2, 2 + step, 2 + int(2 * 4 * (1 if seconds is None else float(seconds[0])))]


def test_video_roles_by_hand(qwen_model):
    # t VS V*8 VE t VS I*6 VE t   (video 2 frames of 2x2, image 2x3)
    batch = video_batch([[1, ("video", 2, 4, 4), 1, (1, 4, 6), 1]], seed=3)
    roles = qwen_model.roles(**batch)
    vid = list(range(2, 10))
    img = list(range(13, 19))
    assert roles.video[0].nonzero().squeeze(1).tolist() == vid
    assert roles.image[0].nonzero().squeeze(1).tolist() == vid + img  # image = every visual token
    assert roles.eoi[0].nonzero().squeeze(1).tolist() == [10, 19]
    assert roles.image_start[0].nonzero().squeeze(1).tolist() == [1, 12]
    assert roles.text[0].nonzero().squeeze(1).tolist() == [11, 20]
    assert roles.grid_t[0, vid].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert roles.grid_row[0, vid].tolist() == [0, 0, 1, 1] * 2 and roles.grid_col[0, vid].tolist() == [0, 1] * 4
    assert roles.image_index[0, vid].tolist() == [0] * 8 and roles.image_index[0, img].tolist() == [0] * 6
    assert [(s.modality, s.grid) for s in roles.spans] == [("image", (1, 2, 3)), ("video", (2, 2, 2))]
    assert torch.equal(roles.mask("video"), roles.video)


def test_video_input_errors(qwen_model):
    batch = video_batch([[1, ("video", 2, 4, 4), 1]], seed=4)
    with pytest.raises(ValueError, match="video tokens .* video_grid_thw is None"):
        qwen_model(batch["input_ids"])
    with pytest.raises(ValueError, match="pixel_values_videos has 31 patch rows but video_grid_thw describes 32"):
        qwen_model(**{**batch, "pixel_values_videos": batch["pixel_values_videos"][:-1]})
    with pytest.raises(ValueError, match="second_per_grid_ts has 2 entries for 1 video"):
        qwen_model(**batch, second_per_grid_ts=[1.0, 2.0])
    with pytest.raises(ValueError, match="video_grid_thw given without pixel_values_videos"):
        qwen_model(batch["input_ids"], video_grid_thw=batch["video_grid_thw"])


def test_video_knockout_both_modes_match_hf(qwen_hf, qwen_model):
    """text -> video cut in every layer: mechvlm's hooks against HF's eager attention edited
    by hand (post-softmax zero; pre-softmax finfo.min on the scores)."""
    batch = video_batch([[2, ("video", 2, 4, 4), 4], [1, ("video", 3, 4, 4), 2]], seed=6, seconds=[0.5, 1.0])
    ids, real = batch["input_ids"], real_tokens(batch)
    text = real & (torch.cumsum((ids == QWEN_IDS["vision_start"]).long(), -1) > 0) & (ids != VID) & (
        ids != QWEN_IDS["vision_start"]) & (ids != QWEN_IDS["vision_end"])
    cut = (text[:, :, None] & (ids == VID)[:, None, :])[:, None]
    roles = qwen_model.roles(**batch)
    assert torch.equal(roles.text, text)
    with torch.no_grad():
        clean = qwen_model(**batch)
        for mode, edit in (("post_softmax_zero", dict(pattern_fn=lambda w: w.masked_fill(cut, 0.0))),
                           ("pre_softmax_mask", dict(scores_fn=lambda w: w.masked_fill(cut, torch.finfo(w.dtype).min)))):
            ref = hf_with_attention_edit(qwen_hf, None, **edit)(**hf_kw(batch)).logits
            ours = qwen_model.run_with_hooks(**batch, fwd_hooks=knockout(roles, "text", "video", mode=mode))
            diff = (ours - ref)[real].abs().max().item()
            print(f"\n[qwen video knockout {mode} vs HF] max abs diff {diff:.1e}")
            assert diff <= FP32_TOL and (ours - clean)[real].abs().max() > 1e-2


def test_video_share_and_received_attention_match_hf(qwen_hf, qwen_model):
    batch = video_batch([[2, (1, 4, 4), 2, ("video", 2, 4, 4), 3]], seed=7)
    with torch.no_grad():
        attn = qwen_hf(**hf_kw(batch), output_attentions=True).attentions
    roles = qwen_model.roles(**batch)
    ids = batch["input_ids"]
    keys = {"video": ids == VID, "image": (ids == IMG) | (ids == VID), "eoi": ids == QWEN_IDS["vision_end"]}
    q = roles.text[0]
    ref = torch.stack([torch.stack([a[0][:, q][:, :, k[0]].sum((1, 2)) for k in keys.values()], -1) for a in attn])
    res = attention_share(qwen_model, batch, keys=tuple(keys), progress=False)
    assert (res.raw[0] - ref).abs().max() <= FP32_TOL and ref[..., 0].min() > 0.05
    rec = received_attention(qwen_model, batch, key="video", progress=False)
    want = torch.stack([a[0][:, q][:, :, keys["video"][0]].sum(1) for a in attn])  # [layer, head, n_video]
    assert (rec.received[0] - want).abs().max() <= FP32_TOL


def test_per_frame_heatmaps(qwen_model):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from mechvlm import viz

    batch = video_batch([[2, ("video", 3, 4, 6), 3]], seed=8)  # 3 frames of 2x3
    roles = qwen_model.roles(**batch)
    frame, cell = 1, (1, 2)
    hit = roles.video[0] & (roles.grid_t[0] == frame) & (roles.grid_row[0] == cell[0]) & (roles.grid_col[0] == cell[1])
    values = torch.zeros(roles.shape[1])
    values[hit] = 1.0
    panels = viz.image_panels(values, roles)
    assert [(p.span.modality, p.frame, p.grid.shape) for p in panels] == [("video", f, (2, 3)) for f in range(3)]
    assert panels[frame].grid[cell] == 1.0 and sum(p.grid.sum() for p in panels) == 1.0
    assert [p.grid.sum() for p in viz.image_panels(values, roles, frames="mean")] == pytest.approx([1 / 3])
    fig = viz.attention_on_image(values, roles, cfg=qwen_model.cfg)
    drawn = [ax for ax in fig.axes if len(ax.images) == 2]
    assert [ax.get_title() for ax in drawn] == [f"video 0 frame {f}: 2\u00d73 tokens" for f in range(3)]
    assert np.asarray(drawn[frame].images[1].get_array())[cell] == 1.0
    assert viz.token_labels(roles, safe=False)[int(hit.nonzero())] == "<vid 1,1,2>"
    plt.close("all")


def test_greedy_generation_with_video_matches_hf(qwen_hf, qwen_model):
    from mechvlm.generation import greedy_generate

    batch = video_batch([[2, ("video", 2, 4, 4), 3]], seed=9, seconds=[0.5])
    gen = greedy_generate(qwen_model, batch, max_new_tokens=4, eos_token_ids=[QWEN_IDS["eos"]])
    ids = batch["input_ids"]
    with torch.no_grad():  # HF, one full forward per step (no cache), 3-D positions from mm_token_type_ids
        for _ in range(4):
            nxt = qwen_hf(**hf_kw({**batch, "input_ids": ids}), use_cache=False).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
    assert gen.sequences.tolist() == ids.tolist()


@pytest.mark.slow
def test_crosscheck_on_a_video_batch(qwen_hf):
    pytest.importorskip("nnsight")
    from mechvlm.crosscheck import crosscheck

    batch = video_batch([[2, ("video", 2, 4, 4), 3, (1, 4, 4), 2], [1, ("video", 3, 4, 4), 4]], seed=10,
                        seconds=[0.5, 1.0])
    report = crosscheck(qwen_hf, batch)
    assert report.passed, report.table()
    assert report.effects["knockout post_softmax_zero text->image"] > 1e-2  # cuts the video tokens too
