"""`next_token_loss` and `InputBuilder.with_targets` against a hand-written loop."""

import math

import pytest
import torch

from mechvlm.losses import next_token_loss
from mechvlm.processing import InputBuilder
from mechvlm.toy.checkpoint import SHIPPED
from mechvlm.toy.scenes import make_scenes


def _hand_loss(logits, ids, scored):
    total, n = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if scored[b][t]:
                row = logits[b, t - 1].double()
                total += float(torch.logsumexp(row, 0) - row[ids[b, t]])
                n += 1
    return total / n


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_answer_loss_equals_a_hand_cross_entropy_on_hf_logits(family):
    from transformers import AutoModelForImageTextToText

    builder = InputBuilder.from_pretrained(SHIPPED[family])
    scenes = make_scenes(3, seed=1)
    answers = ["A. red", "red", "B. large"]
    batch, target = builder.with_targets([s.question for s in scenes], [[s.pil_image()] for s in scenes], answers)
    ids, am = batch["input_ids"], batch["attention_mask"]
    tok = builder.tokenizer
    for i, a in enumerate(answers):  # the mask is exactly the answer's tokens + end of turn, at the row's end
        want = tok(a, add_special_tokens=False)["input_ids"] + [builder.end_of_turn_id]
        assert ids[i][target[i]].tolist() == want and bool(target[i, -len(want):].all())
        assert int(target[i].sum()) == len(want)
    hf = AutoModelForImageTextToText.from_pretrained(SHIPPED[family]).eval()
    image = ids == hf.config.image_token_id
    kw = dict(batch, **({"mm_token_type_ids": image.long()} if family == "qwen2_5_vl"
                        else {"token_type_ids": image.long(), "position_ids": (am.cumsum(-1) - 1).clamp(min=0)}))
    with torch.no_grad():
        logits = hf(**kw).logits
    got = next_token_loss(logits, ids, target, attention_mask=am, image_token_id=hf.config.image_token_id)
    assert math.isclose(float(got), _hand_loss(logits, ids, target.tolist()), rel_tol=1e-5)
    per = next_token_loss(logits, ids, target, per_token=True)
    assert per.shape == (3, ids.shape[1] - 1) and bool((per[~target[:, 1:]] == 0).all())


def test_padding_images_and_position_zero_are_never_scored():
    logits = torch.randn(1, 4, 10)
    ids = torch.tensor([[5, 9, 2, 3]])
    everything = torch.ones(1, 4, dtype=torch.bool)
    got = next_token_loss(logits, ids, everything, attention_mask=torch.tensor([[0, 1, 1, 1]]), image_token_id=2)
    scored = [[False, False, False, True]]  # 0: position 0 / pad, 2: image
    assert math.isclose(float(got), _hand_loss(logits, ids, scored), rel_tol=1e-6)
    with pytest.raises(ValueError, match="no token is scored"):
        next_token_loss(logits, ids, torch.zeros(1, 4, dtype=torch.bool))
