"""Tokenizer methods of `HookedVLM`, with TransformerLens' names and semantics.

`TokenizerMixin` gives the model ``tokenizer`` (the checkpoint's, attached by
``from_pretrained`` / given to ``from_hf``), ``to_tokens``, ``to_str_tokens``, ``to_string``,
``to_single_token``, ``get_token_position`` and, for images, ``to_inputs`` (the batch dict
``forward`` takes, built by `mechvlm.processing.InputBuilder`).

Conventions, as TransformerLens':
    * ``prepend_bos=None`` means ``cfg.default_prepend_bos`` (True when the tokenizer has a
      BOS token: Gemma3; False for Qwen2.5-VL, whose tokenizer has none). When the tokenizer
      does not add the BOS itself (``cfg.tokenizer_prepends_bos`` False), it is prepended as
      a string, as TL does. A tokenizer without a BOS token (Qwen) gets TL's fallback, its
      EOS token, for an explicit ``prepend_bos=True`` (the tokenizer object is not changed).
    * ``padding_side=None`` means right padding (TL's default). A right-padded batch from
      ``to_tokens`` runs without an attention mask: causal attention keeps the pads out of
      the real tokens. ``to_inputs`` left-pads and returns the mask (generation needs it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from mechvlm.forward_args import VLMBatch


def _require(model, what: str):
    if getattr(model, "tokenizer", None) is None:
        raise RuntimeError(
            f"{what} needs a tokenizer: load the model with HookedVLM.from_pretrained(<checkpoint dir>) "
            "(which attaches the checkpoint's tokenizer) or pass tokenizer= to HookedVLM.from_hf")
    return model.tokenizer


class TokenizerMixin:
    """TransformerLens' tokenization surface (see the module docstring)."""

    tokenizer: Any = None
    input_builder: Any = None
    _bos_text: str | None = None

    def set_tokenizer(self, tokenizer, input_builder=None) -> None:
        """Attach a HF tokenizer (and optionally the `InputBuilder` ``to_inputs`` uses) and
        derive ``cfg.default_prepend_bos`` / ``cfg.tokenizer_prepends_bos`` from it."""
        self.tokenizer = tokenizer
        self.input_builder = input_builder
        if tokenizer is None:
            return
        self.cfg.tokenizer_name = getattr(tokenizer, "name_or_path", None)
        self.cfg.default_prepend_bos = tokenizer.bos_token is not None
        self._bos_text = tokenizer.bos_token if tokenizer.bos_token is not None else tokenizer.eos_token
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.cfg.tokenizer_prepends_bos = bool(
            tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id)

    # ------------------------------------------------------------------------- text --
    def to_tokens(self, input: str | list[str], prepend_bos: bool | None = None,
                  padding_side: Literal["left", "right"] | None = None, move_to_device: bool = True,
                  truncate: bool = True) -> Int[Tensor, "batch pos"]:
        """Text -> token ids ``[batch, pos]`` (TL's ``to_tokens``); raw text, no chat template.
        A batch mapping (``to_inputs``) gives its ``input_ids``, so that TL helpers that
        tokenize their input (the head detector) take one; they still need its cache."""
        if isinstance(input, Mapping):
            return input["input_ids"].to(self.device) if move_to_device else input["input_ids"]
        tok = _require(self, "to_tokens")
        if prepend_bos is None:
            prepend_bos = self.cfg.default_prepend_bos
        texts = [input] if isinstance(input, str) else list(input)
        if prepend_bos and self._bos_text is None:
            raise ValueError("prepend_bos=True but the tokenizer has neither a BOS nor an EOS token")
        if prepend_bos and not self.cfg.tokenizer_prepends_bos:
            texts = [self._bos_text + t for t in texts]
        add_special = bool(prepend_bos and self.cfg.tokenizer_prepends_bos)
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=add_special,
                  padding_side=padding_side or "right", truncation=truncate,
                  max_length=self.cfg.n_ctx if truncate else None)
        tokens = enc["input_ids"]
        return tokens.to(self.device) if move_to_device else tokens

    def to_string(self, tokens: Tensor | Sequence[int]) -> str | list[str]:
        """Token ids -> text (a list for ``[batch, pos]``); nothing skipped, as TL."""
        tok = _require(self, "to_string")
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return tok.batch_decode(tokens, clean_up_tokenization_spaces=False)
        if tokens.ndim <= 1:
            return tok.decode(tokens.reshape(-1), clean_up_tokenization_spaces=False)
        raise ValueError(f"to_string takes [pos] or [batch, pos] tokens, got shape {tuple(tokens.shape)}")

    def to_str_tokens(self, input: str | Tensor | Sequence, prepend_bos: bool | None = None,
                      padding_side: Literal["left", "right"] | None = None, *,
                      expand_images: bool = False, image_grid_thw: Tensor | None = None) -> list:
        """Text or ids -> one string per token (a list of lists for a list of inputs).

        Each run of image placeholder tokens is shown as ONE entry ``"<image i: HxW>"`` (the
        merged grid; ``i`` counts images from 0 in this sequence), unless
        ``expand_images=True``. Qwen2.5-VL needs ``image_grid_thw`` to name the grid (else
        ``"<image i: N tokens>"``); Gemma3's grid is fixed."""
        if isinstance(input, list) and input and not isinstance(input[0], int):
            return [self.to_str_tokens(x, prepend_bos, padding_side, expand_images=expand_images)
                    for x in input]
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0]
        else:
            ids = torch.as_tensor(input).squeeze()
            if ids.ndim == 0:
                ids = ids[None]
            if ids.ndim != 1:
                raise ValueError(f"to_str_tokens takes one sequence, got shape {tuple(ids.shape)}")
        tok = _require(self, "to_str_tokens")
        strs = tok.batch_decode([[int(t)] for t in ids.tolist()], clean_up_tokenization_spaces=False)
        if expand_images or self.cfg.image_token_id is None:
            return strs
        return _collapse_image_runs(strs, ids.tolist(), self.cfg, image_grid_thw)

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (raises otherwise)."""
        token = self.to_tokens(string, prepend_bos=False).squeeze()
        if token.numel() != 1:
            raise AssertionError(f"Input string: {string} is not a single token!")
        return int(token.item())

    def get_token_position(self, single_token: str | int, input: str | Tensor,
                           mode: Literal["first", "last"] = "first", prepend_bos: bool | None = None,
                           padding_side: Literal["left", "right"] | None = None) -> int:
        """Position of ``single_token`` in ``input`` (text, ``[pos]`` or ``[1, pos]`` ids)."""
        tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side) \
            if isinstance(input, str) else input
        if tokens.ndim == 2:
            assert tokens.shape[0] == 1, f"If tokens are rank two, they must have shape [1, seq_len], not {tokens.shape}"
            tokens = tokens[0]
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, Tensor):
            single_token = int(single_token.item())
        indices = torch.arange(len(tokens), device=tokens.device)[tokens == single_token]
        assert len(indices) > 0, "The token does not occur in the prompt"
        if mode == "first":
            return int(indices[0])
        if mode == "last":
            return int(indices[-1])
        raise ValueError(f"mode must be 'first' or 'last', not {mode}")

    # ----------------------------------------------------------------------- images --
    def to_inputs(self, prompt: str | list[str], images: Any = None, *, chat_template: bool = True,
                  targets: str | list[str] | None = None, with_image_embeds: bool = False) -> VLMBatch:
        """Prompt(s) and PIL images -> the batch dict ``forward`` / ``run_with_cache`` take
        (``input_ids``, ``attention_mask``, ``pixel_values``, Qwen's ``image_grid_thw``),
        left-padded, on the model's device, as a `VLMBatch` (a dict with ``.shape``, so that
        TransformerLens' patching functions take it as their ``corrupted_tokens``).

        ``images``: one image, a list of images for one prompt, or one list per prompt.
        ``chat_template=True`` renders a user turn (images first) with a generation prompt;
        ``False`` uses the text as is, which must then hold one image placeholder per image
        (``<|vision_start|><|image_pad|><|vision_end|>`` / ``<start_of_image>``).
        ``targets`` (chat template only): answers appended after the prompt; the batch then
        also holds ``target_mask`` (bool ``[batch, pos]``) for ``return_type="loss"``.
        ``with_image_embeds=True`` also runs the vision encoder once and stores its output
        as ``image_embeds``: every forward on the batch then skips the tower (patching
        sweeps run the model hundreds of times); ``hook_image_embeds`` still fires.
        """
        builder = self.input_builder
        if builder is None:
            raise RuntimeError("to_inputs needs the checkpoint's tokenizer and image processor: load "
                               "with HookedVLM.from_pretrained(<checkpoint dir>) or from_hf(..., processor=)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        image_lists = _image_lists(images, len(prompts))
        if targets is not None:
            if not chat_template:
                raise ValueError("targets= needs chat_template=True")
            targets = [targets] if isinstance(targets, str) else list(targets)
            batch, target_mask = builder.with_targets(prompts, image_lists, targets)
            batch = {**batch, "target_mask": target_mask}
        elif chat_template:
            batch = builder(prompts, image_lists)
        else:
            tensors, counts = builder.process_images([im for ims in image_lists for im in ims])
            per_prompt, i = [], 0
            for ims in image_lists:
                per_prompt.append(counts[i:i + len(ims)])
                i += len(ims)
            texts = [builder.expand_images(p, n) for p, n in zip(prompts, per_prompt)]
            enc = builder.tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left",
                                    return_tensors="pt")
            batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], **tensors}
        batch = VLMBatch(batch, image_token_id=self.cfg.image_token_id).to(self.device)
        if with_image_embeds and "pixel_values" in batch:
            with torch.no_grad():
                batch["image_embeds"] = self.encode_images(batch["pixel_values"], batch.get("image_grid_thw"))
        return batch


def _image_lists(images, n_prompts: int) -> list[list]:
    if images is None:
        return [[] for _ in range(n_prompts)]
    if not isinstance(images, (list, tuple)):
        images = [images]
    if images and all(isinstance(x, (list, tuple)) for x in images):
        if len(images) != n_prompts:
            raise ValueError(f"{n_prompts} prompts but {len(images)} image lists")
        return [list(x) for x in images]
    if n_prompts != 1:
        raise ValueError(f"{n_prompts} prompts: pass one list of images per prompt")
    return [list(images)]


def _collapse_image_runs(strs: list[str], ids: list[int], cfg, image_grid_thw) -> list[str]:
    grids = []
    if image_grid_thw is not None:
        m = cfg.spatial_merge_size
        grids = [f"{h // m}x{w // m}" if t == 1 else f"{t}x{h // m}x{w // m}"
                 for t, h, w in torch.as_tensor(image_grid_thw).tolist()]
    out, i, n_image = [], 0, 0
    while i < len(ids):
        if ids[i] != cfg.image_token_id:
            out.append(strs[i])
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] == cfg.image_token_id:
            j += 1
        n = j - i
        side = math.isqrt(n)
        if n_image < len(grids):
            shape = grids[n_image]
        elif cfg.model_type == "gemma3" and side * side == n:
            shape = f"{side}x{side}"
        else:
            shape = f"{n} tokens"
        out.append(f"<image {n_image}: {shape}>")
        n_image += 1
        i = j
    return out
