"""The contenders of ``compare_peers.py``: models, inputs, and one callable per (tool, task).

Every tool runs the same weights (one seeded draw, `_common.init_weights_`) on the same
inputs, and every callable returns the logits of the LAST position only (HF
``logits_to_keep=1``; mechvlm ``return_type=None`` plus its own unembedding of the last
position, read at the last ``hook_resid_post`` by one permanent hook): the 151k / 262k-vocab
unembedding at every position would otherwise dominate a CPU run and is the same GEMM for all.

Tools (each owns its module tree; the parameter tensors are shared, never written):
    hf / hf_eager   HF ``...ForConditionalGeneration`` with sdpa / eager text attention
    mech            ``HookedVLM.from_hf(hf)`` (its own copy of the weights)
    bridge          TransformerLens 4.x ``TransformerBridge`` around a deepcopy of hf
    nn_eager        nnsight 0.8 on a deepcopy in eager text attention (`EagerTwin`)
    nn_sdpa         nnsight 0.8 on a deepcopy in sdpa
The nnsight traces must live in a file (nnsight re-reads the ``with`` body from source).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import Tensor

from mechvlm import synthetic as syn

FULL_DEPTH = {"qwen": 36, "gemma": 34}  # Qwen2.5-VL-3B, Gemma3-4B
KEYS = ("image", "eoi")
LABELS = {
    "hf_sdpa": "HF sdpa",
    "hf_sdpa_aa": "HF sdpa again (A/A control: the noise floor)",
    "hf_eager": "HF eager",
    "mech": "mechvlm, no hooks",
    "bridge": "TransformerBridge",
    "hf_eager_attn": "HF eager, output_attentions=True",
    "mech_cache": "mechvlm run_with_cache(hook_pattern)",
    "bridge_cache": "bridge run_with_cache(hook_pattern)",
    "mech_ko_pre": "mechvlm knockout pre_softmax_mask (SDPA, mask edit)",
    "mech_ko_post": "mechvlm knockout post_softmax_zero (explicit softmax)",
    "nn_ko_pre": "nnsight: attention-mask edit on HF sdpa (pre-softmax)",
    "nn_ko_pre_eager": "nnsight: softmax-input edit in HF eager (pre-softmax)",
    "nn_ko_post": "nnsight: softmax-output edit in HF eager (post-softmax zero)",
    "bridge_ko_pre": "bridge: hook_attn_scores edit (pre-softmax)",
    "bridge_ko_post": "bridge: hook_pattern edit (post-softmax zero)",
    "mech_share": "mechvlm attention_share (streaming)",
    "hf_eager_share": "HF eager output_attentions -> share",
    "bridge_share": "bridge run_with_cache(hook_pattern) -> share",
}


def pattern_names(name: str) -> bool:
    """The language model's ``blocks.{l}.attn.hook_pattern`` (mechvlm and the bridge; the
    bridge's vision tower has patterns of its own, left out)."""
    return name.startswith("blocks.") and name.endswith("attn.hook_pattern")


# ------------------------------------------------------------------------------ setup --
@dataclass(frozen=True)
class Spec:
    """What defines one model and one batch of inputs (all tools get the same)."""

    family: str                 # "qwen" | "gemma"
    layers: int
    image_tokens: int           # LM tokens per image (a square)
    batch: int = 1              # examples (rows; same layout, different tokens and pixels)
    quick: bool = False         # the tiny test configs instead of the 3B / 4B shapes
    tiny_vision: bool = False   # Qwen: one windowed vision block, no full-attention block
    text_before: int = 16
    text_after: int = 48
    seed: int = 0

    def with_(self, **kw) -> Spec:
        return replace(self, **kw)


def hf_config(spec: Spec):
    side = math.isqrt(spec.image_tokens)
    if side * side != spec.image_tokens:
        raise ValueError(f"image_tokens must be a square, got {spec.image_tokens}")
    if spec.family == "qwen":
        kw = {"vision_depth": 1} if spec.tiny_vision else {}
        cfg = (syn.qwen2_5_vl_config(n_layers=spec.layers, **kw) if spec.quick
               else syn.qwen2_5_vl_3b_text_config(n_layers=spec.layers, **kw))
        if spec.tiny_vision:
            cfg.vision_config.fullatt_block_indexes = []
        return cfg
    if spec.family != "gemma":
        raise ValueError(f"unknown family {spec.family!r}")
    types = ["sliding_attention"] * (spec.layers - 1) + ["full_attention"]
    if spec.quick:
        return syn.gemma3_config(n_layers=spec.layers, layer_types=types, mm_tokens=spec.image_tokens,
                                 image_size=28, patch_size=7)
    cfg = syn.gemma3_4b_text_config(n_layers=spec.layers, layer_types=types)
    cfg.mm_tokens_per_image = spec.image_tokens  # the 896x896 tower's 64x64 patches, pooled
    return cfg


