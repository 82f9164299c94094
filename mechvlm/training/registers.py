"""The Registering setting of a model (seed 000 section 4): which tokens are registers, which
mask, and the register token itself.

Variants: ``none`` (plain fine-tuning, the seed's baseline), ``eoi`` (the end-of-image token
is the one register), ``registers`` (``n`` new tokens right after each EOI, plus the EOI).
Masks: ``register`` (`register_mask`: text may not attend the image), ``mitre`` and
``gist`` (`mechvlm.interventions.masks`).

A fine-tuned checkpoint stores the setting as ``registering`` in its HF ``config.json``;
`HookedVLM` reads it into ``cfg.registering`` / ``cfg.register_token_id`` (the ``register``
token role) and `InputBuilder` inserts the register tokens after every EOI. `registering_hooks`
returns the mask for such a model, so evaluation applies what training applied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor, nn

from mechvlm.interventions import gist_mask, mitre_mask, register_mask
from mechvlm.interventions.masks import REGISTERS

VARIANTS = ("none", "eoi", "registers")
MASKS = ("register", "mitre", "gist")
#: the added token's text (a special token of the tokenizer)
REGISTER_TOKEN = "<|register|>"


@dataclass(frozen=True)
class Registering:
    """One Registering setting. ``register_token_id`` is filled by `add_register_token`."""

    variant: str = "none"
    n_registers: int = 0
    mask: str = "register"
    register_token: str | None = None
    register_token_id: int | None = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"registering variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.mask not in MASKS:
            raise ValueError(f"registering mask must be one of {MASKS}, got {self.mask!r}")
        if (self.variant == "registers") != (self.n_registers > 0):
            raise ValueError(f"variant {self.variant!r} with n_registers={self.n_registers}: inserted "
                             "registers need variant 'registers' and n_registers > 0")

    @classmethod
    def parse(cls, spec: str | int, mask: str = "register") -> "Registering":
        """``"none"``, ``"eoi"`` or a number of inserted registers (``"16"``, ``256``)."""
        text = str(spec).strip().lower()
        if text in ("none", "eoi"):
            return cls(variant=text, mask=mask)
        if text.isdigit() and int(text) > 0:
            return cls(variant="registers", n_registers=int(text), mask=mask)
        raise ValueError(f"--registering must be 'none', 'eoi' or a positive number of registers, got {spec!r}")

    @property
    def active(self) -> bool:
        return self.variant != "none"

    @property
    def label(self) -> str:
        name = {"none": "none", "eoi": "eoi"}.get(self.variant, f"{self.n_registers} registers")
        return name if self.mask == "register" or not self.active else f"{name} ({self.mask})"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "Registering":
        return cls(**{k: v for k, v in dict(d or {}).items() if k in cls.__dataclass_fields__})


def add_register_token(model, tokenizer, hf_config, registering: Registering,
                       token: str = REGISTER_TOKEN) -> Registering:
    """Make ``registering`` the setting of ``model`` (a `HookedVLM`) and ``hf_config``.

    For inserted registers: ``token`` becomes a special token of ``tokenizer``; when its id
    is past the embedding (the toy checkpoints) ``W_E`` (and an untied unembedding) grow by
    rows, else (real checkpoints keep spare rows) the row is reused. Either way the row
    starts as a copy of the EOI's. Returns the setting with the token id filled in; the
    model's ``cfg.registering`` / ``register_token_id`` and ``hf_config.registering`` hold it.
    Models without an end-of-image token (the LLaVA families) are refused for ``eoi`` and
    inserted registers: both are placed at the EOI.
    """
    if registering.variant != "none" and model.cfg.image_end_token_id is None:
        raise ValueError(f"Registering {registering.label!r} needs an end-of-image token, and this "
                         f"{model.cfg.model_type} model has none (seed 000 section 4 places the registers at "
                         "the EOI); use --registering none")
    if registering.variant == "registers":
        if token not in tokenizer.get_vocab():
            tokenizer.add_tokens([token], special_tokens=True)
        tid = tokenizer.convert_tokens_to_ids(token)
        _grow_vocab(model, tid + 1)
        with torch.no_grad():
            eoi = model.cfg.image_end_token_id
            model.embed.W_E[tid] = model.embed.W_E[eoi]
            if not model.cfg.tie_word_embeddings:
                model.unembed.weight[tid] = model.unembed.weight[eoi]
        registering = replace(registering, register_token=token, register_token_id=tid)
    set_registering(model, hf_config, registering)
    return registering


def set_registering(model, hf_config, registering: Registering) -> None:
    """Record ``registering`` on the model's cfg and on the HF config that will be saved."""
    model.cfg.registering = registering.to_dict()
    model.cfg.register_token_id = registering.register_token_id
    if hf_config is not None:
        hf_config.registering = registering.to_dict()


