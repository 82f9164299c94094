"""The mechvlm side: the same experiments through `HookedVLM` hooks."""

from __future__ import annotations

import inspect
import time

import torch
from torch import Tensor

from mechvlm.crosscheck.record import Run
from mechvlm.crosscheck.share import share_from_patterns
from mechvlm.interventions import knockout


def model_inputs(model, batch: dict) -> dict:
    """The batch keys `HookedVLM.forward` takes, on the model's device."""
    from mechvlm.models.base import VISUAL_INPUTS

    keep = ("input_ids", "pixel_values", "image_grid_thw", "attention_mask", *VISUAL_INPUTS)
    if model.cfg.model_type == "gemma3":
        keep += ("token_type_ids",)
    return {k: (v.to(model.device) if isinstance(v, Tensor) else v)
            for k, v in batch.items() if k in keep and v is not None}


@torch.no_grad()
def time_forward(model, kw: dict, repeats: int = 5) -> float:
    """Seconds of one plain forward (median of ``repeats`` after a warm-up run)."""
    model(**kw)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**kw)
        if kw["input_ids"].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def run_clean(model, batch: dict) -> Run:
    """Logits from the default (SDPA) path, the residual stream from a cache of the same
    run, the final norm applied to the last residual, and the patterns from a second run
    that hooks ``hook_pattern`` (the explicit path)."""
    kw = model_inputs(model, batch)
    n = model.cfg.n_layers
    names = ["hook_embed"] + [f"blocks.{l}.hook_resid_post" for l in range(n)]
    logits, cache = model.run_with_cache(**kw, names_filter=names)
    final = model.ln_final(cache[f"blocks.{n - 1}.hook_resid_post"])
    _, pcache = model.run_with_cache(**kw, names_filter=lambda name: name.endswith("attn.hook_pattern"))
    return Run(logits=logits, embed=cache["hook_embed"],
                   resid_post=[cache[f"blocks.{l}.hook_resid_post"] for l in range(n)], final_norm=final,
                   patterns=[pcache[f"blocks.{l}.attn.hook_pattern"] for l in range(n)])


@torch.no_grad()
def run_knockout(model, batch: dict, key: str, mode: str) -> Run:
    kw = model_inputs(model, batch)
    hooks = knockout(model.roles(**kw), query="text", key=key, mode=mode)
    return Run(logits=model.run_with_hooks(**kw, fwd_hooks=hooks))


def attention_share(model, batch: dict, patterns: list[Tensor], keys=("image", "eoi")) -> tuple[dict, str]:
    """mechvlm's text->key attention share ``{key: [layer, head]}`` (mean over examples of
    the per-example shares, NaN examples skipped) and where it came from:
    ``mechvlm.metrics.attention_share`` (its ``mean_share``) when the package has it,
    otherwise Eq. 1-2 computed here from the cached ``hook_pattern`` and `HookedVLM.roles`
    (the same formula as the HF side, so then only patterns and roles are checked)."""
    try:
        from mechvlm.metrics import attention_share as metric
    except ImportError:
        metric = None
    kw = model_inputs(model, batch)
    if metric is not None:
        extra = {"progress": False} if "progress" in inspect.signature(metric).parameters else {}
        out = metric(model, kw, query="text", keys=tuple(keys), **extra)
        return _as_layer_head(out, keys), "mechvlm.metrics.attention_share"
    roles = model.roles(**kw)
    return share_from_patterns(patterns, roles.text, {k: roles.mask(k) for k in keys}), \
        "hook_pattern cache (mechvlm.metrics not available)"


def _as_layer_head(out, keys) -> dict[str, Tensor]:
    """``AttentionShareResult.mean_share`` ``[layer, head, key]`` -> ``{key: [layer, head]}``."""
    share = out.mean_share
    names = list(getattr(out, "keys", keys))
    if share.ndim != 3 or share.shape[-1] != len(keys):
        raise ValueError(f"unexpected attention_share result: mean_share {tuple(share.shape)}, keys {names}")
    return {k: share[..., names.index(k) if k in names else i].float() for i, k in enumerate(keys)}
