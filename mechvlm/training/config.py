"""`FinetuneConfig`: every setting of a fine-tuning run, with seed 000 Table 3 as defaults.

Seed 000 (Table 3, section 4.1): batch 32, 10 epochs, sequence length 8,192, learning rate
2e-7 on a cosine schedule, Adam (0.9, 0.999, 1e-8), bf16, max pixels 50,176, min pixels
784, seed 42; vision encoder and projector frozen, the whole language model trained;
cc_sbu_align split 16,880 / 1,876. Warm-up, weight decay and clipping are not given in the
seed: the defaults here (3 % warm-up, no decay, clip at 1.0) are the common HF Trainer ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class FinetuneConfig:
    """Attributes:
        model: base checkpoint directory in HF layout (default: the shipped toy Qwen2.5-VL).
        data: a cc_sbu_align folder (default: a toy one written to ``out/toy_cc_sbu_align``).
        out: run directory: ``checkpoint-NNNNNN/`` (HF layout + training state), ``model/``
            (the final checkpoint), ``log.jsonl``, ``loss_curve.png``, ``run.json``.
        registering: ``"none"``, ``"eoi"`` or a number of inserted registers (``"16"``).
        mask: ``"register"`` (seed 000), ``"mitre"`` or ``"gist"``.
        prompt: the user instruction (default: the data folder's, else MiniGPT-4's).
        epochs, max_steps: run length (``max_steps`` overrides the epochs).
        global_batch: examples per optimizer step over all ranks; ``micro_batch``: per
            forward and rank (gradient accumulation fills the rest).
        lr, min_lr_ratio, warmup_ratio: cosine schedule from ``lr`` (after a linear warm-up
            over ``warmup_ratio`` of the steps) down to ``lr * min_lr_ratio``.
        betas, eps, weight_decay: AdamW. max_grad_norm: gradient clipping (0: none).
        precision: ``auto`` = bf16 autocast on CUDA, fp32 on CPU; or ``fp32`` / ``bf16``.
        seed: initial RNG and data order. max_pixels / min_pixels: Qwen2.5-VL's image
            processor bounds (Gemma3 has a fixed image size). max_length: the longest row.
        val_fraction: the validation share of the data; val_every: validation loss every N
            steps (and at the end) on at most ``val_limit`` examples.
        save_every: checkpoint every N steps (and at the end); keep_checkpoints: how many
            intermediate ones to keep.
        toy_examples: pairs in the default toy folder.
        device: ``auto`` (CUDA if present), ``cpu``, ``cuda``...; threads: torch CPU threads.
        fsdp: shard the language model with FSDP2 (``fully_shard``) instead of DDP.
        resume: continue from the newest checkpoint in ``out``; overwrite: replace a run.
    """

    model: str | None = None
    data: str | None = None
    out: str = "mechvlm-finetune"
    registering: str = "none"
    mask: str = "register"
    prompt: str | None = None
    epochs: float = 10.0
    max_steps: int | None = None
    global_batch: int = 32
    micro_batch: int = 8
    lr: float = 2e-7
    min_lr_ratio: float = 0.0
    warmup_ratio: float = 0.03
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "auto"
    seed: int = 42
    max_pixels: int = 50_176
    min_pixels: int = 784
    max_length: int = 8192
    val_fraction: float = 0.1
    val_every: int = 50
    val_limit: int | None = 256
    save_every: int = 100
    keep_checkpoints: int = 2
    toy_examples: int = 2000
    device: str = "auto"
    threads: int | None = None
    fsdp: bool = False
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("global_batch", "micro_batch", "val_every", "save_every", "max_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def model_dir(self) -> Path:
        from mechvlm.toy.checkpoint import SHIPPED

        return Path(self.model) if self.model else SHIPPED["qwen2_5_vl"]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
