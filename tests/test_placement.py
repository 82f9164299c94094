"""Models placed over devices (`mechvlm.placement`), on CPU.

* The automatic maps are HF's own: the map ``transformers`` computes for the HF model under
  the same ``max_memory`` (accelerate-level device ids, no GPU needed), renamed.
* Offloaded halves (accelerate's hooks: weights on disk or in a CPU copy, loaded per
  forward) give bit-identical logits, caches and metrics to the unsplit model.
* A split between the CPU and the ``meta`` device shows the routing: every hook point sees
  its block's device, the residual stream moves at the block boundary.
The split over two real accelerators is `scripts/gpu_placement_check.py`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_qwen, qwen_batch

from mechvlm import HookedVLM, attention_share
from mechvlm.interventions import knockout, mean_head_outputs
from mechvlm.placement import _offload, expand_device_map, infer_device_map, place
from mechvlm.toy.checkpoint import SHIPPED


@pytest.fixture(scope="module")
def hf4():
    return make_hf_qwen(seed=3, n_layers=4)


@pytest.fixture(scope="module")
def batch():
    return qwen_batch([[4, (1, 4, 6), 6], [3, (1, 4, 4), 2]], seed=1)


@pytest.fixture(scope="module")
def reference(hf4, batch):
    model = HookedVLM.from_hf(hf4)
    with torch.no_grad():
        logits, cache = model.run_with_cache(**batch, names_filter=lambda n: n.endswith(("resid_pre", "hook_z")))
    return model, logits, cache


def _hf_name_to_piece(name: str) -> str:
    """HF Qwen2.5-VL module names -> mechvlm pieces (for the reference maps)."""
    name = name.replace("model.visual", "vision").replace("model.language_model.embed_tokens", "embed")
    name = name.replace("model.language_model.layers", "blocks").replace("model.language_model.norm", "ln_final")
    return name.replace("lm_head", "unembed")


@pytest.mark.parametrize("mode", ["sequential", "auto", "balanced_low_0"])
@pytest.mark.parametrize("budget", [(3.5, 10), (2.2, 2.5), (1.2, 1.5)])
def test_automatic_maps_are_the_ones_hf_computes(mode, budget):
    from accelerate.utils import compute_module_sizes
    from transformers.integrations.accelerate import _get_device_map

    hf = make_hf_qwen(seed=3, n_layers=6)
    model = HookedVLM.from_hf(hf)
    sizes = compute_module_sizes(hf)
    block = sizes["model.language_model.layers.0"]
    first = sizes["model.visual"] + sizes["model.language_model.embed_tokens"]
    mem = {0: int(first + budget[0] * block), 1: int(budget[1] * block), "cpu": 10**9}
    theirs = _get_device_map(hf, mode, dict(mem), None)
    theirs = expand_device_map(model, {_hf_name_to_piece(k): v for k, v in theirs.items()
                                       if not k.endswith("rotary_emb")})
    ours = infer_device_map(model, mode, mem)
    assert ours == theirs
    if budget == (2.2, 2.5):  # a three-way split: two devices and the CPU
        assert set(ours.values()) == {"cuda:0", "cuda:1", "cpu"}


@pytest.mark.parametrize("budget", [1.5, 2.5])
def test_tied_embeddings_stay_together_as_in_hf(budget):
    """The unembedding shares the embedding's weight: both go where the embedding goes
    (accelerate matches ties by substring, which ``embed`` / ``unembed`` would defeat)."""
    from accelerate.utils import compute_module_sizes
    from transformers.integrations.accelerate import _get_device_map

    hf = make_hf_qwen(seed=3, n_layers=4, tie=True)
    model = HookedVLM.from_hf(hf)
    sizes = compute_module_sizes(hf)
    block = sizes["model.language_model.layers.0"]
    mem = {0: int(sizes["model.visual"] + sizes["model.language_model.embed_tokens"] + budget * block),
           1: 10 * block, "cpu": 10**9}
    theirs = {_hf_name_to_piece(k): v for k, v in _get_device_map(hf, "sequential", dict(mem), None).items()
              if not k.endswith("rotary_emb")}
    ours = infer_device_map(model, "sequential", mem)
    assert ours == expand_device_map(model, theirs)
    assert ours["embed"] == ours["unembed"] == "cuda:0" and ours["blocks.3"] == "cuda:1"


def test_device_maps_are_checked(hf4):
    model = HookedVLM.from_hf(hf4)
    with pytest.raises(ValueError, match="no device to ln_final, unembed"):
        expand_device_map(model, {"vision": 0, "embed": 0, "blocks": 1})
    with pytest.raises(ValueError, match="inside the piece 'blocks.1'"):
        expand_device_map(model, {"": 0, "blocks.1.attn": 1})
    with pytest.raises(ValueError, match="names no part"):
        expand_device_map(model, {"": 0, "lm_head": 1})
    assert expand_device_map(model, {"": "cpu", "blocks": 1, "blocks.3": "disk"})["blocks.2"] == "cuda:1"
    with pytest.raises(ValueError, match="offload_folder"):
        HookedVLM.from_hf(hf4, device_map={"": "cpu", "blocks.3": "disk"})
    with pytest.raises(ValueError, match="mutually exclusive"):
        HookedVLM.from_hf(hf4, device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="requires CUDA"):  # TransformerLens' own check
        HookedVLM.from_hf(hf4, n_devices=2)
    tied = HookedVLM.from_hf(make_hf_qwen(seed=3, n_layers=2, tie=True))
    with pytest.raises(ValueError, match="tied to the embedding"):
        place(tied, {"": "cpu", "unembed": "meta"})


def test_disk_offloaded_half_gives_identical_logits_cache_and_metrics(hf4, batch, reference, tmp_path):
    ref_model, ref_logits, ref_cache = reference
    model = HookedVLM.from_hf(hf4, device_map={"": "cpu", "blocks.2": "disk", "blocks.3": "disk", "ln_final": "disk"},
                              offload_folder=tmp_path)
    assert model.placement.offloaded == {"blocks.2", "blocks.3", "ln_final"}
    assert model.blocks[3].mlp.up_proj.weight.is_meta  # really offloaded: loaded only during its forward
    assert (tmp_path / "blocks.3" / "index.json").is_file()
    with torch.no_grad():
        logits, cache = model.run_with_cache(**batch, names_filter=lambda n: n.endswith(("resid_pre", "hook_z")),
                                             device="cpu")
    assert torch.equal(logits, ref_logits)
    assert set(cache.keys()) == set(ref_cache.keys())
    assert all(torch.equal(cache[k], ref_cache[k]) for k in ref_cache.keys())
    assert model.blocks[3].mlp.up_proj.weight.is_meta  # dropped again after the forward
    roles = model.roles(**batch)
    with torch.no_grad():
        ko = model.run_with_hooks(**batch, fwd_hooks=knockout(roles, "text", "image"))
        ko_ref = ref_model.run_with_hooks(**batch, fwd_hooks=knockout(roles, "text", "image"))
    assert torch.equal(ko, ko_ref)
    got, want = (attention_share(m, batch, progress=False) for m in (model, ref_model))
    assert torch.equal(got.raw, want.raw)


def test_cpu_offloaded_halves_give_identical_logits(hf4, batch, reference):
    """Accelerate's CPU offload (what ``"cpu"`` means next to a GPU), each half its own
    offloaded piece, run here on the CPU itself."""
    _, ref_logits, _ = reference
    model = HookedVLM.from_hf(hf4)
    for half in (model.blocks[:2], model.blocks[2:]):
        for block in half:
            _offload(block, torch.device("cpu"), None)
    assert all(b.attn.q_proj.weight.is_meta for b in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(**batch), ref_logits)


def test_a_split_with_the_meta_device_routes_every_hook_to_its_block_device(hf4, batch):
    model = HookedVLM.from_hf(hf4)
    place(model, {"": "cpu", "blocks.2": "meta", "blocks.3": "meta", "ln_final": "meta", "unembed": "meta"},
          cpu_offload=False)
    seen = {}

    def record(t, hook):
        seen[hook.name] = t.device.type

    names = [f"blocks.{l}.{p}" for l in range(4) for p in ("hook_resid_pre", "attn.hook_attn_mask",
                                                          "attn.hook_pattern", "mlp.hook_post")]
    assert model.device == torch.device("cpu")
    with torch.no_grad():
        model.run_with_hooks(**batch, fwd_hooks=[(n, record) for n in names], return_type=None)
    assert seen == {n: "cpu" if n.startswith(("blocks.0.", "blocks.1.")) else "meta" for n in names}
    means = mean_head_outputs(model, [batch])  # its token mask follows each layer's device
    assert [means[l].device.type for l in range(4)] == ["cpu", "cpu", "meta", "meta"]
    with pytest.raises(RuntimeError, match="placed over devices"):
        model.to("cpu")


def test_from_pretrained_with_device_maps(batch, tmp_path):
    from mechvlm.processing import InputBuilder

    path = SHIPPED["qwen2_5_vl"]
    builder = InputBuilder.from_pretrained(path)
    from PIL import Image

    inputs = builder(["What is in the image?"], [[Image.new("RGB", (112, 112), (200, 30, 30))]])
    plain = HookedVLM.from_pretrained(str(path))
    auto = HookedVLM.from_pretrained(str(path), device_map="auto")  # on a CPU-only machine: all on the CPU
    assert set(auto.placement.device_map.values()) == {"cpu"}
    split = HookedVLM.from_pretrained(str(path), device_map={"": "cpu", "blocks.1": "disk", "blocks.3": "disk"},
                                      offload_folder=tmp_path)
    with torch.no_grad():
        want = plain(**inputs)
        assert torch.equal(auto(**inputs), want)
        assert torch.equal(split(**inputs), want)


def test_each_torchrun_process_gets_its_share_of_the_gpus(monkeypatch):
    import accelerate.utils

    from mechvlm.placement import rank_max_memory

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 4)
    monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda: {0: 10, 1: 11, 2: 12, 3: 13, "cpu": 100})
    assert rank_max_memory() is None  # one process: every GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_max_memory() == {2: 12, 3: 13, "cpu": 50}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(ValueError, match="8 processes per node share 4 accelerators"):
        rank_max_memory()
