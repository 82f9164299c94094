"""What a model family supplies to `HookedVLM`, and the registry of families.

A family is configuration and conversion, not a second copy of the network: it maps the
HF config onto `VLMConfig`, builds the shared components with its options, renames the HF
language-model weights onto mechvlm's modules, wraps the HF vision tower, and turns the
inputs into positions, image spans and (Gemma3) bidirectional blocks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Int
from torch import Tensor, nn

from mechvlm.components import (
    Attention,
    GatedMLP,
    RMSNorm,
    RotaryEmbedding,
    TransformerBlock,
)
from mechvlm.config import VLMConfig
from mechvlm.image_layout import ImageSpan


#: Visual inputs of `HookedVLM.forward` besides ``pixel_values`` / ``image_grid_thw``; each
#: is used by some families only (a family that does not use one raises when it is given).
VISUAL_INPUTS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "image_sizes",
                 "batch_num_images")


@dataclass
class VisualInput:
    """One modality's features to compute and scatter into its placeholder tokens.

    Attributes:
        modality: ``"image"`` or ``"video"``; the features pass ``hook_{modality}_embeds``.
        token_id: the placeholder id the features replace, in sequence order.
        encoder_kwargs: the keyword arguments of the family's vision encoder
            (``model.vision(**encoder_kwargs)`` returns ``[n_features, d_model]``).
        n_features: how many feature vectors the encoder returns: the placeholder tokens,
            or, when ``image_cells`` removed some, the whole images' cells
            (`ImageSpan.n_cells`); the kept cells' features are then selected.
    """

    modality: str
    token_id: int
    encoder_kwargs: dict
    n_features: int


@dataclass
class PreparedInputs:
    """Validated inputs of one forward pass.

    Attributes:
        input_ids: ``[batch, pos]`` on the model's device.
        key_padding: ``[batch, pos]`` True for real tokens; None when nothing is padded.
        spans: the images, in feature order, then the videos.
        position_ids: ``[3, batch, pos]`` (mRoPE) or ``[batch, pos]``.
        block_ids: ``[batch, pos]`` bidirectional block of each token (-1: none), or None.
        visual: the features to scatter, one entry per modality present.
    """

    input_ids: Int[Tensor, "batch pos"]
    key_padding: Bool[Tensor, "batch pos"] | None
    spans: list[ImageSpan]
    position_ids: Int[Tensor, "..."]
    block_ids: Int[Tensor, "batch pos"] | None = None
    visual: list[VisualInput] = field(default_factory=list)


class ModelFamily(ABC):
    """One HF architecture mapped onto mechvlm's components."""

    model_type: str
    hf_class_name: str

    # --- configuration and construction -----------------------------------------------
    @abstractmethod
    def config_from_hf(self, hf_config, *, dtype: torch.dtype, device: str) -> VLMConfig: ...

    @abstractmethod
    def build_block(self, cfg: VLMConfig, layer: int) -> TransformerBlock: ...

    def build_final_norm(self, cfg: VLMConfig) -> RMSNorm:
        return RMSNorm(cfg.d_model, cfg.eps)

    def embed_scale(self, cfg: VLMConfig) -> float | None:
        return None

    @abstractmethod
    def rotary(self, cfg: VLMConfig) -> dict[str, RotaryEmbedding]:
        """One rotary table builder per layer type."""

    # --- weights ---------------------------------------------------------------------
    @abstractmethod
    def state_dict_from_hf(self, hf_model: nn.Module) -> dict[str, Tensor]:
        """The language-model weights under mechvlm names (tensors not copied)."""

    @abstractmethod
    def state_dict_to_hf(self, weights: dict[str, Tensor], cfg: VLMConfig) -> dict[str, Tensor]:
        """The inverse of `state_dict_from_hf`: language-model weights under mechvlm names ->
        the HF model's ``state_dict()`` names (tensors not copied). ``unembed.weight`` may be
        absent when ``cfg.tie_word_embeddings`` (HF's ``lm_head.weight`` is then the embedding)."""

    #: mechvlm name prefix of the vision encoder's modules -> HF ``state_dict()`` prefix
    vision_prefixes: dict[str, str] = {}

    @abstractmethod
    def vision_encoder(self, hf_model: nn.Module) -> nn.Module:
        """A module ``(pixel_values, image_grid_thw=None, **kw) -> [n_tokens, d_model]``
        around the HF vision tower (and projector / merger), called with the
        ``encoder_kwargs`` of a `VisualInput` (LLaVA-NeXT: ``image_sizes``; Qwen videos: the
        video pixels and ``video_grid_thw``)."""

    @staticmethod
    def ties_embeddings(hf_model: nn.Module) -> bool:
        out = hf_model.get_output_embeddings().weight
        inp = hf_model.get_input_embeddings().weight
        return out is inp or out.data_ptr() == inp.data_ptr()

    # --- inputs ----------------------------------------------------------------------
    @abstractmethod
    def image_spans(self, cfg: VLMConfig, input_ids: Tensor, image_grid_thw: Tensor | None,
                    key_padding: Tensor | None, image_cells=None, **visual) -> list[ImageSpan]:
        """The images' (and videos') token spans from ``input_ids`` and the grids / image
        sizes in ``visual`` (`VISUAL_INPUTS`), without pixels. ``image_cells``: see
        `HookedVLM.forward` (images with removed tokens; None: every token is there)."""

    @abstractmethod
    def prepare_inputs(
        self, cfg: VLMConfig, input_ids: Tensor, pixel_values: Tensor | None,
        image_grid_thw: Tensor | None, attention_mask: Tensor | None, device: torch.device,
        token_type_ids: Tensor | None = None, image_cells=None, **visual,
    ) -> PreparedInputs:
        """Validate the inputs; find padding, image spans, positions and (Gemma3) blocks.

        ``token_type_ids`` (Gemma3's processor output, 1 on image tokens) is optional and
        only checked against what ``input_ids`` imply; families that do not use it raise.
        ``visual``: the `VISUAL_INPUTS` given (None values mean absent); a family raises
        for one it does not use.
        ``image_cells`` (optional): per image, the grid cells of the tokens left in
        ``input_ids`` when some were removed; positions are those the family assigns to a
        sequence holding only these tokens (see each family's ``prepare_inputs``).
        """


