"""from_pretrained on a local directory laid out like the hub's Qwen2.5-VL checkpoints:
the flat (pre-v5) config.json with ``rope_scaling: {type: mrope}`` and the legacy weight
names (``model.layers.*``, ``visual.*``), sharded safetensors with an index."""

from __future__ import annotations

import copy
import json

import torch
from safetensors.torch import save_file

from conftest import make_hf_qwen, qwen_batch
from mechvlm import HookedVLM
from mechvlm.synthetic import QWEN_IDS


def _legacy_config(hf) -> dict:
    t, v = hf.config.text_config, hf.config.vision_config
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0, "bos_token_id": QWEN_IDS["bos"], "eos_token_id": QWEN_IDS["eos"],
        "vision_start_token_id": QWEN_IDS["vision_start"], "vision_end_token_id": QWEN_IDS["vision_end"],
        "image_token_id": QWEN_IDS["image"], "video_token_id": QWEN_IDS["video"],
        "hidden_act": "silu", "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "max_position_embeddings": 4096, "max_window_layers": 70, "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers, "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "sliding_window": 32768, "use_sliding_window": False,
        "tie_word_embeddings": True, "torch_dtype": "float32", "transformers_version": "4.49.0",
        "vocab_size": t.vocab_size, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vision_config": {"depth": v.depth, "hidden_act": "silu", "hidden_size": v.hidden_size,
                          "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "in_chans": 3,
                          "out_hidden_size": v.out_hidden_size, "patch_size": 14, "spatial_merge_size": 2,
                          "spatial_patch_size": 14, "window_size": v.window_size,
                          "fullatt_block_indexes": list(v.fullatt_block_indexes), "tokens_per_second": 2,
                          "temporal_patch_size": 2},
    }


def test_from_pretrained_on_hub_layout_directory(tmp_path):
    hf = make_hf_qwen(seed=5, n_layers=2, tie=True)
    legacy = {}
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied: the hub checkpoint of the 3B stores no lm_head
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        legacy[k] = v.contiguous().clone()
    assert "model.layers.0.self_attn.q_proj.bias" in legacy and "visual.merger.mlp.0.weight" in legacy
    names = sorted(legacy)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: legacy[k] for k in keys}, str(tmp_path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(_legacy_config(hf)))

    loaded = HookedVLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    reference = copy.deepcopy(hf)
    reference.set_attn_implementation("sdpa")
    direct = HookedVLM.from_hf(reference)
    assert loaded.cfg.mrope_section == (2, 3, 3) and loaded.cfg.tie_word_embeddings
    assert loaded.cfg.image_end_token_id == QWEN_IDS["vision_end"]
    batch = qwen_batch([[3, (1, 4, 6), 4]], seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(**batch), direct(**batch))
