"""Independent references for the MMBench tests: a stub input builder (the protocol of
`mechvlm.mmbench.InputBuilder`) for the tiny random Qwen2.5-VL, and greedy decoding with
HF's own forward and hand-computed knockout masks."""

from __future__ import annotations

import zlib

import numpy as np
import torch

from conftest import hf_kwargs, hf_with_attention_edit
from mechvlm.synthetic import QWEN_IDS, left_pad

SPECIAL = set(QWEN_IDS.values()) | {254, 255}
WORDS = ["A", "B", "C", "D", "red", "blue", "maybe", "the", "(B)", "cat"]


class StubBuilder:
    """Word-level "tokenizer" for the synthetic Qwen vocab: ``<bos> <vision_start>
    <image_pad> x 4 <vision_end>`` per image (a 4x4 patch grid whose patches carry the
    image's colours), then one token per whitespace-separated prompt word. ``decode`` skips special ids
    and writes every other id as a word of `WORDS` (so outputs look like answers)."""

    def __init__(self, eos_token_ids=(QWEN_IDS["eos"],)):
        self.eos_token_ids = list(eos_token_ids)
        self.calls = []

    def __call__(self, prompts, images):
        self.calls.append((list(prompts), [len(i) for i in images]))
        rows, grids, pixels = [], [], []
        for prompt, imgs in zip(prompts, images):
            toks = [QWEN_IDS["bos"]]
            for img in imgs:
                toks += [QWEN_IDS["vision_start"]] + [QWEN_IDS["image"]] * 4 + [QWEN_IDS["vision_end"]]
                rgb = torch.tensor(np.asarray(img.resize((4, 4))), dtype=torch.float32) / 255.0  # [4, 4, 3]
                pixels.append(rgb.reshape(16, 3).repeat(1, 392) - 0.5)                      # [16, 1176]
                grids.append([1, 4, 4])
            toks += [3 + zlib.crc32(w.encode()) % 240 for w in prompt.split()]
            rows.append(torch.tensor(toks))
        input_ids, attention_mask = left_pad(rows, QWEN_IDS["pad"])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if grids:
            batch.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(grids))
        return batch

    def decode(self, ids):
        return " ".join(WORDS[i % len(WORDS)] for i in ids if i not in SPECIAL)


def hand_roles(ids: torch.Tensor, mask: torch.Tensor):
    """Text / image / EOI masks of a Qwen batch from the token ids alone."""
    real = mask.bool()
    image, eoi = ids == QWEN_IDS["image"], ids == QWEN_IDS["vision_end"]
    special = image | eoi | (ids == QWEN_IDS["vision_start"])
    pos = torch.arange(ids.shape[1])
    first = torch.where(ids == QWEN_IDS["vision_start"], pos, ids.shape[1]).min(-1).values
    return real & ~special & (pos[None] > first[:, None]), image, eoi


def hf_knockout_greedy(hf, batch: dict, steps: int, key: str | None, mode: str | None):
    """Greedy decoding with HF's own forward, no cache, the knockout rebuilt each step from
    hand-computed roles: ``pre_softmax_mask`` as a 4-D additive mask (with HF's 3-D
    positions), ``post_softmax_zero`` in HF's eager attention. Returns (ids, logits per step)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    cut_now = [None]
    edited = hf_with_attention_edit(hf, None, pattern_fn=lambda w: w.masked_fill(cut_now[0], 0.0)) \
        if mode == "post_softmax_zero" else hf
    logits_per_step = []
    with torch.no_grad():
        for _ in range(steps):
            text, image, eoi = hand_roles(ids, mask)
            cut = (text[:, :, None] & (image if key == "image" else eoi)[:, None, :])[:, None]
            kw = hf_kwargs(dict(batch, input_ids=ids, attention_mask=mask))
            if mode == "pre_softmax_mask":
                n = ids.shape[1]
                allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
                allowed &= ~cut
                pos, _ = hf.model.get_rope_index(ids, kw["mm_token_type_ids"], batch["image_grid_thw"],
                                                 attention_mask=mask)
                kw.update(attention_mask=torch.where(allowed, 0.0, torch.finfo(torch.float32).min),
                          position_ids=pos)
            cut_now[0] = cut
            logits = edited(**kw).logits[:, -1].float()
            logits_per_step.append(logits)
            ids = torch.cat([ids, logits.argmax(-1)[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids, torch.stack(logits_per_step, 1)


