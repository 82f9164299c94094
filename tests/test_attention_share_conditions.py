"""`attention_share` under several conditions from one prefill per batch
(`mechvlm.metrics.attention_share_conditions`) against today's condition-by-condition path,
``attention_share(model, batch, fwd_hooks=condition)`` run per condition over the whole
prompt: the same raw masses and shares (fp32 tolerance), on Qwen2.5-VL (left padding, rows
of different lengths, a row with two images, an image-free row) and Gemma3, with a user hook
that forces the fallback, a declared custom condition, a hook at ``hook_pattern`` (that
layer reads the real pattern), a subset of layers. And `QueryAttention` over a KV cache
against the same query rows read in the full forward."""

from __future__ import annotations

import pytest
import torch

from conftest import qwen_batch
from mechvlm.interventions import knockout, knockout_reach
from mechvlm.interventions._common import pattern_query_range
from mechvlm.kv_cache import VLMKeyValueCache
from mechvlm.metrics import QueryAttention, attention_share, attention_share_conditions
from mechvlm.mmbench import CONDITIONS, Condition
from mechvlm.mmbench.conditions import condition_by_name
from test_prefix_sharing import QWEN_ROWS, _gemma, _gemma_batch, _present

TOL = 1e-5
#: key roles with mass from the prefix too (the text before the image attends "prefix" keys)
KEYS = ("image", "eoi", "prefix", "text")


def _reference(model, batches, conditions, **kw):
    """Today's path: each condition on its own, `attention_share` over the whole prompt."""
    out = {}
    for name, c in conditions.items():
        if isinstance(c, Condition) and c.prepare is not None:  # a step that may rewrite the batch
            batch, c = c.setup(model, batches)
            out[name] = attention_share(model, batch, fwd_hooks=c, progress=False, **kw)
        else:
            out[name] = attention_share(model, batches, fwd_hooks=c, progress=False, **kw)
    return out


def _assert_same(got, ref):
    assert list(got.results) == list(ref)
    for name, r in ref.items():
        g = got[name]
        assert g.layers == r.layers and g.keys == r.keys and torch.equal(g.n_queries, r.n_queries), name
        torch.testing.assert_close(g.raw, r.raw, atol=TOL, rtol=0, msg=name)
        torch.testing.assert_close(g.share, r.share, atol=TOL, rtol=0, equal_nan=True, msg=name)
        torch.testing.assert_close(g.head_share, r.head_share, atol=TOL, rtol=0, equal_nan=True, msg=name)


# ------------------------------------------------------------ QueryAttention + cache --
def _masses(qa_or_list, layers):
    return torch.stack([qa_or_list.results[l] for l in layers], dim=1)


