"""The streaming metrics against HF's own model (eager attentions / hidden states).

Every reference here is computed in the test with plain torch from the METHODS formulas,
from HF's ``output_attentions`` / ``output_hidden_states`` (and HF's own final norm and
lm_head), with token roles built by hand from the token ids, never from mechvlm's roles.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from torch import nn

from conftest import hf_kwargs as qwen_hf_kwargs
from conftest import make_hf_qwen, qwen_batch
from mechvlm import HookedVLM, attention_share, logit_lens, received_attention, visual_text_similarity
from mechvlm.interventions import knockout
from mechvlm.synthetic import GEMMA3_IDS, QWEN_IDS
from test_gemma3 import batch_from as gemma_batch
from test_gemma3 import hf_kwargs as gemma_hf_kwargs
from test_gemma3 import make_hf as make_hf_gemma

torch.set_num_threads(min(2, torch.get_num_threads()))
TOL = 1e-4
THRESHOLDS = (0.5, 0.8, 0.9)


# --- the two families: model pairs, batches, hand-built roles ------------------------------
class Family:
    def __init__(self, name, hf, batches, hf_kwargs, ids):
        self.name, self.hf, self.batches, self.hf_kwargs, self.ids = name, hf, batches, hf_kwargs, ids
        self.model = HookedVLM.from_hf(hf)

    def roles(self, batch) -> dict[str, torch.Tensor]:
        """Role masks from token ids alone: image / eoi / text (real tokens after the first
        image-start token that are no image, EOI, image-start or BOS token)."""
        ids = batch["input_ids"]
        am = batch.get("attention_mask")
        real = am.bool() if am is not None else torch.ones_like(ids, dtype=torch.bool)
        start, img, eoi = self.ids["start"], self.ids["image"], self.ids["eoi"]
        special = (ids == start) | (ids == img) | (ids == eoi) | (ids == self.ids["bos"])
        after_start = (ids == start).long().cumsum(-1) > 0
        return {"image": ids == img, "eoi": ids == eoi, "image_start": ids == start,
                "text": real & after_start & ~special, "real": real}

    def hf_run(self, batch, **kw):
        with torch.no_grad():
            return self.hf(**self.hf_kwargs(batch), output_attentions=True, output_hidden_states=True, **kw)


@pytest.fixture(scope="module")
def qwen():
    # 6 heads / 2 KV heads: GQA with n_rep (3) != n_kv_heads, so a wrong head grouping shows
    hf = make_hf_qwen(seed=0, n_layers=3, d_model=96, n_heads=6, n_kv_heads=2)
    batches = [qwen_batch([[3, (1, 4, 6), 7]], seed=1),  # one image
               qwen_batch([[4, (1, 4, 4), 6], [2, (1, 4, 4), 3, (1, 2, 4), 5]], seed=2)]  # left-padded, 2 images
    return Family("qwen", hf, batches, qwen_hf_kwargs,
                  dict(start=QWEN_IDS["vision_start"], image=QWEN_IDS["image"], eoi=QWEN_IDS["vision_end"],
                       bos=QWEN_IDS["bos"]))


@pytest.fixture(scope="module")
def gemma():
    # layers S S F S S F, window 6, bidirectional image blocks; 8 heads / 2 KV heads
    hf = make_hf_gemma(seed=0, n_heads=8, n_kv_heads=2)
    batches = [gemma_batch([[3, "image", 7]], mm=4, seed=3),
               gemma_batch([[3, "image", 5], [2, "image", 1, "image", 3]], mm=4, seed=4)]
    return Family("gemma3", hf, batches, gemma_hf_kwargs,
                  dict(start=GEMMA3_IDS["boi"], image=GEMMA3_IDS["image"], eoi=GEMMA3_IDS["eoi"],
                       bos=GEMMA3_IDS["bos"]))


@pytest.fixture(params=["qwen", "gemma"])
def fam(request):
    return request.getfixturevalue(request.param)


# --- references from HF ------------------------------------------------------------------
def ref_mass(attn: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[b, h, key]``: sum over text query rows of HF's pattern."""
    return (attn.float() * text[:, None, :, None]).sum(2)


