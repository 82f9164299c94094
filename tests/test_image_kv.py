"""`image_kv` against keys and values computed from Hugging Face's own attention modules.

The reference hooks HF's ``k_proj`` / ``v_proj`` (and Gemma3's ``k_norm``), takes the
rotary tables HF hands to each attention module and applies HF's ``apply_rotary_pos_emb``;
the image positions and grids come from how the test built the prompt, not from mechvlm.
"""

from __future__ import annotations

import pytest
import torch
from conftest import QWEN_IDS, hf_kwargs, qwen_batch

from mechvlm import HookedVLM
from mechvlm.analyses.image_kv import image_kv
from mechvlm.analyses.kv_store import ImageKVStore

torch.set_num_threads(min(2, torch.get_num_threads()))


def hf_reference(hf, kw: dict, image_id: int, module) -> dict:
    """Per layer ``key`` (post-RoPE), ``key_pre``, ``value`` ``[n_image, kv, d]`` of the
    image tokens (row-major over the batch), and ``vision`` (the first layer's input there)."""
    lm = hf.model.language_model
    got, handles = {}, []
    d = lm.config.head_dim if hasattr(lm.config, "head_dim") and lm.config.head_dim else \
        lm.config.hidden_size // lm.config.num_attention_heads
    for l, layer in enumerate(lm.layers):
        att = layer.self_attn
        handles.append(att.k_proj.register_forward_hook(lambda m, i, o, l=l: got.__setitem__(("k", l), o)))
        handles.append(att.v_proj.register_forward_hook(lambda m, i, o, l=l: got.__setitem__(("v", l), o)))
        handles.append(att.register_forward_pre_hook(
            lambda m, a, k, l=l: got.__setitem__(("rope", l), k["position_embeddings"]), with_kwargs=True))
    handles.append(lm.layers[0].register_forward_pre_hook(
        lambda m, a, k: got.__setitem__("x0", k.get("hidden_states", a[0] if a else None)), with_kwargs=True))
    try:
        with torch.no_grad():
            hf(**kw)
    finally:
        for h in handles:
            h.remove()
    image = kw["input_ids"] == image_id
    out = {"vision": got["x0"][image]}
    for l, layer in enumerate(lm.layers):
        b, n, _ = got[("k", l)].shape
        k = got[("k", l)].view(b, n, -1, d)
        if getattr(layer.self_attn, "k_norm", None) is not None:
            k = layer.self_attn.k_norm(k)
        cos, sin = got[("rope", l)]
        k_rot = module.apply_rotary_pos_emb(k.transpose(1, 2), k.transpose(1, 2), cos, sin)[1].transpose(1, 2)
        out[f"key_pre.{l}"] = k[image]
        out[f"key.{l}"] = k_rot[image]
        out[f"value.{l}"] = got[("v", l)].view(b, n, -1, d)[image]
    return out


