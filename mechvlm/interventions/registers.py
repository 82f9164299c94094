"""Registering (seed 000, section 4, Fig. 4): text reaches the image only through registers."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechvlm.interventions._common import Hooks, PositionSelection, layer_names
from mechvlm.interventions.attention import PairCut
from mechvlm.roles import RoleSpec, TokenRoles


def register_mask(
    roles: TokenRoles,
    registers: RoleSpec = "eoi",
    text: RoleSpec = "text",
    image: RoleSpec = "image",
    layers: Iterable[int] | int | None = None,
) -> Hooks:
    """The Registering mask on top of the model's own mask (causal, padding, and for
    Gemma3 its bidirectional image blocks): ``text`` queries may not attend ``image``
    keys; ``registers`` (the EOI by default, or the tokens `insert_registers` added) are
    not text and keep their access to the image. Runs as an attention mask through SDPA,
    so it works in the forward pass and under autograd (training). In generation the
    generated tokens are text (role names extend to them; a boolean ``registers`` mask from
    `insert_registers` needs the callable form ``(batch, roles) -> hooks``)."""
    cut = PairCut(PositionSelection(text, roles, "register_mask"), PositionSelection(image, roles, "register_mask"),
                  exempt=PositionSelection(registers, roles, "register_mask"))
    return [(name, cut.mask_out) for name in layer_names(layers, "attn.hook_attn_mask")]


def insert_registers(
    input_ids: Int[Tensor, "batch pos"],
    n: int,
    *,
    roles: TokenRoles,
    token_id: int,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    pad_id: int = 0,
) -> tuple[Int[Tensor, "batch pos2"], Int[Tensor, "batch pos2"], Bool[Tensor, "batch pos2"]]:
    """Insert ``n`` register tokens right after each end-of-image token.

    Returns ``(input_ids, attention_mask, registers)`` with rows left-padded again;
    ``registers`` marks the EOI tokens and the inserted ones (pass it to
    ``register_mask(roles, registers=...)`` after recomputing ``roles`` on the new ids).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    roles.check_ids(input_ids, used_by="insert_registers")
    real = roles.real.cpu()
    eoi = roles.mask("eoi").cpu()  # raises MissingRoleError for a model without EOI (LLaVA)
    rows, regs = [], []
    for b in range(input_ids.shape[0]):
        ids_row, reg_row = [], []
        for tok, is_real, is_eoi in zip(input_ids[b].tolist(), real[b].tolist(), eoi[b].tolist()):
            if not is_real:
                continue
            ids_row.append(tok)
            reg_row.append(is_eoi)
            if is_eoi:
                ids_row += [token_id] * n
                reg_row += [True] * n
        rows.append(ids_row)
        regs.append(reg_row)
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    reg = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, (r, g) in enumerate(zip(rows, regs)):
        out[b, width - len(r):] = torch.tensor(r, dtype=input_ids.dtype)
        mask[b, width - len(r):] = 1
        reg[b, width - len(r):] = torch.tensor(g)
    dev = input_ids.device
    return out.to(dev), mask.to(dev), reg.to(dev)
