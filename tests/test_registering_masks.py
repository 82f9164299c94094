"""MITRE and Gisting masks (`mechvlm.interventions.masks`) against matrices built by hand
from the token ids, following zhiqu22/mitre ``build_future_mask`` and jayelm/gisting
``make_gist_mask``; and `apply_registering`, the mask a Registering checkpoint carries."""

from __future__ import annotations

import torch

from conftest import qwen_batch
from mechvlm.interventions import gist_mask, knockout, mitre_mask, register_mask
from mechvlm.synthetic import QWEN_IDS


def _captured_masks(model, batch, hooks):
    """The bool mask every layer's attention gets, recorded after ``hooks``."""
    seen = {}

    def grab(mask, hook):
        seen[hook.name] = mask.clone()

    names = [f"blocks.{l}.attn.hook_attn_mask" for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        model.run_with_hooks(**batch, fwd_hooks=list(hooks) + [(n, grab) for n in names])
    return [seen[n][:, 0] for n in names]


def _by_hand(batch, rule):
    """``[batch, q, k]``: causal + key padding, then ``rule(row, q, k, allowed, kinds)``."""
    ids = batch["input_ids"]
    real = batch["attention_mask"].bool() if batch.get("attention_mask") is not None else torch.ones_like(ids).bool()
    b, n = ids.shape
    out = torch.zeros(b, n, n, dtype=torch.bool)
    for r in range(b):
        row = ids[r].tolist()
        first_image = row.index(QWEN_IDS["image"])
        kinds = []
        for p, t in enumerate(row):
            if not real[r, p]:
                kinds.append("pad")
            elif t == QWEN_IDS["image"]:
                kinds.append("image")
            elif t == QWEN_IDS["vision_end"]:
                kinds.append("eoi")
            elif p > first_image and t not in (QWEN_IDS["vision_start"],):
                kinds.append("text")
            else:
                kinds.append("prefix")
        for q in range(n):
            for k in range(n):
                allowed = bool(k <= q and real[r, k])
                out[r, q, k] = rule(q, k, allowed, kinds)
    return out


def test_mitre_mask_is_the_hand_built_matrix(qwen_model):
    batch = qwen_batch([[3, (1, 4, 4), 5], [2, (1, 4, 6), 3]], seed=2)

    def mitre(q, k, allowed, kinds):  # [src | registers | tgt]; src = image, registers = EOI
        prefix = ("image", "eoi")
        if kinds[q] in prefix and kinds[k] in prefix and kinds[k] != "pad":
            allowed = True  # the prefix is bidirectional
        if kinds[q] == "image" and kinds[k] == "eoi":
            allowed = False  # source rows cannot see the registers
        if kinds[q] == "text" and kinds[k] == "image":
            allowed = False  # target rows cannot see the source
        return allowed

    want = _by_hand(batch, mitre)
    roles = qwen_model.roles(**batch)
    for got in _captured_masks(qwen_model, batch, mitre_mask(roles, registers="eoi")):
        assert torch.equal(got, want)
    assert not torch.equal(want, _by_hand(batch, lambda q, k, a, kinds: a))  # the rule changes something


def test_gist_mask_is_the_hand_built_matrix(qwen_model):
    batch = qwen_batch([[3, (1, 4, 4), 5], [2, (1, 4, 6), 3]], seed=3)
    roles = qwen_model.roles(**batch)
    gists = roles.eoi | roles.image_start  # two gist tokens per row, the image between them

    want = _by_hand(batch, lambda q, k, allowed, kinds: allowed)
    for r in range(2):  # after the last gist: nothing before the first

        pos = gists[r].nonzero().squeeze(1).tolist()
        first, last = pos[0], pos[-1]
        assert last - first > 1
        want[r, last + 1:, :first] = False
    got_all = _captured_masks(qwen_model, batch, gist_mask(roles, gists=gists))
    for got in got_all:
        assert torch.equal(got, want)
    # a row without a gist token is left as it was
    none = torch.zeros_like(gists)
    for got in _captured_masks(qwen_model, batch, gist_mask(roles, gists=none)):
        assert torch.equal(got, _by_hand(batch, lambda q, k, a, kinds: a))


def test_apply_registering_masks_every_forward_and_comes_off(qwen_model):
    from mechvlm.training import Registering, apply_registering
    from mechvlm.training.registers import set_registering

    model = qwen_model
    batch = qwen_batch([[3, (1, 4, 4), 5], [2, (1, 4, 6), 3]], seed=4)
    roles = model.roles(**batch)
    with torch.no_grad():
        plain = model(**batch)
        masked = model.run_with_hooks(**batch, fwd_hooks=register_mask(roles, registers=["eoi", "register"]))
        both = model.run_with_hooks(**batch, fwd_hooks=register_mask(roles, registers=["eoi", "register"])
                                    + knockout(roles, query="text", key="eoi", mode="pre_softmax_mask"))
    set_registering(model, None, Registering.parse("eoi"))
    try:
        handle = apply_registering(model)
        assert apply_registering(model) is handle  # idempotent
        with torch.no_grad():
            assert torch.equal(model(**batch), masked)
            assert torch.equal(model({k: v for k, v in batch.items() if v is not None}), masked)  # mapping form
            assert torch.equal(model.run_with_hooks(**batch, fwd_hooks=knockout(
                roles, query="text", key="eoi", mode="pre_softmax_mask")), both)
            model.reset_hooks()  # permanent: survives a reset
            assert torch.equal(model(**batch), masked)
        handle.remove()
        with torch.no_grad():
            assert torch.equal(model(**batch), plain)
    finally:
        set_registering(model, None, Registering())
        model.cfg.registering = None
    assert not torch.equal(plain, masked)


def test_installed_mask_covers_kv_cache_generation(qwen_model):
    """A KV-cache step runs only the new tokens; the installed mask must still be the
    prompt's (text never reads the image). Reference: `generate` without a cache on the
    plain model, the mask passed as a per-step hook callable."""
    from mechvlm.generation import generate
    from mechvlm.training import Registering, apply_registering
    from mechvlm.training.registers import set_registering

    model = qwen_model
    batch = qwen_batch([[3, (1, 4, 4), 5], [2, (1, 4, 6), 3]], seed=5)
    batch = {k: v for k, v in batch.items() if v is not None}
    per_step = lambda b, roles: register_mask(roles, registers=["eoi", "register"])  # noqa: E731
    with torch.no_grad():
        ref = generate(model, batch, 4, fwd_hooks=per_step, use_past_kv_cache=False, output_logits=True,
                       stop_at_eos=False)
        plain = generate(model, batch, 4, use_past_kv_cache=True, output_logits=True, stop_at_eos=False)
    set_registering(model, None, Registering.parse("eoi"))
    try:
        handle = apply_registering(model)
        with torch.no_grad():
            cached = generate(model, batch, 4, use_past_kv_cache=True, output_logits=True, stop_at_eos=False)
        handle.remove()
    finally:
        set_registering(model, None, Registering())
        model.cfg.registering = None
    assert torch.allclose(torch.as_tensor(cached.logits), torch.as_tensor(ref.logits), atol=1e-4)
    assert not torch.allclose(torch.as_tensor(plain.logits), torch.as_tensor(ref.logits), atol=1e-2)


def test_registering_is_refused_on_a_model_without_an_eoi():
    """LLaVA has no end-of-image token: the ``eoi`` variant and inserted registers (placed
    at the EOI) are refused by name instead of copying an undefined row."""
    import pytest

    from llava_helpers import make_hf_llava
    from mechvlm import HookedVLM
    from mechvlm.training import Registering, add_register_token

    hf = make_hf_llava("llava", n_layers=1, d_model=32)
    model = HookedVLM.from_hf(hf)
    w_e = model.embed.W_E.detach().clone()
    for spec in ("eoi", "16"):
        with pytest.raises(ValueError, match="end-of-image token"):
            add_register_token(model, None, hf.config, Registering.parse(spec))
    assert torch.equal(model.embed.W_E, w_e) and getattr(model.cfg, "registering", None) in (None, {})
    add_register_token(model, None, hf.config, Registering.parse("none"))  # plain fine-tuning is fine
