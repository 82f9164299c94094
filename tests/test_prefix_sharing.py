"""Several conditions from one prefill (`mechvlm.prefix_sharing`) against running each
condition on its own (`greedy_generate` with the condition's hooks over the whole prompt):
the same generated tokens and the same logits (fp32 tolerance), on Qwen2.5-VL and Gemma3,
with left padding, several images per row, and custom hooks that force the fallback. The
declared reach of a knockout is checked against brute force (the residual stream with and
without the knockout), and the prefill is counted (the images are encoded once)."""

from __future__ import annotations

import collections
import importlib
import json

import pytest
import torch

from conftest import qwen_batch
from mechvlm import HookedVLM
from mechvlm.generation import greedy_generate
from mechvlm.interventions import knockout, knockout_reach
from mechvlm.mmbench import CONDITIONS, Condition
from mechvlm.prefix_sharing import generate_conditions, plan_shared_prefix
from mechvlm.synthetic import GEMMA3_IDS, gemma3_config, gemma3_pixel_values, gemma3_prompt, left_pad

NEVER = 10**6  # an EOS id no model emits: every row runs all steps
STEPS = 4
TOL = 1e-4


def _present(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if v is not None}


def _one_by_one(model, batch, conditions, steps=STEPS):
    """The reference: each condition on its own, the prompt prefilled with its hooks."""
    out = {}
    for name, c in conditions.items():
        run_batch, hooks = c.setup(model, batch) if isinstance(c, Condition) else (batch, c)
        out[name] = greedy_generate(model, run_batch, steps, [NEVER], fwd_hooks=hooks, output_logits=True)
    return out


def _assert_same(got, ref):
    assert list(got) == list(ref)
    for name in ref:
        assert torch.equal(got[name].sequences, ref[name].sequences), name
        assert torch.equal(got[name].attention_mask, ref[name].attention_mask), name
        assert got[name].prompt_length == ref[name].prompt_length
        torch.testing.assert_close(got[name].logits, ref[name].logits, atol=TOL, rtol=0, msg=name)


class ImageEmbedCount:
    """A ``hook_image_embeds`` hook counting the forwards that encode images."""

    def __init__(self):
        self.n = 0

    def __call__(self, x, hook):
        self.n += 1
        return x


def _run(model, batch, conditions, **kw):
    counter = ImageEmbedCount()
    with model.hooks(fwd_hooks=[("hook_image_embeds", counter)]):
        gens, plan = generate_conditions(model, batch, conditions, STEPS, [NEVER], output_logits=True, **kw)
    return gens, plan, counter.n


# ----------------------------------------------------------------------- Qwen2.5-VL --
#: rows of different lengths (left padding, images ending at different columns), a row
#: with two images in a row, and an image-free row.
QWEN_ROWS = [[4, (1, 4, 6), 6], [2, (1, 4, 4), 9], [3, (1, 4, 4), (1, 4, 4), 5], [7]]


def test_qwen_table1_conditions_share_one_prefill(qwen_model):
    batch = _present(qwen_batch(QWEN_ROWS, seed=1))
    ref = _one_by_one(qwen_model, batch, CONDITIONS)
    for stack in (True, False):  # side by side along the batch, or each from a fork of the cache
        gens, plan, encoded = _run(qwen_model, batch, CONDITIONS, stack=stack)
        _assert_same(gens, ref)
        assert plan.shared == list(CONDITIONS) and not plan.fallback and encoded == 1
        assert plan.stacked == (list(CONDITIONS) if stack else [])
    assert not plan.common  # rows split at different columns: padding moved between prefix and rest
    roles = qwen_model.roles(**batch)
    first_text = [int(r.nonzero()[0]) for r in roles.text[:3]]
    assert plan.boundary[:3].tolist() == first_text  # everything up to the first text token is shared


def test_qwen_stop_tokens_end_each_condition_as_its_own_run(qwen_model):
    """Stacked along the batch, the conditions run until all rows stopped; each condition's
    part is cut to the steps its own run takes (same sequences, finished, logits)."""
    batch = _present(qwen_batch(QWEN_ROWS[:2], seed=5))
    free = greedy_generate(qwen_model, batch, 3, [NEVER])
    eos = [int(free.new_tokens[0, 1]), int(free.new_tokens[1, 2])]  # "none" stops after 3 steps
    ref = {k: greedy_generate(qwen_model, batch, 6, eos, fwd_hooks=c, output_logits=True)
           for k, c in CONDITIONS.items()}
    gens, plan = generate_conditions(qwen_model, batch, CONDITIONS, 6, eos, output_logits=True)
    assert plan.stacked == list(CONDITIONS)
    _assert_same(gens, ref)
    assert ref["none"].new_tokens.shape[1] < 6  # stopped early, unlike the stacked run as a whole
    for k in CONDITIONS:
        assert torch.equal(gens[k].finished, ref[k].finished)


