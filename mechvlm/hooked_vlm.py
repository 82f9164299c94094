"""`HookedVLM`: a VLM language backbone as a TransformerLens `HookedRootModule`.

The language model is reimplemented with mechvlm's hooked components and loads the
original HF weights; the vision tower (+ merger / projector) is the HF module, frozen.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedRootModule

from mechvlm.checked_hooks import CheckedHooksMixin
from mechvlm.components import AttentionMask, Embed, Unembed
from mechvlm.config import VLMConfig
from mechvlm.fold_ln import process_weights_
from mechvlm.forward_args import forward_arguments
from mechvlm.hook_points import HookPoint
from mechvlm.kv_cache import VLMKeyValueCache, check_cached_forward, keeps_positions
from mechvlm.models import family_for
from mechvlm.models.base import (
    VISUAL_INPUTS,
    ModelFamily,
    PreparedInputs,
    check_input_ids,
    padding_from_attention_mask,
)
from mechvlm.optional_hooks import OptionalHooksMixin
from mechvlm.placement import check_placement_arguments, place_as_asked
from mechvlm.return_types import check_return_type, forward_output
from mechvlm.roles import TokenRoles, compute_roles, records_batch
from mechvlm.tokens import TokenizerMixin
from mechvlm.visual_features import VisualFeaturesMixin
from mechvlm.weights import WeightsMixin


def _without_module_hooks(module: nn.Module) -> nn.Module:
    """Drop the forward / backward hooks (torch's and accelerate's) from every submodule of
    a private copy, so hooks a user registered on the HF model do not fire in mechvlm."""
    try:
        from accelerate.hooks import remove_hook_from_module
    except ImportError:  # pragma: no cover - accelerate is optional
        remove_hook_from_module = None
    if remove_hook_from_module is not None and any(hasattr(m, "_hf_hook") for m in module.modules()):
        remove_hook_from_module(module, recurse=True)
    for m in module.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                     "_forward_pre_hooks_with_kwargs"):
            hooks = getattr(m, attr, None)
            if hooks:
                hooks.clear()
        if getattr(m, "_is_full_backward_hook", None) is not None:
            m._is_full_backward_hook = None
        if getattr(m, "_output_capturing_hooks_installed", False):
            # HF's own hidden-state capture hooks went too: let HF install them again when
            # needed (LLaVA selects a tower layer through them), or it captures nothing
            m._output_capturing_hooks_installed = False
    return module


class HookedVLM(CheckedHooksMixin, VisualFeaturesMixin, TokenizerMixin, WeightsMixin, OptionalHooksMixin,
                HookedRootModule):
    """Hooked language backbone of a vision-language model.

    Build it with `HookedVLM.from_pretrained` (hub id or local HF directory) or
    `HookedVLM.from_hf` (an in-memory HF model, left untouched: weights are copied).

    Model-level hooks:
        hook_tokens: ``[batch, pos]`` the input ids (a copy: an in-place edit changes the
            run, never the caller's tensor); positions and image spans follow the edit.
        hook_image_embeds: ``[n_image_tokens, d_model]`` the vision features after the
            merger/projector, all images of the batch concatenated in feature order.
            The tower is frozen, so this tensor does not require grad; a hook that
            wants gradients with respect to it calls ``t.requires_grad_(True)``.
        hook_video_embeds: ``[n_video_tokens, d_model]`` the same for the videos
            (Qwen2.5-VL), scattered into the video placeholder tokens.
        hook_embed: ``[batch, pos, d_model]`` the input sequence embedding with the image
            features scattered in (the input of block 0).
        ln_final.hook_scale / hook_normalized: the final norm.
        unembed.hook_in / hook_out: the unembedding's input and the logits.
    Per-layer hooks: see `TransformerBlock`, `Attention`, `GatedMLP`, `RMSNorm`; opt-in
    ones: `mechvlm.optional_hooks`. TransformerLens surface: `mechvlm.tokens`,
    `mechvlm.weights` (weight stacks), `mechvlm.fold_ln`, `mechvlm.cache`.
    """

    def __init__(self, cfg: VLMConfig, family: ModelFamily, vision: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.family = family
        self.hook_tokens = HookPoint()
        self.embed = Embed(cfg.d_vocab, cfg.d_model, scale=family.embed_scale(cfg))
        self.hook_image_embeds = HookPoint()
        self.hook_video_embeds = HookPoint()
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList([family.build_block(cfg, l) for l in range(cfg.n_layers)])
        self.ln_final = family.build_final_norm(cfg)
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab)
        self.vision = vision
        self._rotary = family.rotary(cfg)
        self._warned_n_ctx = False
        self.placement = None  # `mechvlm.placement.Placement` once split over devices
        self.setup()

    # ------------------------------------------------------------------ construction --
    @classmethod
    def from_hf(cls, hf_model: nn.Module, *, dtype: torch.dtype | None = None,
                device: str | torch.device | None = None, tokenizer=None, processor=None,
                fold_ln: bool = False, center_unembed: bool = False, device_map=None, max_memory=None,
                n_devices: int | None = None, offload_folder=None) -> "HookedVLM":
        """Build from an in-memory HF model (e.g. ``Qwen2_5_VLForConditionalGeneration``).

        The HF model is not modified: its weights and vision tower are copied (cast to
        ``dtype`` / moved to ``device``, by default the HF model's own). Forward / backward
        hooks registered on the HF modules are not carried over. ``tokenizer`` (HF)
        enables ``to_tokens`` & co.; ``processor`` (a `mechvlm.InputBuilder`, or an HF image
        processor used with ``tokenizer``) enables ``to_inputs``. ``fold_ln`` /
        ``center_unembed``: `process_weights_`. ``device_map`` / ``max_memory`` /
        ``n_devices`` / ``offload_folder``: as in `from_pretrained`.
        """
        check_placement_arguments(device=device, device_map=device_map, max_memory=max_memory, n_devices=n_devices)
        model = cls._build(hf_model, dtype=dtype, device=device, copy_weights=True)
        model._attach_processing(tokenizer, processor, hf_model.config)
        model.process_weights_(fold_ln=fold_ln, center_unembed=center_unembed)
        return place_as_asked(model, device_map=device_map, max_memory=max_memory, n_devices=n_devices,
                              offload_folder=offload_folder)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, strict: bool = True,
                        fold_ln: bool = False, center_unembed: bool = False, device_map=None, max_memory=None,
                        n_devices: int | None = None, offload_folder=None, **hf_kwargs) -> "HookedVLM":
        """Load a hub id (``"Qwen/Qwen2.5-VL-3B-Instruct"``) or a local directory in HF
        layout. ``dtype=None`` keeps the checkpoint's dtype. Extra keyword arguments go
        to the HF ``from_pretrained`` (``revision``, ``local_files_only``, ...).

        Refused with an error that names the problem: a path that does not exist or is a
        file, and a checkpoint whose tensors are not exactly the model's (missing,
        unexpected or of another shape: `mechvlm.checkpoint_check`; ``strict=False`` makes
        that a warning).

        The checkpoint's tokenizer and image processor, when it has them, are attached
        (``model.tokenizer``, ``model.to_inputs``). ``fold_ln=True`` folds the norm weights
        (`process_weights_`; logits unchanged), which TransformerLens' attribution helpers
        assume; it is off by default so that weights stay HF's.

        Several devices (`mechvlm.placement`, ``docs/scaling.md``): ``device_map="auto"`` (or
        ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``; with ``max_memory={0: "20GiB",
        1: "20GiB", "cpu": "200GiB"}``) splits the blocks over the devices as HF would; a
        dict ``{"vision": 0, "embed": 0, "blocks.0": 0, ..., "ln_final": 1, "unembed": 1}``
        (``{"blocks": 1, ...}`` for groups) places each piece; ``"cpu"`` next to a GPU and
        ``"disk"`` (needs ``offload_folder``) are offloaded through accelerate's hooks.
        ``n_devices=k``: TransformerLens' split over ``cuda:0..k-1``. The weights are loaded
        on the CPU first, then placed."""
        import transformers

        from mechvlm.checkpoint_check import load_hf_checked, load_hf_config

        hf_config = load_hf_config(name_or_path, **hf_kwargs)  # "no such directory", not HF's repo-id advice
        family = family_for(hf_config)
        hf_class = getattr(transformers, family.hf_class_name)
        # a missing / unexpected tensor raises, naming it, instead of a random initialisation
        check_placement_arguments(device=device, device_map=device_map, max_memory=max_memory, n_devices=n_devices)
        hf_model = load_hf_checked(hf_class, name_or_path, strict=strict, dtype=dtype or "auto", **hf_kwargs)
        model = cls._build(hf_model, dtype=dtype, device=device, copy_weights=False)
        model._attach_from_checkpoint(name_or_path, hf_config)
        model.process_weights_(fold_ln=fold_ln, center_unembed=center_unembed)
        return place_as_asked(model, device_map=device_map, max_memory=max_memory, n_devices=n_devices,
                              offload_folder=offload_folder)

    def _attach_from_checkpoint(self, name_or_path: str, hf_config) -> None:
        from pathlib import Path

        from mechvlm.processing import InputBuilder

        path = Path(name_or_path)
        if not (path / "tokenizer_config.json").is_file():
            return  # a hub id or a directory without tokenizer: attach none (to_tokens explains)
        if (path / "preprocessor_config.json").is_file() and getattr(self.cfg, "image_token_id", None) is not None:
            builder = InputBuilder.from_pretrained(path)
            self.set_tokenizer(builder.tokenizer, builder)
        else:
            from transformers import AutoTokenizer

            self.set_tokenizer(AutoTokenizer.from_pretrained(path))

    def _attach_processing(self, tokenizer, processor, hf_config) -> None:
        from mechvlm.processing import InputBuilder

        if processor is not None and not isinstance(processor, InputBuilder):
            if tokenizer is None:
                raise ValueError("processor= (an HF image processor) needs tokenizer= too, or pass an InputBuilder")
            processor = InputBuilder(tokenizer, processor, hf_config)
        if tokenizer is None and processor is not None:
            tokenizer = processor.tokenizer
        self.set_tokenizer(tokenizer, processor)

    def process_weights_(self, fold_ln: bool = True, center_writing_weights: bool = False,
                         center_unembed: bool = False, fold_value_biases: bool = False,
                         refactor_factored_attn_matrices: bool = False) -> None:
        """TransformerLens' weight processing, in place (see `mechvlm.fold_ln`)."""
        process_weights_(self, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                         center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                         refactor_factored_attn_matrices=refactor_factored_attn_matrices)

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
            vision = _without_module_hooks(copy.deepcopy(vision))
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
        """Where the inputs go (the embedding's device; a placed model's main device)."""
        placement = getattr(self, "placement", None)
        return placement.main_device if placement is not None else self.embed.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.W_E.dtype

    def prepare_inputs(self, input_ids: Tensor, pixel_values: Tensor | None = None,
                       image_grid_thw: Tensor | None = None,
                       attention_mask: Tensor | None = None,
                       token_type_ids: Tensor | None = None, image_cells=None, **visual) -> PreparedInputs:
        """Validate the inputs; find image (and video) spans, positions, padding and
        (Gemma3) the bidirectional image blocks. ``visual``: the `VISUAL_INPUTS`
        (``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``,
        ``image_sizes``, ``batch_num_images``) of the families that use them;
        ``image_cells``: see ``forward``."""
        return self.family.prepare_inputs(self.cfg, input_ids, pixel_values, image_grid_thw,
                                          attention_mask, self.device, token_type_ids=token_type_ids,
                                          image_cells=image_cells, **visual)

    def roles(self, input_ids: Tensor, image_grid_thw: Tensor | None = None,
              attention_mask: Tensor | None = None, image_cells=None, **batch) -> TokenRoles:
        """Token roles of a batch (image, video, newline, eoi, image_start, prefix, text,
        bos, pad, last) and the cell of every image token. Takes the same keyword
        arguments as ``forward`` (``model.roles(**batch)``); pixels are not needed (the
        grids and ``image_sizes`` are)."""
        check_input_ids(input_ids)
        ids = input_ids.to(self.device)
        key_padding = padding_from_attention_mask(attention_mask, ids, self.device)
        visual = {k: batch[k] for k in VISUAL_INPUTS if k not in ("pixel_values_videos", "second_per_grid_ts")
                  and batch.get(k) is not None}
        spans = self.family.image_spans(self.cfg, ids, image_grid_thw, key_padding, image_cells, **visual)
        return compute_roles(self.cfg, ids, spans, key_padding)

    @records_batch  # role-based hooks check that their TokenRoles were built for this batch
    @keeps_positions
    def forward(
        self,
        input_ids: Int[Tensor, "batch pos"] | Mapping | str | list[str],
        pixel_values: Tensor | None = None,
        image_grid_thw: Int[Tensor, "n_images 3"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        *,
        token_type_ids: Int[Tensor, "batch pos"] | None = None,
        return_type: Literal["logits", "loss", "both"] | None = "logits",
        image_embeds: Float[Tensor, "... d_model"] | None = None,
        image_cells: list[Int[Tensor, " kept"]] | None = None,
        loss_per_token: bool = False,
        target_mask: Tensor | None = None,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        resid: Float[Tensor, "batch pos d_model"] | None = None,
        tokens: Tensor | Mapping | None = None,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        pixel_values_videos: Tensor | None = None,
        video_grid_thw: Int[Tensor, "n_videos 3"] | None = None,
        second_per_grid_ts: Tensor | list[float] | None = None,
        image_sizes: Int[Tensor, "n_images 2"] | None = None,
        batch_num_images: Int[Tensor, " batch"] | None = None,
        video_embeds: Float[Tensor, "... d_model"] | None = None,
        past_kv_cache: VLMKeyValueCache | None = None,
    ):
        """Run the backbone; returns logits ``[batch, pos, d_vocab]`` (or None).

        The first argument may also be a batch mapping (``to_inputs``, `InputBuilder`, an HF
        processor's ``BatchFeature``) or text (``to_tokens``); see `mechvlm.forward_args`.
        ``return_type``: ``"logits"``, ``"loss"`` (next-token cross-entropy of the scored
        tokens, `mechvlm.return_types`; ``loss_per_token`` gives ``[batch, pos - 1]``;
        ``target_mask`` bool ``[batch, pos]`` restricts it, e.g. to answer tokens), ``"both"``
        (logits, loss) or None. ``stop_at_layer=l`` returns the residual stream entering
        block ``l`` (negative counts from the end), before ``ln_final``.
        ``start_at_layer=l`` starts at block ``l`` from ``resid`` (``[batch, pos, d_model]``,
        what ``blocks.{l}.hook_resid_pre`` would see); positions, masks and image blocks
        still come from ``input_ids`` (pass the same batch: ``tokens=batch`` in TL's form
        ``model(resid, start_at_layer=l, tokens=batch)``). Hooks of the blocks that run fire.

        ``attention_mask`` (1 = real token) supports left padding; positions count real
        tokens only. Image tokens need ``pixel_values`` (and, for Qwen2.5-VL,
        ``image_grid_thw``). ``token_type_ids`` (Gemma3 only, optional) is checked against
        the image blocks mechvlm derives from ``input_ids``; a disagreement raises.
        ``image_embeds``: the vision encoder's output for these ``pixel_values``
        (`encode_images`), to skip recomputing it (e.g. at every generation step);
        ``hook_image_embeds`` still sees and may edit it (an edit applies to this forward
        only: the given tensor is never modified). It must be ``[n_image_tokens, d_model]``
        on the model's device (with ``image_cells``: the features of the whole images).
        Videos (Qwen2.5-VL): ``pixel_values_videos``, ``video_grid_thw`` and optionally
        ``second_per_grid_ts`` (seconds per temporal patch, default 1), as HF's processor
        returns them; ``video_embeds`` as ``image_embeds``. LLaVA-NeXT / OneVision:
        ``image_sizes`` (``[n_images, 2]`` original height, width) and, for OneVision,
        ``batch_num_images`` (rows with several images use the overview only).
        ``image_cells``: images some of whose tokens were removed from the sequence (see
        `mechvlm.interventions.remove_image_tokens`): per image (feature order), the
        increasing row-major cells of its merged grid that its tokens in ``input_ids``
        stand for. The vision features (and ``image_embeds``, ``hook_image_embeds``) stay
        those of the whole images; the kept cells' features are scattered in, with the
        positions of the family's ``prepare_inputs``. Images only (videos keep every
        token), and one-grid images only (anyres LLaVA images raise).
        ``past_kv_cache``: a `mechvlm.kv_cache.VLMKeyValueCache`. Empty, the forward is a
        prefill that fills it; else ``input_ids`` are new text tokens after the cached ones
        (returns their logits only) and ``attention_mask``, if given, covers the new tokens
        or the whole sequence. See `mechvlm.kv_cache` for what hooks see and what is cached.
        """
        if not isinstance(input_ids, Tensor) or input_ids.is_floating_point() or tokens is not None:
            return self.forward(**forward_arguments(self, {k: v for k, v in locals().items()
                                                           if k not in ("self", "__class__")}))
        check_return_type(return_type)
        if self.hook_tokens.is_observed():
            input_ids = self.hook_tokens(input_ids.clone())
        visual = dict(pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                      second_per_grid_ts=second_per_grid_ts, image_sizes=image_sizes,
                      batch_num_images=batch_num_images)
        offset = past_kv_cache.length if past_kv_cache is not None else 0
        if past_kv_cache is not None:
            check_cached_forward(return_type, start_at_layer, stop_at_layer, offset)
        if offset:
            inputs, new_mask = past_kv_cache.continuation_inputs(
                self.cfg, input_ids, attention_mask, self.device, pixel_values=pixel_values,
                image_grid_thw=image_grid_thw, image_embeds=image_embeds, image_cells=image_cells,
                video_embeds=video_embeds, token_type_ids=token_type_ids, **visual)
        else:
            inputs = self.prepare_inputs(input_ids, pixel_values, image_grid_thw, attention_mask,
                                         token_type_ids, image_cells,
                                         **{k: v for k, v in visual.items() if v is not None})
        start, stop = self._layer_range(start_at_layer, stop_at_layer)
        if start_at_layer is None:
            x = self._embed(inputs, {"image": image_embeds, "video": video_embeds}, offset)
        else:
            x = self._check_resid(resid, inputs.input_ids)
        tables = {id(t): t(inputs.position_ids, x.dtype) for t in set(self._rotary.values())}
        rope = {kind: tables[id(t)] for kind, t in self._rotary.items()}  # one table per distinct RoPE
        mask = AttentionMask(x.shape[0], x.shape[1], x.device, inputs.key_padding, inputs.block_ids, offset)
        for l in range(start, stop):
            x = self.blocks[l](x, rope[self.cfg.layer_types[l]], mask, None if past_kv_cache is None else past_kv_cache[l])
        if past_kv_cache is not None:
            past_kv_cache.record(inputs, new_mask if offset else attention_mask, prefill=not offset)
        if stop_at_layer is not None:
            return x
        x = self.ln_final(x)
        if return_type is None:
            return None
        return forward_output(self.unembed(x), inputs.input_ids, return_type, loss_per_token=loss_per_token,
                              target_mask=target_mask, attention_mask=attention_mask,
                              image_token_id=self.cfg.image_token_id)

    def _layer_range(self, start_at_layer: int | None, stop_at_layer: int | None) -> tuple[int, int]:
        n = self.cfg.n_layers
        start = 0 if start_at_layer is None else start_at_layer + (n if start_at_layer < 0 else 0)
        stop = n if stop_at_layer is None else stop_at_layer + (n if stop_at_layer < 0 else 0)
        if not 0 <= start <= n or not 0 <= stop <= n or start > stop:
            raise ValueError(f"start_at_layer={start_at_layer}, stop_at_layer={stop_at_layer} do not give a "
                             f"layer range within the {n} layers")
        return start, stop

    def _check_resid(self, resid: Tensor | None, input_ids: Tensor) -> Tensor:
        if resid is None:
            raise ValueError("start_at_layer needs the residual stream (resid=, or first argument with tokens=)")
        if resid.shape != (*input_ids.shape, self.cfg.d_model):
            raise ValueError(f"resid has shape {tuple(resid.shape)}; with these input_ids it must be "
                             f"{(*input_ids.shape, self.cfg.d_model)}")
        return resid.to(self.device)

    @torch.no_grad()
    def generate(self, input="", max_new_tokens: int = 10, stop_at_eos: bool = True,
                 eos_token_id: int | list[int] | None = None, do_sample: bool = True, top_k: int | None = None,
                 top_p: float | None = None, temperature: float = 1.0, freq_penalty: float = 0.0,
                 use_past_kv_cache: bool = True, prepend_bos: bool | None = None, padding_side: str | None = None,
                 return_type: str | None = "input", verbose: bool = True, **kwargs):
        """TransformerLens' ``generate`` (same arguments and defaults: it samples unless
        ``do_sample=False``) over a KV cache, hooks included; ``input`` may also be a batch
        mapping with images. See `mechvlm.tl_generate.tl_generate` for every argument
        (``fwd_hooks``, ``seed``, ``output_logits``, ``attention_mask``, ...)."""
        from mechvlm.tl_generate import tl_generate

        return tl_generate(self, input, max_new_tokens, stop_at_eos, eos_token_id, do_sample, top_k, top_p,
                           temperature, freq_penalty, use_past_kv_cache=use_past_kv_cache,
                           prepend_bos=prepend_bos, padding_side=padding_side, return_type=return_type,
                           verbose=verbose, **kwargs)
