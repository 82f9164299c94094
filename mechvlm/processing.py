"""Text + images -> the batch ``HookedVLM.forward`` takes, from a checkpoint directory.

`InputBuilder` loads the checkpoint's tokenizer (with its chat template) and its HF image
processor, renders a user turn holding the images and the prompt, and expands each image
placeholder the way the family's HF processor does:

- Qwen2.5-VL: ``<|image_pad|>`` becomes ``t*h*w / merge**2`` copies (from ``image_grid_thw``).
- Gemma3: ``<start_of_image>`` becomes ``\\n\\n<start_of_image>`` + ``mm_tokens_per_image``
  soft tokens + ``<end_of_image>\\n\\n``.
- LLaVA-1.5 / NeXT / OneVision: ``<image>`` becomes one ``<image>`` per feature: the
  tower's grid (LLaVA-1.5) or the anyres layout of the image's original size (overview +
  cropped tiles + newlines, `mechvlm.models.llava_next.anyres_layout`; OneVision rows with
  several images: overview + one newline, with ``batch_num_images``), as HF's
  ``LlavaProcessor`` / ``LlavaNextProcessor`` / ``LlavaOnevisionProcessor`` expand it.

It does not build HF's ``*Processor`` object: ``Qwen2_5_VLProcessor`` and
``LlavaOnevisionProcessor`` cannot be constructed without torchvision (their video
processors), which torch 2.13 has no wheel for here. The image processors are HF's PIL
backends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


_PIL_PROCESSORS = {"qwen2_5_vl": "Qwen2VLImageProcessorPil", "gemma3": "Gemma3ImageProcessorPil",
                   "llava": "LlavaImageProcessorPil", "llava_next": "LlavaNextImageProcessorPil",
                   "llava_onevision": "LlavaOnevisionImageProcessorPil"}
_LLAVA = ("llava", "llava_next", "llava_onevision")
#: the token that closes a chat turn (None: the tokenizer's EOS, Vicuna's ``</s>``)
_END_OF_TURN = {"qwen2_5_vl": "<|im_end|>", "gemma3": "<end_of_turn>", "llava": None, "llava_next": None,
                "llava_onevision": "<|im_end|>"}


def _image_processor(path: Path, model_type: str):
    try:
        import torchvision  # noqa: F401
    except ImportError:  # the PIL backends are exact and need no torchvision
        if model_type not in _PIL_PROCESSORS:
            raise ValueError(f"no image processor known for model_type {model_type!r}") from None
        import transformers

        return getattr(transformers, _PIL_PROCESSORS[model_type]).from_pretrained(path)
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path)


class InputBuilder:
    """Builds model inputs from prompts and PIL images, left-padded.

    ``builder(prompts, images)`` with ``prompts: list[str]`` and ``images: list[list[Image]]``
    (the images of each prompt, placed before its text) returns a dict with ``input_ids``
    and ``attention_mask`` ``[batch, pos]``, ``pixel_values`` and, for Qwen2.5-VL,
    ``image_grid_thw [n_images, 3]``: pass it as ``model(**batch)`` / ``model.roles(**batch)``.
    """

    def __init__(self, tokenizer, image_processor, hf_config):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_type = hf_config.model_type
        if self.model_type not in _PIL_PROCESSORS:
            raise ValueError(f"unsupported model_type {self.model_type!r}")
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template; mechvlm renders prompts with it")
        self.config = hf_config
        if self.model_type == "qwen2_5_vl":
            self.image_token = tokenizer.convert_ids_to_tokens(hf_config.image_token_id)
            self.merge = hf_config.vision_config.spatial_merge_size
        elif self.model_type in _LLAVA:
            from mechvlm.models import family_for

            self.image_token = tokenizer.convert_ids_to_tokens(hf_config.image_token_id)
            self.family = family_for(hf_config)
            self.layout_cfg = self.family.config_from_hf(hf_config, dtype=torch.float32, device="cpu")
        else:
            self.image_token = tokenizer.convert_ids_to_tokens(hf_config.image_token_index)
            self.boi = tokenizer.convert_ids_to_tokens(hf_config.boi_token_index)
            self.eoi = tokenizer.convert_ids_to_tokens(hf_config.eoi_token_index)
        self.eos_token_ids = self._eos_ids(hf_config)
        # a Registering checkpoint (mechvlm.training): n register tokens follow every EOI
        registering = dict(getattr(hf_config, "registering", None) or {})
        self.n_registers = int(registering.get("n_registers") or 0)
        if self.n_registers:
            eoi_id = hf_config.vision_end_token_id if self.model_type == "qwen2_5_vl" else hf_config.eoi_token_index
            self.eoi_token = tokenizer.convert_ids_to_tokens(eoi_id)
            self.register_token = tokenizer.convert_ids_to_tokens(registering["register_token_id"])

    @classmethod
    def from_pretrained(cls, path: str | Path) -> InputBuilder:
        from transformers import AutoConfig, AutoTokenizer

        path = Path(path)
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        builder = cls(tokenizer, _image_processor(path, config.model_type), config)
        gen = path / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            if eos is not None:
                builder.eos_token_ids = sorted(set(builder.eos_token_ids) | set(
                    eos if isinstance(eos, list) else [eos]))
        return builder

    def _eos_ids(self, hf_config) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        if self.model_type == "gemma3":
            end_turn = self.tokenizer.convert_tokens_to_ids("<end_of_turn>")
            if end_turn is not None and end_turn != self.tokenizer.unk_token_id:
                ids.add(end_turn)
        return sorted(i for i in ids if i is not None)

    # --------------------------------------------------------------------------- text --
    def render(self, prompt: str, n_images: int, prefix: str | None = None) -> str:
        """The chat-templated text of one user turn (images first, or after the text
        ``prefix``), with a generation prompt."""
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        if prefix is not None:
            content.insert(0, {"type": "text", "text": prefix})
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def expand_images(self, text: str, tokens_per_image: list[int]) -> str:
        """Expand each image placeholder of ``text`` as the family's HF processor does; for a
        Registering checkpoint with ``n`` registers (its config's ``registering``), ``n``
        register tokens follow each end-of-image token."""
        if self.model_type == "qwen2_5_vl" or self.model_type in _LLAVA:
            parts = text.split(self.image_token)
            expanded = [self.image_token * n for n in tokens_per_image]
        else:
            parts = text.split(self.boi)
            expanded = [f"\n\n{self.boi}{self.image_token * n}{self.eoi}\n\n" for n in tokens_per_image]
        if len(parts) - 1 != len(tokens_per_image):
            raise ValueError(f"the text has {len(parts) - 1} image placeholders but "
                             f"{len(tokens_per_image)} images were given")
        out = parts[0]
        for rep, rest in zip(expanded, parts[1:]):
            out += rep + rest
        if self.n_registers:
            out = out.replace(self.eoi_token, self.eoi_token + self.register_token * self.n_registers)
        return out

    # ------------------------------------------------------------------------- images --
    def process_images(self, images: list, per_prompt: list[int] | None = None) -> tuple[dict[str, Tensor], list[int]]:
        """HF image processing of a flat list of images -> (tensors, tokens per image).
        ``per_prompt``: how many of the images each prompt holds (LLaVA-OneVision treats
        rows with several images differently; default: one prompt)."""
        if not images:
            return {}, []
        if self.model_type in _LLAVA:
            return self._llava_images(images, per_prompt or [len(images)])
        out = self.image_processor(images=images, return_tensors="pt")
        if self.model_type == "qwen2_5_vl":
            grid = out["image_grid_thw"]
            n = (grid.prod(-1) // self.merge ** 2).tolist()
            return {"pixel_values": out["pixel_values"], "image_grid_thw": grid}, n
        return {"pixel_values": out["pixel_values"]}, [self.config.mm_tokens_per_image] * len(images)

    def image_token_count(self, image, images_in_prompt: int = 1) -> int:
        """LM tokens of one PIL image, from its size alone (no pixel processing);
        ``images_in_prompt``: how many images its prompt holds (LLaVA-OneVision tiles only
        the image of a one-image row)."""
        width, height = image.size
        if self.model_type == "qwen2_5_vl":
            return self.image_processor.get_number_of_image_patches(height, width) // self.merge ** 2
        if self.model_type == "llava":
            return self.family.tile_layout(self.layout_cfg).n_tokens
        if self.model_type in _LLAVA:
            from mechvlm.models.llava_next import anyres_layout

            cfg = self.layout_cfg
            patched = self.family.patched(cfg, images_in_prompt, batch_num_images=torch.tensor([images_in_prompt]))
            return anyres_layout(cfg, (height, width), patched=patched[0],
                                 max_patches=cfg.extra.get("max_patches")).n_tokens
        return int(self.config.mm_tokens_per_image)

    def prompt_lengths(self, prompts: list[str], images: list[list[Any]] | None = None) -> list[int]:
        """Tokens of each prompt's row (no padding), without processing pixels: what
        `mechvlm.mmbench.evaluate` sorts its batches by."""
        images = images if images is not None else [[] for _ in prompts]
        counts = [[self.image_token_count(im, len(ims)) for im in ims] for ims in images]
        texts = [self.expand_images(self.render(p, len(n)), n) for p, n in zip(prompts, counts)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _llava_images(self, images: list, per_prompt: list[int]) -> tuple[dict[str, Tensor], list[int]]:
        from mechvlm.models.llava_next import anyres_layout

        cfg = self.layout_cfg
        if self.model_type == "llava":
            out = self.image_processor(images=images, return_tensors="pt")
            return {"pixel_values": out["pixel_values"]}, [self.family.tile_layout(cfg).n_tokens] * len(images)
        nested, i = [], 0
        for n in per_prompt:
            nested.append(images[i:i + n])
            i += n
        out = self.image_processor(images=[g for g in nested if g] if self.model_type == "llava_onevision"
                                   else images, return_tensors="pt")
        tensors = {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}
        if self.model_type == "llava_onevision":
            tensors["batch_num_images"] = torch.tensor(per_prompt)  # one entry per row, as HF's processor
        patched = self.family.patched(cfg, len(images), **{k: v for k, v in tensors.items() if k != "pixel_values"})
        counts = [anyres_layout(cfg, size, patched=p, max_patches=cfg.extra.get("max_patches")).n_tokens
                  for size, p in zip(out["image_sizes"].tolist(), patched)]
        return tensors, counts

    def encode(self, prompts: list[str], tokens_per_image: list[list[int]],
               prefixes: list[str | None] | None = None) -> dict[str, Tensor]:
        """Token ids (left-padded) for prompts whose images have the given token counts."""
        prefixes = prefixes if prefixes is not None else [None] * len(prompts)
        texts = [self.expand_images(self.render(p, len(n), pre), n)
                 for p, n, pre in zip(prompts, tokens_per_image, prefixes, strict=True)]
        enc = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def __call__(self, prompts: list[str], images: list[list[Any]] | None = None, *,
                 prefixes: str | list[str | None] | None = None) -> dict[str, Tensor]:
        """``prefixes``: text put before the images of each prompt (one string for every
        row, or one per row, None for none): the text-prefix control of seed 002."""
        images = images if images is not None else [[] for _ in prompts]
        if isinstance(prefixes, str):
            prefixes = [prefixes] * len(prompts)
        if prefixes is not None and len(prefixes) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prefixes)} prefixes")
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        flat = [im for ims in images for im in ims]
        tensors, counts = self.process_images(flat, [len(ims) for ims in images])
        per_prompt, i = [], 0
        for ims in images:
            per_prompt.append(counts[i:i + len(ims)])
            i += len(ims)
        return {**self.encode(prompts, per_prompt, prefixes), **tensors}

    @property
    def end_of_turn_id(self) -> int:
        """The token that closes a chat turn (Qwen ``<|im_end|>``, Gemma3 ``<end_of_turn>``,
        LLaVA-1.5 / NeXT the EOS ``</s>``)."""
        token = _END_OF_TURN[self.model_type] or self.tokenizer.eos_token
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token} token")
        return tid

    def with_targets(self, prompts: list[str], images: list[list[Any]] | None, targets: list[str], *,
                     end_turn: bool = True) -> tuple[dict[str, Tensor], Tensor]:
        """A batch whose rows are the prompt, then ``targets[i]`` as the model's answer (and the
        end-of-turn token), left-padded; plus the ``[batch, pos]`` bool mask of the answer
        tokens (the end-of-turn included), for `mechvlm.losses.next_token_loss`.

        The prompt and the answer are tokenised separately, so the mask is exact whatever the
        tokenizer merges."""
        if len(targets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        base = self(prompts, images)
        tails = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + ([self.end_of_turn_id] if end_turn else [])
                 for t in targets]
        ids, am = base["input_ids"], base["attention_mask"]
        rows = [ids[i][am[i].bool()].tolist() for i in range(len(prompts))]
        width = max(len(r) + len(t) for r, t in zip(rows, tails))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = torch.full((len(rows), width), pad, dtype=ids.dtype)
        mask = torch.zeros(len(rows), width, dtype=am.dtype)
        target = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, (r, t) in enumerate(zip(rows, tails)):
            n = len(r) + len(t)
            out[i, width - n:] = torch.tensor(r + t, dtype=ids.dtype)
            mask[i, width - n:] = 1
            target[i, width - len(t):] = True
        return {**base, "input_ids": out, "attention_mask": mask}, target

    def decode(self, ids: list[int] | Tensor) -> str:
        """Generated ids -> text, special tokens skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
