"""fp32 parity of a HookedVLM with the HF model it was built from: logits (SDPA and explicit
paths), the embeddings, every residual and every attention pattern, over real tokens.

HF is the reference: eager attention, ``output_hidden_states`` / ``output_attentions``,
with the keyword arguments the caller built (type ids, real-token positions)."""

from __future__ import annotations

import torch

FP32_TOL = 1e-4


def real_tokens(batch: dict) -> torch.Tensor:
    am = batch.get("attention_mask")
    return am.bool() if am is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)


def parity_diffs(hf_model, model, batch: dict, hf_kw: dict) -> dict[str, float]:
    """Max abs differences per quantity (see the module doc)."""
    with torch.no_grad():
        ref = hf_model(**hf_kw, output_hidden_states=True, output_attentions=True, use_cache=False)
        out = model(**batch)
        cache_logits, cache = model.run_with_cache(**batch)
    real = real_tokens(batch)
    assert out.shape == ref.logits.shape and ref.logits[real].abs().max() > 1.0
    n = model.cfg.n_layers
    assert len(ref.hidden_states) == n + 1 and len(ref.attentions) == n
    diffs = {"logits": (out - ref.logits)[real].abs().max().item(),
             "logits_explicit_path": (cache_logits - ref.logits)[real].abs().max().item(),
             "embed": (cache["hook_embed"] - ref.hidden_states[0])[real].abs().max().item()}
    for l in range(n):
        ours = cache["resid_post", l]
        if l == n - 1:  # HF's last hidden state is after the final norm
            ours = model.ln_final(ours)
        diffs[f"resid_post.{l}"] = (ours - ref.hidden_states[l + 1])[real].abs().max().item()
        rows = real[:, None, :, None].expand_as(ref.attentions[l])  # real query rows
        diffs[f"pattern.{l}"] = (cache["pattern", l] - ref.attentions[l])[rows].abs().max().item()
    return diffs


def assert_parity(name: str, hf_model, model, batch: dict, hf_kw: dict, tol: float = FP32_TOL) -> dict:
    diffs = parity_diffs(hf_model, model, batch, hf_kw)
    worst = max(diffs, key=diffs.get)
    print(f"\n[{name} fp32] max abs diff {diffs[worst]:.2e} ({worst}); logits {diffs['logits']:.2e}")
    assert diffs[worst] <= tol, diffs
    return diffs
