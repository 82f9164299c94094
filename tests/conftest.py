"""Shared fixtures: tiny random Qwen2.5-VL models and independent HF references."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from torch import nn

from mechvlm import HookedVLM
from mechvlm.synthetic import QWEN_IDS, left_pad, qwen2_5_vl_config, qwen_pixel_values, qwen_prompt

torch.set_num_threads(min(2, torch.get_num_threads()))


def randomize_(model: nn.Module, seed: int = 0, std: float = 0.08) -> nn.Module:
    """Re-draw every weight with a larger spread than HF's init (norm weights around 1),
    so that a wrong op, order or index shows up as a large difference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if "norm" in name or name.endswith("ln_q.weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(std * noise)
    return model


def make_hf_qwen(seed: int = 0, attn: str = "eager", **config_kw) -> nn.Module:
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = qwen2_5_vl_config(**config_kw)
    model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()
    return randomize_(model, seed)


def qwen_batch(segment_rows: list[list], seed: int = 0) -> dict:
    """Inputs for ``HookedVLM`` from prompt segments per row (see ``qwen_prompt``);
    more than one row is left-padded. Includes ``mm_token_type_ids`` for HF."""
    g = torch.Generator().manual_seed(seed)
    rows, grids = [], []
    for segs in segment_rows:
        ids, grid = qwen_prompt(segs, generator=g)
        rows.append(ids[0])
        if grid is not None:
            grids.append(grid)
    if len(rows) == 1:
        input_ids, attention_mask = rows[0][None], None
    else:
        input_ids, attention_mask = left_pad(rows, QWEN_IDS["pad"])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if grids:
        grid = torch.cat(grids)
        batch["image_grid_thw"] = grid
        batch["pixel_values"] = qwen_pixel_values(grid, generator=g)
    return batch


def hf_kwargs(batch: dict) -> dict:
    """The same inputs for HF, with mm_token_type_ids so that HF builds 3-D positions."""
    kw = {k: v for k, v in batch.items() if v is not None}
    kw["mm_token_type_ids"] = (batch["input_ids"] == QWEN_IDS["image"]).long()
    return kw


def real_tokens(batch: dict) -> torch.Tensor:
    am = batch.get("attention_mask")
    return am.bool() if am is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)


@pytest.fixture(scope="session")
def qwen_hf():
    return make_hf_qwen(seed=0, n_layers=3)


@pytest.fixture(scope="session")
def qwen_model(qwen_hf):
    return HookedVLM.from_hf(qwen_hf)


@pytest.fixture
def image_batch():
    return qwen_batch([[4, (1, 4, 6), 6]], seed=1)


def hf_with_attention_edit(hf_model: nn.Module, layer, *, scores_fn=None, pattern_fn=None) -> nn.Module:
    """A deepcopy of ``hf_model`` whose eager attention in text layer(s) ``layer`` (an int,
    a list, or None for all) applies
    ``scores_fn`` to the masked pre-softmax scores and/or ``pattern_fn`` to the softmax
    output, ``[batch, head, q, k]``. Written against HF's own eager attention function,
    registered through HF's AttentionInterface (with its eager mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq

    ref = copy.deepcopy(hf_model)
    layers = ref.model.language_model.layers
    chosen = range(len(layers)) if layer is None else ([layer] if isinstance(layer, int) else layer)
    targets = [layers[l].self_attn for l in chosen]

    def edited_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        if not any(module is t for t in targets):
            return mq.eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        key = mq.repeat_kv(key, module.num_key_value_groups)
        value = mq.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        if scores_fn is not None:
            w = scores_fn(w)
        w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
        if pattern_fn is not None:
            w = pattern_fn(w)
        return torch.matmul(w, value).transpose(1, 2).contiguous(), w

    AttentionInterface.register("mechvlm_test_edited", edited_eager)
    AttentionMaskInterface.register("mechvlm_test_edited", eager_mask)
    ref.set_attn_implementation("mechvlm_test_edited")
    return ref