def test_qwen_user_hook_falls_back(qwen_model):
    batch = _present(qwen_batch(QWEN_ROWS[:3], seed=2))
    ko = CONDITIONS["text→image:post_softmax_zero"]

    def shift_image_resid(batch, roles):  # touches the image tokens: cannot be shared
        img = roles.image

        def fn(x, hook):
            if x.shape[1] != img.shape[1]:  # a generation step: the new token is text
                return x
            return torch.where(img[..., None].to(x.device), x + 1.0, x)
        return [("blocks.1.hook_resid_post", fn)]

    def last_token_mlp(x, hook):  # an arbitrary hook list: nothing declared
        x[:, -1] = 0
        return x

    conditions = {"none": CONDITIONS["none"], "ko": ko, "user": shift_image_resid,
                  "user_list": [("blocks.0.hook_mlp_out", last_token_mlp)],
                  "user_condition": Condition("user_condition", "custom", hooks=shift_image_resid),
                  "declared": Condition("declared", "declared", hooks=lambda b, r: ko(b, r),
                                        touches=lambda r: knockout_reach(r, "text", "image"))}
    ref = _one_by_one(qwen_model, batch, conditions)
    gens, plan, encoded = _run(qwen_model, batch, conditions)
    _assert_same(gens, ref)
    assert plan.shared == ["none", "ko", "declared"]
    assert set(plan.fallback) == {"user", "user_list", "user_condition"}
    assert "does not declare" in plan.fallback["user_condition"]
    assert encoded == 1 + 3  # one shared prefill, one prefill per fallback
    assert (gens["user"].logits - gens["none"].logits).abs().max() > 1e-2  # the user hook did act


def test_qwen_text_between_images_falls_back(qwen_model):
    """Text between two images sees the first one: a text-query knockout touches a position
    before the second image, which must stay in the prefill, so it runs on its own."""
    batch = _present(qwen_batch([[3, (1, 4, 4), 4, (1, 4, 4), 5], [2, (1, 4, 6), 8]], seed=3))
    conds = {k: CONDITIONS[k] for k in ("none", "text→image:pre_softmax_mask", "text→EOI:post_softmax_zero")}
    ref = _one_by_one(qwen_model, batch, conds)
    gens, plan, _ = _run(qwen_model, batch, conds)
    _assert_same(gens, ref)
    assert plan.shared == [] and "before the end of an image (row 0)" in plan.fallback["text→image:pre_softmax_mask"]


def test_registering_model_runs_each_condition_on_its_own(qwen_model):
    """An installed Registering mask builds its edits from the prompt a KV cache was filled
    with: a shared prefix (then a fork) would escape it, so every condition runs on its own."""
    from mechvlm.training import Registering, apply_registering
    from mechvlm.training.registers import set_registering

    batch = _present(qwen_batch(QWEN_ROWS[:2], seed=6))
    set_registering(qwen_model, None, Registering.parse("eoi"))
    try:
        handle = apply_registering(qwen_model)
        ref = _one_by_one(qwen_model, batch, CONDITIONS)
        gens, plan, _ = _run(qwen_model, batch, CONDITIONS)
        handle.remove()
    finally:
        set_registering(qwen_model, None, Registering())
        qwen_model.cfg.registering = None
    _assert_same(gens, ref)
    assert plan.shared == [] and "wrapped" in plan.fallback["none"]


def test_knockout_reach_matches_brute_force(qwen_model):
    """Before a row's first reached query, the residual stream is bit-for-bit what it is
    without the knockout; at that query it differs."""
    batch = _present(qwen_batch(QWEN_ROWS[:3], seed=4))
    roles = qwen_model.roles(**batch)
    name = f"blocks.{qwen_model.cfg.n_layers - 1}.hook_resid_post"
    _, clean = qwen_model.run_with_cache(**batch, names_filter=name)
    for key in ("image", "eoi"):
        reach = knockout_reach(roles, "text", key)
        hooks = knockout(roles, "text", key, mode="pre_softmax_mask")
        with qwen_model.hooks(fwd_hooks=hooks):
            _, cut = qwen_model.run_with_cache(**batch, names_filter=name)
        changed = (cut[name] - clean[name]).abs().amax(-1) > 1e-6
        for r in range(3):
            first = int(reach[r].nonzero()[0])
            assert not changed[r, :first].any() and changed[r, first], (key, r)


