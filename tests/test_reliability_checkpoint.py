"""A checkpoint that is not exactly the model is refused, naming the tensors; a missing or
wrong path says so.

Before issue 12, HF initialised a missing weight at random (a log line only), ignored an
unexpected one, and `mechvlm report` ran to the end with exit status 0; a missing folder
got HF's repo-id message and a file got a JSON / ``weights_only`` message."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import make_hf_qwen
from mechvlm import HookedVLM
from mechvlm.checkpoint_check import CheckpointMismatchError
from mechvlm.cli import main
from mechvlm.toy.checkpoint import SHIPPED


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "qwen"
    make_hf_qwen(seed=1, n_layers=2).save_pretrained(d)
    return d


def _variant(src, dst, edit):
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_language_model_tensor(saved, tmp_path):
    d = _variant(saved, tmp_path / "m", lambda sd: sd.pop("model.layers.0.mlp.down_proj.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"missing.*model\.language_model\.layers\.0\.mlp\.down_proj\.weight"):
        HookedVLM.from_pretrained(str(d))


def test_missing_vision_tower_tensor(saved, tmp_path):
    d = _variant(saved, tmp_path / "v", lambda sd: sd.pop("visual.blocks.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"missing.*model\.visual\.blocks\.1\.mlp\.up_proj\.weight"):
        HookedVLM.from_pretrained(str(d))


def test_unexpected_tensor(saved, tmp_path):
    import torch

    d = _variant(saved, tmp_path / "u", lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointMismatchError, match=r"not used by the model.*layers\.0\.extra\.weight"):
        HookedVLM.from_pretrained(str(d))


def _sharded(saved, dst):
    shutil.copytree(saved, dst)
    sd = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    return weight_map, shards


def _write_index(dst, weight_map):
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_checkpoint_with_a_shard_left_out_of_the_index(saved, tmp_path):
    d = tmp_path / "s1"
    weight_map, shards = _sharded(saved, d)
    second = "model-00002-of-00002.safetensors"
    _write_index(d, {k: v for k, v in weight_map.items() if v != second})  # its tensors are never read
    with pytest.raises(CheckpointMismatchError, match=rf"{second} are not in the index"):
        HookedVLM.from_pretrained(str(d))


def test_sharded_checkpoint_with_an_index_entry_removed(saved, tmp_path):
    d = tmp_path / "s2"
    weight_map, _ = _sharded(saved, d)
    gone = sorted(weight_map)[-1]
    _write_index(d, {k: v for k, v in weight_map.items() if k != gone})
    with pytest.raises(CheckpointMismatchError, match=rf"holds 1 tensor\(s\) the index does not list: {gone}"):
        HookedVLM.from_pretrained(str(d))
    # the intact index loads
    _write_index(d, weight_map)
    HookedVLM.from_pretrained(str(d))


def test_report_refuses_a_checkpoint_with_a_missing_tensor(tmp_path):
    d = _variant(SHIPPED["qwen2_5_vl"], tmp_path / "toy",
                 lambda sd: sd.pop(sorted(k for k in sd if k.endswith("mlp.down_proj.weight"))[0]))
    with pytest.raises(CheckpointMismatchError, match=r"missing.*down_proj\.weight"):
        main(["report", "--model", str(d), "--limit", "2", "--out", str(tmp_path / "r"), "--no-progress"])
    assert not (tmp_path / "r" / "report.html").exists()


def test_missing_directory_says_no_such_directory(tmp_path, capsys):
    for name in (str(tmp_path / "nope"), "./nope", "nope-model"):
        with pytest.raises(FileNotFoundError, match="no such directory"):
            HookedVLM.from_pretrained(name)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        main(["hooks", "--model", str(tmp_path / "nope")])
    with pytest.raises(FileNotFoundError, match="no such directory"):
        main(["report", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])


def test_a_file_instead_of_a_directory(saved, capsys):
    with pytest.raises(NotADirectoryError, match="is a file, not a checkpoint directory") as e:
        HookedVLM.from_pretrained(str(saved / "model.safetensors"))
    assert "weights_only" not in str(e.value) and "JSON" not in str(e.value)
    with pytest.raises(NotADirectoryError, match="is a file"):
        main(["hooks", "--model", str(saved / "config.json")])
    assert "weights_only" not in capsys.readouterr().err


def test_strict_false_loads_with_a_warning(saved, tmp_path):
    import torch

    d = _variant(saved, tmp_path / "w", lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.warns(UserWarning, match=r"extra\.weight.*strict=False"):
        HookedVLM.from_pretrained(str(d), strict=False)