def ref_raw(attentions, text, key_masks) -> torch.Tensor:
    """``[b, layer, head, key role]``: Eq. 1 for each key role."""
    return torch.stack([torch.stack([(ref_mass(a, text) * k[:, None]).sum(-1) for k in key_masks], -1)
                        for a in attentions], 1)


def ref_fraction(r: np.ndarray, p: float) -> float:
    c = np.cumsum(np.sort(r)[::-1]) / r.sum()
    return (int(np.argmax(c >= p - 1e-6)) + 1) / len(r)


def hf_lm(fam):
    return fam.hf.model.language_model


def hf_states(fam, batch):
    """HF hidden states (embeddings, then each layer's output before the final norm: the
    last one is taken from a forward hook on HF's last decoder layer) and logits."""
    got = {}
    h = hf_lm(fam).layers[-1].register_forward_hook(
        lambda m, i, o: got.__setitem__("last", o[0] if isinstance(o, tuple) else o))
    try:
        out = fam.hf_run(batch)
    finally:
        h.remove()
    return list(out.hidden_states[:-1]) + [got["last"]], out.logits


# --- attention share and received attention ---------------------------------------------
@pytest.mark.parametrize("query", ["text", "image"])  # image queries see Gemma3's bidirectional blocks
def test_attention_share_matches_hf(fam, query):
    keys = ("image", "eoi", "image_start")
    kw = dict(query_chunk=3) if fam.name == "qwen" else {}  # several query chunks for Qwen
    res = attention_share(fam.model, fam.batches, query=query, keys=keys, progress=False, **kw)
    refs = []
    for batch in fam.batches:
        roles = fam.roles(batch)
        refs.append(ref_raw(fam.hf_run(batch).attentions, roles[query], [roles[k] for k in keys]))
    ref = torch.cat(refs)
    n_layers, n_heads = fam.model.cfg.n_layers, fam.model.cfg.n_heads
    assert res.raw.shape == ref.shape == (3, n_layers, n_heads, 3)
    assert ref[..., 0].min() > 0.05  # non-trivial masses
    if query == "text":
        assert ref[..., 1].min() > 1e-3
    share = ref / ref.sum(-1, keepdim=True)
    summed = ref.sum(2)
    diffs = {"raw": (res.raw - ref).abs().max().item(), "share": (res.share - share).abs().max().item(),
             "head_share": (res.head_share - summed / summed.sum(-1, keepdim=True)).abs().max().item(),
             "head_mean_share": (res.head_mean_share - share.mean(2)).abs().max().item(),
             "mean_share": (res.mean_share - share.mean(0)).abs().max().item()}
    print(f"\n[{fam.name} attention_share {query}->keys vs HF] " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs
    assert res.keys == list(keys) and res.layers == list(range(n_layers)) and res.query == query
    assert res.n_queries.tolist() == torch.cat([fam.roles(b)[query].sum(-1) for b in fam.batches]).tolist()
    frame = res.to_frame()
    assert len(frame) == res.raw.numel() and abs(frame["share"].sum() - res.share.sum().item()) < 1e-3


def test_received_attention_matches_hf(fam):
    layers, heads = [0, fam.model.cfg.n_layers - 1], [1, 2]
    res = received_attention(fam.model, fam.batches, layers=layers, heads=heads, progress=False)
    ex = 0
    diffs = []
    for batch in fam.batches:
        roles = fam.roles(batch)
        attn = fam.hf_run(batch).attentions
        for row in range(batch["input_ids"].shape[0]):
            img = roles["image"][row]
            ref = torch.stack([ref_mass(attn[l], roles["text"])[row][heads][:, img] for l in layers])  # [L, H, n]
            assert res.positions[ex].tolist() == img.nonzero().squeeze(-1).tolist()
            diffs.append((res.received[ex] - ref).abs().max().item())
            for li in range(len(layers)):
                r_mean = ref[li].mean(0).numpy().astype(np.float64)
                want = [ref_fraction(r_mean, p) for p in THRESHOLDS]
                assert res.frac_tokens_head_mean[ex, li].tolist() == pytest.approx(want)
                for hi in range(len(heads)):
                    want = [ref_fraction(ref[li, hi].numpy().astype(np.float64), p) for p in THRESHOLDS]
                    assert res.frac_tokens[ex, li, hi].tolist() == pytest.approx(want)
                n = len(r_mean)
                c = np.concatenate([[0.0], np.cumsum(np.sort(r_mean)[::-1]) / r_mean.sum()])
                want = np.interp(res.curve_x.numpy(), np.arange(n + 1) / n, c)
                assert np.abs(res.curve[ex, li].numpy() - want).max() < 1e-5
            ex += 1
    print(f"\n[{fam.name} received_attention vs HF] max abs diff {max(diffs):.1e}")
    assert ex == 3 and max(diffs) <= TOL
    assert res.mean_frac_tokens.shape == (2, 3) and torch.allclose(
        res.mean_frac_tokens, res.frac_tokens_head_mean.mean(0))


def test_attention_metrics_never_take_the_explicit_path(qwen, monkeypatch):
    calls = []
    for block in qwen.model.blocks:
        orig = block.attn._explicit
        monkeypatch.setattr(block.attn, "_explicit", lambda *a, _o=orig, **k: calls.append(1) or _o(*a, **k))
    attention_share(qwen.model, qwen.batches, progress=False)
    received_attention(qwen.model, qwen.batches, progress=False)
    assert calls == []
    # a pre-softmax knockout (a mask edit) keeps every layer on SDPA too
    attention_share(qwen.model, qwen.batches, progress=False,
                    fwd_hooks=lambda batch, roles: knockout(roles, "text", "image", mode="pre_softmax_mask"))
    assert calls == []


# --- composed with knockouts --------------------------------------------------------------
def patch_hf_zeroing_pattern(fam, monkeypatch, layers: list[int], cut: torch.Tensor) -> None:
    """Make HF's eager attention of the given language layers zero ``cut`` ``[b, q, k]``
    after the softmax (no renormalisation), by wrapping HF's own module-level eager function."""
    import importlib

    mod = importlib.import_module(type(hf_lm(fam).layers[0].self_attn).__module__)
    original = mod.eager_attention_forward
    targets = [hf_lm(fam).layers[l].self_attn for l in layers]

    def eager(module, query, key, value, attention_mask, *args, **kwargs):
        if not any(module is t for t in targets):
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        key, value = mod.repeat_kv(key, module.num_key_value_groups), mod.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, key.transpose(2, 3)) * kwargs["scaling"]
        if attention_mask is not None:
            w = w + attention_mask
        w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
        w = w.masked_fill(cut[:, None], 0.0)
        return torch.matmul(w, value).transpose(1, 2).contiguous(), w

    monkeypatch.setattr(mod, "eager_attention_forward", eager)


