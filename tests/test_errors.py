"""Bad input gets an error that names the problem, and no hook state leaks."""

from __future__ import annotations

import pytest
import torch

from conftest import qwen_batch
from mechvlm import HookEditError, HookedVLM, UnknownHookError
from mechvlm.synthetic import QWEN_IDS


def _no_hooks_left(model) -> bool:
    return not any(hp.fwd_hooks or hp.bwd_hooks for hp in model.hook_dict.values())


def test_image_token_count_mismatch(qwen_model, image_batch):
    ids = image_batch["input_ids"].clone()
    first = int((ids[0] == QWEN_IDS["image"]).nonzero()[0])
    ids[0, first] = 7  # one image token fewer than the grid's features
    with pytest.raises(ValueError, match=r"5 image tokens .* give 6 features"):
        qwen_model(**{**image_batch, "input_ids": ids})


def test_image_tokens_without_grid(qwen_model, image_batch):
    with pytest.raises(ValueError, match="image_grid_thw is None"):
        qwen_model(image_batch["input_ids"])


def test_pixel_values_count_mismatch(qwen_model, image_batch):
    with pytest.raises(ValueError, match="pixel_values has 20 patch rows"):
        qwen_model(**{**image_batch, "pixel_values": image_batch["pixel_values"][:20]})


def test_precomputed_image_embeds(qwen_model, image_batch):
    feats = qwen_model.encode_images(image_batch["pixel_values"], image_batch["image_grid_thw"])
    torch.testing.assert_close(qwen_model(**image_batch, image_embeds=feats), qwen_model(**image_batch),
                               atol=0, rtol=0)
    other = qwen_model(**image_batch, image_embeds=torch.zeros_like(feats))
    assert not torch.allclose(other, qwen_model(**image_batch))  # they are used, not ignored
    with pytest.raises(ValueError, match="image features hold 5 token vectors but the input has 6"):
        qwen_model(**image_batch, image_embeds=feats[:5])


def test_grid_not_tiling_the_image_run(qwen_model):
    batch = qwen_batch([[3, (1, 4, 6), 3, (1, 4, 4), 2]], seed=2)
    grid = batch["image_grid_thw"].flip(0)  # same total, wrong order: 4 tokens, then 6
    with pytest.raises(ValueError, match="does not fit the run"):
        qwen_model(**{**batch, "image_grid_thw": grid})


def test_other_bad_inputs(qwen_model, image_batch):
    with pytest.raises(TypeError, match="integer tensor"):
        qwen_model(image_batch["input_ids"].float())
    with pytest.raises(ValueError, match="attention_mask has shape"):
        qwen_model(**{**image_batch, "attention_mask": torch.ones(1, 3)})
    with pytest.raises(ValueError, match="1 video tokens .* but video_grid_thw is None"):
        qwen_model(torch.tensor([[5, QWEN_IDS["video"], 6]]))
    with pytest.raises(ValueError, match="without image_grid_thw"):
        qwen_model(torch.tensor([[5, 6]]), pixel_values=image_batch["pixel_values"])


def test_unknown_hook_name(qwen_model, image_batch):
    with pytest.raises(UnknownHookError, match=r"did you mean 'blocks.0.attn.hook_pattern'"):
        qwen_model.run_with_hooks(**image_batch, fwd_hooks=[("blocks.0.attn.hook_patern", lambda t, hook: None)])
    with pytest.raises(UnknownHookError, match="set_use_attn_result"):
        qwen_model.run_with_hooks(**image_batch, fwd_hooks=[("blocks.0.attn.hook_result", lambda t, hook: None)])
    with pytest.raises(UnknownHookError, match="matches no hook point"):
        qwen_model.run_with_hooks(**image_batch, fwd_hooks=[(lambda n: n.endswith("nonexistent"), lambda t, hook: None)])
    with pytest.raises(UnknownHookError):
        qwen_model.run_with_cache(**image_batch, names_filter=["hook_embed", "blocks.9.hook_resid_post"])
    assert _no_hooks_left(qwen_model)


def test_hook_returning_wrong_shape_names_the_hook(qwen_model, image_batch):
    good = ("blocks.0.hook_resid_post", lambda t, hook: None)
    bad = ("blocks.1.attn.hook_pattern", lambda t, hook: t[:, :1])
    with pytest.raises(HookEditError, match=r"blocks\.1\.attn\.hook_pattern.*shape"):
        qwen_model.run_with_hooks(**image_batch, fwd_hooks=[good, bad])
    assert _no_hooks_left(qwen_model)
    with pytest.raises(HookEditError, match="dtype"):
        qwen_model.run_with_hooks(**image_batch, fwd_hooks=[("blocks.0.hook_mlp_out", lambda t, hook: t.double())])
    with pytest.raises(HookEditError, match="returned list"):
        qwen_model.run_with_hooks(**image_batch, fwd_hooks=[("hook_embed", lambda t, hook: [t])])
    assert _no_hooks_left(qwen_model)


def test_exception_inside_hook_leaves_no_hook(qwen_model, image_batch):
    def boom(t, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        qwen_model.run_with_hooks(**image_batch, fwd_hooks=[("hook_embed", lambda t, hook: None),
                                                            ("blocks.2.mlp.hook_post", boom)])
    assert _no_hooks_left(qwen_model)
    with torch.no_grad():  # and the model still works, equal to a fresh run
        a = qwen_model(**image_batch)
        b = qwen_model(**image_batch)
    assert torch.equal(a, b)


def test_unsupported_architecture():
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(NotImplementedError, match="no hooked backbone for model_type 'llama'"):
        HookedVLM.from_hf(tiny)