def test_image_kv_equals_hf_qwen_multi_image_left_padded(qwen_hf, qwen_model):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq

    # row 0: two images (merged grids 2x3 and 2x2), row 1: one image; left-padded
    batch = qwen_batch([[3, (1, 4, 6), 2, (1, 4, 4), 3], [5, (1, 4, 4), 4]], seed=3)
    ref = hf_reference(qwen_hf, hf_kwargs(batch), QWEN_IDS["image"], mq)
    res = image_kv(qwen_model, batch, kinds=("key", "value", "key_pre"), progress=False)
    assert res.n_images == 3
    assert res.image_grid.tolist() == [[1, 2, 3], [1, 2, 2], [1, 2, 2]]
    assert res.image_example.tolist() == [0, 0, 1] and res.image_slot.tolist() == [0, 1, 0]
    for name, want in ref.items():
        got = res.features[name]
        assert got.shape == (want.shape[0], *want.shape[1:]) if name != "vision" else got.shape[1] == 1
        torch.testing.assert_close(got.reshape(want.shape), want, atol=2e-5, rtol=1e-4, msg=name)
    # the grid: token j of an image is cell (j // w, j % w) of its merged grid, as HF's processor lays it
    first = ref["key.1"][:6].view(2, 3, *ref["key.1"].shape[1:])
    torch.testing.assert_close(res.grid("key", 1, 0), first, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(res.stack("value", 2, images=[1, 2])[1],
                               ref["value.2"][10:14].view(2, 2, *ref["value.2"].shape[1:]), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="different grids"):
        res.stack("key", 0)


def test_image_kv_equals_hf_gemma3():
    from test_gemma3 import IMG, batch_from, hf_kwargs as gemma_kwargs, make_hf
    from transformers.models.gemma3 import modeling_gemma3 as mg

    hf = make_hf(seed=2, n_layers=3)
    model = HookedVLM.from_hf(hf)
    batch = batch_from([[3, "image", 2, "image", 2], [4, "image", 3]], mm=4, seed=5)
    kw = gemma_kwargs(batch)
    am = batch["attention_mask"]
    kw["position_ids"] = (am.cumsum(-1) - 1).clamp(min=0)  # real-token positions, as mechvlm counts them
    ref = hf_reference(hf, kw, IMG, mg)
    res = image_kv(model, batch, kinds=("key", "value", "key_pre"), progress=False)
    assert res.n_images == 3 and res.image_grid.tolist() == [[1, 2, 2]] * 3
    for name, want in ref.items():
        torch.testing.assert_close(res.features[name].reshape(want.shape), want, atol=2e-5, rtol=1e-4, msg=name)


def _batches(n: int):
    return [qwen_batch([[2, (1, 4, 4), 3]] * 2, seed=10 + i) for i in range(n)]


def test_image_kv_shards_round_trip_resume_and_overwrite(tmp_path, qwen_model):
    batches = _batches(5)
    full = image_kv(qwen_model, batches, layers=[0, 2], progress=False)
    store = image_kv(qwen_model, batches, layers=[0, 2], out_dir=tmp_path / "kv", shard_tokens=8, progress=False)
    assert isinstance(store, ImageKVStore) and store.complete and len(store.manifest["shards"]) == 5
    loaded = store.load()
    assert loaded.n_images == full.n_images == 10
    for name, t in full.features.items():
        assert torch.equal(loaded.features[name], t), name
    assert torch.equal(loaded.image_offset, full.image_offset) and torch.equal(loaded.image_example, full.image_example)
    one = store.load(kinds=["value"], layers=[2])
    assert set(one.features) == {"value.2"} and torch.equal(one.features["value.2"], full.features["value.2"])

    def interrupted():
        yield from batches[:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        image_kv(qwen_model, interrupted(), layers=[0, 2], out_dir=tmp_path / "part", shard_tokens=16, progress=False)
    part = ImageKVStore(tmp_path / "part")
    assert not part.complete and part.manifest["batches_done"] == 2  # whole shards only
    with pytest.raises(FileExistsError, match="resume=True"):
        image_kv(qwen_model, batches, layers=[0, 2], out_dir=tmp_path / "part", progress=False)
    resumed = image_kv(qwen_model, batches, layers=[0, 2], out_dir=tmp_path / "part", shard_tokens=16,
                       resume=True, progress=False).load()
    for name, t in full.features.items():
        assert torch.equal(resumed.features[name], t), name
    assert torch.equal(resumed.image_example, full.image_example)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        image_kv(qwen_model, batches, layers=[0], out_dir=tmp_path / "kv", progress=False)
    again = image_kv(qwen_model, batches[:1], layers=[1], out_dir=tmp_path / "kv", overwrite=True, progress=False)
    assert again.layers == [1] and again.n_images == 2
    assert sorted(p.name for p in (tmp_path / "kv").iterdir()) == ["index.json", "shard-00000.safetensors"]