@pytest.mark.parametrize("family", ["qwen", "gemma"])
def test_share_sees_post_softmax_knockout(family, request, monkeypatch):
    fam = request.getfixturevalue(family)
    batch = fam.batches[1]
    knocked = [0, 2]
    calls = []
    for l, block in enumerate(fam.model.blocks):
        orig = block.attn._explicit
        monkeypatch.setattr(block.attn, "_explicit", lambda *a, _o=orig, _l=l, **k: calls.append(_l) or _o(*a, **k))
    hooks = knockout(fam.model.roles(**batch), "text", "image", layers=knocked, mode="post_softmax_zero")
    res = attention_share(fam.model, batch, keys=("image", "eoi"), fwd_hooks=hooks, progress=False)
    assert calls == []  # no layer materialises its pattern: the knockout's cut is streamed too
    share = res.share[..., 0]
    assert (share[:, knocked] == 0).all() and share[:, 1].min() > 0.05
    roles = fam.roles(batch)
    cut = roles["text"][:, :, None] & roles["image"][:, None, :]
    with monkeypatch.context() as m:
        patch_hf_zeroing_pattern(fam, m, knocked, cut)
        out = fam.hf_run(batch)
    ref = ref_raw(out.attentions, roles["text"], [roles["image"], roles["eoi"]])
    diff = (res.raw - ref).abs().max().item()
    print(f"\n[{fam.name} attention_share + post-softmax knockout vs HF] max abs diff {diff:.1e}")
    assert diff <= TOL
    # the metric hooks run after the knockout's: registered before, they would see the clean pattern
    clean = attention_share(fam.model, batch, keys=("image", "eoi"), progress=False)
    assert (clean.share[:, knocked, :, 0] > 0.05).all()


