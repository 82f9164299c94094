"""Generation with `HookedVLM`: a KV cache by default, hooks on every step.

`generate` prefills the prompt once (the images are encoded once) into a
`mechvlm.kv_cache.VLMKeyValueCache`, then runs one new token per step. With
``use_past_kv_cache=False`` every step reruns the whole sequence instead (the reference the
tests hold the cache against; same tokens, same logits within fp32 tolerance).

Hooks (``fwd_hooks``) fire in every step. In a cached step, ``[batch, pos, ...]`` hooks see
the new position only and ``hook_pattern`` / ``hook_attn_scores`` / ``hook_attn_mask``
``[batch, head, 1, pos_so_far]``; the cache holds the keys after ``hook_rot_k`` and the
values after ``hook_v``, so an edit there in the prefill is what every later token reads.
``hook_image_embeds`` fires in the prefill only (the images are encoded once).
Hooks may be:

* a callable ``(batch, roles) -> hooks``, called every step with the batch so far (prompt
  plus the tokens generated until then) and its roles, in both paths: role-based
  interventions (``knockout(roles, query="text", key="image")``) cover the generated
  tokens, which are text after the image;
* a hook list, attached once for the whole generation. Interventions built from the
  prompt's roles by role name (knockout, register_mask) extend to the generated tokens;
  ones built from a boolean ``[batch, pos]`` mask raise at the first generated token and
  say to pass the callable form (`mechvlm.interventions._common.PositionSelection`).

Token choice: greedy is Hugging Face's ``generate(do_sample=False)`` (argmax of the last
position); sampling uses TransformerLens' ``sample_logits`` (temperature, top_k, or
top_p, frequency / repetition penalties), seeded with ``seed``. A row that emitted a stop
token continues with the pad token (its attention-mask entries are 1, as HF extends the
mask); generation stops when every row has finished or after ``max_new_tokens``. Batches
must be left-padded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mechvlm.forward_positions import forward_positions
from mechvlm.kv_cache import VLMKeyValueCache
from mechvlm.metrics._common import FwdHooks, user_hooks
from mechvlm.roles import compute_roles

#: Per-token inputs besides input_ids / attention_mask; generated tokens get this value.
_PER_TOKEN_INPUTS = {"token_type_ids": 0}


@dataclass
class Generation:
    """The result of `generate` / `greedy_generate`.

    Attributes:
        sequences: ``[batch, prompt + steps]`` the prompt followed by the generated ids;
            after its stop token a row holds the pad token (as HF ``generate``'s ``sequences``).
        prompt_length: the number of prompt columns.
        finished: ``[batch]`` True where the row emitted a stop token.
        eos_token_ids: the stop tokens (empty with ``stop_at_eos=False``).
        logits: ``[batch, steps, d_vocab]`` (fp32) the last-position logits each step
            chose from, when ``output_logits=True``; else None.
        attention_mask: ``[batch, prompt + steps]`` the prompt's mask extended with ones.
        inputs: the batch's other inputs (``pixel_values``, ``image_grid_thw``, ...).
    """

    sequences: Tensor
    prompt_length: int
    finished: Tensor
    eos_token_ids: tuple[int, ...]
    logits: Tensor | None = None
    attention_mask: Tensor | None = None
    inputs: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> Tensor:
        """``[batch, steps]`` the generated ids (pad after the stop token)."""
        return self.sequences[:, self.prompt_length:]

    def tokens(self, row: int, include_eos: bool = False) -> list[int]:
        """Row ``row``'s generated ids up to its first stop token (included if ``include_eos``)."""
        out = []
        for t in self.new_tokens[row].tolist():
            if t in self.eos_token_ids:
                if include_eos:
                    out.append(t)
                break
            out.append(t)
        return out

    def generated_mask(self, include_eos: bool = True) -> Tensor:
        """``[batch, prompt + steps]`` bool: the generated tokens of each row up to its stop
        token (included if ``include_eos``), not the padding after it."""
        mask = torch.zeros_like(self.sequences, dtype=torch.bool)
        for row in range(self.sequences.shape[0]):
            n = len(self.tokens(row, include_eos=include_eos))
            mask[row, self.prompt_length:self.prompt_length + n] = True
        return mask

    def as_batch(self) -> dict:
        """The whole sequence as ``HookedVLM.forward`` keyword arguments, e.g. to run a
        streaming metric over the generated tokens in one forward::

            attention_share(model, gen.as_batch(), query=gen.generated_mask(), keys=["image"])

        (attention is causal, so each generated token's attention there is the attention
        it had when it was generated, under the same hooks)."""
        out = {k: v for k, v in self.inputs.items() if k != "image_embeds"}
        extra = self.sequences.shape[1] - self.prompt_length
        for k, fill in _PER_TOKEN_INPUTS.items():
            if out.get(k) is not None:
                out[k] = torch.cat([out[k], torch.full_like(out[k][:, :1], fill).expand(-1, extra)], dim=1)
        return dict(out, input_ids=self.sequences, attention_mask=self.attention_mask)


@contextlib.contextmanager
def step_hooks(model, hooks):
    """Attach ``hooks`` for one step and remove exactly those afterwards (what
    ``run_with_hooks`` does, without its sweep over every hook point of the model on exit,
    which costs more than a decode step of a deep model). Hooks that a hook adds during the
    step belong to the step's context level and are removed with it, as in
    ``run_with_hooks``."""
    if not hooks:
        yield
        return
    model.context_level += 1
    level = model.context_level
    added = []
    try:
        for name, fn in hooks:
            model._check_hook_name(name)
            points = [model.hook_dict[name]] if isinstance(name, str) else \
                [hp for n, hp in model.hook_dict.items() if name(n)]
            for hp in points:
                added.append((hp, hp.add_hook(fn, dir="fwd", level=level)))
        yield
    finally:
        for hp, handle in added:
            handle.hook.remove()
            hp.fwd_hooks.remove(handle)
        if any(h.context_level == level for hp in model.hook_dict.values() for h in hp.fwd_hooks + hp.bwd_hooks):
            model.reset_hooks(including_permanent=False, level=level)
        model.context_level -= 1


def check_left_padded(attention_mask: Tensor) -> None:
    """Raise unless every row is ``0 .. 0 1 .. 1`` with at least one real token."""
    m = attention_mask.bool()
    if not m[:, -1].all() or (m[:, 1:].int() < m[:, :-1].int()).any():
        raise ValueError("generation needs a left-padded batch (attention_mask rows 0..0 1..1, "
                         "last column real); got right or inner padding")


def _stop_tokens(model, eos_token_ids, stop_at_eos: bool) -> tuple[int, ...]:
    if not stop_at_eos:
        return ()
    if eos_token_ids is None:
        eos_token_ids = model.cfg.eos_token_id
        if eos_token_ids is None:
            raise ValueError("no stop token: pass eos_token_ids (the model config has no eos_token_id), "
                             "or stop_at_eos=False")
    eos = (int(eos_token_ids),) if isinstance(eos_token_ids, int) else tuple(int(e) for e in eos_token_ids)
    if not eos:
        raise ValueError("no EOS token ids given (use stop_at_eos=False to generate without stop tokens)")
    return eos


@torch.no_grad()
def generate(model, batch: Mapping, max_new_tokens: int, eos_token_ids: Iterable[int] | int | None = None,
             fwd_hooks: FwdHooks = None, *, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, freq_penalty: float = 0.0,
             repetition_penalty: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
             pad_token_id: int | None = None, output_logits: bool = False, use_past_kv_cache: bool = True,
             progress: bool = False, past_kv_cache: VLMKeyValueCache | None = None) -> Generation:
    """Decode up to ``max_new_tokens`` tokens per row, greedily or by sampling.

    Args:
        model: a `HookedVLM`.
        batch: keyword arguments of ``HookedVLM.forward`` (``input_ids``, optional left-padded
            ``attention_mask``, ``pixel_values``, ``image_grid_thw``, ``token_type_ids``).
        max_new_tokens: the most tokens to generate per row.
        eos_token_ids: the stop token(s); default ``model.cfg.eos_token_id``.
        fwd_hooks: a hook list (attached once) or a callable ``(batch, roles) -> hooks``
            called every step (see the module docstring).
        do_sample: sample instead of the argmax; ``temperature``, ``top_k`` or ``top_p``
            (top_k wins when both are given, as TransformerLens' ``sample_logits``),
            ``freq_penalty``, ``repetition_penalty`` shape the distribution.
        seed: seeds the sampling (the global RNG is restored afterwards).
        stop_at_eos: stop rows at their stop token (False: always ``max_new_tokens``).
        pad_token_id: what finished rows are continued with (default: the first stop id).
        output_logits: keep the fp32 logits of every step in `Generation.logits`.
        use_past_kv_cache: False reruns the whole sequence every step (the reference).
        progress: a tqdm bar over the steps.
        past_kv_cache: a cache already holding the first ``past_kv_cache.length`` columns of
            ``batch`` (prefilled by the caller: a prefix several conditions share,
            `mechvlm.prefix_sharing`). The first step runs the rest of the prompt over it;
            the cache grows in place. Hooks see those columns as a continuation; callable
            hooks get the whole ``batch`` and its roles. Without it, the prompt is prefilled
            into a new cache.

    Returns:
        a `Generation`; greedy ``sequences`` equal HF ``generate(do_sample=False)``'s.
    """
    from tqdm.auto import tqdm
    from transformer_lens.utilities.logits_utils import sample_logits

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    eos = _stop_tokens(model, eos_token_ids, stop_at_eos)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else model.cfg.pad_token_id or 0)
    device = model.device
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device=device, dtype=ids.dtype)
    done = 0 if past_kv_cache is None else past_kv_cache.length
    if done:
        if not use_past_kv_cache:
            raise ValueError("past_kv_cache needs use_past_kv_cache=True")
        if done >= ids.shape[1] or not torch.equal(past_kv_cache.input_ids.to(device), ids[:, :done]):
            raise ValueError(f"past_kv_cache must hold the first columns of batch's input_ids and leave at least "
                             f"one to run: it holds {done} columns, the prompt has {ids.shape[1]}, or they differ")
    check_left_padded(mask[:, done:])
    per_token = {k: batch[k].to(device) for k in _PER_TOKEN_INPUTS if batch.get(k) is not None}
    fixed = {k: v for k, v in batch.items()
             if k not in ("input_ids", "attention_mask") and k not in _PER_TOKEN_INPUTS and v is not None}
    eos_t = torch.tensor(eos, device=device, dtype=ids.dtype)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    prompt_length = ids.shape[1]
    last_hidden: list[Tensor] = []
    step_logits = []
    cache, spans = None, None
    if use_past_kv_cache:
        cache = past_kv_cache if past_kv_cache is not None else VLMKeyValueCache.init_cache(model.cfg, device, ids.shape[0])
        cache.reserve(prompt_length + max_new_tokens)
        cache.allow_image_token_ids = True  # a generated placeholder id is a text token, as in HF
    elif "image_embeds" not in fixed and "video_embeds" not in fixed:
        # the images and videos do not change between steps: encode them once
        fixed.update(model.visual_embeds(**dict(fixed, input_ids=ids, attention_mask=mask, **per_token)))
    static = list(fwd_hooks) if fwd_hooks is not None and not callable(fwd_hooks) else []

    def grab_last(module, args, output):
        last_hidden.append(output[:, -1])

    rng = contextlib.nullcontext()
    if seed is not None:
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    handle = model.ln_final.register_forward_hook(grab_last)
    try:
        with rng, forward_positions(0, continuation=True), model.hooks(fwd_hooks=static):
            if seed is not None:
                torch.manual_seed(seed)
            for step in tqdm(range(max_new_tokens), desc="generate", unit="token", disable=not progress):
                full = dict(fixed, input_ids=ids, attention_mask=mask, **per_token)
                hooks = []
                if callable(fwd_hooks):
                    if step == 0 or cache is None:
                        roles = model.roles(**full)
                        spans = roles.spans
                    else:  # the prompt's image spans; the generated tokens are text
                        real = mask.bool()
                        roles = compute_roles(model.cfg, ids, spans, None if bool(real.all()) else real)
                    hooks = user_hooks(fwd_hooks, full, roles)
                if cache is None:
                    inputs = full
                elif step == 0 and done:  # the rest of the prompt over the given prefix
                    inputs = {"input_ids": ids[:, done:], "attention_mask": mask[:, done:], "past_kv_cache": cache}
                elif step == 0:
                    inputs = dict(full, past_kv_cache=cache)
                else:
                    inputs = {"input_ids": ids[:, -1:], "past_kv_cache": cache}
                last_hidden.clear()
                with step_hooks(model, hooks):
                    model(**inputs, return_type=None)
                logits = model.unembed(last_hidden[-1]).float()
                if output_logits:
                    step_logits.append(logits)
                nxt = sample_logits(logits, top_k=top_k, top_p=top_p, temperature=temperature if do_sample else 0.0,
                                    freq_penalty=freq_penalty, repetition_penalty=repetition_penalty,
                                    tokens=ids).to(ids.dtype)
                nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                per_token = {k: torch.cat([v, torch.full_like(v[:, :1], _PER_TOKEN_INPUTS[k])], dim=1)
                             for k, v in per_token.items()}
                finished |= torch.isin(nxt, eos_t)
                if eos and finished.all():
                    break
    finally:
        handle.remove()
    return Generation(sequences=ids, prompt_length=prompt_length, finished=finished, eos_token_ids=eos,
                      logits=torch.stack(step_logits, dim=1) if output_logits else None,
                      attention_mask=mask, inputs={k: v for k, v in batch.items()
                                                   if k not in ("input_ids", "attention_mask") and v is not None})


def greedy_generate(model, batch: Mapping, max_new_tokens: int, eos_token_ids: Iterable[int] | int,
                    fwd_hooks: FwdHooks = None, *, pad_token_id: int | None = None,
                    output_logits: bool = False, use_past_kv_cache: bool = True,
                    progress: bool = False, past_kv_cache: VLMKeyValueCache | None = None) -> Generation:
    """Greedy decoding (HF ``generate(do_sample=False)``): `generate` with ``do_sample=False``."""
    return generate(model, batch, max_new_tokens, eos_token_ids, fwd_hooks, pad_token_id=pad_token_id,
                    output_logits=output_logits, use_past_kv_cache=use_past_kv_cache, progress=progress,
                    past_kv_cache=past_kv_cache)
