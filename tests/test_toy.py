"""The toy pieces: scenes, tokenizer, input builder, training pixels, benchmark generator.

References are independent of the code under test: HF's own image processors and
Gemma3Processor, and hand-written expectations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechvlm.processing import InputBuilder
from mechvlm.toy.checkpoint import build_toy, save_toy
from mechvlm.toy.scenes import CATEGORIES, COLORS, IMAGE_SIZE, VALUES, make_scene, make_scenes
from mechvlm.toy.train import compositional_init_, fast_pixels

FAMILIES = ["qwen2_5_vl", "gemma3"]
PROMPT = "How big is the shape?\nA. tiny\nB. large\nC. small\nD. medium\nAnswer with the option's letter from the given choices directly."


@pytest.fixture(scope="module", params=FAMILIES)
def toy(request):
    model, tok, proc = build_toy(request.param)
    return request.param, model, tok, proc, InputBuilder(tok, proc, model.config)


def test_scenes_are_deterministic_and_answerable():
    a, b = make_scenes(8, seed=3), make_scenes(8, seed=3)
    assert all((x.image == y.image).all() and x.answer == y.answer for x, y in zip(a, b))
    assert [s.category for s in a] == list(CATEGORIES) * 2
    rng = np.random.default_rng(0)
    s = make_scene("color", rng)
    painted = (s.image != 128).any(-1)
    assert s.answer in s.options and len(set(s.options)) == 4
    assert (s.image[painted] == COLORS[s.answer]).all()  # every painted pixel has the answer's colour
    s = make_scene("count", rng)
    cells = (s.image != 128).any(-1).reshape(4, 28, 4, 28).any((1, 3)).sum()
    assert ["one", "two", "three", "four"][cells - 1] == s.answer
    s = make_scene("position", rng)
    ys, xs = np.nonzero((s.image != 128).any(-1))
    vert = "top" if ys.max() < IMAGE_SIZE / 2 else "bottom"
    horiz = "left" if xs.max() < IMAGE_SIZE / 2 else "right"
    assert s.answer == f"{vert}-{horiz}"


def test_tokenizer_specials_option_lines_and_round_trip(toy, tmp_path):
    family, model, tok, _, _ = toy
    cfg = model.config
    image_id = cfg.image_token_id if family == "qwen2_5_vl" else cfg.image_token_index
    assert tok.convert_ids_to_tokens(image_id) in ("<|image_pad|>", "<image_soft_token>")
    pieces = tok.convert_ids_to_tokens(tok("A. tiny\nB. large", add_special_tokens=False)["input_ids"])
    assert pieces == ["A. tiny", "\n", "B. large"]
    assert tok.unk_token_id not in tok(PROMPT, add_special_tokens=False)["input_ids"]
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(PROMPT)["input_ids"] == tok(PROMPT)["input_ids"]
    assert again.chat_template == tok.chat_template


def test_fast_pixels_equal_the_hf_image_processor(toy):
    family, _, _, proc, builder = toy
    scenes = make_scenes(5, seed=1)
    ref = proc(images=[s.pil_image() for s in scenes], return_tensors="pt")
    fast = fast_pixels(np.stack([s.image for s in scenes]), builder)
    torch.testing.assert_close(fast["pixel_values"], ref["pixel_values"].float(), atol=1e-6, rtol=0)
    if family == "qwen2_5_vl":
        assert fast["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist() == [[1, 8, 8]] * 5


def test_builder_matches_gemma3_processor():
    from transformers import Gemma3Processor

    model, tok, proc = build_toy("gemma3")
    builder = InputBuilder(tok, proc, model.config)
    hf = Gemma3Processor(image_processor=proc, tokenizer=tok, image_seq_length=16,
                         chat_template=tok.chat_template)
    scenes = make_scenes(2, seed=5)
    texts = [hf.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                                    add_generation_prompt=True, tokenize=False) for p in (PROMPT, "How big?")]
    ref = hf(text=texts, images=[[s.pil_image()] for s in scenes], return_tensors="pt", padding=True)
    ours = builder([PROMPT, "How big?"], [[s.pil_image()] for s in scenes])
    assert tok.padding_side == "left"
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == ref["attention_mask"].tolist()
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"])


def test_builder_qwen_layout_by_hand():
    model, tok, proc = build_toy("qwen2_5_vl")
    builder = InputBuilder(tok, proc, model.config)
    s = make_scenes(1, seed=0)[0]
    batch = builder(["How big is the shape?"], [[s.pil_image()]])
    toks = tok.convert_ids_to_tokens(batch["input_ids"][0])
    assert toks == ["<|im_start|>", "user", "\n", "<|vision_start|>", *["<|image_pad|>"] * 16,
                    "<|vision_end|>", "How big is the shape?", "<|im_end|>", "\n", "<|im_start|>",
                    "assistant", "\n"]
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]
    with pytest.raises(ValueError, match="2 prompts but 1 image lists"):
        builder(["a", "b"], [[s.pil_image()]])


def test_saved_toy_loads_like_a_checkpoint(tmp_path):
    from mechvlm import HookedVLM

    model, tok, proc = build_toy("qwen2_5_vl")
    n_values = len({v for vs in VALUES.values() for v in vs})
    assert compositional_init_(model, tok) == 4 * n_values  # every option line of every value
    save_toy(model, tok, proc, tmp_path)
    builder = InputBuilder.from_pretrained(tmp_path)
    hooked = HookedVLM.from_pretrained(str(tmp_path))
    s = make_scenes(1, seed=0)[0]
    batch = builder([PROMPT], [[s.pil_image()]])
    hf_kw = dict(batch, mm_token_type_ids=(batch["input_ids"] == model.config.image_token_id).long())
    with torch.no_grad():
        ref = model.eval()(**hf_kw).logits
    torch.testing.assert_close(hooked(**batch), ref, atol=1e-5, rtol=0)
    assert builder.eos_token_ids == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_scene_object_masks_are_the_painted_pixels_on_the_token_grid():
    import numpy as np

    from mechvlm.toy.scenes import BACKGROUND, CELL, GRID, make_scenes

    for scene in make_scenes(20, seed=5, categories=("color", "size", "position", "count", "shape")):
        painted = (scene.image != BACKGROUND).any(-1)  # independent of the mask bookkeeping
        assert (scene.object_mask == painted).all()
        cov = scene.token_coverage()
        for r in range(GRID):
            for c in range(GRID):
                cell = painted[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
                assert abs(cov[r, c] - cell.mean()) < 1e-12
        assert (scene.token_mask(threshold=0) == (cov > 0)).all()
        if scene.category == "count":
            assert len(scene.object_masks) == scene.options.index(scene.answer) + 1
    with pytest.raises(ValueError, match="threshold"):
        scene.token_mask(threshold=2)
    one = make_scenes(1, seed=5)[0]
    assert np.isclose(one.token_coverage(2).mean(), one.object_mask.mean())
