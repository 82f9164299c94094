"""Causal tracing: restoring every site gives the clean logits, restoring none the corrupted
ones, and the batched sites equal a one-site-per-forward loop written with
`interventions.patch_activations` on each example alone."""

from __future__ import annotations

import pytest
import torch
from conftest import qwen_batch

from mechvlm.analyses.causal_tracing import Site, causal_trace, default_groups, run_sites
from mechvlm.analyses.forward_rows import image_embeds
from mechvlm.interventions import patch_activations

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def clean_and_swapped():
    clean = qwen_batch([[3, (1, 4, 4), 4], [3, (1, 4, 4), 4]], seed=20)
    swapped = dict(clean, pixel_values=qwen_batch([[3, (1, 4, 4), 4]] * 2, seed=21)["pixel_values"])
    return clean, swapped


def _logits(model, batch, hooks=(), embeds=None):
    with torch.no_grad():
        return model.run_with_hooks(**batch, image_embeds=embeds, fwd_hooks=list(hooks))[:, -1]


def test_restoring_every_site_gives_the_clean_logits_and_none_the_corrupted(qwen_model, clean_and_swapped):
    clean, swapped = clean_and_swapped
    roles = qwen_model.roles(**clean)
    groups = {"all": roles.real, "none": torch.zeros_like(roles.real)}
    emb = image_embeds(qwen_model, clean)
    noisy = emb + 3.0 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))
    clean_logits = _logits(qwen_model, clean)
    for corrupted, embeds in ((swapped, None), (clean, noisy)):
        corrupt_logits = _logits(qwen_model, corrupted, embeds=embeds)
        assert (corrupt_logits - clean_logits).abs().max() > 0.1
        L = qwen_model.cfg.n_layers
        sites = [Site("resid", (l,), "all") for l in range(L)] + [Site("resid", (0,), "none"),
                                                                  Site("attn", tuple(range(L)), "none")]
        out, n_fwd = run_sites(qwen_model, clean, corrupted, sites, groups, corrupted_embeds=embeds,
                               sites_per_forward=2)
        assert n_fwd == 1 + 3
        for i in range(L):
            torch.testing.assert_close(out[i], clean_logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(out[L], corrupt_logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(out[L + 1], corrupt_logits, atol=1e-6, rtol=0)
    res = causal_trace(qwen_model, clean, swapped, groups={"all": "real"}, progress=False)
    torch.testing.assert_close(res.p[..., 0], res.p_clean[:, None].expand(-1, qwen_model.cfg.n_layers))
    torch.testing.assert_close(res.recovery, torch.ones(qwen_model.cfg.n_layers, 1))


def test_batched_sites_equal_one_forward_per_site(qwen_model, clean_and_swapped):
    clean, swapped = clean_and_swapped
    roles = qwen_model.roles(**clean)
    groups = default_groups(roles)
    assert sum(groups[f"image row {r}"] for r in range(2)).eq(roles.image.long()).all()  # rows partition the image
    sites = [Site("resid", (1,), "image row 0"), Site("attn", (0, 1), "last"), Site("mlp", (2,), "text"),
             Site("resid", (0,), "eoi"), Site("head", (1,), "last", head=3), Site("head", (0,), "image row 1", head=0)]
    out, _ = run_sites(qwen_model, clean, swapped, sites, groups, sites_per_forward=4)
    hook = {"resid": "hook_resid_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out", "head": "attn.hook_z"}
    from mechvlm.forward_args import VLMBatch

    image_id = qwen_model.cfg.image_token_id
    for b in range(2):  # each example alone, with its own image
        one_c, one_s = (VLMBatch(x, image_token_id=image_id)[b:b + 1] for x in (clean, swapped))
        names = [f"blocks.{l}.{hook[s.kind]}" for s in sites for l in s.layers]
        _, cache = qwen_model.run_with_cache(**one_c, names_filter=names)
        for i, s in enumerate(sites):
            pos = groups[s.group][b:b + 1]
            hooks = []
            for l in s.layers:
                name = f"blocks.{l}.{hook[s.kind]}"
                if s.kind == "head":  # the clean head output, every other head as the corrupted run has it
                    def one_head(z, hook, clean_z=cache[name], h=s.head, p=pos):
                        z = z.clone()
                        z[:, :, h] = torch.where(p[..., None], clean_z[:, :, h], z[:, :, h])
                        return z
                    hooks.append((name, one_head))
                else:
                    hooks += patch_activations(cache, name, positions=pos)
            want = _logits(qwen_model, one_s, hooks)[0]
            torch.testing.assert_close(out[i, b], want, atol=2e-5, rtol=1e-4, msg=str(s))


def test_causal_trace_map_and_cost(qwen_model, clean_and_swapped):
    clean, _ = clean_and_swapped
    res = causal_trace(qwen_model, clean, heads=True, kind="mlp", window=3, sites_per_forward=8, progress=False)
    L, H = qwen_model.cfg.n_layers, qwen_model.cfg.n_heads
    assert res.groups == ["image row 0", "image row 1", "eoi", "text", "last"]
    assert res.p.shape == (2, L, 5) and res.p_heads.shape == (2, L, H)
    n_sites = L * 5 + L * H
    assert res.n_forwards == 2 + 1 + -(-n_sites // 8)
    assert (res.p_corrupt - res.p_clean).abs().max() > 0  # the noise changes the answer's probability
    d = res.to_dict()
    assert d["recovery"].shape == (L, 5) and d["corruption"] == "noise"


def test_window_layers_as_rome():
    from mechvlm.analyses.causal_tracing import window_layers

    assert window_layers(5, 1, 10) == (5,)
    assert window_layers(5, 3, 10) == (4, 5, 6)
    assert window_layers(5, 10, 36) == tuple(range(0, 10))   # ROME: range(i - w // 2, i - (-w // 2))
    assert window_layers(2, 10, 36) == tuple(range(0, 7))    # clipped at the first layer
    assert window_layers(20, 10, 36) == tuple(range(15, 25))
    assert window_layers(34, 10, 36) == tuple(range(29, 36))  # clipped at the last layer


def test_batched_sites_equal_transformer_lens_patching(qwen_model, clean_and_swapped):
    """TransformerLens' own patching (one forward per index, on a batch mapping) as the reference."""
    import pandas as pd
    from transformer_lens import patching

    from mechvlm.forward_args import VLMBatch

    image_id = qwen_model.cfg.image_token_id
    clean, swapped = (VLMBatch(b, image_token_id=image_id)[:1] for b in clean_and_swapped)  # row 0 with its image
    with torch.no_grad():
        clean_logits, clean_cache = qwen_model.run_with_cache(clean)
    answer = int(clean_logits[0, -1].argmax())
    metric = lambda logits: logits[0, -1, answer]  # noqa: E731
    L, n = qwen_model.cfg.n_layers, clean["input_ids"].shape[1]
    cells = [(l, p) for l in range(L) for p in (2, 4, 8, n - 1)]  # text, image, EOI, last
    with torch.no_grad():
        tl = patching.generic_activation_patch(qwen_model, swapped, clean_cache, metric,
                                               patch_setter=patching.layer_pos_patch_setter,
                                               activation_name="resid_post",
                                               index_df=pd.DataFrame(cells, columns=["layer", "pos"]))
        tl_heads = patching.get_act_patch_attn_head_out_all_pos(qwen_model, swapped, clean_cache, metric)
    groups = {f"p{p}": torch.zeros(1, n, dtype=torch.bool).index_fill_(1, torch.tensor([p]), True)
              for p in (2, 4, 8, n - 1)}
    groups["all"] = torch.ones(1, n, dtype=torch.bool)
    sites = [Site("resid", (l,), f"p{p}") for l, p in cells]
    sites += [Site("head", (l,), "all", head=h) for l in range(L) for h in range(qwen_model.cfg.n_heads)]
    out, n_fwd = run_sites(qwen_model, clean, swapped, sites, groups, reduce=lambda lg: lg[:, answer],
                           sites_per_forward=len(sites))
    assert n_fwd == 2  # the clean cache + one forward for every site; TransformerLens ran one per site
    torch.testing.assert_close(out[:len(cells), 0], tl.float(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[len(cells):, 0].view(L, -1), tl_heads.float(), atol=2e-5, rtol=1e-4)