def _grow_vocab(model, d_vocab: int) -> None:
    """Give ``model`` at least ``d_vocab`` embedding rows (new rows zero until set)."""
    old = model.cfg.d_vocab
    if d_vocab <= old:
        return
    W_E = model.embed.W_E
    rows = torch.zeros(d_vocab - old, W_E.shape[1], dtype=W_E.dtype, device=W_E.device)
    model.embed.W_E = nn.Parameter(torch.cat([W_E.detach(), rows]), requires_grad=W_E.requires_grad)
    if model.cfg.tie_word_embeddings:
        model.unembed.weight = model.embed.W_E
    else:
        W_U = model.unembed.weight
        model.unembed.weight = nn.Parameter(torch.cat([W_U.detach(), rows.to(W_U.dtype)]),
                                            requires_grad=W_U.requires_grad)
    model.cfg.d_vocab = d_vocab


def registering_of(model) -> Registering:
    """The setting a loaded model carries (``none`` when its config has none)."""
    return Registering.from_dict(getattr(model.cfg, "registering", None))


def mask_hooks(registering: Registering) -> Callable | None:
    """``(batch, roles) -> hooks`` applying the setting's mask, or None for ``none``.
    Registers are the EOI and the ``register`` role (the inserted tokens)."""
    if not registering.active:
        return None

    def hooks(batch, roles) -> list:
        if registering.mask == "register":
            return register_mask(roles, registers=list(REGISTERS))
        if registering.mask == "mitre":
            return mitre_mask(roles, registers=list(REGISTERS))
        return gist_mask(roles, gists=list(REGISTERS))

    hooks.__name__ = f"registering_{registering.mask}"
    return hooks


def registering_hooks(model) -> Callable | None:
    """The mask of a loaded Registering model (`HookedVLM`) as ``(batch, roles) -> hooks``,
    or None for a model without one (`apply_registering` installs it on the model instead)."""
    return mask_hooks(registering_of(model))


