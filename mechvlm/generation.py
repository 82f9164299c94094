"""Greedy generation without a KV cache, with hooks that also cover the generated tokens.

Every step reruns the whole sequence (prompt + tokens generated so far) through
`HookedVLM`, so an intervention defined on token roles -- e.g. a text->image knockout --
is rebuilt for the longer sequence and applies to the new tokens too (they are text
after the image). That costs one full forward per token, fine for the few tokens an
MMBench answer needs.

The token choice is Hugging Face's ``generate(do_sample=False)``: argmax of the last
position's logits; a row that has emitted an EOS token is continued with the pad token
(its attention-mask entries are 1, as HF extends the mask); generation stops when every
row has finished or after ``max_new_tokens``. Batches must be left-padded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from mechvlm.metrics._common import FwdHooks, user_hooks

#: Per-token inputs besides input_ids / attention_mask; generated tokens get this value.
_PER_TOKEN_INPUTS = {"token_type_ids": 0}


@dataclass
class Generation:
    """The result of `greedy_generate`.

    Attributes:
        sequences: ``[batch, prompt + steps]`` the prompt followed by the generated ids;
            after its EOS a row holds the pad token (as HF ``generate``'s ``sequences``).
        prompt_length: the number of prompt columns.
        finished: ``[batch]`` True where the row emitted an EOS token.
        eos_token_ids: the stop tokens.
        logits: ``[batch, steps, d_vocab]`` (fp32) the last-position logits each step
            chose from, when ``output_logits=True``; else None.
    """

    sequences: Tensor
    prompt_length: int
    finished: Tensor
    eos_token_ids: tuple[int, ...]
    logits: Tensor | None = None

    @property
    def new_tokens(self) -> Tensor:
        """``[batch, steps]`` the generated ids (pad after EOS)."""
        return self.sequences[:, self.prompt_length:]

    def tokens(self, row: int, include_eos: bool = False) -> list[int]:
        """Row ``row``'s generated ids up to its first EOS (included if ``include_eos``)."""
        out = []
        for t in self.new_tokens[row].tolist():
            if t in self.eos_token_ids:
                if include_eos:
                    out.append(t)
                break
            out.append(t)
        return out


def check_left_padded(attention_mask: Tensor) -> None:
    """Raise unless every row is ``0 .. 0 1 .. 1`` with at least one real token."""
    m = attention_mask.bool()
    if not m[:, -1].all() or (m[:, 1:].int() < m[:, :-1].int()).any():
        raise ValueError("greedy_generate needs a left-padded batch (attention_mask rows 0..0 1..1, "
                         "last column real); got right or inner padding")


@torch.no_grad()
def greedy_generate(model, batch: Mapping, max_new_tokens: int, eos_token_ids: Iterable[int] | int,
                    fwd_hooks: FwdHooks = None, *, pad_token_id: int | None = None,
                    output_logits: bool = False) -> Generation:
    """Greedy decoding with `HookedVLM`, recomputing the whole sequence each step.

    Args:
        model: a `HookedVLM`.
        batch: keyword arguments of ``HookedVLM.forward`` (``input_ids``, optional left-padded
            ``attention_mask``, ``pixel_values``, ``image_grid_thw``, ``token_type_ids``).
        max_new_tokens: the most tokens to generate per row.
        eos_token_ids: the stop token(s).
        fwd_hooks: a hook list used at every step, or a callable ``(batch, roles) -> hooks``
            called at every step on the extended batch (so role-based interventions such as
            ``knockout(roles, query="text", key="image")`` cover the generated tokens).
        pad_token_id: what finished rows are continued with (default: the first EOS id).
        output_logits: keep the fp32 logits of every step in `Generation.logits`.

    Returns:
        a `Generation`; ``sequences`` equals HF ``generate(do_sample=False)``'s.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    eos = (int(eos_token_ids),) if isinstance(eos_token_ids, int) else tuple(int(e) for e in eos_token_ids)
    if not eos:
        raise ValueError("no EOS token ids given")
    pad = eos[0] if pad_token_id is None else int(pad_token_id)
    device = model.device
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device=device, dtype=ids.dtype)
    check_left_padded(mask)
    per_token = {k: batch[k].to(device) for k in _PER_TOKEN_INPUTS if batch.get(k) is not None}
    fixed = {k: v for k, v in batch.items()
             if k not in ("input_ids", "attention_mask") and k not in _PER_TOKEN_INPUTS}
    eos_t = torch.tensor(eos, device=device)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    prompt_length = ids.shape[1]
    last_hidden: list[Tensor] = []
    step_logits = []

    def grab_last(module, args, output):
        last_hidden.append(output[:, -1])

    if "image_embeds" not in fixed and "video_embeds" not in fixed:
        # the images and videos do not change between steps: encode them once
        fixed.update(model.visual_embeds(**dict(fixed, input_ids=ids, attention_mask=mask, **per_token)))
    handle = model.ln_final.register_forward_hook(grab_last)
    try:
        for _ in range(max_new_tokens):
            step = dict(fixed, input_ids=ids, attention_mask=mask, **per_token)
            hooks = user_hooks(fwd_hooks, step, model.roles(**step)) if callable(fwd_hooks) \
                else user_hooks(fwd_hooks, step, None)
            last_hidden.clear()
            if hooks:
                model.run_with_hooks(**step, fwd_hooks=hooks, return_type=None)
            else:
                model(**step, return_type=None)
            logits = model.unembed(last_hidden[-1]).float()
            if output_logits:
                step_logits.append(logits)
            nxt = logits.argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            per_token = {k: torch.cat([v, torch.full_like(v[:, :1], _PER_TOKEN_INPUTS[k])], dim=1)
                         for k, v in per_token.items()}
            finished |= torch.isin(nxt, eos_t)
            if finished.all():
                break
    finally:
        handle.remove()
    return Generation(sequences=ids, prompt_length=prompt_length, finished=finished, eos_token_ids=eos,
                      logits=torch.stack(step_logits, dim=1) if output_logits else None)
