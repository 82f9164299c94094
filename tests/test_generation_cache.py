"""Generation over the KV cache against independent references: HF ``generate(do_sample=
False)`` on the same weights (both families, left padding, Qwen with two images of
different grids, Gemma3 with a window shorter than the image block and more new tokens
than the window), and the no-cache path (every step a full forward) under hooks: logits of
every step, patterns, role-based interventions covering the generated tokens."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_kwargs, qwen_batch
from mechvlm import HookedVLM, attention_share
from mechvlm.generation import generate, greedy_generate
from mechvlm.interventions import ablate_heads, knockout, patch_activations, register_mask, skip_sublayers
from mechvlm.synthetic import GEMMA3_IDS, QWEN_IDS, gemma3_config, gemma3_pixel_values, gemma3_prompt, left_pad

NEVER = 10**6  # an EOS id no model emits
TOL = 1e-4


def _present(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if v is not None}


# ----------------------------------------------------------------- HF generate parity --
QWEN_TWO_GRIDS = {
    "one_row": [[3, (1, 4, 6), 2, (1, 6, 4), 5]],
    "left_padded": [[3, (1, 4, 6), 2, (1, 6, 4), 5], [2, (1, 4, 4), 4], [6, (1, 2, 8), 1]],
}


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("rows", QWEN_TWO_GRIDS, ids=list(QWEN_TWO_GRIDS))
def test_qwen_two_grids_equals_hf_generate(qwen_hf, qwen_model, rows, cache):
    batch = _present(qwen_batch(QWEN_TWO_GRIDS[rows], seed=5))
    ours = greedy_generate(qwen_model, batch, 8, NEVER, pad_token_id=QWEN_IDS["pad"], use_past_kv_cache=cache)
    ref = qwen_hf.generate(**hf_kwargs(batch), max_new_tokens=8, do_sample=False, eos_token_id=NEVER,
                           pad_token_id=QWEN_IDS["pad"])
    assert torch.equal(ours.sequences, ref)
    assert len(set(ref[0, -8:].tolist())) > 2  # not a degenerate repetition


@pytest.fixture(scope="module")
def gemma_long_image():
    """Gemma3 whose image block (16 tokens) is longer than the sliding window (6); the
    embedding is kept small next to the other weights so that greedy decoding moves."""
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    cfg = gemma3_config(n_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        mm_tokens=16, sliding_window=6)
    hf = Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_((0.02 if "embed_tokens" in name else 0.3) * torch.randn(p.shape, generator=g))
    return hf, HookedVLM.from_hf(hf)


def gemma_batch(rows, seed=3, mm_tokens=16):
    g = torch.Generator().manual_seed(seed)
    ids = [gemma3_prompt(segs, mm_tokens=mm_tokens, generator=g)[0] for segs in rows]
    input_ids, mask = (ids[0][None], None) if len(ids) == 1 else left_pad(ids, GEMMA3_IDS["pad"])
    n_images = sum(s == "image" for segs in rows for s in segs)
    return _present({"input_ids": input_ids, "attention_mask": mask,
                     "pixel_values": gemma3_pixel_values(n_images, generator=g)})


GEMMA_ROWS = {"one_row": [[3, "image", 4]], "left_padded": [[3, "image", 2], [2, "image", 1, "image", 3], [5]]}


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("rows", GEMMA_ROWS, ids=list(GEMMA_ROWS))
def test_gemma3_window_shorter_than_image_equals_hf_generate(gemma_long_image, rows, cache):
    hf, model = gemma_long_image
    batch = gemma_batch(GEMMA_ROWS[rows])
    steps = 10  # more new tokens than the window
    hf_kw = dict(batch, token_type_ids=(batch["input_ids"] == GEMMA3_IDS["image"]).long())
    ref = hf.generate(**hf_kw, max_new_tokens=steps, do_sample=False, eos_token_id=NEVER,
                      pad_token_id=GEMMA3_IDS["pad"])
    ours = greedy_generate(model, batch, steps, NEVER, pad_token_id=GEMMA3_IDS["pad"], use_past_kv_cache=cache)
    assert torch.equal(ours.sequences, ref)
    assert len(set(ref[0, -steps:].tolist())) > 2


# ------------------------------------------------------ cache vs no cache, with hooks --
def _clean_resid(model, batch):
    other = dict(batch, pixel_values=batch["pixel_values"].flip(0))
    _, cache = model.run_with_cache(**other, names_filter="blocks.1.hook_resid_pre")
    return cache


HOOKS = {
    "none": lambda model, batch: None,
    "knockout_pre": lambda model, batch: lambda b, r: knockout(r, "text", "image", mode="pre_softmax_mask"),
    "knockout_post": lambda model, batch: lambda b, r: knockout(r, "text", "image", mode="post_softmax_zero"),
    "knockout_post_static": lambda model, batch: knockout(model.roles(**batch), "text", "image"),
    "knockout_eoi_heads": lambda model, batch: knockout(model.roles(**batch), "text", "eoi", layers=[0, 2],
                                                        heads=[1, 3], mode="post_softmax_zero"),
    "ablate_heads_text": lambda model, batch: lambda b, r: ablate_heads({1: [0, 2]}, positions=r.text),
    "register_mask": lambda model, batch: register_mask(model.roles(**batch)),
    "edit_v_and_rot_k": lambda model, batch: [("blocks.0.attn.hook_v", lambda v, hook: v * 1.5),
                                              ("blocks.1.attn.hook_rot_k", lambda k, hook: k.flip(-1))],
    "skip_image_sublayers": lambda model, batch: lambda b, r: skip_sublayers(r.image, layers=[1]),
    "patch_image_positions": lambda model, batch: (lambda clean: lambda b, r: patch_activations(
        clean, "blocks.1.hook_resid_pre", positions=r.image))(_clean_resid(model, batch)),
}


def _cache_equals_no_cache(model, batch, kind: str, steps: int, family: str):
    hooks = HOOKS[kind](model, batch)
    ref = greedy_generate(model, batch, steps, NEVER, fwd_hooks=hooks, output_logits=True, use_past_kv_cache=False)
    ours = greedy_generate(model, batch, steps, NEVER, fwd_hooks=hooks, output_logits=True)
    diff = (ours.logits - ref.logits).abs().max().item()
    print(f"\n[{family} cache vs no cache, {kind}] max |logits diff| over {steps} steps {diff:.1e}")
    assert torch.equal(ours.sequences, ref.sequences) and diff <= TOL
    if kind != "none":
        clean = greedy_generate(model, batch, steps, NEVER, output_logits=True)
        assert (ours.logits - clean.logits).abs().max() > 1e-3  # the hooks do something


@pytest.mark.parametrize("kind", HOOKS)
def test_qwen_cache_equals_no_cache(qwen_model, kind):
    batch = _present(qwen_batch([[3, (1, 4, 6), 5], [2, (1, 4, 4), 7]], seed=21))
    _cache_equals_no_cache(qwen_model, batch, kind, 5, "qwen")


@pytest.mark.parametrize("kind", ["none", "knockout_pre", "knockout_post_static", "register_mask"])
def test_gemma3_cache_equals_no_cache(gemma_long_image, kind):
    _cache_equals_no_cache(gemma_long_image[1], gemma_batch(GEMMA_ROWS["left_padded"], seed=4), kind, 9, "gemma3")


def test_decode_hooks_see_new_positions_and_pattern_rows(qwen_model):
    batch = _present(qwen_batch([[3, (1, 4, 6), 5], [2, (1, 4, 4), 7]], seed=21))
    b, p = batch["input_ids"].shape
    h, d = qwen_model.cfg.n_heads, qwen_model.cfg.d_head

    def run(cache: bool):
        seen = {"q": [], "mask": [], "resid": [], "pattern": []}
        hooks = [("blocks.1.attn.hook_q", lambda t, hook: seen["q"].append(tuple(t.shape))),
                 ("blocks.1.attn.hook_attn_mask", lambda t, hook: seen["mask"].append(tuple(t.shape))),
                 ("blocks.1.hook_resid_post", lambda t, hook: seen["resid"].append(tuple(t.shape))),
                 ("blocks.1.attn.hook_pattern", lambda t, hook: seen["pattern"].append(t.clone()))]
        greedy_generate(qwen_model, batch, 4, NEVER, fwd_hooks=hooks, use_past_kv_cache=cache)
        return seen

    cached, full = run(True), run(False)
    assert cached["q"] == [(b, p, h, d)] + [(b, 1, h, d)] * 3
    assert cached["resid"] == [(b, p, qwen_model.cfg.d_model)] + [(b, 1, qwen_model.cfg.d_model)] * 3
    assert cached["mask"] == [(b, 1, p, p)] + [(b, 1, 1, p + s) for s in (1, 2, 3)]
    assert [tuple(t.shape) for t in cached["pattern"]] == [(b, h, p, p)] + [(b, h, 1, p + s) for s in (1, 2, 3)]
    assert [tuple(t.shape) for t in full["pattern"]] == [(b, h, p + s, p + s) for s in range(4)]
    for c, f in zip(cached["pattern"][1:], full["pattern"][1:]):  # each decode row = the full pattern's last row
        assert (c - f[:, :, -1:]).abs().max() <= 1e-5


# --------------------------------------------- static hook lists in generation (issue 12) --
@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no_cache"])
def test_static_role_list_extends_or_says_pass_a_callable(qwen_model, cache):
    batch = _present(qwen_batch([[3, (1, 4, 6), 5], [2, (1, 4, 4), 7]], seed=21))
    roles = qwen_model.roles(**batch)
    static = greedy_generate(qwen_model, batch, 4, NEVER, fwd_hooks=knockout(roles, "text", "image"),
                             output_logits=True, use_past_kv_cache=cache)
    rebuilt = greedy_generate(qwen_model, batch, 4, NEVER, output_logits=True, use_past_kv_cache=cache,
                              fwd_hooks=lambda b, r: knockout(r, "text", "image"))
    assert torch.equal(static.sequences, rebuilt.sequences)
    assert (static.logits - rebuilt.logits).abs().max() <= 1e-5
    for hooks in (ablate_heads({1: [0]}, positions=roles.text), knockout(roles, roles.text, "image")):
        with pytest.raises(ValueError, match=r"callable \(batch, roles\) -> hooks"):
            greedy_generate(qwen_model, batch, 3, NEVER, fwd_hooks=hooks, use_past_kv_cache=cache)
    with pytest.raises(ValueError, match="built from TokenRoles of a batch"):  # outside generation: another batch
        longer = _present(qwen_batch([[3, (1, 4, 6), 9], [2, (1, 4, 4), 7]], seed=21))
        qwen_model.run_with_hooks(**longer, fwd_hooks=knockout(roles, "text", "image"))


# ---------------------------------------------- streaming metrics over generated tokens --
def test_attention_share_of_generated_tokens_equals_hf(qwen_hf, qwen_model):
    batch = _present(qwen_batch([[3, (1, 4, 6), 5], [2, (1, 4, 4), 7]], seed=21))
    gen = greedy_generate(qwen_model, batch, 4, NEVER)
    full, query = gen.as_batch(), gen.generated_mask()
    share = attention_share(qwen_model, full, query=query, keys=["image", "eoi"], progress=False)
    roles = qwen_model.roles(**full)
    with torch.no_grad():
        att = qwen_hf(**hf_kwargs(full), output_attentions=True).attentions
    ref = torch.stack([torch.stack([torch.einsum("bhqk,bq,bk->bh", a, query.float(), m.float())
                                    for m in (roles.image, roles.eoi)], -1) for a in att], 1)
    assert query.sum() == 8 and (share.raw - ref).abs().max() <= TOL


# ------------------------------------------------------------------------- sampling --
def test_sampling_seeded_and_filtered(qwen_model):
    batch = _present(qwen_batch([[3, (1, 4, 6), 5], [2, (1, 4, 4), 7]], seed=21))
    kw = dict(do_sample=True, temperature=2.0, seed=7, output_logits=True)
    a = generate(qwen_model, batch, 6, NEVER, **kw)
    b = generate(qwen_model, batch, 6, NEVER, **kw, use_past_kv_cache=False)
    c = generate(qwen_model, batch, 6, NEVER, **dict(kw, seed=8))
    greedy = greedy_generate(qwen_model, batch, 6, NEVER)
    assert torch.equal(a.sequences, b.sequences)  # same seed, same draws, with or without the cache
    assert not torch.equal(a.sequences, c.sequences) and not torch.equal(a.sequences, greedy.sequences)
    top1 = generate(qwen_model, batch, 6, NEVER, do_sample=True, top_k=1, seed=3)
    assert torch.equal(top1.sequences, greedy.sequences)
    k3 = generate(qwen_model, batch, 6, NEVER, do_sample=True, top_k=3, temperature=5.0, seed=1, output_logits=True)
    allowed = k3.logits.topk(3, dim=-1).indices
    assert (allowed == k3.new_tokens[..., None]).any(-1).all()
    p = generate(qwen_model, batch, 6, NEVER, do_sample=True, top_p=0.3, temperature=3.0, seed=2, output_logits=True)
    probs = (p.logits / 3.0).softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    rank = (order == p.new_tokens[..., None]).float().argmax(-1)
    mass_before = torch.gather(sorted_p.cumsum(-1) - sorted_p, -1, rank[..., None])[..., 0]
    assert (mass_before < 0.3 + 1e-6).all()  # every token lies inside the nucleus


def test_stop_tokens_and_generation_options(qwen_model):
    batch = _present(qwen_batch([[3, (1, 4, 6), 5], [2, (1, 4, 4), 7]], seed=21))
    free = greedy_generate(qwen_model, batch, 5, NEVER)
    stop = int(free.new_tokens[0, 1])
    gen = greedy_generate(qwen_model, batch, 5, [NEVER, stop], pad_token_id=QWEN_IDS["pad"])
    assert gen.finished[0] and gen.tokens(0, include_eos=True)[-1] == stop
    mask = gen.generated_mask()
    assert mask[0].sum() == len(gen.tokens(0, include_eos=True))
    no_stop = generate(qwen_model, batch, 5, stop_at_eos=False)
    assert no_stop.new_tokens.shape == (2, 5) and no_stop.eos_token_ids == ()


# ---------------------------------------------------------------- model.generate (TL) --
def test_model_generate_tl_signature(qwen_model):
    batch = _present(qwen_batch([[3, (1, 4, 6), 5], [2, (1, 4, 4), 7]], seed=21))
    greedy = greedy_generate(qwen_model, batch, 4, NEVER)
    out = qwen_model.generate(batch, max_new_tokens=4, do_sample=False, eos_token_id=NEVER, verbose=False)
    assert torch.equal(out, greedy.sequences)  # a batch mapping in: tokens out ("input")
    ids = batch["input_ids"][1:, -6:]  # text only, no padding
    toks = qwen_model.generate(ids, max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
    assert toks.shape == (1, ids.shape[1] + 3) and torch.equal(toks[:, :ids.shape[1]], ids)
    gen = qwen_model.generate(batch, max_new_tokens=4, do_sample=False, eos_token_id=NEVER, verbose=False,
                              return_type="generation", use_past_kv_cache=False)
    assert torch.equal(gen.sequences, greedy.sequences)
    logits = qwen_model.generate(batch, max_new_tokens=4, do_sample=False, eos_token_id=NEVER, verbose=False,
                                 output_logits=True)
    assert torch.equal(logits.sequences, greedy.sequences) and len(logits.logits) == 4
    if getattr(qwen_model, "tokenizer", None) is None:
        with pytest.raises(ValueError, match="tokenizer"):
            qwen_model.generate("a prompt", max_new_tokens=2, verbose=False)
    with pytest.raises(ValueError, match="return_type"):
        qwen_model.generate(batch, return_type="logits", verbose=False)


def test_model_generate_strings_with_a_tokenizer():
    from mechvlm.synthetic import left_pad
    from mechvlm.toy.checkpoint import SHIPPED

    model = HookedVLM.from_pretrained(str(SHIPPED["qwen2_5_vl"]))  # attaches the checkpoint's tokenizer
    tok = model.tokenizer
    prompts = ["what is left of the red square", "what is on the right"]
    out = model.generate(prompts, max_new_tokens=3, do_sample=False, verbose=False)
    rows = [model.to_tokens(p, move_to_device=False)[0] for p in prompts]  # TL's tokenization, row by row
    ids, mask = left_pad(rows, tok.pad_token_id or 0)
    seqs = greedy_generate(model, {"input_ids": ids, "attention_mask": mask}, 3, model.cfg.eos_token_id,
                           pad_token_id=model.cfg.eos_token_id).sequences
    assert out == [tok.decode(s, skip_special_tokens=True) for s in seqs]
    one = model.generate(prompts[0], max_new_tokens=3, do_sample=False, verbose=False)
    alone = greedy_generate(model, {"input_ids": rows[0][None]}, 3, model.cfg.eos_token_id)
    assert one == tok.decode(alone.sequences[0], skip_special_tokens=True)
    assert tok.decode(alone.new_tokens[0], skip_special_tokens=True)  # it generated words


# --------------------------------------- visual-token conditions (issue 16) over the cache --
def _drop_two_image_tokens(model, batch):
    roles = model.roles(**batch)
    drop = torch.zeros_like(roles.image)
    for row in range(drop.shape[0]):
        where = roles.image[row].nonzero()[:, 0]
        drop[row, where[[1, -2]]] = True
    return roles, drop


@pytest.mark.parametrize("name", ["removed", "inject:2", "skip:mlp:1"])
def test_visual_token_conditions_cache_equals_no_cache(qwen_model, name):
    from mechvlm.interventions import mask_image_keys, remove_image_tokens
    from mechvlm.mmbench.conditions import Condition, condition_by_name

    batch = _present(qwen_batch([[3, (1, 4, 6), 5], [2, (1, 4, 4), 7]], seed=21))
    if name == "removed":  # image_cells carried into the prefill; positions continue after the kept cells
        roles, drop = _drop_two_image_tokens(qwen_model, batch)
        cond = Condition(name, name, prepare=lambda m, b: (remove_image_tokens(b, roles, drop, pad_id=QWEN_IDS["pad"])
                                                           .batch, None))
    else:
        cond = condition_by_name(name)
    gb, hooks = cond.setup(qwen_model, batch)
    assert (name == "removed") == ("image_cells" in gb)
    ref = greedy_generate(qwen_model, gb, 5, NEVER, fwd_hooks=hooks, output_logits=True, use_past_kv_cache=False)
    ours = greedy_generate(qwen_model, gb, 5, NEVER, fwd_hooks=hooks, output_logits=True)
    assert torch.equal(ours.sequences, ref.sequences) and (ours.logits - ref.logits).abs().max() <= TOL
    if name == "inject:2":  # a static list built from the prompt's roles by name extends as well
        from mechvlm.interventions import inject_at_layer

        static = greedy_generate(qwen_model, gb, 5, NEVER, output_logits=True,
                                 fwd_hooks=inject_at_layer(qwen_model.roles(**gb), 2))
        assert torch.equal(static.sequences, ref.sequences) and (static.logits - ref.logits).abs().max() <= TOL
    if name == "removed":  # for Qwen, removing image tokens = masking them as keys (grid positions kept)
        masked = greedy_generate(qwen_model, batch, 5, NEVER, output_logits=True,
                                 fwd_hooks=lambda b, r: mask_image_keys(r, torch.cat(
                                     [drop, torch.zeros_like(drop[:, :1]).expand(-1, r.shape[1] - drop.shape[1])], 1)))
        assert torch.equal(ours.new_tokens, masked.new_tokens) and (ours.logits - masked.logits).abs().max() <= TOL
        with pytest.raises(ValueError, match="text tokens only"):  # a continuation refuses image_cells
            from mechvlm.kv_cache import VLMKeyValueCache

            cache = VLMKeyValueCache.init_cache(qwen_model.cfg, qwen_model.device, 2)
            qwen_model(**gb, past_kv_cache=cache)
            qwen_model(ours.new_tokens[:, :1], past_kv_cache=cache, image_cells=gb["image_cells"])
