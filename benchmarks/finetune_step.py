"""Tokens/s and peak memory of one Registering fine-tuning step (mechvlm.training), mask on/off.

    python benchmarks/finetune_step.py --device cuda                 # GPU: full-depth 3B shape, bf16 autocast
    python benchmarks/finetune_step.py --quick --no-write            # CPU smoke run (tiny model)

Model: `synthetic.qwen2_5_vl_3b_text_config(n_layers=36)`: Qwen2.5-VL-3B's language model
at full depth (36 layers, d_model 2048, 16 / 2 heads, d_mlp 11008, vocab 151936, tied) with
random seeded weights and a small vision tower (frozen, encoded under no_grad, so its size
barely moves a training step). One step = what `Finetuner.train_step` does with one
micro-batch: `caption_nll` (images encoded under no_grad, LM forward under the mask, caption
cross-entropy), backward, gradient clipping, AdamW step; fp32 master weights, bf16 autocast on
CUDA (fp32 on CPU). Rows (micro-batch of ``--batch`` rows: an image of ``--grid`` patches,
the registers, ``--caption`` caption tokens):

    plain        no mask, no registers (SDPA is_causal)
    mask_eoi     register mask, the EOI as the register (a dense bool mask goes to SDPA)
    plain_16 / mask_16     16 inserted registers, mask off / on
    plain_256 / mask_256   256 inserted registers, mask off / on

Method: `_common.time_interleaved` (every row once per round, rounds in seeded random
order, medians and min-max, paired ratios mask/plain at equal length); peak memory = the
CUDA allocator's peak during the step (weights, gradients and AdamW states included).
Results go to benchmarks/finetune_step.json and a section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import init_weights_, machine_info, paired_ratios, time_interleaved  # noqa: E402

from mechvlm import HookedVLM  # noqa: E402
from mechvlm.synthetic import QWEN_IDS, qwen2_5_vl_3b_text_config, qwen2_5_vl_config, qwen_pixel_values  # noqa: E402
from mechvlm.training.loop import caption_nll  # noqa: E402
from mechvlm.training.optim import build_optimizer  # noqa: E402
from mechvlm.training.registers import Registering, mask_hooks, set_registering  # noqa: E402

OUT = Path(__file__).resolve().parent / "finetune_step.json"


def build(args, device):
    from transformers import Qwen2_5_VLForConditionalGeneration

    if args.quick:
        cfg = qwen2_5_vl_config(n_layers=2, vocab=512, d_model=64, d_mlp=128, mrope_section=(2, 3, 3))
    else:
        cfg = qwen2_5_vl_3b_text_config(n_layers=args.layers)
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    init_weights_(hf, seed=0)
    model = HookedVLM.from_hf(hf, dtype=torch.float32, device=device)
    del hf
    reg_id = model.cfg.d_vocab - 1  # a spare row as the register token (the real 3B has 271 of them)
    set_registering(model, None, Registering("registers", 16, "register", "<|register|>", reg_id))
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("vision."))
    return model.train(), reg_id


def batch_for(args, n_registers: int, reg_id: int, device, vocab: int):
    g = torch.Generator().manual_seed(1)
    t, h, w = args.grid
    n_image = t * h * w // 4
    ids = ([QWEN_IDS["bos"]] + torch.randint(3, 200, (8,), generator=g).tolist() + [QWEN_IDS["vision_start"]]
           + [QWEN_IDS["image"]] * n_image + [QWEN_IDS["vision_end"]] + [reg_id] * n_registers
           + torch.randint(3, 200, (12,), generator=g).tolist()
           + torch.randint(3, min(vocab, 30000), (args.caption,), generator=g).tolist())
    input_ids = torch.tensor([ids] * args.batch)
    grid = torch.tensor([[t, h, w]] * args.batch)
    target = torch.zeros_like(input_ids, dtype=torch.bool)
    target[:, -args.caption:] = True
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "image_grid_thw": grid,
             "pixel_values": qwen_pixel_values(grid, generator=g)}
    return {k: v.to(device) for k, v in batch.items()}, target.to(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--batch", type=int, default=4, help="rows per step (one micro-batch)")
    ap.add_argument("--grid", type=int, nargs=3, default=(1, 16, 16), help="patch grid: 64 tokens = max pixels 50,176")
    ap.add_argument("--caption", type=int, default=128, help="caption tokens per row")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rows", default="plain,mask_eoi,plain_16,mask_16,plain_256,mask_256")
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 reps (a smoke test)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.warmup, a.caption, a.grid, a.batch, a.rows = 1, 1, 16, (1, 4, 4), 2, "plain_16,mask_16"
    device = torch.device(a.device)
    torch.set_flush_denormal(True)
    model, reg_id = build(a, device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    class Cfg:  # the optimizer settings of FinetuneConfig
        lr, betas, eps, weight_decay, warmup_ratio, min_lr_ratio = 1e-6, (0.9, 0.999), 1e-8, 0.0, 0.0, 0.0

    opt, sched = build_optimizer(model.parameters(), Cfg, 10_000)
    params = [p for p in model.parameters() if p.requires_grad]
    peaks: dict[str, float] = {}
    tokens: dict[str, int] = {}
    contenders = {}
    for row in a.rows.split(","):
        kind, _, n = row.partition("_")
        n_reg = int(n) if n.isdigit() else 0
        mask = mask_hooks(Registering.parse("eoi" if not n_reg else n_reg)) if kind == "mask" else None
        batch, target = batch_for(a, n_reg, reg_id, device, model.cfg.d_vocab)
        tokens[row] = int(batch["input_ids"].numel())

        def step(batch=batch, target=target, mask=mask, row=row):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            loss = caption_nll(model, batch, target, mask=mask, autocast=autocast) / int(target.sum())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peaks[row] = max(peaks.get(row, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
            return loss.detach()

        contenders[row] = (row, step)
    wall, cpu = time_interleaved(contenders, a.reps, a.warmup, device, collect=device.type != "cuda")
    rows = {}
    for row in contenders:
        med = statistics.median(wall[row])
        rows[row] = {"tokens": tokens[row], "median_ms": med, "min_ms": min(wall[row]), "max_ms": max(wall[row]),
                     "tokens_per_s": tokens[row] / med * 1e3, "peak_gib": peaks.get(row)}
    ratios = {f"{m}/{p}": paired_ratios(wall[m], wall[p]) for m, p in
              (("mask_eoi", "plain"), ("mask_16", "plain_16"), ("mask_256", "plain_256")) if m in wall and p in wall}
    result = {"machine": machine_info(device), "args": {k: (list(v) if isinstance(v, tuple) else v)
                                                        for k, v in vars(a).items()},
              "model": "toy" if a.quick else f"Qwen2.5-VL-3B-shaped, {a.layers} layers", "rows": rows,
              "ratios": ratios}
    for row, r in rows.items():
        peak = "" if r["peak_gib"] is None else f", peak {r['peak_gib']:.1f} GiB"
        print(f"{row:10s} {r['tokens']:6d} tokens  {r['median_ms']:9.1f} ms  {r['tokens_per_s']:9.0f} tok/s{peak}")
    for k, v in ratios.items():
        print(f"{k}: paired {v['median_of_paired_ratios']:.3f} [{v['paired_ratio_min']:.3f}, {v['paired_ratio_max']:.3f}]")
    if not a.no_write:
        from mechvlm.fileio import write_text

        write_text(OUT, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
