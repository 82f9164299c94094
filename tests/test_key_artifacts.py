"""Input-agnostic keys: the closed-form cross-image cosine against a loop over image pairs,
and the key replacement against the identity (replacing keys with their own mean)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mechvlm.analyses.image_kv import ImageKV
from mechvlm.analyses.key_artifacts import key_artifacts, replace_artifact_keys

torch.set_num_threads(min(2, torch.get_num_threads()))


def hand_kv(n_images: int = 5, h: int = 2, w: int = 3, kv: int = 2, d: int = 4) -> ImageKV:
    g = torch.Generator().manual_seed(0)
    feats = {}
    for l in (0, 2):
        keys = torch.randn(n_images, h, w, kv, d, generator=g)
        # an input-agnostic key: the same direction (different norms) in every image
        keys[:, 0, 1, 1] = torch.tensor([1.0, -2.0, 0.5, 3.0]) * torch.arange(1, n_images + 1)[:, None]
        feats[f"key.{l}"] = keys.reshape(-1, kv, d)
        feats[f"value.{l}"] = torch.randn(n_images * h * w, kv, d, generator=g)
    return ImageKV(features=feats, image_example=torch.arange(n_images), image_slot=torch.zeros(n_images, dtype=torch.long),
                   image_grid=torch.tensor([[1, h, w]] * n_images), image_offset=torch.arange(n_images) * h * w,
                   layers=[0, 2], kinds=["key", "value"])


def brute_force_consistency(x: torch.Tensor) -> torch.Tensor:
    """Mean cosine over ordered pairs ``i != j``, one pair at a time."""
    n = x.shape[0]
    total = torch.zeros(x.shape[1:-1], dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i != j:
                total += F.cosine_similarity(x[i].double(), x[j].double(), dim=-1)
    return total / (n * (n - 1))


def test_consistency_equals_the_mean_over_image_pairs():
    kv = hand_kv()
    res = key_artifacts(kv, threshold=0.99)
    for i, l in enumerate(res.layers):
        torch.testing.assert_close(res.consistency[i].double(), brute_force_consistency(kv.stack("key", l)),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(res.value_consistency[i].double(), brute_force_consistency(kv.stack("value", l)),
                                   atol=1e-6, rtol=0)
    # the planted key is the only artifact, in both layers
    expected = torch.zeros(2, 2, 3, 2, dtype=torch.bool)
    expected[:, 0, 1, 1] = True
    assert torch.equal(res.artifacts, expected)
    assert res.fraction.tolist() == pytest.approx([1 / 12, 1 / 12])
    with pytest.raises(ValueError, match="at least two"):
        key_artifacts(ImageKV(**{**kv.__dict__, "image_grid": kv.image_grid[:1], "image_offset": kv.image_offset[:1],
                                 "image_example": kv.image_example[:1], "image_slot": kv.image_slot[:1]}))


@pytest.fixture(scope="module")
def toy():
    from mechvlm import HookedVLM
    from mechvlm.processing import InputBuilder
    from mechvlm.toy.checkpoint import SHIPPED
    from mechvlm.toy.scenes import make_scenes
    from mechvlm.toy.train import open_item

    model = HookedVLM.from_pretrained(str(SHIPPED["qwen2_5_vl"]))
    builder = InputBuilder.from_pretrained(SHIPPED["qwen2_5_vl"])
    scenes = make_scenes(3, seed=11)
    batches = [builder([open_item(s)[0]], [[s.pil_image()]]) for s in scenes]
    return model, batches


def test_replacing_keys_with_their_own_mean_changes_nothing(toy):
    """Every image key replaced (threshold below any cosine) by the mean over a reference
    holding only the same image: pre-RoPE means re-rotated at their positions must give the
    clean distribution back; a reference of other images must not."""
    from mechvlm.analyses.image_kv import image_kv

    model, batches = toy
    kv = image_kv(model, batches, kinds=("key",), vision=False, progress=False)
    every = key_artifacts(kv, threshold=-2.0)
    assert bool(every.artifacts.all())
    same = replace_artifact_keys(model, batches[0], every, reference=batches[0], n_random=1)
    assert same["artifacts"]["kl"] < 1e-9 and abs(same["artifacts"]["dp_top1"]) < 1e-6
    assert same["n_keys"] == [every.artifacts[i].numel() for i in range(len(every.layers))]
    other = replace_artifact_keys(model, batches[0], every, reference=batches[1:], n_random=1)
    assert other["artifacts"]["kl"] > 1e-4