def build_standard_block(cfg: VLMConfig, layer: int, *, qkv_bias: bool, qk_norm: bool = False,
                         sandwich: bool = False, offset_weight: bool = False) -> TransformerBlock:
    """The shared block, configured per family."""
    norm = lambda d: RMSNorm(d, cfg.eps, offset_weight=offset_weight)  # noqa: E731
    attn = Attention(
        cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.attn_scale,
        window=cfg.window(layer), qkv_bias=qkv_bias,
        q_norm=norm(cfg.d_head) if qk_norm else None, k_norm=norm(cfg.d_head) if qk_norm else None,
    )
    return TransformerBlock(
        attn, GatedMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn), norm(cfg.d_model), norm(cfg.d_model),
        ln1_post=norm(cfg.d_model) if sandwich else None, ln2_post=norm(cfg.d_model) if sandwich else None,
    )


def reject_unused(visual: dict, family: str, used: tuple[str, ...] = ()) -> None:
    """Raise for a given visual input (`VISUAL_INPUTS`) that ``family`` does not use."""
    unknown = set(visual) - set(VISUAL_INPUTS)
    if unknown:
        raise TypeError(f"unknown visual input(s) {sorted(unknown)}; known: {VISUAL_INPUTS}")
    for key, value in visual.items():
        if value is not None and key not in used:
            raise ValueError(f"{key} is not used by {family}; drop it")


def prenorm_state_dict(lm: nn.Module, lm_head: nn.Module) -> dict[str, Tensor]:
    """mechvlm names of a HF pre-norm decoder (Qwen2 / Qwen2.5-VL / Llama layout:
    ``embed_tokens``, ``layers[l].{input,post_attention}_layernorm``, ``self_attn.{q,k,v,o}_proj``
    (with their biases, if any), ``mlp.{gate,up,down}_proj``, ``norm``) and its ``lm_head``."""
    sd = {"embed.W_E": lm.embed_tokens.weight, "ln_final.w": lm.norm.weight, "unembed.weight": lm_head.weight}
    for l, layer in enumerate(lm.layers):
        p = f"blocks.{l}."
        sd[p + "ln1.w"] = layer.input_layernorm.weight
        sd[p + "ln2.w"] = layer.post_attention_layernorm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for key, t in getattr(layer.self_attn, name).state_dict(keep_vars=True).items():
                sd[f"{p}attn.{name}.{key}"] = t
        for name in ("gate_proj", "up_proj", "down_proj"):
            sd[f"{p}mlp.{name}.weight"] = getattr(layer.mlp, name).weight
    return sd


