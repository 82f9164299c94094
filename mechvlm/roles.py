"""Token roles: which positions are image tokens, the end-of-image (EOI) token, text, ...

`TokenRoles` is computed from ``input_ids`` (and the image grids) by `HookedVLM.roles`,
for any family: it reads the image spans the family found and the special-token ids of
``model.cfg``. Every function that takes a role also accepts a user boolean mask
``[batch, pos]`` (see `TokenRoles.mask`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechvlm.config import VLMConfig
from mechvlm.image_layout import ImageSpan

ROLE_NAMES = ("image", "eoi", "image_start", "prefix", "text", "bos", "pad", "last", "real", "register")

RoleSpec = str | Tensor | Iterable[str | Tensor]


@dataclass
class TokenRoles:
    """Boolean masks ``[batch, pos]`` per role, plus the image grid of each image token.

    Roles:
        image: image placeholder tokens (Qwen ``<|image_pad|>``, Gemma3 soft tokens).
        eoi: the end-of-image token right after each run of image tokens.
        image_start: the token right before each image run (``<|vision_start|>`` / BOI).
        prefix: real tokens before the first image (all real tokens of an image-free row).
        text: real tokens after the first image that are none of image / eoi /
            image_start / bos / register. (Chat-template tokens after the image count as text.)
        bos: a BOS token at the first real position.
        pad: padding (``attention_mask == 0``).
        last: the final real position of each row.
        real: every non-padding token.
        register: the inserted register tokens of a Registering model (``cfg.register_token_id``,
            seed 000 section 4); all False for other models. The EOI, which is a register
            too, keeps its own role: registers of the mask are ``["eoi", "register"]``.

    Grid (-1 where not an image token): ``image_index`` (the image's index in feature
    order), ``grid_t``, ``grid_row``, ``grid_col`` on the merged grid.
    """

    image: Bool[Tensor, "batch pos"]
    eoi: Bool[Tensor, "batch pos"]
    image_start: Bool[Tensor, "batch pos"]
    prefix: Bool[Tensor, "batch pos"]
    text: Bool[Tensor, "batch pos"]
    bos: Bool[Tensor, "batch pos"]
    pad: Bool[Tensor, "batch pos"]
    last: Bool[Tensor, "batch pos"]
    real: Bool[Tensor, "batch pos"]
    image_index: Int[Tensor, "batch pos"]
    grid_t: Int[Tensor, "batch pos"]
    grid_row: Int[Tensor, "batch pos"]
    grid_col: Int[Tensor, "batch pos"]
    spans: list[ImageSpan] = field(default_factory=list)
    register: Bool[Tensor, "batch pos"] | None = None

    @property
    def shape(self) -> torch.Size:
        return self.image.shape

    def mask(self, spec: RoleSpec) -> Bool[Tensor, "batch pos"]:
        """A role name, a boolean ``[batch, pos]`` mask, or an iterable of them (union)."""
        if isinstance(spec, str):
            if spec not in ROLE_NAMES:
                raise ValueError(f"unknown token role {spec!r}; roles are {ROLE_NAMES} or a boolean mask")
            if spec == "register" and self.register is None:
                return torch.zeros_like(self.image)
            return getattr(self, spec)
        if isinstance(spec, Tensor):
            if spec.dtype != torch.bool:
                raise TypeError(f"a role mask must be a bool tensor, got {spec.dtype}")
            if spec.shape != self.shape:
                raise ValueError(f"a role mask must have shape {tuple(self.shape)}, got {tuple(spec.shape)}")
            return spec.to(self.image.device)
        specs = list(spec)
        if not specs:
            raise ValueError("an empty list of roles")
        out = self.mask(specs[0]).clone()
        for s in specs[1:]:
            out |= self.mask(s)
        return out

    def to(self, device) -> "TokenRoles":
        kw = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return TokenRoles(**kw)

    def counts(self) -> dict[str, list[int]]:
        """Tokens per role and row (a quick sanity view)."""
        return {r: self.mask(r).sum(-1).tolist() for r in ROLE_NAMES}


def compute_roles(cfg: VLMConfig, input_ids: Tensor, spans: list[ImageSpan],
                  key_padding: Tensor | None) -> TokenRoles:
    """Roles from ``input_ids`` and the validated image spans (see `HookedVLM.roles`)."""
    ids = input_ids.cpu()
    b, n = ids.shape
    real = key_padding.cpu() if key_padding is not None else torch.ones(b, n, dtype=torch.bool)
    image = torch.zeros(b, n, dtype=torch.bool)
    eoi = torch.zeros_like(image)
    start = torch.zeros_like(image)
    grid = {k: torch.full((b, n), -1, dtype=torch.long) for k in ("image_index", "grid_t", "grid_row", "grid_col")}
    for s in spans:
        image[s.row, s.start:s.stop] = True
        t, h, w = s.grid
        i = torch.arange(s.n_tokens)
        grid["image_index"][s.row, s.start:s.stop] = s.image
        grid["grid_t"][s.row, s.start:s.stop] = i // (h * w)
        grid["grid_row"][s.row, s.start:s.stop] = (i // w) % h
        grid["grid_col"][s.row, s.start:s.stop] = i % w
    for s in spans:  # run ends: the span is not followed by another image token
        if s.stop < n and image[s.row, s.stop]:
            continue
        if s.stop >= n or int(ids[s.row, s.stop]) != cfg.image_end_token_id:
            got = "the end of the sequence" if s.stop >= n else f"token {int(ids[s.row, s.stop])}"
            raise ValueError(
                f"image {s.image} (row {s.row}, positions {s.start}..{s.stop - 1}) is followed by {got}, "
                f"not the end-of-image token {cfg.image_end_token_id}: the EOI is missing"
            )
        eoi[s.row, s.stop] = True
    for s in spans:  # run starts
        if s.start > 0 and not image[s.row, s.start - 1] and int(ids[s.row, s.start - 1]) == cfg.image_start_token_id:
            start[s.row, s.start - 1] = True
    pos = torch.arange(n).expand(b, n)
    first_image = torch.where(image.any(-1), torch.where(image, pos, n).min(-1).values, n)
    first_start = torch.where(start.any(-1), torch.where(start, pos, n).min(-1).values, n)
    first = torch.minimum(first_image, first_start)[:, None]
    first_real = torch.where(real, pos, n).min(-1).values[:, None]
    bos = real & (pos == first_real) & (ids == cfg.bos_token_id) if cfg.bos_token_id is not None \
        else torch.zeros_like(image)
    prefix = real & (pos < first)
    register = real & (ids == cfg.register_token_id) if cfg.register_token_id is not None \
        else torch.zeros_like(image)
    text = real & (pos > first) & ~image & ~eoi & ~start & ~bos & ~register
    last = pos == torch.where(real, pos, -1).max(-1).values[:, None]
    dev = input_ids.device
    return TokenRoles(
        image=image.to(dev), eoi=eoi.to(dev), image_start=start.to(dev), prefix=prefix.to(dev),
        text=text.to(dev), bos=bos.to(dev), pad=(~real).to(dev), last=last.to(dev), real=real.to(dev),
        **{k: v.to(dev) for k, v in grid.items()}, spans=list(spans), register=register.to(dev),
    )
