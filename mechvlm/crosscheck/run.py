"""`crosscheck`: the same experiments on mechvlm and on the HF model traced by nnsight."""

from __future__ import annotations

import time

import torch
from torch import nn

from mechvlm.crosscheck import mechvlm_side as mech
from mechvlm.crosscheck.hf_roles import hf_roles, special_ids
from mechvlm.crosscheck.hf_side import EagerTwin, eager_copy, hf_inputs
from mechvlm.crosscheck.inputs import as_batch, build_inputs, load_hf_eager
from mechvlm.crosscheck.report import CrosscheckReport
from mechvlm.crosscheck.share import share_from_patterns
from mechvlm.crosscheck.tolerances import LOW_PRECISION, Tol, tolerances_for

KNOCKOUT_KEYS = ("image", "eoi")
KNOCKOUT_MODES = ("post_softmax_zero", "pre_softmax_mask")


def crosscheck(
    model: nn.Module | str,
    batch: dict | None = None,
    *,
    hooked=None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    image=None,
    prompt: str | None = None,
    seed: int = 0,
    knockouts: bool = True,
    share: bool = True,
    tolerances: dict[str, Tol] | None = None,
    reference_fp32: bool | None = None,
    **hf_kwargs,
) -> CrosscheckReport:
    """Run the same experiments on mechvlm and on the untouched HF model (eager attention,
    traced with nnsight) and compare them.

    Args:
        model: an in-memory HF ``Qwen2_5_VLForConditionalGeneration`` /
            ``Gemma3ForConditionalGeneration`` / ``Llava(Next|Onevision)ForConditionalGeneration``
            (not modified: the nnsight side works on a
            deepcopy switched to eager attention, mechvlm copies the weights), or a hub id /
            local HF directory (loaded once, in eager attention).
        batch: model inputs (``input_ids``, ``pixel_values``, ``image_grid_thw`` for Qwen,
            optional ``attention_mask``, videos, ``image_sizes`` for LLaVA-NeXT; processor
            outputs may be passed as they are).
            Default: the processor of ``model`` (a path) on ``image``/``prompt``, or a
            synthetic prompt of the model's family when there is no processor.
        hooked: the `HookedVLM` to check (default: ``HookedVLM.from_hf(model)``); lets a
            test check a deliberately broken one.
        dtype, device: where both sides run (default: the HF model's).
        knockouts: also compare text->image / text->EOI knockouts in both modes (text->EOI is
            skipped, and listed in ``report.skipped``, for a model without EOI).
        share: also compare the text->{image, EOI} attention share per layer and head
            (text->{image, text} for a model without EOI, e.g. LLaVA).
        tolerances: per-kind overrides of `tolerances_for(dtype)`.
        reference_fp32: in bf16 / fp16, also trace an fp32 copy of the HF reference (same
            rounded weights) to measure HF's own rounding error, which sets the bounds
            (default True in low precision; False: fixed bounds, no extra copy).
        **hf_kwargs: passed to HF ``from_pretrained`` / ``AutoProcessor`` for a path.

    Compared (mechvlm vs HF, over real tokens): role masks; the embeddings and every
    layer's output (HF hidden states) and the final norm; every layer's attention
    pattern; logits; knockout logits; the attention share. See `CrosscheckReport`.
    """
    from mechvlm import HookedVLM

    t_start = time.perf_counter()
    if isinstance(model, str):
        source = model
        twin_hf = load_hf_eager(model, dtype=dtype, device=device, **hf_kwargs)
        name = model
    else:
        source = None
        twin_hf = eager_copy(model, dtype=dtype, device=device)
        name = type(model).__name__
    if hooked is None:
        hooked = HookedVLM.from_hf(twin_hf if source else model, dtype=twin_hf.dtype, device=twin_hf.device)
    if hooked.dtype != twin_hf.dtype:
        raise ValueError(f"the hooked model runs in {hooked.dtype}, the HF reference in {twin_hf.dtype}")
    config = twin_hf.config
    if batch is None:
        batch, made = build_inputs(config, source, image=image, prompt=prompt, seed=seed, **hf_kwargs)
    else:
        made = "given"
    batch = as_batch(batch)
    low = twin_hf.dtype in LOW_PRECISION
    if reference_fp32 is None:
        reference_fp32 = low
    twin32 = None
    if reference_fp32 and low:  # a copy before any nnsight wrapping (see hf_side)
        twin32 = EagerTwin(eager_copy(twin_hf, dtype=torch.float32))
    twin = EagerTwin(twin_hf)
    dev = twin_hf.device
    kw = hf_inputs(config, batch, twin_hf.dtype, dev)
    kw32 = hf_inputs(config, batch, torch.float32, dev) if twin32 else None
    roles = hf_roles(config, batch["input_ids"].to(dev), kw.get("attention_mask"))
    real = roles.real

    keys = tuple(k for k in KNOCKOUT_KEYS if k != "eoi" or special_ids(config)["eoi"] is not None)
    report = CrosscheckReport(model=f"{name} [{config.model_type}, {twin.n_layers} layers, {made} inputs, "
                                    f"{tuple(batch['input_ids'].shape)} tokens]",
                              dtype=str(twin_hf.dtype).replace("torch.", ""),
                              tolerances=tolerances_for(twin_hf.dtype, tolerances,
                                                        measured_noise=twin32 is not None))
    if keys != KNOCKOUT_KEYS:
        report.skipped["text->eoi"] = f"{config.model_type} has no end-of-image token (no EOI role)"
    t_runs = time.perf_counter()

    # token roles: mechvlm's own against the independent derivation from input_ids
    mroles = hooked.roles(**mech.model_inputs(hooked, batch))
    for r in ("text", "image", "eoi"):  # a missing EOI role is all False on both sides
        report.add(f"roles/{r}", None, "roles", getattr(mroles, r).float(), getattr(roles, r).float())

    # clean run: residual stream, patterns, logits
    ref = twin.run_clean(kw)
    r32 = twin32.run_clean(kw32) if twin32 else None
    ours = mech.run_clean(hooked, batch)
    pair = real[:, None, :, None] & real[:, None, None, :]
    report.add("embed", 0, "activation", ours.embed, ref.embed, real, r32 and r32.embed, note="input of layer 0")
    for l in range(twin.n_layers):
        report.add("pattern", l, "pattern", ours.patterns[l], ref.patterns[l], pair, r32 and r32.patterns[l])
        report.add("resid_post", l, "activation", ours.resid_post[l], ref.resid_post[l], real,
                   r32 and r32.resid_post[l])
    report.add("final_norm", None, "activation", ours.final_norm, ref.final_norm, real, r32 and r32.final_norm,
               note="HF hidden_states[-1]")
    report.add("logits", None, "logits", ours.logits, ref.logits, real, r32 and r32.logits)

    if knockouts:
        for mode in KNOCKOUT_MODES:
            for key in keys:
                cut = (roles.text[:, :, None] & roles.key(key)[:, None, :])[:, None]
                ref_ko = twin.run_knockout(kw, cut, mode)
                ko32 = twin32.run_knockout(kw32, cut, mode).logits if twin32 else None
                ours_ko = mech.run_knockout(hooked, batch, key, mode)
                label = f"knockout {mode} text->{key}"
                report.add(f"{label} logits", None, "logits", ours_ko.logits, ref_ko.logits, real, ko32)
                report.effects[label] = float((ref_ko.logits - ref.logits).float().abs()[real].max()) \
                    if bool(real.any()) else 0.0

    if share:
        share_keys = keys if "eoi" in keys else ("image", "text")  # image vs text when there is no EOI
        key_masks = {k: roles.key(k) for k in share_keys}
        ref_share = share_from_patterns(ref.patterns, roles.text, key_masks)
        share32 = share_from_patterns(r32.patterns, roles.text, key_masks) if r32 else None
        our_share, report.share_source = mech.attention_share(hooked, batch, ours.patterns, share_keys)
        for key in share_keys:
            for l in range(twin.n_layers):
                report.add(f"share/{key}", l, "share", our_share[key][l], ref_share[key][l],
                           ref32=share32 and share32[key][l])

    end = time.perf_counter()
    forward_s = mech.time_forward(hooked, mech.model_inputs(hooked, batch))  # not counted in crosscheck_s
    report.timing = {"crosscheck_s": end - t_start, "setup_s": t_runs - t_start, "runs_s": end - t_runs,
                     "mechvlm_forward_s": forward_s, "ratio": (end - t_start) / forward_s}
    return report


@torch.no_grad()
def perturb_layer(hooked, layer: int, delta: float = 0.5) -> None:
    """For testing the cross-check: add ``delta`` to one entry of layer ``layer``'s
    query projection (head 0), so that mechvlm diverges from HF from that layer on."""
    hooked.blocks[layer].attn.q_proj.weight[0, 0] += delta
