"""``mechvlm finetune``: the command line of `mechvlm.training.finetune`.

Single process: ``mechvlm finetune --registering 16 --out runs/r16``. Data parallel:
``torchrun --nproc_per_node 4 $(which mechvlm) finetune ...`` (each rank runs the same
command; add ``--fsdp`` to shard a model that does not fit one device).
"""

from __future__ import annotations

import argparse

from mechvlm.training.config import PRECISIONS, FinetuneConfig


def add_finetune_parser(sub) -> argparse.ArgumentParser:
    d = FinetuneConfig()
    p = sub.add_parser("finetune", help="Registering fine-tuning (seed 000 section 4): captions, register mask, "
                                        "HF checkpoints", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base checkpoint directory (default: the shipped toy Qwen2.5-VL)")
    p.add_argument("--data", default=None, help="cc_sbu_align folder (default: a toy one written into OUT)")
    p.add_argument("--out", default=d.out, help="run directory (checkpoints, model/, log.jsonl, loss_curve.png)")
    p.add_argument("--registering", default=d.registering,
                   help="none (plain fine-tuning), eoi (the EOI is the register) or N inserted registers (16, 256)")
    p.add_argument("--mask", default=d.mask, choices=["register", "mitre", "gist"], help="which mask the registers get: register (seed 000), mitre or gist (METHODS section 4)")
    p.add_argument("--prompt", default=None, help="user instruction (default: the data folder's, else MiniGPT-4's)")
    p.add_argument("--epochs", type=float, default=d.epochs, help="passes over the training split")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps, overriding --epochs (default: as many as --epochs gives)")
    p.add_argument("--global-batch", type=int, default=d.global_batch, help="examples per optimizer step over all ranks (gradient accumulation fills it)")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch, help="per forward and rank")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (seed 000 Table 3)")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final learning rate of the cosine schedule, as a fraction of --lr")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="fraction of the steps spent in linear warm-up")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--adam-eps", type=float, default=d.eps, help="AdamW epsilon (seed: 1e-8)")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0: no clipping")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the RNG (data order, new register rows)")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="largest image area the processor keeps (pixels)")
    p.add_argument("--min-pixels", type=int, default=d.min_pixels, help="smallest image area the processor keeps (pixels)")
    p.add_argument("--max-length", type=int, default=d.max_length, help="longest training sequence in tokens")
    p.add_argument("--val-every", type=int, default=d.val_every, help="optimizer steps between validation losses")
    p.add_argument("--val-limit", type=int, default=d.val_limit, help="validation examples (0: all)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="optimizer steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="how many step checkpoints to keep")
    p.add_argument("--toy-examples", type=int, default=d.toy_examples, help="pairs in the default toy folder")
    p.add_argument("--device", default=d.device, help="torch device (auto: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--fsdp", action="store_true", help="shard the language model with FSDP2 (under torchrun)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--overwrite", action="store_true", help="start OUT's run again from scratch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=run_finetune)
    return p


def config_from_args(a: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        model=a.model, data=a.data, out=a.out, registering=a.registering, mask=a.mask, prompt=a.prompt,
        epochs=a.epochs, max_steps=a.max_steps, global_batch=a.global_batch, micro_batch=a.micro_batch, lr=a.lr,
        min_lr_ratio=a.min_lr_ratio, warmup_ratio=a.warmup_ratio, weight_decay=a.weight_decay, eps=a.adam_eps,
        max_grad_norm=a.max_grad_norm, precision=a.precision, seed=a.seed, max_pixels=a.max_pixels,
        min_pixels=a.min_pixels, max_length=a.max_length, val_every=a.val_every, val_limit=a.val_limit or None,
        save_every=a.save_every, keep_checkpoints=a.keep_checkpoints, toy_examples=a.toy_examples,
        device=a.device, threads=a.threads, fsdp=a.fsdp, resume=a.resume, overwrite=a.overwrite,
        progress=not a.no_progress)


def run_finetune(a: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mechvlm.training.loop import finetune

    rec = finetune(config_from_args(a))
    if int(os.environ.get("RANK", "0")) == 0:
        fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
        print(f"fine-tuned {rec['steps']} steps ({rec['registering']['variant']}, mask {rec['registering']['mask']}): "
              f"loss {fmt(rec['final_loss'])}, validation {fmt(rec['first_val_loss'])} -> "
              f"{fmt(rec['final_val_loss'])}, {rec['wall_s']} s; model in {a.out}/model")
    return 0