def test_plan_refuses_a_prompt_ending_with_an_image(qwen_model):
    batch = _present(qwen_batch([[3, (1, 4, 4)]], seed=0))
    roles = qwen_model.roles(**batch)
    touched = {k: c.touched(roles) for k, c in CONDITIONS.items()}
    # the vision_end token follows the image: the rest to run is that one token
    plan = plan_shared_prefix(roles, touched)
    assert plan.shared == list(CONDITIONS) and plan.boundary.tolist() == [roles.shape[1] - 1]


# -------------------------------------------------------------------------- Gemma3 --
def _gemma(sliding_window: int):
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    cfg = gemma3_config(n_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        sliding_window=sliding_window)
    hf = Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a small tied embedding, so that greedy decoding does not just repeat
        for name, p in hf.named_parameters():
            p.copy_((0.02 if "embed_tokens" in name else 0.3) * torch.randn(p.shape, generator=g))
    return HookedVLM.from_hf(hf)


@pytest.fixture(scope="module")
def gemma_wide():
    return _gemma(sliding_window=64)


@pytest.fixture(scope="module")
def gemma_narrow():
    return _gemma(sliding_window=6)


def _gemma_batch(rows, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = [gemma3_prompt(segs, generator=g)[0] for segs in rows]
    input_ids, mask = left_pad(ids, GEMMA3_IDS["pad"])
    n_images = sum(1 for segs in rows for s in segs if s == "image")
    return {"input_ids": input_ids, "attention_mask": mask,
            "token_type_ids": (input_ids == GEMMA3_IDS["image"]).long(),
            "pixel_values": gemma3_pixel_values(n_images, generator=g)}


def test_gemma_rows_split_apart_under_a_wide_window(gemma_wide):
    batch = _gemma_batch([[3, "image", 5], [1, "image", "image", 9], [6, "image", 2]])
    ref = _one_by_one(gemma_wide, batch, CONDITIONS)
    gens, plan, encoded = _run(gemma_wide, batch, CONDITIONS)
    _assert_same(gens, ref)
    assert plan.shared == list(CONDITIONS) and not plan.common and encoded == 1


def test_gemma_narrow_window_shares_only_a_common_split(gemma_narrow):
    # the same text after the image in every row: one column splits all rows (left padding
    # in front differs), which a sliding window cannot tell apart from the whole prompt
    common = _gemma_batch([[3, "image", 4], [7, "image", 4]], seed=5)
    ref = _one_by_one(gemma_narrow, common, CONDITIONS)
    gens, plan, encoded = _run(gemma_narrow, common, CONDITIONS)
    _assert_same(gens, ref)
    assert plan.shared == list(CONDITIONS) and plan.common and encoded == 1
    # different text lengths after the image: a split per row moves padding, which the
    # window would count, so every condition runs on its own
    apart = _gemma_batch([[3, "image", 5], [6, "image", 2]], seed=6)
    two = {k: CONDITIONS[k] for k in ("none", "text→image:post_softmax_zero")}
    ref = _one_by_one(gemma_narrow, apart, two)
    gens, plan, encoded = _run(gemma_narrow, apart, two)
    _assert_same(gens, ref)
    assert plan.shared == [] and "sliding window" in plan.fallback["none"] and encoded == 2


# ------------------------------------------------- mmbench.evaluate on the shipped toys --
@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_evaluate_on_shipped_toys_equals_the_condition_by_condition_path(family):
    from mechvlm.mmbench import evaluate, load_mmbench
    from mechvlm.processing import InputBuilder
    from mechvlm.toy.benchmark import SHIPPED_TSV
    from mechvlm.toy.checkpoint import SHIPPED

    model = HookedVLM.from_pretrained(str(SHIPPED[family]))
    builder = InputBuilder.from_pretrained(SHIPPED[family])
    items = load_mmbench(SHIPPED_TSV)[:10]

    def last_text_resid(batch, roles):  # a user hook: runs on its own
        return [("blocks.0.hook_resid_post", lambda x, hook: x * 1.5)]

    conds = {**{k: CONDITIONS[k] for k in ("none", "text→image:pre_softmax_mask", "text→EOI:post_softmax_zero")},
             "user": last_text_resid}
    kw = dict(batch_size=4, max_new_tokens=3, progress=False)
    ref = {name: evaluate(model, builder, items, {name: c}, **kw)[name] for name, c in conds.items()}
    counter = ImageEmbedCount()
    with model.hooks(fwd_hooks=[("hook_image_embeds", counter)]):
        got = evaluate(model, builder, items, conds, **kw)
    assert counter.n == 3 * 2  # 3 batches: one shared prefill + the user hook's own run each
    for name in conds:
        assert got[name]["settings"].pop("shared_prefix") is True
        assert ref[name]["settings"].pop("shared_prefix") is False
        assert got[name] == ref[name], name
    assert got["none"]["accuracy"] > got["text→image:pre_softmax_mask"]["accuracy"]  # the knockout acts


# ------------------------------------------------------------- video and LLaVA inputs --
def test_qwen_video_runs_each_condition_on_its_own(qwen_model):
    """The text after a video starts below the video's largest (time-scaled) position; a
    continuation of a prefix ending at the video would start above it (logits off by ~2)."""
    from test_qwen_video import video_batch

    batch = video_batch([[2, ("video", 2, 4, 4), 3], [4, ("video", 2, 4, 4), 1]], seed=9, seconds=[0.5, 1.0])
    ref = _one_by_one(qwen_model, batch, CONDITIONS)
    gens, plan = generate_conditions(qwen_model, batch, CONDITIONS, STEPS, [NEVER], output_logits=True)
    _assert_same(gens, ref)
    assert plan.shared == [] and "videos" in plan.fallback["none"]


@pytest.mark.parametrize("family, sizes, per_row", [("llava_next", [(10, 60), (50, 50)], False),
                                                     ("llava_onevision", [(50, 70), (20, 40), (40, 20)], True)])
def test_llava_anyres_rows_share_the_prefix(family, sizes, per_row):
    from llava_helpers import llava_batch, make_hf_llava

    hf = make_hf_llava(family)
    model = HookedVLM.from_hf(hf)
    rows = [[3, "image", 2], [4, "image", 5]] if len(sizes) == 2 else [[3, "image", 2], [4, "image", "image", 1]]
    batch = llava_batch(hf, rows, sizes, seed=1, per_row_images=per_row)
    conds = {k: CONDITIONS[k] for k in ("none", "text→image:pre_softmax_mask", "text→image:post_softmax_zero")}
    ref = _one_by_one(model, batch, conds)
    gens, plan = generate_conditions(model, batch, conds, STEPS, [NEVER], output_logits=True)
    _assert_same(gens, ref)
    assert plan.stacked == list(conds)


class _Killed(Exception):
    pass


def test_evaluate_resumes_a_batch_journaled_for_only_some_conditions(tmp_path, monkeypatch):
    """A run killed between two conditions' writes of one shared batch: the resumed run
    recomputes that batch, appends only what is missing, and gives the uninterrupted result."""
    from mechvlm.journal import Journal, JournalTask
    from mechvlm.mmbench import evaluate, load_mmbench
    from mechvlm.processing import InputBuilder
    from mechvlm.toy.benchmark import SHIPPED_TSV
    from mechvlm.toy.checkpoint import SHIPPED

    model = HookedVLM.from_pretrained(str(SHIPPED["qwen2_5_vl"]))
    builder = InputBuilder.from_pretrained(SHIPPED["qwen2_5_vl"])
    items = load_mmbench(SHIPPED_TSV)[:6]
    names = ["none", "text→image:pre_softmax_mask", "text→EOI:post_softmax_zero"]
    kw = dict(batch_size=2, max_new_tokens=2, progress=False)
    ref = evaluate(model, builder, items, names, **kw)  # no journal, uninterrupted

    header = {"run": "partial"}
    put, writes = JournalTask.put, []

    def dying_put(self, unit, fp, result):  # killed after the 1st condition of batch 1 is written
        if len(writes) == len(names) + 1:
            raise _Killed
        writes.append((self.name, unit))
        put(self, unit, fp, result)

    monkeypatch.setattr(JournalTask, "put", dying_put)
    with Journal.open(tmp_path, header, resume=False) as j, pytest.raises(_Killed):
        evaluate(model, builder, items, names, journal=j, **kw)
    monkeypatch.setattr(JournalTask, "put", put)
    assert writes == [(f"knockout/{n}", 0) for n in names] + [(f"knockout/{names[0]}", 1)]

    runs = []
    real = generate_conditions

    def counted(model_, batch, *a, **k):
        runs.append(batch["input_ids"].shape[0])
        return real(model_, batch, *a, **k)

    ev_module = importlib.import_module("mechvlm.mmbench.evaluate")  # the package re-exports a function of that name
    monkeypatch.setattr(ev_module, "generate_conditions", counted)
    with Journal.open(tmp_path, header, resume=True) as j:
        got = evaluate(model, builder, items, names, journal=j, **kw)
        reused, written = j.reused, j.written
    assert len(runs) == 2  # batch 0 read back; batch 1 (partly journaled) and batch 2 computed
    assert written == 2 * len(names) - 1  # batch 1's first condition was not appended again
    assert reused == len(names)
    for n in names:
        assert got[n] == ref[n], n
    lines = [json.loads(x) for path in sorted(tmp_path.glob("**/*.jsonl")) for x in path.read_text().splitlines()]
    counts = collections.Counter((r["task"], r["unit"], r["row"]) for r in lines if "task" in r)
    assert set(counts.values()) == {1}  # no item written twice
    assert len(counts) == len(names) * len(items)
