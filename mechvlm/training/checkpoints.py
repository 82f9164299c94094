"""Fine-tuning checkpoints: HF layout, written atomically, resumable.

A checkpoint folder is a complete HF checkpoint (``config.json`` with the ``registering``
setting, safetensors, tokenizer with the register token, image processor, generation
config) that ``*ForConditionalGeneration.from_pretrained`` and `HookedVLM.from_pretrained`
load, plus, for intermediate checkpoints, ``training_state.pt``: step, optimizer and
scheduler state, and every RNG state (torch CPU / CUDA, Python, NumPy). Weights are saved in
the training dtype (fp32 master weights), so a resumed run continues bit for bit.

The folder is built in a temporary sibling and renamed into place (`mechvlm.fileio.atomic_dir`):
an interrupted save leaves the previous checkpoints intact and no half-written one.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from mechvlm.fileio import atomic_dir, write_json

STATE_FILE = "training_state.pt"
RECORD_FILE = "finetune.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def list_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the resumable checkpoints in ``out``, oldest first."""
    out = Path(out)
    found = []
    if out.is_dir():
        for p in out.iterdir():
            m = _CKPT.match(p.name)
            if m and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, model, hf_config, tokenizer, image_processor, *,
                    generation_config=None, weights: dict | None = None, training_state: dict | None = None,
                    record: dict | None = None) -> Path:
    """Write one checkpoint folder atomically (see the module doc). ``weights``: the full
    state dict when the model is sharded (`mechvlm.training.distributed.full_state_dict`)."""
    from mechvlm.hf_export import save_hf

    path = Path(path)
    with atomic_dir(path) as tmp:
        save_hf(model, hf_config, tmp, weights=weights)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if training_state is not None:
            torch.save(training_state, tmp / STATE_FILE)
        if record is not None:
            write_json(tmp / RECORD_FILE, record)
    return path


def load_training_state(path: str | Path) -> dict:
    """The ``training_state.pt`` of a checkpoint folder (optimizer, scheduler, RNG, step)."""
    f = Path(path) / STATE_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist: {path} is not a resumable checkpoint")
    return torch.load(f, map_location="cpu", weights_only=False)


def prune_checkpoints(out: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` intermediate checkpoints."""
    found = list_checkpoints(out)
    for _, p in found[:max(0, len(found) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
