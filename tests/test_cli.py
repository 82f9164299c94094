"""The command line works offline on a local save_pretrained directory."""

from __future__ import annotations

import re

from conftest import make_hf_qwen
from mechvlm.cli import main


def test_demo_reports_parity(capsys):
    assert main(["demo", "--layers", "2"]) == 0
    out = capsys.readouterr().out
    diffs = [float(x) for x in re.findall(r"= ([0-9.e+-]+)\n", out)[:3]]
    assert len(diffs) == 3 and max(diffs) < 1e-4, out


def test_hooks_on_local_directory(tmp_path, capsys):
    make_hf_qwen(seed=1, n_layers=2).save_pretrained(tmp_path)
    assert main(["hooks", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.attn.hook_pattern               (1, 4, 8, 8)" in out
    assert "47 hook points in all" in out  # 46 + hook_video_embeds
