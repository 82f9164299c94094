"""Caption data in MiniGPT-4's cc_sbu_align layout, its split, and a toy folder in that layout.

The layout (https://hf.co/datasets/Vision-CAIR/cc_sbu_align)::

    ROOT/filter_cap.json    {"annotations": [{"image_id": "2", "caption": "..."}, ...]}
    ROOT/image/{image_id}.jpg

`CCSBUAlign` reads it (every image is checked to exist up front). `split_indices` splits it
deterministically as seed 000 does (a seeded permutation, 10 % validation: 18,756 pairs give
16,880 / 1,876). `CaptionCollator` turns examples into a training batch with the
checkpoint's chat template (the user turn holds the image and the instruction, the
assistant turn the caption; only caption tokens are scored, see `mechvlm.losses`).

`write_toy_cc_sbu_align` writes such a folder from `mechvlm.toy` scenes, with captions that
state the count, size, colour and position of what is drawn in the toy tokenizer's words,
so that the whole fine-tuning pipeline runs offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mechvlm.fileio import atomic_dir, write_json

#: MiniGPT-4's stage-2 instruction (its prompts/alignment.txt). A dataset folder may carry
#: its own as the top-level ``"prompt"`` of filter_cap.json (the toy folder does).
DEFAULT_PROMPT = "Describe this image in detail."
SEED_VAL_FRACTION = 0.1


@dataclass(frozen=True)
class CaptionExample:
    image_id: str
    caption: str
    image_path: Path

    def pil_image(self):
        from PIL import Image

        with Image.open(self.image_path) as im:
            return im.convert("RGB")


class CCSBUAlign:
    """The pairs of a cc_sbu_align folder, in file order.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the folder, the annotation and the
    missing image or field, before any training starts."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        ann_path = self.root / "filter_cap.json"
        if not ann_path.is_file():
            raise FileNotFoundError(f"{ann_path} does not exist: a cc_sbu_align folder holds filter_cap.json "
                                    "and image/{image_id}.jpg")
        data = json.loads(ann_path.read_text(encoding="utf-8"))
        annotations = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(annotations, list) or not annotations:
            raise ValueError(f"{ann_path}: expected {{'annotations': [{{'image_id', 'caption'}}, ...]}}")
        self.prompt: str | None = data.get("prompt")
        self.examples: list[CaptionExample] = []
        for i, a in enumerate(annotations):
            if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
                raise ValueError(f"{ann_path}: annotation {i} lacks 'image_id' or 'caption': {a!r:.200}")
            caption = str(a["caption"]).strip()
            if not caption:
                raise ValueError(f"{ann_path}: annotation {i} (image_id {a['image_id']}) has an empty caption")
            image = self.root / "image" / f"{a['image_id']}.jpg"
            if not image.is_file():
                raise FileNotFoundError(f"{ann_path}: annotation {i} (image_id {a['image_id']}): {image} does not exist")
            self.examples.append(CaptionExample(str(a["image_id"]), caption, image))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> CaptionExample:
        return self.examples[i]


def split_indices(n: int, val_fraction: float = SEED_VAL_FRACTION, seed: int = 42) -> tuple[list[int], list[int]]:
    """``(train, validation)`` indices, each sorted: a ``torch.randperm(n)`` seeded with
    ``seed``; its first ``round(n * val_fraction)`` entries are the validation set."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(n * val_fraction)
    return sorted(perm[n_val:]), sorted(perm[:n_val])


class CaptionCollator:
    """Examples -> ``(batch, target_mask)`` from `InputBuilder.with_targets`: one user turn
    with the image and ``prompt``, the caption as the assistant's answer (+ end of turn).

    Raises if a row is longer than ``max_length`` tokens (nothing is cut silently) or if the
    tokenizer has to map a word of the prompt or a caption to its unknown token."""

    def __init__(self, builder, prompt: str, max_length: int = 8192):
        self.builder = builder
        self.prompt = prompt
        self.max_length = max_length
        tok = builder.tokenizer
        self.unk = tok.unk_token_id
        if self.unk is not None and self.unk in tok(prompt, add_special_tokens=False)["input_ids"]:
            raise ValueError(f"the instruction {prompt!r} holds words the tokenizer does not know "
                             f"(they map to {tok.unk_token!r}); pass another prompt")

    def __call__(self, examples: list[CaptionExample]):
        batch, target = self.builder.with_targets([self.prompt] * len(examples),
                                                  [[ex.pil_image()] for ex in examples],
                                                  [ex.caption for ex in examples])
        lengths = batch["attention_mask"].sum(-1)
        for ex, n in zip(examples, lengths.tolist()):
            if n > self.max_length:
                raise ValueError(f"example image_id {ex.image_id} is {n} tokens long, more than "
                                 f"max_length={self.max_length}")
        if self.unk is not None:
            bad = (batch["input_ids"] == self.unk) & target
            if bool(bad.any()):
                ex = examples[int(bad.any(-1).nonzero()[0])]
                raise ValueError(f"the caption of image_id {ex.image_id} ({ex.caption!r:.120}) holds words the "
                                 f"tokenizer maps to its unknown token")
        return batch, target


# --------------------------------------------------------------------------- toy folder --
def scene_caption(scene) -> str:
    """A caption in the toy vocabulary: ``"{count} [{size}] {color} [{position}]"``.

    Count and colour are read from the painted masks and pixels; the size word only for
    size scenes (the toy's size buckets apply to those); the position (quadrant of the
    shape's centre) only when there is one shape."""
    from mechvlm.toy.scenes import COLORS, COUNTS, IMAGE_SIZE, POSITIONS

    masks = scene.object_masks
    pixel = scene.image[masks[0]].mean(0)
    color = min(COLORS, key=lambda c: float(((np.array(COLORS[c]) - pixel) ** 2).sum()))
    words = [COUNTS[len(masks) - 1]]
    if scene.category == "size":
        words.append(scene.answer)
    words.append(color)
    if len(masks) == 1:
        ys, xs = np.nonzero(masks[0])
        half = IMAGE_SIZE / 2
        words.append(POSITIONS[int(ys.mean() + 0.5 >= half) * 2 + int(xs.mean() + 0.5 >= half)])
    return " ".join(words)


def write_toy_cc_sbu_align(out: str | Path, n: int = 2000, seed: int = 7, prompt: str = "") -> Path:
    """Write ``n`` toy scenes (cycling through the toy categories) as a cc_sbu_align folder
    (JPEG quality 95), atomically. ``prompt`` is stored as the folder's instruction (the
    default, empty, is a bare image turn: the toy vocabulary has no words for MiniGPT-4's)."""
    from PIL import Image

    from mechvlm.toy.scenes import make_scenes

    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "image").mkdir()
        annotations = []
        for i, scene in enumerate(make_scenes(n, seed)):
            Image.fromarray(scene.image).save(tmp / "image" / f"{i}.jpg", quality=95)
            annotations.append({"image_id": str(i), "caption": scene_caption(scene)})
        write_json(tmp / "filter_cap.json", {"annotations": annotations, "prompt": prompt,
                                             "source": f"mechvlm.toy scenes, seed {seed}"})
    return out