def prenorm_state_dict_to_hf(weights: dict[str, Tensor], cfg: VLMConfig,
                             lm: str = "model.language_model.") -> dict[str, Tensor]:
    """The inverse of `prenorm_state_dict`: mechvlm names -> the HF ``state_dict()`` names
    under the language model's prefix ``lm`` (tensors not copied); ``lm_head.weight`` is the
    embedding when ``unembed.weight`` is absent (tied)."""
    out = {lm + "embed_tokens.weight": weights["embed.W_E"], lm + "norm.weight": weights["ln_final.w"],
           "lm_head.weight": weights.get("unembed.weight", weights["embed.W_E"])}
    for l in range(cfg.n_layers):
        p, q = f"blocks.{l}.", f"{lm}layers.{l}."
        out[q + "input_layernorm.weight"] = weights[p + "ln1.w"]
        out[q + "post_attention_layernorm.weight"] = weights[p + "ln2.w"]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for key in ("weight", "bias"):
                if f"{p}attn.{name}.{key}" in weights:
                    out[f"{q}self_attn.{name}.{key}"] = weights[f"{p}attn.{name}.{key}"]
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"{q}mlp.{name}.weight"] = weights[f"{p}mlp.{name}.weight"]
    return out


def real_token_positions(key_padding: Tensor | None, shape: torch.Size) -> Int[Tensor, "batch pos"]:
    """1-D positions counting real tokens only (left pads get 0)."""
    if key_padding is None:
        return torch.arange(shape[1]).expand(shape[0], -1)
    real = key_padding.long()
    return ((torch.cumsum(real, dim=-1) - 1) * real).cpu()


def padding_from_attention_mask(attention_mask: Tensor | None, input_ids: Tensor,
                                device: torch.device) -> Bool[Tensor, "batch pos"] | None:
    """Validate a ``[batch, pos]`` 0/1 mask; None when every token is real."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}"
        )
    key_padding = attention_mask.to(device).bool()
    if bool(key_padding.all()):
        return None
    if not bool(key_padding.any(dim=-1).all()):
        raise ValueError("attention_mask has a row with no real token")
    return key_padding


def check_input_ids(input_ids: Tensor) -> None:
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, pos], got shape {tuple(input_ids.shape)}")


def check_image_embeds(image_embeds, n_image_tokens: int, d_model: int, device: torch.device, *,
                       what: str = "image") -> None:
    """Refuse precomputed image (``what="video"``: video) features that cannot be the
    ``[n_image_tokens, d_model]`` vision output of this batch: another shape (even with the
    same element count, e.g. ``[d_model, n]``), another device, or the meta device."""
    name = f"{what}_embeds"
    if not isinstance(image_embeds, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [n_{what}_tokens, d_model], got "
                        f"{type(image_embeds).__name__}")
    if not n_image_tokens:
        raise ValueError(f"{name} given, but input_ids hold no {what} token: they would be ignored")
    if image_embeds.is_meta:
        raise ValueError(f"{name} is on the meta device (it has no values)")
    if image_embeds.device != torch.device(device):
        raise ValueError(f"{name} is on {image_embeds.device}, the model on {device}: "
                         "move it with .to(model.device)")
    if not image_embeds.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {image_embeds.dtype}")
    shape = tuple(image_embeds.shape)
    if shape != (n_image_tokens, d_model):
        why = ""
        if len(shape) == 2 and shape[1] == d_model:
            why = f": the {what} features hold {shape[0]} token vectors but the input has {n_image_tokens}"
        elif len(shape) == 2 and shape == (d_model, n_image_tokens):
            why = ": it looks transposed"
        raise ValueError(f"{name} has shape {shape}; it must be [n_{what}_tokens, d_model] = "
                         f"[{n_image_tokens}, {d_model}]{why}")


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    _FAMILIES[family.model_type] = family
    return family


def family_for(hf_config) -> ModelFamily:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _FAMILIES:
        raise NotImplementedError(
            f"mechvlm has no hooked backbone for model_type {model_type!r}; "
            f"supported: {sorted(_FAMILIES)}"
        )
    return _FAMILIES[model_type]

