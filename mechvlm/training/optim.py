"""AdamW on the trainable parameters and the cosine learning-rate schedule with warm-up."""

from __future__ import annotations

import math

import torch


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """The learning-rate factor of optimizer step ``step`` (0-based): linear warm-up
    ``(step + 1) / warmup`` over the first ``warmup`` steps, then a half cosine from 1 down to
    ``min_ratio`` at step ``total - 1``."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params, cfg, total_steps: int):
    """``(AdamW, LambdaLR)`` from a `FinetuneConfig` (fused/foreach left to torch)."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    warmup = int(round(cfg.warmup_ratio * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, total_steps, warmup, cfg.min_lr_ratio))
    return opt, sched
