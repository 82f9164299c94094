"""Register-style attention masks of the work seed 000 builds on (METHODS section 4).

Next to `register_mask` (text may not attend the image; registers may), two published
layouts, each a pure function returning ``hook_attn_mask`` hooks that edit the model's own
mask (causal, padding, Gemma3's bidirectional image blocks, sliding windows):

* `mitre_mask`: MITRE (Qu et al. 2025, zhiqu22/mitre ``build_future_mask``) on
  ``[source | registers | target]``: the prefix of source and registers is bidirectional,
  source rows cannot see the registers, target rows cannot see the source.
* `gist_mask`: Gisting (Mu et al. 2023, jayelm/gisting ``make_gist_mask``): tokens after
  the last gist token see nothing before the first gist token.

In a VLM the source is the image, the registers are the EOI (and any inserted register
tokens), the target is the text after them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from jaxtyping import Bool
from torch import Tensor

from mechvlm.interventions._common import Hooks, OnDevice, layer_names
from mechvlm.roles import RoleSpec, TokenRoles

REGISTERS: tuple[str, ...] = ("eoi", "register")


def mitre_mask(
    roles: TokenRoles,
    registers: RoleSpec = REGISTERS,
    source: RoleSpec = "image",
    target: RoleSpec = "text",
    layers: Iterable[int] | int | None = None,
) -> Hooks:
    """MITRE's mask on top of the model's mask (zhiqu22/mitre ``build_future_mask``).

    With ``S`` = source, ``R`` = registers and ``T`` = target tokens (minus the registers):

    * every query of ``S | R`` may attend every key of ``S | R`` (the prefix is
      bidirectional; only future keys are added, so a sliding window still bounds the past);
    * ``S`` queries may not attend ``R`` keys;
    * ``T`` queries may not attend ``S`` keys.

    Each hook sees ``[batch, 1 | head, q, k]`` bool (True = may attend) and returns the edit.
    """
    reg = roles.mask(registers)
    src = roles.mask(source) & ~reg
    tgt = roles.mask(target) & ~reg & ~src
    prefix = src | reg
    n = roles.shape[1]
    future = torch.ones(n, n, dtype=torch.bool, device=reg.device).triu(1)
    add = OnDevice((prefix[:, :, None] & prefix[:, None, :] & future)[:, None])
    cut = OnDevice(((src[:, :, None] & reg[:, None, :]) | (tgt[:, :, None] & src[:, None, :]))[:, None])

    def apply(mask: Tensor, hook) -> Tensor:
        roles.check_runs_on(mask.shape[0], mask.shape[-1], where=hook.name, used_by="mitre_mask")
        return (mask | add.get(mask.device)) & ~cut.get(mask.device)

    return [(name, apply) for name in layer_names(layers, "attn.hook_attn_mask")]


def gist_mask(
    roles: TokenRoles,
    gists: RoleSpec = REGISTERS,
    layers: Iterable[int] | int | None = None,
) -> Hooks:
    """Gisting's mask on top of the model's mask (jayelm/gisting ``make_gist_mask``): in each
    row, queries after the last ``gists`` token may not attend keys before the first one.
    Rows without a gist token are unchanged. A hook sees ``[batch, 1 | head, q, k]`` bool."""
    gist = roles.mask(gists)
    cut = OnDevice(_after_last(gist)[:, None, :, None] & _before_first(gist)[:, None, None, :])

    def apply(mask: Tensor, hook) -> Tensor:
        roles.check_runs_on(mask.shape[0], mask.shape[-1], where=hook.name, used_by="gist_mask")
        return mask & ~cut.get(mask.device)

    return [(name, apply) for name in layer_names(layers, "attn.hook_attn_mask")]


def _before_first(flags: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """True before the first True of each row (all False in a row without one)."""
    return (flags.long().cumsum(-1) == 0) & flags.any(-1, keepdim=True)


def _after_last(flags: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """True after the last True of each row (all False in a row without one)."""
    return _before_first(flags.flip(-1)).flip(-1)
