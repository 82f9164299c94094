"""`HookedVLM`: a VLM language backbone as a TransformerLens `HookedRootModule`.

The language model is reimplemented with mechvlm's hooked components and loads the
original HF weights; the vision tower (+ merger / projector) is the HF module, frozen.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedRootModule

from mechvlm.components import AttentionMask, Embed, Unembed
from mechvlm.config import VLMConfig
from mechvlm.hook_points import HookPoint, UnknownHookError, unknown_hook_error
from mechvlm.models import family_for
from mechvlm.models.base import (
    ModelFamily,
    PreparedInputs,
    check_input_ids,
    padding_from_attention_mask,
)
from mechvlm.roles import TokenRoles, compute_roles


class HookedVLM(HookedRootModule):
    """Hooked language backbone of a vision-language model.

    Build it with `HookedVLM.from_pretrained` (hub id or local HF directory) or
    `HookedVLM.from_hf` (an in-memory HF model, left untouched: weights are copied).

    Model-level hooks:
        hook_image_embeds: ``[n_image_tokens, d_model]`` the vision features after the
            merger/projector, all images of the batch concatenated in feature order.
            The tower is frozen, so this tensor does not require grad; a hook that
            wants gradients with respect to it calls ``t.requires_grad_(True)``.
        hook_embed: ``[batch, pos, d_model]`` the input sequence embedding with the image
            features scattered in (the input of block 0).
        ln_final.hook_scale / hook_normalized: the final norm.
    Per-layer hooks: see `TransformerBlock`, `Attention`, `GatedMLP`, `RMSNorm`.
    """

    def __init__(self, cfg: VLMConfig, family: ModelFamily, vision: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.family = family
        self.embed = Embed(cfg.d_vocab, cfg.d_model, scale=family.embed_scale(cfg))
        self.hook_image_embeds = HookPoint()
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList([family.build_block(cfg, l) for l in range(cfg.n_layers)])
        self.ln_final = family.build_final_norm(cfg)
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab)
        self.vision = vision
        self._rotary = family.rotary(cfg)
        self.setup()

    # ------------------------------------------------------------------ construction --
    @classmethod
    def from_hf(cls, hf_model: nn.Module, *, dtype: torch.dtype | None = None,
                device: str | torch.device | None = None) -> "HookedVLM":
        """Build from an in-memory HF model (e.g. ``Qwen2_5_VLForConditionalGeneration``).

        The HF model is not modified: its weights and vision tower are copied (cast to
        ``dtype`` / moved to ``device``, by default the HF model's own).
        """
        return cls._build(hf_model, dtype=dtype, device=device, copy_weights=True)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, **hf_kwargs) -> "HookedVLM":
        """Load a hub id (``"Qwen/Qwen2.5-VL-3B-Instruct"``) or a local directory in HF
        layout. ``dtype=None`` keeps the checkpoint's dtype. Extra keyword arguments go
        to the HF ``from_pretrained`` (``revision``, ``local_files_only``, ...)."""
        import transformers

        hf_config = transformers.AutoConfig.from_pretrained(name_or_path, **hf_kwargs)
        family = family_for(hf_config)
        hf_class = getattr(transformers, family.hf_class_name)
        hf_model = hf_class.from_pretrained(name_or_path, dtype=dtype or "auto", **hf_kwargs)
        return cls._build(hf_model, dtype=dtype, device=device, copy_weights=False)

    @classmethod
    def _build(cls, hf_model, *, dtype, device, copy_weights: bool) -> "HookedVLM":
        family = family_for(hf_model.config)
        dtype = dtype or hf_model.dtype
        device = torch.device(device) if device is not None else hf_model.device
        cfg = family.config_from_hf(hf_model.config, dtype=dtype, device=str(device))
        cfg.tie_word_embeddings = family.ties_embeddings(hf_model)
        cfg.registering = dict(getattr(hf_model.config, "registering", None) or {}) or None
        cfg.register_token_id = (cfg.registering or {}).get("register_token_id")
        weights = {k: v.detach().to(device=device, dtype=dtype, copy=copy_weights)
                   for k, v in family.state_dict_from_hf(hf_model).items()}
        if cfg.tie_word_embeddings:
            weights.pop("unembed.weight")
        vision = family.vision_encoder(hf_model)
        if copy_weights:
            vision = copy.deepcopy(vision)
        # as HF's own loading: fp32 buffers (the vision rotary inv_freq) stay fp32 under a cast
        fp32_buffers = {n: b for n, b in vision.named_buffers() if b.dtype == torch.float32}
        vision = vision.to(device=device, dtype=dtype).requires_grad_(False).eval()
        for name, buf in fp32_buffers.items():
            owner, _, attr = name.rpartition(".")
            vision.get_submodule(owner)._buffers[attr] = buf.to(device)
        with torch.device("meta"):
            model = cls(cfg, family)
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "unembed.weight")]
        if missing or unexpected:
            raise RuntimeError(f"weight conversion mismatch: missing {missing}, unexpected {unexpected}")
        if cfg.tie_word_embeddings:
            model.unembed.weight = model.embed.W_E
        model.vision = vision
        model.setup()
        return model.eval()

    # ----------------------------------------------------------------------- forward --
    @property
    def device(self) -> torch.device:
        return self.embed.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.W_E.dtype

    def prepare_inputs(self, input_ids: Tensor, pixel_values: Tensor | None = None,
                       image_grid_thw: Tensor | None = None,
                       attention_mask: Tensor | None = None,
                       token_type_ids: Tensor | None = None) -> PreparedInputs:
        """Validate the inputs; find image spans, positions, padding and (Gemma3) the
        bidirectional image blocks."""
        return self.family.prepare_inputs(self.cfg, input_ids, pixel_values, image_grid_thw,
                                          attention_mask, self.device, token_type_ids=token_type_ids)

    def roles(self, input_ids: Tensor, image_grid_thw: Tensor | None = None,
              attention_mask: Tensor | None = None, **_batch) -> TokenRoles:
        """Token roles of a batch (image, eoi, image_start, prefix, text, bos, pad, last)
        and the merged-grid cell of every image token. Takes the same keyword arguments as
        ``forward`` (``model.roles(**batch)``); pixels are not needed."""
        check_input_ids(input_ids)
        ids = input_ids.to(self.device)
        key_padding = padding_from_attention_mask(attention_mask, ids, self.device)
        spans = self.family.image_spans(self.cfg, ids, image_grid_thw, key_padding)
        return compute_roles(self.cfg, ids, spans, key_padding)

    def forward(
        self,
        input_ids: Int[Tensor, "batch pos"],
        pixel_values: Tensor | None = None,
        image_grid_thw: Int[Tensor, "n_images 3"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        *,
        token_type_ids: Int[Tensor, "batch pos"] | None = None,
        return_type: Literal["logits"] | None = "logits",
        image_embeds: Float[Tensor, "... d_model"] | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"] | None:
        """Run the backbone; returns logits ``[batch, pos, d_vocab]`` (or None).

        ``attention_mask`` (1 = real token) supports left padding; positions count real
        tokens only. Image tokens need ``pixel_values`` (and, for Qwen2.5-VL,
        ``image_grid_thw``). ``token_type_ids`` (Gemma3 only, optional) is checked against
        the image blocks mechvlm derives from ``input_ids``; a disagreement raises.
        ``image_embeds``: the vision encoder's output for these ``pixel_values``
        (`encode_images`), to skip recomputing it (e.g. at every generation step);
        ``hook_image_embeds`` still sees and may edit it.
        """
        inputs = self.prepare_inputs(input_ids, pixel_values, image_grid_thw, attention_mask,
                                     token_type_ids)
        ids = inputs.input_ids
        if self.cfg.image_token_id is not None and self.cfg.image_token_id >= self.cfg.d_vocab:
            ids = ids.masked_fill(ids == self.cfg.image_token_id, 0)  # as HF: an out-of-vocab placeholder
        x = self.embed(ids)
        if inputs.spans:
            feats = self.encode_images(pixel_values, image_grid_thw) if image_embeds is None else image_embeds
            feats = self.hook_image_embeds(feats.to(x.dtype))
            image_mask = (inputs.input_ids == self.cfg.image_token_id).unsqueeze(-1)
            if feats.numel() != int(image_mask.sum()) * x.shape[-1]:
                raise ValueError(f"image features hold {feats.numel() // x.shape[-1]} token vectors but the "
                                 f"input has {int(image_mask.sum())} image tokens")
            x = x.masked_scatter(image_mask, feats)
        x = self.hook_embed(x)
        tables = {id(t): t(inputs.position_ids, x.dtype) for t in set(self._rotary.values())}
        rope = {kind: tables[id(t)] for kind, t in self._rotary.items()}  # one table per distinct RoPE
        mask = AttentionMask(x.shape[0], x.shape[1], x.device, inputs.key_padding, inputs.block_ids)
        for l, block in enumerate(self.blocks):
            x = block(x, rope[self.cfg.layer_types[l]], mask)
        x = self.ln_final(x)
        if return_type is None:
            return None
        if return_type != "logits":
            raise ValueError(f"return_type must be 'logits' or None, got {return_type!r}")
        return self.unembed(x)

    def encode_images(self, pixel_values: Tensor, image_grid_thw: Tensor | None = None) -> Tensor:
        """The vision encoder's output (HF's tower and projector): one ``d_model`` vector per
        image token, in the order the image tokens appear."""
        if self.vision is None:
            raise RuntimeError("this HookedVLM has no vision encoder")
        grid = image_grid_thw.to(self.device) if image_grid_thw is not None else None
        return self.vision(pixel_values.to(self.device), grid)

    # ------------------------------------------------------------------ hooks / cache --
    def set_use_attn_result(self, use: bool) -> None:
        """Create (or remove) ``blocks.{l}.attn.hook_result``, the per-head output
        ``[batch, pos, head, d_model]``. Off by default: it costs ``head`` times the
        memory of the attention output."""
        self.cfg.use_attn_result = use
        for block in self.blocks:
            block.attn.hook_result = HookPoint() if use else None
        self.setup()

    def _check_hook_name(self, name: str | Callable) -> None:
        if isinstance(name, str):
            if name not in self.hook_dict:
                raise unknown_hook_error(name, self.hook_dict)
        elif callable(name):
            if not any(name(n) for n in self.hook_dict):
                raise UnknownHookError(f"the hook-name filter {name!r} matches no hook point")
        else:
            raise TypeError(f"a hook name must be a str or a callable filter, got {type(name).__name__}")

    def _enable_hook(self, name, hook, dir):
        self._check_hook_name(name)
        super()._enable_hook(name, hook, dir)

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False):
        self._check_hook_name(name)
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def get_caching_hooks(self, names_filter=None, *args, **kwargs):
        if isinstance(names_filter, str):
            self._check_hook_name(names_filter)
        elif isinstance(names_filter, (list, tuple)):
            for n in names_filter:
                self._check_hook_name(n)
            names_filter = list(names_filter)
        elif names_filter is not None:
            self._check_hook_name(names_filter)
        return super().get_caching_hooks(names_filter, *args, **kwargs)

    def run_with_cache(self, *model_args, return_cache_object: bool = True, **kwargs):
        """As TransformerLens: returns ``(logits, ActivationCache)``; the cache supports
        ``cache["pattern", l]``, ``stack_activation``, ``accumulated_resid``, ..."""
        out, cache_dict = super().run_with_cache(*model_args, **kwargs)
        if return_cache_object:
            return out, ActivationCache(cache_dict, self, has_batch_dim=not kwargs.get("remove_batch_dim", False))
        return out, cache_dict

    # TransformerLens conveniences -----------------------------------------------------
    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    def tokens_to_residual_directions(self, tokens: Tensor) -> Tensor:
        return self.W_U[:, tokens].T if tokens.ndim else self.W_U[:, tokens]
