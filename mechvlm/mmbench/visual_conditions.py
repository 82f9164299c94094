"""MMBench conditions built on the visual-token analyses (seed 003, EmbedLens; METHODS §10).

Registered on import of `mechvlm.mmbench` (so ``evaluate(..., conditions=[...])`` and
``mechvlm report --conditions`` accept them):

* ``prune:CATEGORIES[:MODE][:key=value...]``: drop the image tokens of some categories
  (``sink``, ``dead``, ``alive``, joined by ``+``) of the model-agnostic criterion
  (`mechvlm.analyses.massive_activation_categories`, computed on each batch's prompt).
  ``MODE``: ``removed`` (default: removed from the sequence) or ``keys`` (masked as keys).
  Options: ``threshold=``, ``first_layer=``, ``dead_norm=`` of the criterion.
  Examples: ``prune:dead``, ``prune:sink+dead:keys``, ``prune:dead:keys:threshold=8``.
* ``skip:SUBLAYERS:LAYERS``: zero the attention and/or MLP output at the image positions
  in those layers, so their residual passes through unchanged (`skip_sublayers`).
  ``SUBLAYERS``: ``attn``, ``mlp`` or ``attn+mlp``; ``LAYERS``: ``a-b`` (inclusive), ``a``, or
  several joined by ``+``. Example: ``skip:mlp:0-8``.
* ``inject:LAYER[:CATEGORIES]``: the image tokens (or those of some categories) enter at
  ``LAYER`` instead of the input (`inject_at_layer`). Example: ``inject:8``.

Every condition's hooks are rebuilt at each generation step, so they cover the generated
tokens too (the dropped / injected / skipped positions are image positions only).
"""

from __future__ import annotations

import torch

from mechvlm.analyses.token_categories import CATEGORIES, massive_activation_categories
from mechvlm.interventions import inject_at_layer, mask_image_keys, remove_image_tokens, skip_sublayers
from mechvlm.mmbench.conditions import CONDITION_PARSERS, Condition, register_condition_parser

_OPTIONS = {"threshold": float, "first_layer": int, "dead_norm": float}


def parse_layers(spec: str, where: str) -> list[int]:
    """``"0-8"`` (inclusive), ``"3"``, ``"0-2+5"`` -> sorted layer indices."""
    out = set()
    for part in spec.split("+"):
        a, sep, b = part.partition("-")
        try:
            lo, hi = int(a), int(b) if sep else int(a)
        except ValueError:
            raise ValueError(f"{where}: layers must look like 0-8, 3 or 0-2+5, got {spec!r}") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"{where}: bad layer range {part!r}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def _check_layers(model, layers: list[int], where: str) -> None:
    n = model.cfg.n_layers
    if layers[-1] >= n:
        raise ValueError(f"condition {where!r}: layer {layers[-1]} does not exist (the model has {n} layers, 0-{n - 1})")


def _categories(spec: str, where: str) -> list[str]:
    cats = spec.split("+")
    bad = [c for c in cats if c not in CATEGORIES]
    if bad or not spec:
        raise ValueError(f"condition {where!r}: unknown token categories {bad}; choose from {CATEGORIES} (join with +)")
    return cats


def _options(parts: list[str], where: str) -> dict:
    out = {}
    for p in parts:
        key, sep, value = p.partition("=")
        if not sep or key not in _OPTIONS:
            raise ValueError(f"condition {where!r}: unknown option {p!r}; options are {sorted(_OPTIONS)} (key=value)")
        out[key] = _OPTIONS[key](value)
    return out


def _extend(mask: torch.Tensor, width: int) -> torch.Tensor:
    """A ``[batch, pos]`` mask of the prompt, padded with False for the generated columns."""
    return torch.nn.functional.pad(mask, (0, width - mask.shape[1]), value=False)


def _category_mask(model, batch, roles, cats, options) -> torch.Tensor:
    res = massive_activation_categories(model, batch, progress=False, **options)
    mask = torch.zeros(roles.shape, dtype=torch.bool)
    for c in cats:
        mask |= res.masks(tuple(roles.shape), c)
    return mask.to(roles.image.device)


def parse_prune(args: str) -> Condition:
    name = f"prune:{args}"
    parts = args.split(":")
    cats = _categories(parts[0], name)
    mode = "removed"
    rest = parts[1:]
    if rest and "=" not in rest[0]:
        mode, rest = rest[0], rest[1:]
    if mode not in ("removed", "keys"):
        raise ValueError(f"condition {name!r}: mode must be 'removed' or 'keys', got {mode!r}")
    options = _options(rest, name)

    def prepare(model, batch):
        roles = model.roles(**batch)
        drop = _category_mask(model, batch, roles, cats, options)
        if mode == "removed":
            pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
            try:
                return remove_image_tokens(batch, roles, drop, pad_id=pad).batch, None
            except ValueError as e:
                raise ValueError(f"condition {name!r}: {e}; use {'prune:' + parts[0] + ':keys'!r}") from None
        return batch, lambda step, step_roles: mask_image_keys(step_roles, _extend(drop, step_roles.shape[1]))

    return Condition(name, f"prune {'+'.join(cats)} ({mode})", prepare=prepare)


def parse_skip(args: str) -> Condition:
    name = f"skip:{args}"
    which, sep, layer_spec = args.partition(":")
    parts = tuple(which.split("+"))
    if not sep or not parts or not set(parts) <= {"attn", "mlp"}:
        raise ValueError(f"condition {name!r}: expected skip:attn|mlp|attn+mlp:LAYERS, e.g. skip:mlp:0-8")
    layers = parse_layers(layer_spec, name)

    def prepare(model, batch):
        _check_layers(model, layers, name)
        return batch, lambda step, roles: skip_sublayers(roles.image, layers=layers, which=parts)

    return Condition(name, f"skip visual {which} in layers {layer_spec}", prepare=prepare)


def parse_inject(args: str) -> Condition:
    name = f"inject:{args}"
    layer_spec, _, cat_spec = args.partition(":")
    try:
        layer = int(layer_spec)
    except ValueError:
        raise ValueError(f"condition {name!r}: expected inject:LAYER[:CATEGORIES], e.g. inject:8") from None
    cats = _categories(cat_spec, name) if cat_spec else None

    def prepare(model, batch):
        _check_layers(model, [layer], name)
        if cats is None:
            return batch, lambda step, roles: inject_at_layer(roles, layer, "image")
        sel = _category_mask(model, batch, model.roles(**batch), cats, {})
        return batch, lambda step, roles: inject_at_layer(roles, layer, _extend(sel, roles.shape[1]))

    return Condition(name, f"inject {cat_spec or 'image'} at layer {layer}", prepare=prepare)


for _prefix, _parser in (("prune", parse_prune), ("skip", parse_skip), ("inject", parse_inject)):
    if _prefix not in CONDITION_PARSERS:  # a module reload must not register twice
        register_condition_parser(_prefix, _parser)
