"""`HookedVLM` -> Hugging Face: the inverse of loading.

`hf_state_dict` renames a HookedVLM's weights (language model through the family's
``state_dict_to_hf``, vision tower and projector by prefix) to the ``state_dict()`` names of
the family's HF class; `save_hf` writes them as a checkpoint directory in HF layout
(``config.json`` + safetensors, through HF's own ``save_pretrained``), which
``Qwen2_5_VLForConditionalGeneration.from_pretrained`` /
``Gemma3ForConditionalGeneration.from_pretrained`` and `HookedVLM.from_pretrained` load.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor


def hf_state_dict(model, weights: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Every weight of ``model`` (a `HookedVLM`) under the HF class's ``state_dict()`` names.

    ``weights``: the model's state dict when it is not ``model.state_dict()`` (e.g. the full
    state dict gathered from an FSDP-sharded model). Tensors are not copied (they alias the
    model's parameters, detached). A tied model maps ``lm_head.weight`` to the embedding, as
    HF's own ``state_dict()`` does. Raises if a weight has no HF name (nothing is dropped
    silently)."""
    weights = {k: v.detach() for k, v in (model.state_dict() if weights is None else weights).items()}
    family = model.family
    lm = {k: v for k, v in weights.items() if not k.startswith("vision.")}
    if model.cfg.tie_word_embeddings:
        lm.pop("unembed.weight", None)
    out = family.state_dict_to_hf(lm, model.cfg)
    mapped = {id(v) for v in out.values()}
    used = {k for k, v in lm.items() if id(v) in mapped}
    for ours, theirs in family.vision_prefixes.items():
        for k, v in weights.items():
            if k.startswith(ours):
                out[theirs + k[len(ours):]] = v
                used.add(k)
    left = sorted(k for k in weights if k not in used and k != "unembed.weight")
    if left:
        raise RuntimeError(f"no HF name for the weights {left[:5]}{' ...' if len(left) > 5 else ''}")
    return out


def hf_config_for(model, hf_config):
    """A copy of the HF config ``hf_config`` the model was loaded from, with the
    vocabulary size of ``model`` (it grows when a register token is added)."""
    cfg = copy.deepcopy(hf_config)
    cfg.text_config.vocab_size = model.cfg.d_vocab
    if "vocab_size" in vars(cfg):  # a top-level copy some configs keep
        cfg.vocab_size = model.cfg.d_vocab
    return cfg


def save_hf(model, hf_config, out: str | Path, *, dtype: torch.dtype | None = None,
            weights: dict[str, Tensor] | None = None) -> Path:
    """Write ``model``'s weights as an HF checkpoint (config + safetensors) into ``out``.

    The HF model is built on the meta device and given ``model``'s tensors (no copy unless
    ``dtype`` casts), so saving a large model needs no second copy of its weights. ``out``
    should be a fresh folder (e.g. from `mechvlm.fileio.atomic_dir`); tokenizer, image
    processor and generation config are the caller's. ``weights``: see `hf_state_dict`."""
    import transformers

    cls = getattr(transformers, model.family.hf_class_name)
    cfg = hf_config_for(model, hf_config)
    weights = hf_state_dict(model, weights)
    if dtype is not None:
        weights = {k: v.to(dtype) for k, v in weights.items()}
    with torch.device("meta"):
        hf = cls._from_config(cfg, dtype=next(iter(weights.values())).dtype)
    expected = set(hf.state_dict())
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        raise RuntimeError(f"HF export mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    hf.load_state_dict(weights, strict=True, assign=True)
    if model.cfg.tie_word_embeddings:
        hf.lm_head.weight = hf.get_input_embeddings().weight
    hf.save_pretrained(out, safe_serialization=True)
    return Path(out)