def test_share_sees_pre_softmax_knockout(qwen):
    """HF reference: a 4-D additive float mask with finfo.min at the cut entries (and HF's own
    3-D rope positions, which a 4-D mask would break)."""
    batch = qwen.batches[1]
    res = attention_share(qwen.model, batch, keys=("image", "eoi"), progress=False,
                          fwd_hooks=lambda b, roles: knockout(roles, "text", "image", mode="pre_softmax_mask"))
    roles = qwen.roles(batch)
    n = batch["input_ids"].shape[1]
    causal = torch.ones(n, n).tril().bool()
    allowed = causal[None] & roles["real"][:, None, :] & ~(roles["text"][:, :, None] & roles["image"][:, None, :])
    mask4d = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    kw = qwen_hf_kwargs(batch)
    pos, _ = qwen.hf.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"], kw["image_grid_thw"],
                                          attention_mask=kw["attention_mask"])
    kw.update(attention_mask=mask4d, position_ids=pos)
    with torch.no_grad():
        out = qwen.hf(**kw, output_attentions=True)
    ref = ref_raw(out.attentions, roles["text"], [roles["image"], roles["eoi"]])
    diff = (res.raw - ref).abs().max().item()
    print(f"\n[qwen attention_share + pre-softmax knockout vs HF 4-D mask] max abs diff {diff:.1e}")
    assert diff <= TOL
    assert (res.share[..., 0] == 0).all() and res.raw[..., 1].min() > 1e-3  # renormalised onto the rest


def test_chunking_and_batching_do_not_change_results(qwen):
    whole = attention_share(qwen.model, qwen.batches, progress=False)
    one_row = attention_share(qwen.model, iter(qwen.batches[:1]), query_chunk=1, progress=False)  # a generator
    assert torch.allclose(whole.raw[:1], one_row.raw, atol=1e-5)


def test_streaming_equals_the_models_own_pattern(gemma):
    """Streaming rows == the rows of the pattern the model materialises (forced by a no-op
    pattern hook), also for a query row whose every key a mask edit removed (zero row)."""
    batch = gemma.batches[1]
    last = batch["input_ids"].shape[1] - 1

    def cut_last_row(mask, hook):
        mask = mask.clone()
        mask[:, :, last] = False
        return mask

    def hooks(with_pattern):
        names = [f"blocks.{l}.attn.hook_attn_mask" for l in range(gemma.model.cfg.n_layers)]
        out = [(n, cut_last_row) for n in names]
        return out + ([(lambda n: n.endswith("hook_pattern"), lambda t, hook: None)] if with_pattern else [])

    streamed = received_attention(gemma.model, batch, query="last", key="real", fwd_hooks=hooks(False),
                                  progress=False)
    from_pattern = received_attention(gemma.model, batch, query="last", key="real", fwd_hooks=hooks(True),
                                      progress=False)
    assert all(r.abs().max() == 0 for r in streamed.received)
    text = attention_share(gemma.model, batch, keys=("image", "eoi", "text"), fwd_hooks=hooks(False), progress=False)
    text_p = attention_share(gemma.model, batch, keys=("image", "eoi", "text"), fwd_hooks=hooks(True), progress=False)
    assert torch.allclose(text.raw, text_p.raw, atol=1e-5) and text.raw.sum() > 1
    assert all(torch.equal(a, b) for a, b in zip(streamed.received, from_pattern.received))