class RegisteringMask:
    """The mask of a Registering model, installed on it (`apply_registering`).

    ``model.forward`` is wrapped (on the instance, so TransformerLens' ``run_with_hooks`` /
    ``run_with_cache``, which call ``forward`` directly, go through it too): each call
    computes the token roles of its batch and the mask's edits for it; permanent hooks on
    every ``attn.hook_attn_mask`` apply them. They fire before any hook added later
    (knockouts), survive ``reset_hooks()`` and cover every `greedy_generate` step; `remove`
    takes them off. A KV-cache step (only the new tokens) reuses the edits built from the
    prompt that filled its cache (they extend to the generated tokens, `mechvlm.forward_positions`)."""

    def __init__(self, model, registering: Registering):
        import functools
        import inspect

        self.model = model
        self.registering = registering
        self._hooks_for = mask_hooks(registering)
        self._signature = inspect.signature(model.forward)
        self._edits: list = []
        self._prefill: tuple | None = None  # (the KV cache a prompt filled, its edits)
        self._handles = [block.attn.hook_attn_mask.add_hook(self._apply, is_permanent=True) for block in model.blocks]
        plain = type(model).forward

        @functools.wraps(plain)
        def forward(*args, **kwargs):
            batch = dict(self._signature.bind_partial(*args, **kwargs).arguments)
            ids = batch.get("input_ids")
            if not isinstance(ids, Tensor) or ids.is_floating_point() or batch.get("tokens") is not None:
                return plain(model, *args, **kwargs)  # a mapping / text / resid form: forward reduces it
                # to the keyword form and calls model.forward (this wrapper) again
            cache = batch.get("past_kv_cache")
            if cache is not None and cache.length > 0:  # a KV-cache step: the prompt's edits, extended
                if self._prefill is None or self._prefill[0] is not cache:
                    raise RuntimeError("a Registering model continued a KV cache whose prompt did not run "
                                       "through this model's forward: run the prompt with that cache first")
                edits = self._prefill[1]
            else:
                roles = model.roles(ids, batch.get("image_grid_thw"), batch.get("attention_mask"))
                edits = list(self._hooks_for(batch, roles))
                self._prefill = (cache, edits) if cache is not None else None
            self._edits = edits
            try:
                return plain(model, *args, **kwargs)
            finally:
                self._edits = []

        model.forward = forward
        model._registering_mask = self

    def _apply(self, mask: Tensor, hook) -> Tensor:
        for target, fn in self._edits:
            if target == hook.name or (callable(target) and target(hook.name)):
                mask = fn(mask, hook)
        return mask

    def __repr__(self) -> str:
        return f"RegisteringMask({self.registering.label})"

    def remove(self) -> None:
        for block, handle in zip(self.model.blocks, self._handles):
            handle.hook.remove()
            point = block.attn.hook_attn_mask
            point.fwd_hooks = [h for h in point.fwd_hooks if h is not handle]
        self._handles = []
        if getattr(self.model, "_registering_mask", None) is self:
            del self.model._registering_mask
            del self.model.forward  # back to the class's forward


def apply_registering(model) -> RegisteringMask | None:
    """Install the Registering mask a loaded model carries (its ``cfg.registering``), so that
    every forward -- metrics, generation, `mechvlm.mmbench.evaluate`, caches -- runs under the
    mask it was trained with. Idempotent; returns the installed `RegisteringMask` (``.remove()``
    takes it off), or None for a model without Registering."""
    registering = registering_of(model)
    if not registering.active:
        return None
    existing = getattr(model, "_registering_mask", None)
    return existing if existing is not None else RegisteringMask(model, registering)


def hf_attention_mask(model, batch: Mapping, hooks: Callable | None = None) -> Tensor | dict[str, Tensor]:
    """The attention mask ``model`` applies to ``batch`` under ``hooks`` (default: its
    registering mask), as the 4-D bool ``[batch, 1, q, k]`` HF models accept as
    ``attention_mask`` (Gemma3: a dict per layer type, for its sliding layers). With it and
    ``position_ids`` (``model.prepare_inputs(...).position_ids``), the HF model of a saved
    checkpoint computes what the `HookedVLM` computes under the mask."""
    from mechvlm.components import AttentionMask

    hooks = registering_hooks(model) if hooks is None else hooks
    inputs = model.prepare_inputs(batch["input_ids"], batch.get("pixel_values"), batch.get("image_grid_thw"),
                                  batch.get("attention_mask"))
    b, n = inputs.input_ids.shape
    dense = AttentionMask(b, n, model.device, inputs.key_padding, inputs.block_ids)
    edits = list(hooks(batch, model.roles(**batch))) if hooks is not None else []
    out = {}
    for l, kind in enumerate(model.cfg.layer_types):
        if kind in out:
            continue
        mask = dense.dense(model.cfg.window(l)).clone()
        name = f"blocks.{l}.attn.hook_attn_mask"
        for target, fn in edits:
            if target == name or (callable(target) and target(name)):
                mask = fn(mask, model.blocks[l].attn.hook_attn_mask)
        out[kind] = mask
    return out if model.cfg.model_type == "gemma3" else next(iter(out.values()))