def test_query_attention_over_a_kv_cache_equals_the_full_forward(qwen_model):
    """A prefill of the first ``c`` columns, then the rest over the cache (also frozen), with
    a post-softmax knockout and a pattern hook on layer 1: the query rows of the rest give the
    masses the full forward gives for the same rows (over every key column)."""
    model = qwen_model
    batch = _present(qwen_batch(QWEN_ROWS[:3], seed=7))
    roles = model.roles(**batch)
    n = roles.shape[1]
    c = n - 5  # past every row's left padding and images: a common split
    query = roles.real.clone()
    query[:, :c] = False  # the full forward's reference reads the same rows
    layers = [0, 1, 2]

    def halve_late_rows(pattern, hook):  # layer 1 materialises its pattern; rows from column c on edited
        start, stop = pattern_query_range(pattern)
        rows = torch.arange(start, stop) >= c
        return torch.where(rows[None, None, :, None], pattern * 0.5, pattern)

    def hooks_for(r):  # the prefix runs the knockout of its own roles (attention is causal)
        return knockout(r, "text", "image", mode="post_softmax_zero") + [("blocks.1.attn.hook_pattern", halve_late_rows)]

    ident = lambda l, mass: mass  # noqa: E731
    full_hooks = hooks_for(roles)
    full = QueryAttention(model, layers, query, ident, other_hooks=full_hooks)
    model.run_with_hooks(**batch, fwd_hooks=full_hooks + full.hooks(), return_type=None)
    assert full.pattern_layers == {1}
    for frozen in (False, True):
        cache = VLMKeyValueCache.init_cache(model.cfg, model.device, 3)
        prefix = {k: (v[:, :c] if k in ("input_ids", "attention_mask") else v) for k, v in batch.items()}
        model.run_with_hooks(**prefix, past_kv_cache=cache, fwd_hooks=hooks_for(model.roles(**prefix)),
                             return_type=None)
        if frozen:
            cache.freeze()
        hooks = hooks_for(roles)
        qa = QueryAttention(model, layers, query[:, c:], ident, other_hooks=hooks, kv_cache=cache)
        model.run_with_hooks(input_ids=batch["input_ids"][:, c:], attention_mask=batch["attention_mask"][:, c:],
                             past_kv_cache=cache, fwd_hooks=hooks + qa.hooks(), return_type=None)
        assert qa.pattern_layers == {1}
        assert cache.length == (c if frozen else n)
        torch.testing.assert_close(_masses(qa, layers), _masses(full, layers), atol=TOL, rtol=0)
    # without the cache's keys a continuation cannot be read: a clear error, not a number
    cache = VLMKeyValueCache.init_cache(model.cfg, model.device, 3)
    model(**prefix, past_kv_cache=cache, return_type=None)
    qa = QueryAttention(model, [0], query[:, c:], ident)
    with pytest.raises(ValueError, match="pass kv_cache="):
        model.run_with_hooks(input_ids=batch["input_ids"][:, c:], attention_mask=batch["attention_mask"][:, c:],
                             past_kv_cache=cache, fwd_hooks=qa.hooks(), return_type=None)
    qa = QueryAttention(model, [0], query, ident, kv_cache=cache)  # a mask over the whole prompt
    with pytest.raises(ValueError, match="new positions"):
        model.run_with_hooks(input_ids=batch["input_ids"][:, c:], attention_mask=batch["attention_mask"][:, c:],
                             past_kv_cache=cache, fwd_hooks=qa.hooks(), return_type=None)


# ----------------------------------------------------------------------- Qwen2.5-VL --
def test_qwen_table1_conditions_equal_condition_by_condition(qwen_model):
    """Two batches, every real token a query (so the query rows inside the shared prefix
    count: image tokens attend image keys there), stacked and forked."""
    batches = [_present(qwen_batch(QWEN_ROWS, seed=1)), _present(qwen_batch(QWEN_ROWS[:2], seed=8))]
    kw = dict(query="real", keys=KEYS)
    ref = _reference(qwen_model, batches, CONDITIONS, **kw)
    for stack in (True, False):
        got = attention_share_conditions(qwen_model, batches, None, progress=False, stack=stack, **kw)
        _assert_same(got, ref)
        assert got.shared_batches == {k: 2 for k in CONDITIONS} and got.n_batches == 2
        assert got.stacked_batches == {k: 2 if stack else 0 for k in CONDITIONS}
        assert all(not v for v in got.fallback.values())
    # the knockouts act (a test that could not fail otherwise): no text->image mass left
    image = ref["none"].keys.index("image")
    cut = got["text→image:pre_softmax_mask"].raw[..., image]
    assert (ref["none"].raw[..., image] - cut).min() > -TOL and (ref["none"].raw[..., image] - cut).max() > 0.1


def test_no_layer_materialises_its_pattern(qwen_model, monkeypatch):
    """The Table-1 conditions stream: no layer runs the explicit (pattern) attention, in the
    shared prefill, the stacked rest, or a forked one."""
    from mechvlm.components.attention import Attention

    def explicit(*a, **k):
        raise AssertionError("a layer materialised its attention pattern")

    monkeypatch.setattr(Attention, "_explicit", explicit)
    batch = _present(qwen_batch(QWEN_ROWS, seed=2))
    for stack in (True, False):
        got = attention_share_conditions(qwen_model, batch, None, progress=False, stack=stack)
        assert got.shared_batches == {k: 1 for k in CONDITIONS}


