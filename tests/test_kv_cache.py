"""`VLMKeyValueCache` against full forwards: a prefill then continuations of one or several
tokens (with a mask over the new tokens or over the whole sequence), forks, re-batched rows,
a frozen cache, what the cache holds after hook edits, and the errors of a wrong setup."""

from __future__ import annotations

import pytest
import torch

from conftest import qwen_batch
from mechvlm.kv_cache import VLMKeyValueCache
from mechvlm.synthetic import QWEN_IDS

TOL = 1e-4


@pytest.fixture(scope="module")
def prompt():
    return {k: v for k, v in qwen_batch([[3, (1, 4, 6), 5], [2, (1, 4, 4), 7]], seed=21).items() if v is not None}


def _suffix(n, rows=2, seed=0):
    return torch.randint(5, 200, (rows, n), generator=torch.Generator().manual_seed(seed))


def _full(prompt, suffix):
    return dict(prompt, input_ids=torch.cat([prompt["input_ids"], suffix], 1),
                attention_mask=torch.cat([prompt["attention_mask"], torch.ones_like(suffix)], 1))


def _prefill(model, prompt):
    cache = VLMKeyValueCache.init_cache(model.cfg, model.device, prompt["input_ids"].shape[0])
    with torch.no_grad():
        model(**prompt, past_kv_cache=cache)
    return cache


@torch.no_grad()
def test_prefix_then_suffixes_equal_full_forward(qwen_model, prompt):
    suffix = _suffix(5)
    ref = qwen_model(**_full(prompt, suffix))[:, -5:]
    cache = _prefill(qwen_model, prompt)
    a = qwen_model(suffix[:, :3], past_kv_cache=cache)  # several tokens at once, no mask
    b = qwen_model(suffix[:, 3:], attention_mask=_full(prompt, suffix)["attention_mask"], past_kv_cache=cache)
    assert (torch.cat([a, b], 1) - ref).abs().max() <= TOL
    p = prompt["input_ids"].shape[1]
    assert cache.length == p + 5 and cache[0].past_keys.shape == (2, p + 5, qwen_model.cfg.n_kv_heads,
                                                                   qwen_model.cfg.d_head)
    assert torch.equal(cache.input_ids, _full(prompt, suffix)["input_ids"])


@torch.no_grad()
def test_fork_rows_and_frozen(qwen_model, prompt):
    cache = _prefill(qwen_model, prompt)
    p = cache.length
    x, y = _suffix(2, seed=1), _suffix(2, seed=2)
    fork = cache.fork()
    out_x = qwen_model(x, past_kv_cache=cache)
    out_y = qwen_model(y, past_kv_cache=fork)
    assert (out_x - qwen_model(**_full(prompt, x))[:, -2:]).abs().max() <= TOL
    assert (out_y - qwen_model(**_full(prompt, y))[:, -2:]).abs().max() <= TOL
    # one prefix, two conditions stacked along the batch: rows a, a, b, b
    stacked = _prefill(qwen_model, prompt).repeat_interleave(2)
    z = _suffix(3, rows=4, seed=3)
    out = qwen_model(z, past_kv_cache=stacked)
    rep = {k: v.repeat_interleave(2, 0) if k in ("input_ids", "attention_mask") else v for k, v in prompt.items()}
    rep["pixel_values"] = torch.cat([prompt["pixel_values"][:24]] * 2 + [prompt["pixel_values"][24:]] * 2)
    rep["image_grid_thw"] = prompt["image_grid_thw"].repeat_interleave(2, 0)
    assert (out - qwen_model(**_full(rep, z))[:, -3:]).abs().max() <= TOL
    assert [(s.row, s.image) for s in stacked.spans] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    frozen = _prefill(qwen_model, prompt)
    frozen.freeze()
    assert (qwen_model(x, past_kv_cache=frozen) - out_x).abs().max() <= TOL
    assert frozen.length == p and frozen[1].length == p


@torch.no_grad()
def test_cache_holds_the_prefill_edits(qwen_model, prompt):
    edit = [("blocks.0.attn.hook_v", lambda v, hook: v * 1.5), ("blocks.0.attn.hook_rot_k", lambda k, hook: -k)]
    cache = VLMKeyValueCache.init_cache(qwen_model.cfg, qwen_model.device, 2)
    qwen_model.run_with_hooks(**prompt, past_kv_cache=cache, fwd_hooks=edit)
    _, acts = qwen_model.run_with_cache(**prompt, names_filter=lambda n: n in ("blocks.0.attn.hook_v",
                                                                              "blocks.0.attn.hook_rot_k"))
    assert torch.allclose(cache[0].past_values, 1.5 * acts["blocks.0.attn.hook_v"])
    assert torch.allclose(cache[0].past_keys, -acts["blocks.0.attn.hook_rot_k"])
    # later tokens (run without hooks) read the edited entries: a full forward that edits the
    # prompt's positions only
    p = cache.length
    x = _suffix(2, seed=4)
    out = qwen_model(x, past_kv_cache=cache)
    on_prompt = [(name, lambda t, hook, f=f: torch.cat([f(t[:, :p], hook), t[:, p:]], 1)) for name, f in edit]
    ref = qwen_model.run_with_hooks(**_full(prompt, x), fwd_hooks=on_prompt)[:, -2:]
    assert (out - ref).abs().max() <= TOL
    assert (out - qwen_model(**_full(prompt, x))[:, -2:]).abs().max() > 1e-2


@torch.no_grad()
def test_wrong_continuations_raise_and_roll_back(qwen_model, prompt):
    cache = _prefill(qwen_model, prompt)
    p = cache.length
    image = torch.full((2, 1), QWEN_IDS["image"])
    with pytest.raises(ValueError, match="image tokens"):
        qwen_model(image, past_kv_cache=cache)
    with pytest.raises(ValueError, match="text tokens only"):
        qwen_model(_suffix(1), pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"],
                   past_kv_cache=cache)
    with pytest.raises(ValueError, match="2 rows"):
        qwen_model(_suffix(1, rows=3), past_kv_cache=cache)
    with pytest.raises(ValueError, match="attention_mask"):
        qwen_model(_suffix(2), attention_mask=torch.ones(2, 5, dtype=torch.long), past_kv_cache=cache)

    def boom(t, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        qwen_model.run_with_hooks(_suffix(2), past_kv_cache=cache, fwd_hooks=[("blocks.2.hook_resid_pre", boom)])
    assert cache.length == p and all(e.length == p for e in cache.entries)
    x = _suffix(2, seed=5)
    assert (qwen_model(x, past_kv_cache=cache) - qwen_model(**_full(prompt, x))[:, -2:]).abs().max() <= TOL