# --- logit lens and visual-text similarity -----------------------------------------------
def test_logit_lens_matches_hf(fam):
    k = 4
    batch = fam.batches[1]
    states, logits = hf_states(fam, batch)
    img = fam.roles(batch)["image"]
    with torch.no_grad():
        ref_probs = [torch.softmax(fam.hf.lm_head(hf_lm(fam).norm(h[img])).float(), -1) for h in states]
    ref_top = [p.topk(k, -1) for p in ref_probs]
    labels = ref_top[2].indices[:3, 0].tolist()  # top-1 ids of a few image tokens after layer 1
    res = logit_lens(fam.model, batch, k=k, labels=labels, progress=False)
    n = fam.model.cfg.n_layers
    assert res.layers == ["embed"] + list(range(n)) and res.top_ids.shape == (int(img.sum()), n + 1, k)
    assert res.position.tolist() == img.nonzero()[:, 1].tolist()
    assert res.example.tolist() == img.nonzero()[:, 0].tolist()
    # the last layer is the model's own output distribution
    assert (ref_probs[-1] - torch.softmax(logits[img].float(), -1)).abs().max() < 1e-5
    diff = 0.0
    for li, (p, i) in enumerate(ref_top):
        assert torch.equal(res.top_ids[:, li], i), li
        diff = max(diff, (res.top_probs[:, li] - p).abs().max().item())
    hits = torch.stack([torch.isin(t.indices, torch.tensor(labels)).any(-1) for t in ref_top], 1)
    print(f"\n[{fam.name} logit_lens vs HF norm+lm_head] top-k ids equal, max prob diff {diff:.1e}")
    assert diff <= 1e-5
    assert torch.equal(res.hits, hits) and 0 < res.alignment[2] < 1
    assert torch.allclose(res.alignment, hits.float().mean(0))


@pytest.mark.parametrize("reference", ["prompt", "vocab"])
def test_visual_text_similarity_matches_hf(fam, reference):
    res = visual_text_similarity(fam.model, fam.batches, reference=reference, progress=False)
    W = fam.hf.get_input_embeddings().weight.float()
    want_max, want_mean = [], []
    for batch in fam.batches:
        states, _ = hf_states(fam, batch)
        roles = fam.roles(batch)
        for row in range(batch["input_ids"].shape[0]):
            img = roles["image"][row]
            if reference == "prompt":
                E = W[batch["input_ids"][row][roles["text"][row]].unique()]
            else:
                E = W
            cos = [torch.cosine_similarity(h[row][img].float()[:, None], E[None], dim=-1) for h in states]
            want_max.append(torch.stack([c.max(-1).values.mean() for c in cos]))
            want_mean.append(torch.stack([c.mean(-1).mean() for c in cos]))
    want_max, want_mean = torch.stack(want_max), torch.stack(want_mean)
    assert res.max.shape == want_max.shape == (3, fam.model.cfg.n_layers + 1)
    diff = max((res.max - want_max).abs().max().item(), (res.mean - want_mean).abs().max().item())
    print(f"\n[{fam.name} visual_text_similarity {reference} vs HF] max abs diff {diff:.1e}")
    assert diff <= 1e-5
    assert torch.allclose(res.mean_max, want_max.mean(0), atol=1e-5)


def test_bf16_runs_close_to_fp32_and_results_export(qwen):
    """In bf16 every metric runs (fp32 internals) and stays close to the fp32 numbers."""
    model16 = HookedVLM.from_hf(qwen.hf, dtype=torch.bfloat16)
    batch = qwen.batches[1]
    # tolerances about 5x the differences seen (3e-3, 1e-3)
    for fn, field, tol in [(attention_share, "share", 1.5e-2), (visual_text_similarity, "max", 1e-2)]:
        a, b = fn(qwen.model, batch, progress=False), fn(model16, batch, progress=False)
        assert getattr(b, field).dtype == torch.float32
        assert (getattr(a, field) - getattr(b, field)).abs().max() < tol, fn.__name__
        assert len(b.to_frame()) > 0 and set(b.to_dict()) >= {field, "layers"}
    ra, rb = (received_attention(m, batch, progress=False) for m in (qwen.model, model16))
    assert (ra.curve - rb.curve).abs().max() < 1e-2 and len(rb.to_frame()) == 3 * len(rb.thresholds)
    la, lb = (logit_lens(m, batch, k=3, progress=False) for m in (qwen.model, model16))
    p32, p16 = la.top_probs[:, :, 0], lb.top_probs[:, :, 0]
    assert lb.top_probs.dtype == torch.float32 and ((p32 - p16).abs() / p32).max() < 0.1  # seen: 2%
    assert len(lb.to_frame()) == lb.top_ids.numel() and lb.alignment is None