def build_hf(spec: Spec, dtype: torch.dtype, device, weights: str | None = None):
    """The HF model (sdpa): weights drawn by `init_weights_` or loaded from ``weights``."""
    import transformers
    from _common import init_weights_
    from transformers.initialization import no_init_weights

    cfg = hf_config(spec)
    cfg._attn_implementation = "sdpa"
    cls = transformers.Qwen2_5_VLForConditionalGeneration if spec.family == "qwen" \
        else transformers.Gemma3ForConditionalGeneration
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            hf = cls(cfg)
    finally:
        torch.set_default_dtype(default)
    hf.tie_weights()
    if weights is None:
        init_weights_(hf, spec.seed)
    else:
        from safetensors.torch import load_model

        load_model(hf, weights, strict=True)
    return hf.to(device).eval().requires_grad_(False)


def save_weights(hf, path: str) -> None:
    from safetensors.torch import save_model

    save_model(hf, path)


@dataclass
class Inputs:
    """One batch for every tool: ``mech`` (HookedVLM kwargs), ``hf`` (HF kwargs with the
    ids HF needs for the same positions / image blocks, ``use_cache=False``,
    ``logits_to_keep=1``), the HF-side roles and the text->image ``cut`` ``[b, 1, q, k]``."""

    mech: dict
    hf: dict
    roles: object
    cut: Tensor
    n_tokens: int
    n_image: int
    extra: dict = field(default_factory=dict)


def make_inputs(spec: Spec, config, dtype: torch.dtype, device, text_only: bool = False) -> Inputs:
    from mechvlm.crosscheck.hf_roles import hf_roles
    from mechvlm.crosscheck.hf_side import hf_inputs

    g = torch.Generator().manual_seed(spec.seed + 1)
    vocab = config.get_text_config().vocab_size
    rows, grids = [], []
    for _ in range(spec.batch):
        if spec.family == "qwen":
            side = 2 * math.isqrt(spec.image_tokens)
            segs = [spec.text_before + spec.text_after] if text_only else \
                [spec.text_before, (1, side, side), spec.text_after]
            ids, grid = syn.qwen_prompt(segs, vocab=vocab, generator=g)
            grids += [] if grid is None else [grid]
        else:
            segs = [spec.text_before + spec.text_after] if text_only else \
                [spec.text_before, "image", spec.text_after]
            ids = syn.gemma3_prompt(segs, ids=syn.GEMMA3_IDS if spec.quick else syn.GEMMA3_REAL_IDS,
                                    mm_tokens=spec.image_tokens, vocab=vocab, generator=g)
        rows.append(ids)
    batch = {"input_ids": torch.cat(rows)}
    if not text_only and spec.family == "qwen":
        batch["image_grid_thw"] = torch.cat(grids)
        vc = config.vision_config
        batch["pixel_values"] = syn.qwen_pixel_values(batch["image_grid_thw"], patch=vc.patch_size,
                                                      temporal=vc.temporal_patch_size, generator=g)
    elif not text_only:
        batch["pixel_values"] = syn.gemma3_pixel_values(spec.batch, image_size=config.vision_config.image_size,
                                                        generator=g)
    mech = {k: v.to(device=device, dtype=dtype if k == "pixel_values" else v.dtype) for k, v in batch.items()}
    hf = hf_inputs(config, batch, dtype, device)
    hf["logits_to_keep"] = 1
    roles = hf_roles(config, hf["input_ids"])
    cut = (roles.text[:, :, None] & roles.image[:, None, :])[:, None]
    return Inputs(mech=mech, hf=hf, roles=roles, cut=cut, n_tokens=int(batch["input_ids"].shape[1]),
                  n_image=int(roles.image[0].sum()))


