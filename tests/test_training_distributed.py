"""Data-parallel fine-tuning under torchrun on CPU (gloo): 2 ranks, with the same global
batch, give the weights of 1 process (DDP and FSDP2), in fp32 within rounding."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mechvlm.training import FinetuneConfig, Finetuner, write_toy_cc_sbu_align

ROOT = Path(__file__).resolve().parent.parent
# AdamW's epsilon at 1: updates follow the gradient's size (with 1e-8 the first steps are
# sign(gradient) * lr, blind to how the loss is normalised over ranks)
ARGS = ["--global-batch", "4", "--micro-batch", "2", "--max-steps", "3", "--lr", "1e-2", "--adam-eps", "1",
        "--registering", "2",
        "--val-every", "1", "--val-limit", "4", "--save-every", "100", "--threads", "1", "--no-progress",
        "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, data: Path) -> None:
    """Both modes in one torchrun (2 ranks): ``out/ddp`` and ``out/fsdp``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "tests" / "_finetune_worker.py"), str(out),
           "--data", str(data), *ARGS]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = write_toy_cc_sbu_align(root / "data", n=24, seed=5)
    cfg = FinetuneConfig(data=str(data), out=str(root / "single"), global_batch=4, micro_batch=2, max_steps=3,
                         lr=1e-2, eps=1.0, registering="2", val_every=1, val_limit=4, save_every=100, threads=1,
                         progress=False, device="cpu")
    ft = Finetuner(cfg)
    halves = []  # scored tokens of each rank's half of every global batch
    for step in range(3):
        idx = ft.global_batch(step)
        halves.append([ft._scored(*ft.collator([ft.dataset[i] for i in idx[h:h + 2]])) for h in (0, 2)])
    assert any(a != b for a, b in halves), halves  # the ranks' token counts differ: normalising matters
    rec = ft.run()
    assert rec["accumulation"] == 2 and rec["world_size"] == 1
    _torchrun(root / "multi", data)
    return root, data, _weights(root / "single"), rec


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_give_the_weights_of_one_process(runs, mode):
    import json

    root, data, single, rec = runs
    out = root / "multi" / mode
    multi = _weights(out)
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["accumulation"] == 1
    assert set(multi) == set(single)
    base = _weights_base()
    moved = worst = 0.0
    for k, v in single.items():
        assert torch.allclose(multi[k], v, rtol=0, atol=1e-7), (k, (multi[k] - v).abs().max())
        worst = max(worst, float((multi[k] - v).abs().max()))
        if k in base and base[k].shape == v.shape:
            moved = max(moved, float((v - base[k]).abs().max()))
    print(f"{mode}: max |2 ranks - 1 process| = {worst:.2e}, max weight change {moved:.2e}")
    assert moved > 1e-4  # the steps did change the weights, by far more than the tolerance
    assert run["final_loss"] == pytest.approx(rec["final_loss"], rel=1e-5)
    assert run["final_val_loss"] == pytest.approx(rec["final_val_loss"], rel=1e-5)


def _weights_base() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from mechvlm.toy.checkpoint import SHIPPED

    return load_file(SHIPPED["qwen2_5_vl"] / "model.safetensors")
