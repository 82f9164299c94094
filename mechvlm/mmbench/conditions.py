"""Named evaluation conditions: no intervention, and the knockouts of seed 000 Table 1.

A condition is a callable ``(batch, roles) -> hooks`` (the ``fwd_hooks`` convention of
`mechvlm.metrics`), so `greedy_generate` rebuilds it for every step and the knockout
covers the generated tokens as well. `CONDITIONS` holds:

* ``none``
* ``text→image:pre_softmax_mask`` / ``text→image:post_softmax_zero``: text queries cannot
  attend image tokens, in all layers and heads.
* ``text→EOI:pre_softmax_mask`` / ``text→EOI:post_softmax_zero``: text queries cannot
  attend the end-of-image token(s).

Modes: see `mechvlm.interventions.knockout` (``post_softmax_zero`` is Eq. 3-4 as written,
no renormalisation; ``pre_softmax_mask`` renormalises each row).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from mechvlm.interventions import knockout, knockout_reach

#: The column order of seed 000 Table 1.
DIRECTIONS = ("none", "text→image", "text→EOI")


@dataclass(frozen=True)
class Condition:
    """A named intervention for `evaluate`.

    ``direction`` is the Table-1 column (``none``, ``text→image``, ``text→EOI``, or any
    label for a custom condition); ``mode`` the knockout reading (None: no knockout). With
    ``key=None`` the condition adds no hooks; ``hooks`` (optional) overrides the knockout
    with a custom ``(batch, roles) -> hooks`` callable. ``prepare`` (optional) is
    ``(model, batch) -> (batch, fwd_hooks)``: called once per batch before generating, it
    may rewrite the batch (e.g. remove tokens) and compute what its hooks need with the
    model (see `setup`).

    ``touches`` (optional, for custom ``hooks``) is ``(roles) -> Bool[batch, pos]``: the
    positions whose activations the hooks edit directly (see `touched`). Declared, the
    condition can share a prefill with others (`mechvlm.prefix_sharing`); undeclared,
    custom hooks run on their own.
    """

    name: str
    direction: str
    key: str | None = None
    mode: str | None = None
    query: str = "text"
    hooks: Callable | None = None
    prepare: Callable | None = None
    touches: Callable | None = None

    def __call__(self, batch, roles) -> list:
        if self.hooks is not None:
            return list(self.hooks(batch, roles))
        if self.key is None:
            return []
        return knockout(roles, query=self.query, key=self.key, mode=self.mode)

    def setup(self, model, batch) -> tuple:
        """``(batch, fwd_hooks)`` to generate with: ``prepare(model, batch)`` when the
        condition has one, else the batch unchanged and the condition itself."""
        if self.prepare is None:
            return batch, self
        return self.prepare(model, batch)

    def touched(self, roles) -> Tensor | None:
        """``[batch, pos]`` bool: the positions whose activations this condition's hooks edit
        directly (a knockout: the ``query`` tokens that see a ``key`` token,
        `knockout_reach`); every position before a row's first one computes as without the
        condition. None when it cannot say (custom ``hooks`` without ``touches``, or a
        ``prepare`` step, which may rewrite the batch): `evaluate` then runs it on its own."""
        if self.prepare is not None:
            return None
        if self.hooks is not None:
            return None if self.touches is None else self.touches(roles)
        if self.key is None:
            return torch.zeros(roles.shape, dtype=torch.bool)
        return knockout_reach(roles, self.query, self.key)

    def describe(self) -> dict:
        """JSON-friendly description (stored with the results)."""
        return {"name": self.name, "direction": self.direction, "mode": self.mode,
                "query": self.query if self.key is not None else None, "key": self.key,
                "custom_hooks": self.hooks is not None}


def _knockouts() -> list[Condition]:
    out = []
    for direction, key in (("text→image", "image"), ("text→EOI", "eoi")):
        for mode in ("pre_softmax_mask", "post_softmax_zero"):
            out.append(Condition(f"{direction}:{mode}", direction, key=key, mode=mode))
    return out


CONDITIONS: dict[str, Condition] = {c.name: c for c in [Condition("none", "none"), *_knockouts()]}

#: Parametrised conditions by name prefix: ``"PREFIX:ARGS"`` resolves to ``parser("ARGS")``
#: (e.g. an analysis module registers ``"skip"`` so that ``"skip:mlp:0-8"`` names a condition).
CONDITION_PARSERS: dict[str, Callable[[str], Condition]] = {}


def register_condition_parser(prefix: str, parser: Callable[[str], Condition]) -> None:
    """Make ``"prefix:args"`` a condition name for `resolve_conditions` (and ``mechvlm report
    --conditions``); ``parser(args)`` returns the `Condition` (named as given)."""
    if prefix in CONDITION_PARSERS or any(n.split(":")[0] == prefix for n in CONDITIONS):
        raise ValueError(f"condition prefix {prefix!r} is taken")
    CONDITION_PARSERS[prefix] = parser


def condition_by_name(name: str) -> Condition:
    """A fixed condition of `CONDITIONS` (``"->"`` accepted for ``"→"``) or a registered
    parametrised one; unknown names raise and list what is known."""
    fixed = name.replace("->", "→")
    if fixed in CONDITIONS:
        return CONDITIONS[fixed]
    prefix, sep, args = name.partition(":")
    if sep and prefix in CONDITION_PARSERS:
        return CONDITION_PARSERS[prefix](args)
    known = list(CONDITIONS) + [f"{p}:..." for p in CONDITION_PARSERS]
    raise ValueError(f"unknown condition {name!r}; known: {known}")


def resolve_conditions(conditions: None | str | Iterable | Mapping) -> dict[str, Condition]:
    """Normalise the ``conditions`` argument of `evaluate`.

    None: every condition of `CONDITIONS`. A name (``"->"`` is accepted for ``"→"``), a
    `Condition`, or a list of them. A mapping ``{name: Condition | callable(batch, roles)}``
    adds custom conditions (a callable becomes ``Condition(name, direction=name,
    hooks=callable)``).
    """
    if conditions is None:
        return dict(CONDITIONS)
    if isinstance(conditions, (str, Condition)):
        conditions = [conditions]
    out: dict[str, Condition] = {}
    if isinstance(conditions, Mapping):
        for name, c in conditions.items():
            if isinstance(c, Condition):
                out[str(name)] = c
            elif callable(c):
                out[str(name)] = Condition(str(name), str(name), hooks=c)
            else:
                raise TypeError(f"condition {name!r}: expected a Condition or a callable, got {type(c).__name__}")
        return out
    for c in conditions:
        if isinstance(c, str):
            c = condition_by_name(c)
        if not isinstance(c, Condition):
            raise TypeError(f"expected a condition name or a Condition, got {type(c).__name__}")
        out[c.name] = c
    if not out:
        raise ValueError("no conditions to evaluate")
    return out
