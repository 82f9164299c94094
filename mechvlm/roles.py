"""Token roles: which positions are image tokens, the end-of-image (EOI) token, text, ...

`TokenRoles` is computed from ``input_ids`` (and the image grids) by `HookedVLM.roles`,
for any family: it reads the image spans the family found and the special-token ids of
``model.cfg``. Every function that takes a role also accepts a user boolean mask
``[batch, pos]`` (see `TokenRoles.mask`).

A role the model cannot have (LLaVA has no end-of-image or image-start token, only
Qwen2.5-VL takes videos, only anyres models have newline tokens) is listed in
`TokenRoles.missing`; asking `TokenRoles.mask` for it raises `MissingRoleError` naming the
role and why, so an analysis that needs it (a text->EOI knockout, Registering with the
EOI) fails instead of silently doing nothing. The attribute itself is an all-False mask.

`TokenRoles` remembers the batch it came from (its ``input_ids``). Interventions built from
it check, at hook time, that they run on that batch (`TokenRoles.check_runs_on`): the
shapes, and the token ids of the forward in progress (`HookedVLM.forward` records them
with `records_batch`). Roles of another batch raise `RolesBatchMismatch`, instead of
broadcasting a ``[1, n]`` mask over a ``[2, n]`` batch or cutting the wrong positions.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechvlm.config import VLMConfig
from mechvlm.image_layout import ImageSpan, span_cells

ROLE_NAMES = ("image", "eoi", "image_start", "prefix", "text", "bos", "pad", "last", "real", "video",
              "newline", "register")

RoleSpec = str | Tensor | Iterable[str | Tensor]

#: The ``input_ids`` of the `HookedVLM` forward in progress (None outside a forward).
_RUNNING_IDS: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("mechvlm_running_ids", default=None)


class RolesBatchMismatch(ValueError):
    """An intervention built from the `TokenRoles` of one batch runs on another batch."""


@contextlib.contextmanager
def running_on(input_ids):
    """Record ``input_ids`` as the batch of the forward in progress (for `check_runs_on`)."""
    token = _RUNNING_IDS.set(input_ids if isinstance(input_ids, Tensor) else None)
    try:
        yield
    finally:
        _RUNNING_IDS.reset(token)


def running_ids() -> Tensor | None:
    """The ``input_ids`` of the `HookedVLM` forward in progress (None outside a forward)."""
    return _RUNNING_IDS.get()


def records_batch(forward):
    """Decorator of ``HookedVLM.forward``: its ``input_ids`` (first argument) are the batch
    in progress while it runs."""
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        with running_on(args[0] if args else kwargs.get("input_ids")):
            return forward(self, *args, **kwargs)

    return wrapper


class MissingRoleError(ValueError):
    """A named role that this model does not have (e.g. ``eoi`` on LLaVA)."""


@dataclass
class TokenRoles:
    """Boolean masks ``[batch, pos]`` per role, plus the image grid of each image token.

    Roles:
        image: every visual placeholder token, i.e. every position the vision tower fills
            (Qwen ``<|image_pad|>`` and ``<|video_pad|>``, Gemma3 soft tokens, LLaVA
            ``<image>`` including the anyres newline tokens). Analyses treat a video as
            they treat an image; ``video`` / ``newline`` select the subsets.
        video: the video placeholder tokens (Qwen2.5-VL ``<|video_pad|>``).
        newline: the anyres newline tokens (LLaVA-NeXT / OneVision: the learned
            ``image_newline`` vector closing each row of the stitched tiles).
        eoi: the end-of-image token right after each run of image (or video) tokens;
            missing for models without one (LLaVA).
        image_start: the token right before each image run (``<|vision_start|>`` / BOI);
            missing for models without one (LLaVA).
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
    order; on video tokens the video's index among the videos), ``grid_t`` (the frame:
    temporal patch of a video), ``grid_tile`` (0 for a one-grid image and for the anyres
    overview, ``k >= 1`` for the k-th anyres tile, row-major, the order of the tiles in
    ``pixel_values``), ``grid_row``, ``grid_col`` (within the tile; on the merged grid; for
    an image some of whose tokens were removed, the cells of the tokens that are left).
    Newline tokens (and a kept CLS token) have an ``image_index`` but no cell (-1).

    ``missing``: role name -> why this model has no such role (see the module doc).

    ``input_ids``: the ``[batch, pos]`` ids the roles were computed from (CPU), which
    `check_runs_on` compares with the batch an intervention runs on.
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
    video: Bool[Tensor, "batch pos"] | None = None
    newline: Bool[Tensor, "batch pos"] | None = None
    grid_tile: Int[Tensor, "batch pos"] | None = None
    missing: dict[str, str] = field(default_factory=dict)
    input_ids: Int[Tensor, "batch pos"] | None = field(default=None, repr=False, compare=False)
    register: Bool[Tensor, "batch pos"] | None = None

    def __post_init__(self) -> None:
        for name in ("video", "newline"):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros_like(self.image))
        if self.grid_tile is None:
            self.grid_tile = torch.where(self.image, 0, -1)

    @property
    def shape(self) -> torch.Size:
        return self.image.shape

    def check_runs_on(self, batch: int, pos: int, *, where: str, used_by: str) -> None:
        """Raise `RolesBatchMismatch` unless the forward in progress is the batch these roles
        were computed from: ``(batch, pos)`` is the activation's batch size and sequence length
        at hook ``where``; the token ids recorded by `HookedVLM.forward` are compared too (once
        per forward). ``used_by`` names the intervention (with its roles) in the message."""
        ran = (int(batch), int(pos))
        mine = tuple(self.shape)
        running = _RUNNING_IDS.get()
        same = ran == mine
        if same and running is not None and self.input_ids is not None and tuple(running.shape) == mine:
            seen = getattr(self, "_verified_ids", None)
            if seen is None or seen() is not running:
                ids = self.input_ids.to(running.device)
                same = bool(torch.equal(ids, running.to(ids.dtype)))
                if same:
                    object.__setattr__(self, "_verified_ids", weakref.ref(running))
            if not same:
                raise RolesBatchMismatch(
                    f"{used_by} was built from the TokenRoles of another batch of the same shape {mine}: "
                    f"the token ids running at '{where}' differ. Build the roles from the batch that runs "
                    "(model.roles(**batch)), or pass a callable (batch, roles) -> hooks, which mechvlm "
                    "rebuilds for every batch and generation step")
        if not same:
            raise RolesBatchMismatch(
                f"{used_by} was built from TokenRoles of a batch of shape {mine} [batch, pos] but runs at "
                f"'{where}' on a batch of shape {ran}. Build the roles from the batch that runs "
                "(model.roles(**batch)), or pass a callable (batch, roles) -> hooks, which mechvlm "
                "rebuilds for every batch and generation step")

    def check_continues(self, batch: int, start: int, stop: int, *, where: str, used_by: str) -> None:
        """`check_runs_on` for a forward over a KV cache (or a generation step): it runs the
        absolute positions ``start .. stop-1`` of a sequence whose first positions these roles
        describe. Raise `RolesBatchMismatch` when the batch size differs, or when the token
        ids running at positions the roles cover differ from the roles' ids."""
        mine = tuple(self.shape)
        if int(batch) != mine[0]:
            raise RolesBatchMismatch(
                f"{used_by} was built from TokenRoles of a batch of shape {mine} [batch, pos] but runs at "
                f"'{where}' on a batch of {int(batch)} rows. Build the roles from the batch that runs "
                "(model.roles(**batch)), or pass a callable (batch, roles) -> hooks")
        running = _RUNNING_IDS.get()
        covered = min(stop, mine[1]) - start
        if running is None or self.input_ids is None or covered <= 0 or tuple(running.shape) != (mine[0], stop - start):
            return
        seen = getattr(self, "_verified_span", None)
        if seen is not None and seen[0]() is running and seen[1:] == (start, stop):
            return
        ids = self.input_ids[:, start:start + covered].to(running.device)
        if not torch.equal(ids, running[:, :covered].to(ids.dtype)):
            raise RolesBatchMismatch(
                f"{used_by}: the token ids running at '{where}' (positions {start}..{stop - 1}) differ from "
                "those its TokenRoles were computed from. Build the roles from the batch that runs, or pass "
                "a callable (batch, roles) -> hooks, which mechvlm rebuilds for every generation step")
        object.__setattr__(self, "_verified_span", (weakref.ref(running), start, stop))

    def check_ids(self, input_ids: Tensor, *, used_by: str) -> None:
        """Raise `RolesBatchMismatch` unless ``input_ids`` are the ids of these roles."""
        if tuple(input_ids.shape) != tuple(self.shape):
            raise RolesBatchMismatch(f"{used_by}: the TokenRoles are of a batch of shape {tuple(self.shape)}, "
                                     f"input_ids have shape {tuple(input_ids.shape)}")
        if self.input_ids is not None and not torch.equal(self.input_ids, input_ids.cpu().to(self.input_ids.dtype)):
            raise RolesBatchMismatch(f"{used_by}: the TokenRoles were computed from other input_ids "
                                     f"of the same shape {tuple(self.shape)}")

    def mask(self, spec: RoleSpec) -> Bool[Tensor, "batch pos"]:
        """A role name, a boolean ``[batch, pos]`` mask, or an iterable of them (union)."""
        if isinstance(spec, str):
            if spec not in ROLE_NAMES:
                raise ValueError(f"unknown token role {spec!r}; roles are {ROLE_NAMES} or a boolean mask")
            if spec in self.missing:
                raise MissingRoleError(f"this model has no {spec!r} role: {self.missing[spec]}")
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
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw = {k: (v.to(device) if isinstance(v, Tensor) and k != "input_ids" else v) for k, v in kw.items()}
        return TokenRoles(**kw)

    def extend(self, n_new: int) -> "TokenRoles":
        """The roles after ``n_new`` generated tokens are appended to every row.

        Generated tokens are real text after the prompt: ``text`` in a row that holds an
        image (or an image-start token), ``prefix`` in an image-free row (as `compute_roles`
        labels the extended ids), never image / EOI / image_start / BOS / pad; ``last`` moves
        to the final new token. Grid fields are -1 there."""
        if n_new < 0:
            raise ValueError(f"n_new must be >= 0, got {n_new}")
        if n_new == 0:
            return self
        b = self.shape[0]
        dev = self.image.device
        no = torch.zeros(b, n_new, dtype=torch.bool, device=dev)
        visual = (self.image | self.image_start).any(-1, keepdim=True).expand(b, n_new)
        new = {"image": no, "eoi": no, "image_start": no, "bos": no, "pad": no, "real": ~no,
               "text": visual, "prefix": ~visual}
        kw = {name: torch.cat([getattr(self, name), new[name]], dim=1) for name in new}
        kw["last"] = torch.cat([torch.zeros_like(self.last), no], dim=1)
        kw["last"][:, -1] = True
        for name in ("image_index", "grid_t", "grid_row", "grid_col"):
            t = getattr(self, name)
            kw[name] = torch.cat([t, t.new_full((b, n_new), -1)], dim=1)
        return TokenRoles(**kw, spans=list(self.spans), input_ids=None)  # the generated ids are not known here

    def counts(self) -> dict[str, list[int]]:
        """Tokens per role and row (a quick sanity view; a role the model cannot have counts 0)."""
        empty = torch.zeros_like(self.image)
        return {r: (getattr(self, r) if getattr(self, r) is not None else empty).sum(-1).tolist()
                for r in ROLE_NAMES}


