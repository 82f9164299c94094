# Ported from TransformerLens (https://github.com/TransformerLensOrg/TransformerLens, MIT licence),
# tests/unit/test_patching.py at 4cd36aae. Test bodies and assertions unchanged; changed: the model (each
# shipped toy) and the prompts (toy words; with an image, a VLMBatch whose clean and corrupted runs
# differ in the image too).
"""Tests for patching functions that are only covered by notebook cells."""

import pytest
import torch

from transformer_lens.patching import get_act_patch_attn_head_all_pos_every

from _tl_models import toy_model
from _tl_ports import VARIANTS, make_input

pytestmark = pytest.mark.slow  # port: hundreds of forwards


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{f}-{k}" for f, k in VARIANTS])
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def model(variant):
    return toy_model(variant[0], fold_ln=True)


@pytest.fixture(scope="module")
def clean_cache(model, variant):
    prompt = make_input(model, variant[1], "the red circle", image_index=0)
    _, cache = model.run_with_cache(prompt)
    return cache


@pytest.fixture(scope="module")
def corrupted_tokens(model, variant):
    inp = make_input(model, variant[1], "the blue square", image_index=1)
    return model.to_tokens(inp) if variant[1] == "text" else inp


def test_get_act_patch_attn_head_all_pos_every_shape(model, corrupted_tokens, clean_cache):
    """Verify the function returns a [5, n_layers, n_heads] tensor."""

    def metric(logits):
        return logits[:, -1, :].sum()

    result = get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric)

    assert result.shape == (5, model.cfg.n_layers, model.cfg.n_heads)


def test_get_act_patch_attn_head_all_pos_every_values_vary(model, corrupted_tokens, clean_cache):
    """Patching different heads should produce different metric values."""

    def metric(logits):
        return logits[:, -1, :].sum()

    result = get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric)

    # Not all values should be identical — different heads have different effects
    assert not torch.all(result == result[0, 0, 0]), "All patch results are identical"
    # Values should be finite
    assert torch.isfinite(result).all()
