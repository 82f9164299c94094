"""The reference side: nnsight tracing the untouched HF model in eager attention.

Everything here reads or edits HF's own modules through nnsight; nothing calls mechvlm.
The traces must live in a file (nnsight re-parses the ``with`` body from its source).

Where the values come from (transformers 5.x, both families):
    * residual stream: ``language_model.layers[0].input`` (embeddings with the image
      features scattered in), ``layers[l].output`` (a plain tensor in 5.x), and
      ``language_model.norm.output`` (what ``hidden_states[-1]`` is);
    * attention patterns: ``layers[l].self_attn.output[1]``, the weights HF's eager
      attention returns (``output_attentions`` only collects these);
    * logits: the model's own output ``.logits``;
    * knockouts edit the softmax inside HF's ``eager_attention_forward``, reached as
      ``self_attn.source.attention_interface_1.source.nn_functional_softmax_0``:
      ``post_softmax_zero`` overwrites its output, ``pre_softmax_mask`` its input (the
      scores after HF's own additive mask). The op is named ``nn_functional_softmax_0``
      in both families (the assignment labels around it are not: ``attn_weights_1``
      in Qwen2.5-VL, ``attn_weights_4`` in Gemma3).

`EagerTwin` owns its HF model: ``.source`` permanently swaps a module's forward for an
instrumented copy with a snapshot of the module's globals, so it is only ever used on
a private deepcopy (or a model this package loaded itself).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from mechvlm.crosscheck.record import Run

ATTENTION_CALL = "attention_interface_1"
SOFTMAX = "nn_functional_softmax_0"


def eager_copy(hf_model: nn.Module, *, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None) -> nn.Module:
    """A deepcopy of ``hf_model`` in eager attention (the user's model is not touched)."""
    twin = copy.deepcopy(hf_model)
    twin.set_attn_implementation("eager")
    if dtype is not None or device is not None:
        twin.to(device=device, dtype=dtype)
    return twin.eval().requires_grad_(False)


class EagerTwin:
    """An HF VLM (eager attention, owned by this object) wrapped with ``nnsight.NNsight``."""

    def __init__(self, hf_eager: nn.Module):
        import nnsight

        impl = getattr(hf_eager.config, "_attn_implementation", None)
        text_impl = getattr(hf_eager.config.get_text_config(), "_attn_implementation", None)
        if "eager" not in (impl, text_impl):
            raise ValueError(f"the reference model must use eager attention, got {impl!r}/{text_impl!r}")
        self.hf = hf_eager
        self.n_layers = len(hf_eager.model.language_model.layers)
        self.model = nnsight.NNsight(hf_eager)
        names = self.model.model.language_model.layers[0].self_attn.source.names
        if ATTENTION_CALL not in names:
            raise RuntimeError(
                f"HF's attention forward has no operation {ATTENTION_CALL!r} (this transformers version "
                f"names them {names}); update mechvlm.crosscheck.hf_side.ATTENTION_CALL")

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.dtype

    def _softmax(self, layer):
        inner = layer.self_attn.source.attention_interface_1.source
        if SOFTMAX not in inner.names:
            raise RuntimeError(f"HF's eager attention has no operation {SOFTMAX!r}; it has {inner.names}")
        return getattr(inner, SOFTMAX)

    @torch.no_grad()
    def run_clean(self, hf_kwargs: dict) -> Run:
        """Logits, embeddings, every layer's output and pattern, and the final norm."""
        resid, patterns, embed, out = [], [], [], []
        with self.model.trace(**hf_kwargs):
            layers = self.model.model.language_model.layers
            for l in range(self.n_layers):
                if l == 0:
                    embed.append(layers[0].input.save())
                patterns.append(layers[l].self_attn.output[1].save())
                resid.append(layers[l].output.save())
            final = self.model.model.language_model.norm.output.save()
            out.append(self.model.output.logits.save())
        return Run(logits=out[0], embed=embed[0], resid_post=resid, final_norm=final, patterns=patterns)

    @torch.no_grad()
    def run_knockout(self, hf_kwargs: dict, cut: Tensor, mode: str, *, save_patterns: bool = True) -> Run:
        """Logits with ``cut`` ``[batch, 1, q, k]`` (True = remove) knocked out in every
        layer: zeroed after the softmax (``post_softmax_zero``, no renormalisation) or
        set to ``finfo.min`` in the scores before it (``pre_softmax_mask``).
        ``save_patterns=False``: only the logits are kept (the edited patterns are not)."""
        if mode not in ("post_softmax_zero", "pre_softmax_mask"):
            raise ValueError(f"unknown knockout mode {mode!r}")
        out, patterns = [], []
        with self.model.trace(**hf_kwargs):
            layers = self.model.model.language_model.layers
            for l in range(self.n_layers):
                sm = self._softmax(layers[l])
                if mode == "post_softmax_zero":
                    sm.output = sm.output.masked_fill(cut, 0.0)
                else:
                    scores = sm.input
                    sm.input = scores.masked_fill(cut, torch.finfo(scores.dtype).min)
                if save_patterns:
                    patterns.append(layers[l].self_attn.output[1].save())
            out.append(self.model.output.logits.save())
        return Run(logits=out[0], patterns=patterns)


def hf_inputs(config, batch: dict, dtype: torch.dtype, device) -> dict:
    """HF keyword arguments for a mechvlm-style batch.

    HF builds Qwen's 3-D positions only when ``mm_token_type_ids`` is passed (1 image, 2
    video) and Gemma3's bidirectional image blocks only with ``token_type_ids``: both are
    derived from the placeholder ids (or taken from the processor output when it has
    them). Under left padding Gemma3 and LLaVA get real-token ``position_ids`` (as
    ``generate`` does).
    """
    from mechvlm.crosscheck.hf_roles import special_ids

    ids = batch["input_ids"]
    kw = {k: v for k, v in batch.items() if v is not None}
    special = special_ids(config)
    image = (ids == special["image"]).long()
    if config.model_type == "qwen2_5_vl":  # 1 on image tokens, 2 on video tokens
        kw.setdefault("mm_token_type_ids", image + 2 * (ids == special["video"]).long())
    else:
        if config.model_type == "gemma3":
            kw.setdefault("token_type_ids", image)
        am = batch.get("attention_mask")
        if am is not None and not bool(am.bool().all()):
            kw["position_ids"] = (am.long().cumsum(-1) - 1).clamp(min=0)
    kw["use_cache"] = False
    out = {}
    for k, v in kw.items():
        if isinstance(v, Tensor):
            v = v.to(device)
            if k in ("pixel_values", "pixel_values_videos"):
                v = v.to(dtype)
        out[k] = v
    return out
