"""The command line on the shipped toys and as the docs show it.

Before issue 12: ``mechvlm hooks`` probed with ids that hit the toys' video / image tokens;
``mechvlm train-toy`` forwarded no argument (``--help`` and the docs' command failed);
``crosscheck`` built its inputs with HF's AutoProcessor, which expanded a toy Gemma3 image
to 256 tokens for 16 features and, for Qwen2.5-VL, fails here with an empty ImportError."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from mechvlm.cli import main
from mechvlm.toy.checkpoint import SHIPPED

DOCS = Path(__file__).resolve().parent.parent / "docs" / "toy_models.md"


@pytest.mark.parametrize("family", sorted(SHIPPED))
def test_hooks_on_each_shipped_toy(family, capsys):
    assert main(["hooks", "--model", str(SHIPPED[family]), "--tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"blocks\.0\.attn\.hook_pattern\s+\(1, 4, 6, 6\)", out), out
    assert "hook points in all" in out


def test_train_toy_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-toy", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mechvlm train-toy" in out and "--family" in out and "--overwrite" in out


def test_train_toy_command_of_the_docs(tmp_path):
    """The docs' command, with a tmp --out and one tiny step (argparse: the last value wins)."""
    lines = [l for l in DOCS.read_text().splitlines() if l.startswith("mechvlm train-toy")]
    assert len(lines) == 2
    argv = shlex.split(lines[1].split("#")[0])[1:]  # the gemma3 one
    assert argv[0] == "train-toy"
    argv += ["--out", str(tmp_path / "toy"), "--steps", "1", "--eval-every", "1", "--batch-size", "2",
             "--d-model", "32", "--n-layers", "1", "--d-mlp", "64", "--vision-hidden", "32", "--vision-depth", "1"]
    assert main(argv) == 0
    record = json.loads((tmp_path / "toy" / "training.json").read_text())
    assert record["family"] == "gemma3" and record["steps"] == 1
    from mechvlm import HookedVLM

    assert HookedVLM.from_pretrained(str(tmp_path / "toy")).cfg.n_layers == 1


def test_crosscheck_on_the_shipped_toy_gemma3(tmp_path, capsys):
    assert main(["crosscheck", "--model", str(SHIPPED["gemma3"]), "--json", str(tmp_path / "g.json")]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "processor inputs" in out
    assert json.loads((tmp_path / "g.json").read_text())["passed"]


def test_crosscheck_with_an_image_and_a_prompt_uses_the_input_builder(tmp_path, capsys):
    from mechvlm.crosscheck.inputs import synthetic_image

    synthetic_image(112).save(tmp_path / "picture.png")
    argv = ["crosscheck", "--model", str(SHIPPED["qwen2_5_vl"]), "--image", str(tmp_path / "picture.png"),
            "--prompt", "What color is the shape?", "--no-knockouts", "--no-share"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "processor inputs" in out, out