def test_qwen_text_queries_and_a_layer_subset(qwen_model):
    """The Table-1 reading (text queries, image vs EOI) on layers 0 and 2 only."""
    batch = _present(qwen_batch(QWEN_ROWS, seed=2))
    ref = _reference(qwen_model, batch, CONDITIONS, layers=[0, -1])
    got = attention_share_conditions(qwen_model, batch, list(CONDITIONS), layers=[0, -1], progress=False)
    _assert_same(got, ref)
    assert got["none"].layers == [0, 2]
    eoi = got["none"].keys.index("eoi")
    assert torch.allclose(got["text→EOI:post_softmax_zero"].raw[:3, ..., eoi], torch.zeros(()), atol=1e-6)


def test_qwen_user_hooks_fall_back_and_declared_ones_share(qwen_model):
    """A plain callable and an undeclared `Condition` run on their own; a declared knockout and
    a declared edit of layer 1's pattern share the prefix (that layer reads the edited
    pattern, the others stream)."""
    batch = _present(qwen_batch(QWEN_ROWS[:3], seed=3))
    ko = CONDITIONS["text→image:post_softmax_zero"]

    def shift_image_resid(batch, roles):  # touches the image tokens: must not share
        img = roles.image
        return [("blocks.0.hook_resid_post", lambda x, hook: torch.where(img[..., None], x + 1.0, x))]

    def halve_text_rows(batch, roles):  # edits layer 1's pattern at the reached text queries
        reach = knockout_reach(roles, "text", "image")

        def fn(pattern, hook):
            start, stop = pattern_query_range(pattern)
            return torch.where(reach[:, None, start:stop, None], pattern * 0.5, pattern)
        return [("blocks.1.attn.hook_pattern", fn)]

    conditions = {"none": CONDITIONS["none"], "ko": ko, "user": shift_image_resid,
                  "undeclared": Condition("undeclared", "custom", hooks=halve_text_rows),
                  "declared_ko": Condition("declared_ko", "custom", hooks=lambda b, r: ko(b, r),
                                           touches=lambda r: knockout_reach(r, "text", "image")),
                  "pattern_edit": Condition("pattern_edit", "custom", hooks=halve_text_rows,
                                            touches=lambda r: knockout_reach(r, "text", "image")),
                  "prune": condition_by_name("prune:dead:threshold=2")}  # a prepare step: removes image tokens
    kw = dict(query="real", keys=KEYS)
    ref = _reference(qwen_model, batch, conditions, **kw)
    got = attention_share_conditions(qwen_model, batch, conditions, progress=False, **kw)
    _assert_same(got, ref)
    assert {k for k, v in got.shared_batches.items() if v} == {"none", "ko", "declared_ko", "pattern_edit"}
    assert {k for k, v in got.stacked_batches.items() if v} == {"none", "ko"}
    assert "does not declare" in next(iter(got.fallback["undeclared"]))
    assert set(got.fallback["user"]) and set(got.fallback["prune"]) and not got.fallback["pattern_edit"]
    for name in ("user", "pattern_edit"):  # the hooks did act
        assert (got[name].raw - got["none"].raw).abs().max() > 1e-2, name


def test_sharing_off_and_the_journal(qwen_model, tmp_path):
    from mechvlm.journal import Journal

    batches = [_present(qwen_batch(QWEN_ROWS[:2], seed=s)) for s in (4, 5)]
    two = {k: CONDITIONS[k] for k in ("none", "text→EOI:pre_softmax_mask")}
    off = attention_share_conditions(qwen_model, batches, two, share_prefix=False, progress=False)
    assert off.fallback["none"] == {"prefix sharing off": 2} and not any(off.shared_batches.values())
    _assert_same(off, _reference(qwen_model, batches, two))
    header = {"run": "test"}
    with Journal.open(tmp_path, header, resume=False) as j:
        first = attention_share_conditions(qwen_model, batches, two, progress=False, journal=j.task("share"))
    with Journal.open(tmp_path, header, resume=True) as j:
        again = attention_share_conditions(qwen_model, batches, two, progress=False, journal=j.task("share"))
        assert j.reused == 2 and j.written == 0
    for name in two:
        assert torch.equal(again[name].raw, first[name].raw)
    with Journal.open(tmp_path, header, resume=True) as j, pytest.raises(ValueError, match="start again"):
        attention_share_conditions(qwen_model, batches, ["none"], progress=False, journal=j.task("share"))
    assert again.to_dict()["shared_batches"] == first.to_dict()["shared_batches"] == {k: 2 for k in two}
    _assert_same(first, _reference(qwen_model, batches, two))