def missing_roles(cfg: VLMConfig) -> dict[str, str]:
    """The roles ``cfg``'s model cannot have, with the reason."""
    name = cfg.architecture
    out = {}
    if cfg.image_end_token_id is None:
        out["eoi"] = f"{name} has no end-of-image token (no EOI follows its image tokens)"
    if cfg.image_start_token_id is None:
        out["image_start"] = f"{name} has no image-start token"
    if cfg.video_token_id is None:
        out["video"] = f"mechvlm's {name} takes no video input"
    if not cfg.extra.get("image_newline"):
        out["newline"] = f"{name} has no image-newline tokens (only the anyres LLaVA-NeXT / OneVision do)"
    return out


def compute_roles(cfg: VLMConfig, input_ids: Tensor, spans: list[ImageSpan],
                  key_padding: Tensor | None) -> TokenRoles:
    """Roles from ``input_ids`` and the validated image / video spans (see `HookedVLM.roles`)."""
    ids = input_ids.cpu()
    b, n = ids.shape
    real = key_padding.cpu() if key_padding is not None else torch.ones(b, n, dtype=torch.bool)
    image = torch.zeros(b, n, dtype=torch.bool)
    video = torch.zeros_like(image)
    newline = torch.zeros_like(image)
    eoi = torch.zeros_like(image)
    start = torch.zeros_like(image)
    grid = {k: torch.full((b, n), -1, dtype=torch.long)
            for k in ("image_index", "grid_t", "grid_tile", "grid_row", "grid_col")}
    for s in spans:
        image[s.row, s.start:s.stop] = True
        if s.modality == "video":
            video[s.row, s.start:s.stop] = True
        cells = span_cells(s)
        newline[s.row, s.start:s.stop] = cells["newline"]
        grid["image_index"][s.row, s.start:s.stop] = s.image
        for k in ("t", "tile", "row", "col"):
            grid[f"grid_{k}"][s.row, s.start:s.stop] = cells[k]
    for s in spans:  # run ends: the span is not followed by another image token
        if cfg.image_end_token_id is None:
            break
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
        if cfg.image_start_token_id is None:
            break
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
        video=video.to(dev), newline=newline.to(dev), **{k: v.to(dev) for k, v in grid.items()},
        spans=list(spans), missing=missing_roles(cfg), input_ids=ids.long().clone(),
        register=register.to(dev),
    )
