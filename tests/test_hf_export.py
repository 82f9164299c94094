"""HookedVLM -> HF conversion (`mechvlm.hf_export`): the inverse of loading, checked against
HF's own ``state_dict()`` and against HF's ``from_pretrained`` of the written folder."""

from __future__ import annotations

import pytest
import torch

from mechvlm import HookedVLM
from mechvlm.hf_export import hf_state_dict, save_hf
from mechvlm.synthetic import gemma3_config, qwen2_5_vl_config

from conftest import hf_kwargs, qwen_batch, randomize_


def _qwen(tie: bool):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    return randomize_(Qwen2_5_VLForConditionalGeneration._from_config(
        qwen2_5_vl_config(n_layers=2, tie=tie), attn_implementation="eager").eval())


def _gemma():
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    return randomize_(Gemma3ForConditionalGeneration._from_config(
        gemma3_config(n_layers=3), attn_implementation="eager").eval())


def _llava(family: str):
    from llava_helpers import make_hf_llava

    return make_hf_llava(family, seed=3, n_layers=2)


@pytest.mark.parametrize("make", [lambda: _qwen(False), lambda: _qwen(True), _gemma,
                                  lambda: _llava("llava"), lambda: _llava("llava_next"),
                                  lambda: _llava("llava_onevision")],
                         ids=["qwen", "qwen-tied", "gemma3", "llava", "llava_next", "llava_onevision"])
def test_hf_state_dict_inverts_loading(make):
    hf = make()
    model = HookedVLM.from_hf(hf)
    ours, ref = hf_state_dict(model), hf.state_dict()
    assert set(ours) == set(ref)
    for k, v in ref.items():
        assert torch.equal(ours[k], v), k


def test_saved_folder_loads_in_hf_and_in_mechvlm(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = _qwen(False)
    model = HookedVLM.from_hf(hf)
    with torch.no_grad():  # an edit HF must see: the export writes the HookedVLM's weights, not HF's
        model.blocks[1].mlp.up_proj.weight.mul_(1.5)
        model.embed.W_E[7] += 1.0
    save_hf(model, hf.config, tmp_path)
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    batch = qwen_batch([[3, (1, 4, 4), 5], [2, (1, 4, 6), 3]], seed=2)
    with torch.no_grad():
        ours = model(**batch)
        ref = back(**hf_kwargs(batch)).logits
        reloaded = HookedVLM.from_pretrained(str(tmp_path))(**batch)
    real = batch["attention_mask"].bool()
    assert (ours - ref)[real].abs().max() < 1e-4
    assert (reloaded - ours)[real].abs().max() < 1e-4  # HF's loading picks SDPA for the vision tower
    assert not torch.allclose(ref, hf(**hf_kwargs(batch)).logits)  # the edit reached the file


def test_an_unmapped_weight_raises():
    hf = _qwen(False)
    model = HookedVLM.from_hf(hf)
    model.register_buffer("stray", torch.zeros(2))
    with pytest.raises(RuntimeError, match="no HF name.*stray"):
        hf_state_dict(model)
