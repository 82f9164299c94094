"""Every hook exists, fires, and an edit in it takes effect, equal to HF patched the same way."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_kwargs, hf_with_attention_edit
from mechvlm import HookedVLM
from mechvlm.synthetic import QWEN_IDS


@pytest.fixture
def result_model(qwen_hf):
    model = HookedVLM.from_hf(qwen_hf)
    model.set_use_attn_result(True)
    return model


@pytest.fixture
def visual_batch():
    """An image and a video in one prompt, so that hook_image_embeds and hook_video_embeds fire."""
    from mechvlm.synthetic import qwen_pixel_values, qwen_video_prompt

    g = torch.Generator().manual_seed(1)
    ids, igrid, vgrid = qwen_video_prompt([4, (1, 4, 6), 3, ("video", 2, 4, 4), 3], generator=g)
    return dict(input_ids=ids, pixel_values=qwen_pixel_values(igrid, generator=g), image_grid_thw=igrid,
                pixel_values_videos=qwen_pixel_values(vgrid, generator=g), video_grid_thw=vgrid)


def test_every_hook_fires(result_model, visual_batch):
    with torch.no_grad():
        _, cache = result_model.run_with_cache(**visual_batch)
    assert set(cache.keys()) == set(result_model.hook_dict)
    n = result_model.cfg.n_layers
    per_layer = {k.split(".", 2)[2] for k in result_model.hook_dict if k.startswith("blocks.0.")}
    for name in ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                 "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized",
                 "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
                 "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result",
                 "mlp.hook_pre", "mlp.hook_post"]:
        assert name in per_layer
        assert all(f"blocks.{l}.{name}" in cache.keys() for l in range(n))
    for name in ["hook_embed", "hook_image_embeds", "hook_video_embeds", "ln_final.hook_normalized",
                 "ln_final.hook_scale"]:
        assert name in cache.keys()


def test_hook_shapes(result_model, image_batch):
    cfg = result_model.cfg
    with torch.no_grad():
        _, cache = result_model.run_with_cache(**image_batch)
    b, p = image_batch["input_ids"].shape
    n_img = int((image_batch["input_ids"] == QWEN_IDS["image"]).sum())
    expect = {
        "hook_image_embeds": (n_img, cfg.d_model), "hook_embed": (b, p, cfg.d_model),
        "blocks.1.attn.hook_q": (b, p, cfg.n_heads, cfg.d_head),
        "blocks.1.attn.hook_k": (b, p, cfg.n_kv_heads, cfg.d_head),
        "blocks.1.attn.hook_v": (b, p, cfg.n_kv_heads, cfg.d_head),
        "blocks.1.attn.hook_rot_q": (b, p, cfg.n_heads, cfg.d_head),
        "blocks.1.attn.hook_attn_scores": (b, cfg.n_heads, p, p),
        "blocks.1.attn.hook_pattern": (b, cfg.n_heads, p, p),
        "blocks.1.attn.hook_attn_mask": (b, 1, p, p),
        "blocks.1.attn.hook_z": (b, p, cfg.n_heads, cfg.d_head),
        "blocks.1.attn.hook_result": (b, p, cfg.n_heads, cfg.d_model),
        "blocks.1.mlp.hook_pre": (b, p, cfg.d_mlp), "blocks.1.mlp.hook_post": (b, p, cfg.d_mlp),
        "blocks.1.ln1.hook_scale": (b, p, 1), "blocks.1.hook_resid_mid": (b, p, cfg.d_model),
    }
    for name, shape in expect.items():
        assert tuple(cache[name].shape) == shape, name
    # per-head results add up to the attention output (o_proj has no bias)
    assert torch.allclose(cache["blocks.1.attn.hook_result"].sum(2), cache["blocks.1.hook_attn_out"], atol=1e-5)
    # the hook_scale is the RMS divisor: normalized * scale == input
    x = cache["blocks.1.hook_resid_pre"]
    assert torch.allclose(cache["blocks.1.ln1.hook_normalized"] * cache["blocks.1.ln1.hook_scale"], x, atol=1e-5)


def _other_last_token_(t: torch.Tensor) -> torch.Tensor:  # hook_tokens: another last text token
    t[..., -1] = torch.where(t[..., -1] == 5, 6, 5)
    return t


def _perturb(t: torch.Tensor, hook) -> torch.Tensor:
    if t.dtype == torch.bool:  # attention mask: the last query may no longer see key 0
        t = t.clone()
        t[..., -1, 0] = False
        return t
    if not t.is_floating_point():
        return _other_last_token_(t.clone())
    return t * 1.5 + 0.1


def test_every_hook_edit_changes_logits(result_model, visual_batch):
    with torch.no_grad():
        visual_batch = {**visual_batch, **result_model.visual_embeds(**visual_batch)}  # the towers run once
        clean = result_model(**visual_batch)
        for name in result_model.hook_dict:
            edited = result_model.run_with_hooks(**visual_batch, fwd_hooks=[(name, _perturb)])
            assert (edited - clean).abs().max() > 1e-4, f"editing {name} had no effect"


def test_every_in_place_edit_takes_effect(result_model, visual_batch):
    def scale_in_place(t, hook):
        if t.dtype == torch.bool:
            t[..., -1, 0] = False
        elif not t.is_floating_point():
            _other_last_token_(t)
        else:
            t.mul_(1.5).add_(0.1)

    with torch.no_grad():
        visual_batch = {**visual_batch, **result_model.visual_embeds(**visual_batch)}  # the towers run once
        clean = result_model(**visual_batch)
        for name in result_model.hook_dict:
            edited = result_model.run_with_hooks(**visual_batch, fwd_hooks=[(name, scale_in_place)])
            assert (edited - clean).abs().max() > 1e-4, f"an in-place edit of {name} had no effect"


def test_in_place_mask_edit_stays_in_its_layer(qwen_model, image_batch):
    def cut_in_place(m, hook):
        m[..., -1, :] = False
        m[..., -1, -1] = True

    with torch.no_grad(), qwen_model.hooks(fwd_hooks=[("blocks.0.attn.hook_attn_mask", cut_in_place)]):
        _, cache = qwen_model.run_with_cache(**image_batch, names_filter="blocks.1.attn.hook_attn_mask")
    n = image_batch["input_ids"].shape[1]
    assert torch.equal(cache["blocks.1.attn.hook_attn_mask"][0, 0], torch.ones(n, n, dtype=torch.bool).tril())


def test_in_place_edit_takes_effect(qwen_model, image_batch):
    def zero_head(t, hook):
        t[:, 0] = 0.0  # in place, returns None
    with torch.no_grad():
        clean = qwen_model(**image_batch)
        edited = qwen_model.run_with_hooks(**image_batch, fwd_hooks=[("blocks.1.attn.hook_pattern", zero_head)])
    assert (edited - clean).abs().max() > 1e-4


def _image_positions(batch):
    return (batch["input_ids"][0] == QWEN_IDS["image"]).nonzero().squeeze(1)


def test_pattern_edit_equals_hf_patched(qwen_hf, qwen_model, image_batch):
    img = _image_positions(image_batch)
    last_text = int(img.max()) + 2

    def knock(w):  # text queries after the image no longer read image keys (no renormalisation)
        w = w.clone()
        w[:, :, last_text:, img] = 0.0
        return w

    ref_model = hf_with_attention_edit(qwen_hf, 1, pattern_fn=knock)
    with torch.no_grad():
        ref = ref_model(**hf_kwargs(image_batch)).logits
        out = qwen_model.run_with_hooks(**image_batch, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda t, hook: knock(t))])
        clean = qwen_model(**image_batch)
    assert (out - clean).abs().max() > 1e-3
    assert (out - ref).abs().max() <= 1e-4


def test_scores_edit_equals_hf_patched(qwen_hf, qwen_model, image_batch):
    p = image_batch["input_ids"].shape[1]
    bias = torch.randn(p, p, generator=torch.Generator().manual_seed(0))

    def add_bias(w):
        return w + bias

    ref_model = hf_with_attention_edit(qwen_hf, 2, scores_fn=add_bias)
    with torch.no_grad():
        ref = ref_model(**hf_kwargs(image_batch)).logits
        out = qwen_model.run_with_hooks(**image_batch, fwd_hooks=[("blocks.2.attn.hook_attn_scores", lambda t, hook: add_bias(t))])
        clean = qwen_model(**image_batch)
    assert (out - clean).abs().max() > 1e-3
    assert (out - ref).abs().max() <= 1e-4


def test_v_edit_equals_hf_patched(qwen_hf, qwen_model, image_batch):
    import copy

    img = _image_positions(image_batch)
    kv, d = qwen_model.cfg.n_kv_heads, qwen_model.cfg.d_head

    def zero_image_values(v):  # v: [b, pos, kv_head, d_head]
        v = v.clone()
        v[:, img, 0] = 0.0
        return v

    ref_model = copy.deepcopy(qwen_hf)
    v_proj = ref_model.model.language_model.layers[0].self_attn.v_proj
    v_proj.register_forward_hook(lambda mod, inp, out: zero_image_values(out.view(*out.shape[:2], kv, d)).flatten(2))
    with torch.no_grad():
        ref = ref_model(**hf_kwargs(image_batch)).logits
        out = qwen_model.run_with_hooks(**image_batch, fwd_hooks=[("blocks.0.attn.hook_v", lambda t, hook: zero_image_values(t))])
        clean = qwen_model(**image_batch)
    assert (out - clean).abs().max() > 1e-3
    assert (out - ref).abs().max() <= 1e-4


def test_attention_mask_hook_runs_on_sdpa_path(qwen_model, image_batch):
    """Masking keys in hook_attn_mask (no pattern hook: SDPA) equals masking the same
    scores with -inf-like values in hook_attn_scores (explicit path)."""
    img = _image_positions(image_batch)
    start = int(img.max()) + 1

    def mask_fn(m, hook):
        m = m.clone()
        m[:, :, start:, img] = False
        return m

    def scores_fn(s, hook):
        s = s.clone()
        s[:, :, start:, img] = torch.finfo(s.dtype).min
        return s

    with torch.no_grad():
        a = qwen_model.run_with_hooks(**image_batch, fwd_hooks=[("blocks.1.attn.hook_attn_mask", mask_fn)])
        b = qwen_model.run_with_hooks(**image_batch, fwd_hooks=[("blocks.1.attn.hook_attn_scores", scores_fn)])
    assert (a - b).abs().max() <= 1e-5
    assert not qwen_model.blocks[1].attn.needs_pattern()


def test_activation_cache_helpers_match_hf(qwen_hf, qwen_model, image_batch):
    with torch.no_grad():
        ref = qwen_hf(**hf_kwargs(image_batch), output_hidden_states=True)
        _, cache = qwen_model.run_with_cache(**image_batch)
    n = qwen_model.cfg.n_layers
    assert cache["pattern", 1].shape == cache["blocks.1.attn.hook_pattern"].shape
    assert torch.equal(cache["pattern", -1], cache[f"blocks.{n - 1}.attn.hook_pattern"])
    stacked = cache.stack_activation("resid_post")
    assert stacked.shape[0] == n
    accum = cache.accumulated_resid(apply_ln=True)
    assert accum.shape[0] == n + 1
    # final entry: the final norm applied to the last residual = HF's last hidden state
    assert (accum[-1] - ref.hidden_states[-1]).abs().max() <= 1e-4
    raw = cache.accumulated_resid()
    for l in range(n):
        assert (raw[l] - ref.hidden_states[l]).abs().max() <= 1e-4


def test_hooks_context_and_reset(qwen_model, image_batch):
    seen = []
    with torch.no_grad(), qwen_model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda t, hook: seen.append(hook.name))]):
        qwen_model(**image_batch)
        assert qwen_model.hook_dict["blocks.0.hook_resid_post"].fwd_hooks
    assert seen == ["blocks.0.hook_resid_post"]
    assert not any(hp.fwd_hooks for hp in qwen_model.hook_dict.values())
    qwen_model.add_hook("blocks.0.hook_resid_post", lambda t, hook: None)
    assert qwen_model.hook_dict["blocks.0.hook_resid_post"].fwd_hooks
    qwen_model.reset_hooks()
    assert not any(hp.fwd_hooks for hp in qwen_model.hook_dict.values())


def test_pattern_not_materialised_without_pattern_hooks(qwen_model, image_batch, monkeypatch):
    """With only cheap hooks attached, no layer takes the explicit softmax path."""
    calls = []
    for block in qwen_model.blocks:
        orig = block.attn._explicit
        monkeypatch.setattr(block.attn, "_explicit", lambda *a, _o=orig, **k: calls.append(1) or _o(*a, **k))
    with torch.no_grad():
        qwen_model.run_with_cache(**image_batch, names_filter=lambda n: "resid" in n or n.endswith("hook_z"))
        assert calls == []
        qwen_model.run_with_cache(**image_batch, names_filter="blocks.2.attn.hook_pattern")
    assert calls == [1]


def test_gradients_flow_through_hooks_not_into_vision(qwen_hf, image_batch):
    model = HookedVLM.from_hf(qwen_hf)
    grads = {}

    def keep_grad(t, hook):
        if t.requires_grad:
            t.retain_grad()
        else:  # the frozen vision tower's output is a leaf: ask for its gradient
            t.requires_grad_(True)
        grads[hook.name] = t

    logits = model.run_with_hooks(**image_batch, fwd_hooks=[("blocks.1.attn.hook_pattern", keep_grad),
                                                            ("hook_image_embeds", keep_grad)])
    logits[0, -1].logsumexp(-1).backward()
    assert grads["blocks.1.attn.hook_pattern"].grad.abs().sum() > 0
    assert grads["hook_image_embeds"].grad.abs().sum() > 0
    assert model.blocks[0].attn.q_proj.weight.grad is not None
    assert all(p.grad is None for p in model.vision.parameters())


def test_mlp_frees_the_gate_preactivation_before_up_proj(qwen_model, image_batch):
    """As HF's ``down(act(gate(x)) * up(x))``: when ``up(x)`` is computed the gate
    pre-activation is already freed (a forward holds at most three [pos, d_mlp] tensors, the
    peak memory of HF's MLP), and the MLP hooks still fire in the order pre, pre_linear, post."""
    import weakref

    mlp = qwen_model.blocks[0].mlp
    gate_out, order = [], []
    alive_at_up = []
    h1 = mlp.gate_proj.register_forward_hook(lambda m, i, o: gate_out.append(weakref.ref(o)))
    h2 = mlp.up_proj.register_forward_pre_hook(lambda m, i: alive_at_up.append(gate_out[-1]() is not None))
    hooks = [(f"blocks.0.mlp.{n}", lambda t, hook, n=n: order.append(n)) for n in ("hook_pre", "hook_pre_linear",
                                                                                    "hook_post")]
    try:
        with torch.no_grad():
            qwen_model(**image_batch, return_type=None)
            assert alive_at_up == [False]
            qwen_model.run_with_hooks(**image_batch, return_type=None, fwd_hooks=hooks)
    finally:
        h1.remove()
        h2.remove()
    assert order == ["hook_pre", "hook_pre_linear", "hook_post"]
