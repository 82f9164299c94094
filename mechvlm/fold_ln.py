"""TransformerLens' weight processing for `HookedVLM`: ``fold_ln`` and ``center_unembed``.

``fold_ln`` moves each pre-norm's weight into the linear maps that read its output, as
TransformerLens does for RMSNorm models, and leaves the norm weight-free (TL's
``RMSNormPre``: it returns ``x / scale``):

    * ``ln1`` -> the columns of ``q_proj``, ``k_proj``, ``v_proj``;
    * ``ln2`` -> the columns of ``gate_proj``, ``up_proj``;
    * ``ln_final`` -> ``W_U`` (a tied unembedding is untied first: ``W_E`` is unchanged).

For Gemma3 the folded weight is ``1 + w``. What cannot fold, and stays a weighted norm:
Gemma3's sandwich post-norms ``ln1_post``/``ln2_post`` (they normalise a sublayer's output
before it reaches the residual, so no later linear map sees them alone) and its per-head
``q_norm``/``k_norm`` (they act after the projection). The logits are unchanged up to
rounding (fp32: ~1e-6).

Why it matters: ``ActivationCache.apply_ln_to_stack`` (and so ``logit_attrs``,
``decompose_resid(apply_ln=True)``, ``accumulated_resid(apply_ln=True)``,
``get_full_resid_decomposition(apply_ln=True)``) divides by the cached ``ln_final`` scale
but never multiplies by the norm weight: it is right only once that weight is in ``W_U``.
mechvlm's cache raises instead of returning such numbers from an unfolded model.

``center_unembed`` subtracts each residual direction's mean over the vocabulary from
``W_U``: every logit of a position moves by the same amount, so softmax, loss and logit
differences are unchanged (TL's option of the same name).
"""

from __future__ import annotations

import logging

import torch
from torch import nn


def _scale_columns_(linear: nn.Linear, weight: torch.Tensor) -> None:
    linear.weight.copy_((linear.weight.float() * weight.float()[None, :]).to(linear.weight.dtype))


def _untie_unembedding(model) -> None:
    if model.unembed.weight is model.embed.W_E:
        model.unembed.weight = nn.Parameter(model.embed.W_E.detach().clone(),
                                            requires_grad=model.embed.W_E.requires_grad)
        model.cfg.tie_word_embeddings = False


@torch.no_grad()
def fold_layer_norms_(model) -> None:
    """Fold ``ln1``/``ln2``/``ln_final`` into the next linear maps (see module docstring)."""
    for block in model.blocks:
        w1 = block.ln1.effective_weight
        for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
            _scale_columns_(lin, w1)
        w2 = block.ln2.effective_weight
        for lin in (block.mlp.gate_proj, block.mlp.up_proj):
            _scale_columns_(lin, w2)
        for norm in (block.ln1, block.ln2):
            _make_weight_free_(norm)
    _untie_unembedding(model)
    _scale_columns_(model.unembed, model.ln_final.effective_weight)
    _make_weight_free_(model.ln_final)
    model.cfg.normalization_type = "RMSPre"
    model.cfg.ln_folded = True


def _make_weight_free_(norm) -> None:
    norm.w.fill_(0.0 if norm.offset_weight else 1.0)  # the identity weight, for state_dict readers
    norm.folded = True


@torch.no_grad()
def center_unembed_(model) -> None:
    _untie_unembedding(model)
    w = model.unembed.weight  # [d_vocab, d_model]
    w.copy_((w.float() - w.float().mean(0, keepdim=True)).to(w.dtype))


def process_weights_(model, fold_ln: bool = True, center_writing_weights: bool = False,
                     center_unembed: bool = False, fold_value_biases: bool = False,
                     refactor_factored_attn_matrices: bool = False) -> None:
    """TransformerLens' ``process_weights_``, in place. Only what keeps the model's outputs:
    ``fold_ln`` and ``center_unembed``; ``center_writing_weights`` is skipped with a warning
    for these RMSNorm models, as TransformerLens does; the other two are not implemented."""
    if fold_value_biases or refactor_factored_attn_matrices:
        raise NotImplementedError("fold_value_biases and refactor_factored_attn_matrices are not implemented "
                                  "for HookedVLM; use fold_ln / center_unembed")
    if center_writing_weights:
        logging.warning("center_writing_weights skipped: it is only valid before a LayerNorm, and both "
                        "mechvlm families use RMSNorm (TransformerLens skips it too)")
    if fold_ln:
        if model.cfg.ln_folded:
            logging.warning("fold_ln: the norms are already folded; nothing done")
        else:
            fold_layer_norms_(model)
    if center_unembed:
        center_unembed_(model)
