"""Mid-layer injection against a manual layer-by-layer run of HF's own decoder layers, and
its composition with sublayer skipping (EmbedLens) at the image positions."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_kwargs, qwen_batch, real_tokens
from mechvlm.interventions import inject_at_layer, skip_sublayers
from mechvlm.synthetic import QWEN_IDS

TOL = 1e-4


@pytest.fixture(scope="module")
def batch():
    return qwen_batch([[3, (1, 4, 6), 5], [2, (1, 4, 4), 1, (1, 4, 4), 6]], seed=41)


def _mask(valid: torch.Tensor) -> torch.Tensor:
    """HF eager's float mask: causal and key padding, ``[batch, 1, n, n]``."""
    n = valid.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


@torch.no_grad()
def manual_injection(hf, batch, layer: int, zero_mlp_at_image: tuple[int, ...] = ()):
    """Layers < ``layer`` on the text-only sequence (image tokens taken out, positions of the
    full input), then the image features written back in at their positions and layers >=
    ``layer`` on the full sequence; optionally the MLP output zeroed at the image positions
    of some layers. HF's decoder layers, rotary, norm and head, called one by one."""
    lm = hf.model.language_model
    ids, real = batch["input_ids"], real_tokens(batch)
    image = ids == QWEN_IDS["image"]
    kw = hf_kwargs(batch)
    pos, _ = hf.model.get_rope_index(ids, kw["mm_token_type_ids"], batch["image_grid_thw"],
                                    attention_mask=batch["attention_mask"])
    feats = torch.cat(hf.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
    emb = lm.embed_tokens(ids).masked_scatter(image[..., None], feats)
    # the text-only sequence: each row's non-image real tokens, left-padded again
    keep = real & ~image
    width = int(keep.sum(-1).max())
    cols = [keep[r].nonzero().squeeze(-1) for r in range(ids.shape[0])]
    h = torch.zeros(ids.shape[0], width, emb.shape[-1])
    tpos = torch.zeros(3, ids.shape[0], width, dtype=torch.long)
    valid = torch.zeros(ids.shape[0], width, dtype=torch.bool)
    for r, c in enumerate(cols):
        h[r, width - len(c):] = emb[r, c]
        tpos[:, r, width - len(c):] = pos[:, r, c]
        valid[r, width - len(c):] = True
    rope = lm.rotary_emb(h, tpos)
    for l in range(layer):
        h = lm.layers[l](h, attention_mask=_mask(valid), position_embeddings=rope)
    full = emb.clone()
    for r, c in enumerate(cols):
        full[r, c] = h[r, width - len(c):]
    rope = lm.rotary_emb(full, pos)
    for l in range(layer, len(lm.layers)):
        handle = None
        if l in zero_mlp_at_image:
            handle = lm.layers[l].mlp.register_forward_hook(lambda m, i, o: o.masked_fill(image[..., None], 0.0))
        full = lm.layers[l](full, attention_mask=_mask(real), position_embeddings=rope)
        if handle is not None:
            handle.remove()
    return hf.lm_head(lm.norm(full))


@pytest.mark.parametrize("layer", [1, 2])
def test_injection_equals_manual_layer_by_layer_run(qwen_hf, qwen_model, batch, layer):
    ref = manual_injection(qwen_hf, batch, layer)
    with torch.no_grad():
        ours = qwen_model.run_with_hooks(**batch, fwd_hooks=inject_at_layer(qwen_model.roles(**batch), layer))
        clean = qwen_model(**batch)
    real = real_tokens(batch)
    assert (ours - ref)[real].abs().max() <= TOL
    assert (ours - clean)[real].abs().max() > 1e-2
    assert not any(b.attn.needs_pattern() for b in qwen_model.blocks)


def test_injection_composes_with_skip_sublayers(qwen_hf, qwen_model, batch):
    ref = manual_injection(qwen_hf, batch, 1, zero_mlp_at_image=(2,))
    roles = qwen_model.roles(**batch)
    hooks = inject_at_layer(roles, 1) + skip_sublayers(roles.image, layers=2, which="mlp")
    with torch.no_grad():
        ours = qwen_model.run_with_hooks(**batch, fwd_hooks=hooks)
        inject_only = qwen_model.run_with_hooks(**batch, fwd_hooks=inject_at_layer(roles, 1))
    real = real_tokens(batch)
    assert (ours - ref)[real].abs().max() <= TOL
    assert (ours - inject_only)[real].abs().max() > 1e-3


def test_injection_at_layer_zero_is_the_model(qwen_model, batch):
    assert inject_at_layer(qwen_model.roles(**batch), 0) == []
    with pytest.raises(ValueError, match=">= 0"):
        inject_at_layer(qwen_model.roles(**batch), -1)