# -------------------------------------------------------------------------- Gemma3 --
def test_gemma_conditions_equal_condition_by_condition():
    """Bidirectional image blocks, two images in a row, rows split at different columns
    (wide window); with a narrow window the split moves padding, so all fall back."""
    model = _gemma(sliding_window=64)
    batch = _gemma_batch([[3, "image", 5], [1, "image", "image", 9], [6, "image", 2]])
    for kw in (dict(query="real", keys=KEYS), dict(layers=[1])):
        ref = _reference(model, batch, CONDITIONS, **kw)
        got = attention_share_conditions(model, batch, None, progress=False, **kw)
        _assert_same(got, ref)
        assert got.shared_batches == {k: 1 for k in CONDITIONS}
    narrow = _gemma(sliding_window=6)
    apart = _gemma_batch([[3, "image", 5], [6, "image", 2]], seed=6)
    two = {k: CONDITIONS[k] for k in ("none", "text→image:post_softmax_zero")}
    got = attention_share_conditions(narrow, apart, two, progress=False, query="real", keys=KEYS)
    _assert_same(got, _reference(narrow, apart, two, query="real", keys=KEYS))
    assert "sliding window" in next(iter(got.fallback["none"]))


# ------------------------------------------------------------------------ LLaVA --
def test_llava_onevision_rows_share_the_prefix():
    """Anyres tiles (image_sizes, images per row) re-laid and stacked along the batch."""
    from llava_helpers import llava_batch, make_hf_llava

    from mechvlm import HookedVLM

    hf = make_hf_llava("llava_onevision")
    model = HookedVLM.from_hf(hf)
    batch = llava_batch(hf, [[3, "image", 2], [4, "image", "image", 1]], [(50, 70), (20, 40), (40, 20)], seed=1,
                        per_row_images=True)
    conds = {k: CONDITIONS[k] for k in ("none", "text→image:pre_softmax_mask", "text→image:post_softmax_zero")}
    kw = dict(query="real", keys=("image", "prefix", "text"))
    got = attention_share_conditions(model, batch, conds, progress=False, **kw)
    _assert_same(got, _reference(model, batch, conds, **kw))
    assert got.stacked_batches == {k: 1 for k in conds}


def test_videos_and_a_registering_model_run_each_condition_on_its_own(qwen_model):
    """The fallbacks of `generate_conditions`: a batch with videos (its text positions do not
    continue from the video's largest one) and a model whose forward is wrapped."""
    from test_qwen_video import video_batch

    from mechvlm.training import Registering, apply_registering
    from mechvlm.training.registers import set_registering

    two = {k: CONDITIONS[k] for k in ("none", "text→image:pre_softmax_mask")}
    video = video_batch([[2, ("video", 2, 4, 4), 3], [4, ("video", 2, 4, 4), 1]], seed=9, seconds=[0.5, 1.0])
    got = attention_share_conditions(qwen_model, video, two, progress=False, query="real", keys=KEYS)
    _assert_same(got, _reference(qwen_model, video, two, query="real", keys=KEYS))
    assert "videos" in next(iter(got.fallback["none"]))
    batch = _present(qwen_batch(QWEN_ROWS[:2], seed=6))
    set_registering(qwen_model, None, Registering.parse("eoi"))
    try:
        handle = apply_registering(qwen_model)
        try:
            ref = _reference(qwen_model, batch, two, query="real", keys=KEYS)
            got = attention_share_conditions(qwen_model, batch, two, progress=False, query="real", keys=KEYS)
        finally:
            handle.remove()
    finally:
        set_registering(qwen_model, None, Registering())
        qwen_model.cfg.registering = None
    _assert_same(got, ref)
    assert "wrapped" in next(iter(got.fallback["none"])) and not any(got.shared_batches.values())