# ------------------------------------------------------------------------------ tools --
def shared_copy(model):
    """A deepcopy of the module tree that shares the parameter and buffer tensors."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def _bridge_without_torchvision(notes: list):
    """TransformerLens' Qwen2.5-VL adapter refuses to build without torchvision, which only
    its image processor needs (the benchmark passes pixel tensors). Without torchvision the
    check is switched off while the bridge is built, and a note says so."""
    import importlib.util

    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter

    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    notes.append("torchvision is not installed: the bridge adapter's required-library check was "
                 "skipped while building (torchvision serves only its image processor, unused here)")
    saved = ArchitectureAdapter._check_required_libraries
    ArchitectureAdapter._check_required_libraries = lambda self: None
    try:
        yield
    finally:
        ArchitectureAdapter._check_required_libraries = saved


class LastLogits:
    """A permanent hook at the last block's ``hook_resid_post`` keeping the last position;
    ``logits()`` applies the final norm and the unembedding to it (so a ``return_type=None``
    forward still gives the answer logits)."""

    def __init__(self, model):
        self.model, self.x = model, None
        model.add_hook(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", self, is_permanent=True)

    def __call__(self, t: Tensor, hook) -> None:
        self.x = t[:, -1:]

    def logits(self) -> Tensor:
        x, self.x = self.x, None
        return self.model.unembed(self.model.ln_final(x))[:, -1]


class Models:
    """The tools on one HF model, built on first use. ``private=True`` (a memory
    subprocess holding one tool): a tool takes the HF model itself instead of a copy."""

    def __init__(self, hf, private: bool = False):
        self.hf, self.private = hf, private
        self.notes: list[str] = []

    def _own(self):
        return self.hf if self.private else shared_copy(self.hf)

    @cached_property
    def hf_eager(self):
        m = self._own()
        m.set_attn_implementation({"text_config": "eager"})  # the vision tower keeps sdpa, as in hf
        return m

    @cached_property
    def mech(self):
        from mechvlm import HookedVLM

        if self.private:  # share the tensors (as from_pretrained does): no second copy to build
            model = HookedVLM._build(self.hf, dtype=None, device=None, copy_weights=False)
        else:
            model = HookedVLM.from_hf(self.hf)
        model.last = LastLogits(model)
        return model

    @cached_property
    def bridge(self):
        from transformer_lens.model_bridge.sources._bridge_builder import (
            build_bridge_from_module,
        )

        m = self._own()
        with _bridge_without_torchvision(self.notes):
            return build_bridge_from_module(m, type(m).__name__, hf_config=m.config)

    @cached_property
    def nn_eager(self):
        from mechvlm.crosscheck.hf_side import EagerTwin

        return EagerTwin(self.hf_eager if self.private else self._own_eager())

    def _own_eager(self):
        m = shared_copy(self.hf)
        m.set_attn_implementation({"text_config": "eager"})
        return m

    @cached_property
    def nn_sdpa(self):
        import nnsight

        return nnsight.NNsight(self._own())


# ------------------------------------------------------------------------ contenders --
def nnsight_mask_knockout(nn_model, n_layers: int, kw: dict, cut: Tensor) -> Tensor:
    """Pre-softmax knockout through the attention mask, on HF sdpa: every layer's
    ``self_attn`` gets ``mask & ~cut`` (HF passes None for a plain causal layer)."""
    q = cut.shape[-2]
    causal = torch.ones(q, q, dtype=torch.bool, device=cut.device).tril()[None, None]
    out = []
    with nn_model.trace(**kw):
        for l in range(n_layers):
            attn = nn_model.model.language_model.layers[l].self_attn
            args, kwargs = attn.inputs
            mask = kwargs["attention_mask"]
            kwargs = dict(kwargs, attention_mask=(causal if mask is None else mask) & ~cut)
            attn.inputs = (args, kwargs)
        out.append(nn_model.output.logits.save())
    return out[0][:, -1]


def _share_from(patterns, inp: Inputs) -> Tensor:
    """Seed 000 Eq. 1-2 from full patterns: ``[layer, head, key]``, mean over examples."""
    from mechvlm.crosscheck.share import share_from_patterns

    r = inp.roles
    share = share_from_patterns(list(patterns), r.text, {"image": r.image, "eoi": r.eoi})
    return torch.stack([share[k] for k in KEYS], -1)


def contender(name: str, models: Models, inp: Inputs):
    """The zero-argument callable of contender ``name`` on ``inp``. Returns the last-position
    logits ``[batch, vocab]``; ``*_cache`` / ``hf_eager_attn`` also the patterns, ``*_share``
    the attention share ``[layer, head, key]`` (mean over examples)."""
    kw, mk, cut = inp.hf, inp.mech, inp.cut
    bkw = {k: v for k, v in kw.items() if k != "input_ids"}
    ids = kw["input_ids"]

    def mech_run(fwd_hooks=None):
        m = models.mech
        if fwd_hooks is None:
            m(**mk, return_type=None)
        else:
            m.run_with_hooks(**mk, return_type=None, fwd_hooks=fwd_hooks)
        return m.last.logits()

    def bridge_hooks(point: str, fn):
        n = models.bridge.cfg.n_layers
        return [(f"blocks.{l}.attn.{point}", fn) for l in range(n)]

    def zero_pattern(p, hook):
        return p.masked_fill(cut, 0.0)

    def mask_scores(s, hook):
        return s.masked_fill(cut, torch.finfo(s.dtype).min)

    if name in ("hf_sdpa", "hf_sdpa_aa"):
        return lambda: models.hf(**kw).logits[:, -1]
    if name == "hf_eager":
        return lambda: models.hf_eager(**kw).logits[:, -1]
    if name == "mech":
        return mech_run
    if name == "bridge":
        return lambda: models.bridge(ids, **bkw)[:, -1]
    if name == "hf_eager_attn":
        def hf_attn():
            o = models.hf_eager(**kw, output_attentions=True)
            return o.logits[:, -1], list(o.attentions)
        return hf_attn
    if name == "mech_cache":
        def mech_cache():
            m = models.mech
            _, cache = m.run_with_cache(**mk, return_type=None, names_filter=pattern_names)
            return m.last.logits(), [cache["pattern", l] for l in range(m.cfg.n_layers)]
        return mech_cache
    if name == "bridge_cache":
        def bridge_cache():
            logits, cache = models.bridge.run_with_cache(ids, names_filter=pattern_names, **bkw)
            return logits[:, -1], [cache[f"blocks.{l}.attn.hook_pattern"] for l in range(models.bridge.cfg.n_layers)]
        return bridge_cache
    if name in ("mech_ko_pre", "mech_ko_post"):
        from mechvlm.interventions import knockout

        mode = "pre_softmax_mask" if name.endswith("pre") else "post_softmax_zero"
        hooks = knockout(models.mech.roles(**mk), query="text", key="image", mode=mode)
        return lambda: mech_run(fwd_hooks=hooks)
    if name == "nn_ko_pre":
        n_layers = models.hf.config.get_text_config().num_hidden_layers
        return lambda: nnsight_mask_knockout(models.nn_sdpa, n_layers, kw, cut)
    if name in ("nn_ko_pre_eager", "nn_ko_post"):
        mode = "post_softmax_zero" if name == "nn_ko_post" else "pre_softmax_mask"
        return lambda: models.nn_eager.run_knockout(kw, cut, mode, save_patterns=False).logits[:, -1]
    if name == "bridge_ko_post":
        return lambda: models.bridge.run_with_hooks(ids, fwd_hooks=bridge_hooks("hook_pattern", zero_pattern),
                                                    **bkw)[:, -1]
    if name == "bridge_ko_pre":
        return lambda: models.bridge.run_with_hooks(ids, fwd_hooks=bridge_hooks("hook_attn_scores", mask_scores),
                                                    **bkw)[:, -1]
    if name == "mech_share":
        from mechvlm import attention_share

        def mech_share():
            return attention_share(models.mech, mk, query="text", keys=KEYS, progress=False).mean_share
        return mech_share
    if name == "hf_eager_share":
        def hf_share():
            return _share_from(models.hf_eager(**kw, output_attentions=True).attentions, inp)
        return hf_share
    if name == "bridge_share":
        def bridge_share():
            _, cache = models.bridge.run_with_cache(ids, names_filter=pattern_names, **bkw)
            return _share_from([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(models.bridge.cfg.n_layers)],
                               inp)
        return bridge_share
    raise ValueError(f"unknown contender {name!r}")
