"""Command line: ``mechvlm demo`` and ``mechvlm hooks``.

``demo`` needs nothing but this package: it builds a small random Qwen2.5-VL, runs the
same image prompt through Hugging Face and through mechvlm, and prints the parity and a
knockout's effect. ``hooks`` lists the hook points of a checkpoint with their shapes.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def _demo(args: argparse.Namespace) -> int:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mechvlm import HookedVLM
    from mechvlm.synthetic import QWEN_IDS, qwen2_5_vl_config, qwen_pixel_values, qwen_prompt

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    hf = Qwen2_5_VLForConditionalGeneration._from_config(
        qwen2_5_vl_config(n_layers=args.layers), attn_implementation="eager").eval()
    model = HookedVLM.from_hf(hf)
    ids, grid = qwen_prompt([6, (1, 8, 8), 10], generator=g)
    pixels = qwen_pixel_values(grid, generator=g)
    inputs = dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid)
    c = model.cfg
    print(f"HookedVLM({c.architecture}, random weights): {c.n_layers} layers, d_model {c.d_model}, "
          f"{c.n_heads} heads / {c.n_kv_heads} KV heads, mRoPE sections {c.mrope_section}")
    print(f"{len(model.hook_dict)} hook points; prompt: {ids.shape[1]} tokens, "
          f"{int((ids == QWEN_IDS['image']).sum())} image tokens\n")
    with torch.no_grad():
        ref = hf(**inputs, mm_token_type_ids=(ids == QWEN_IDS["image"]).long(), output_attentions=True)
        logits, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("hook_pattern"))
    print(f"logits   max |mechvlm - HF eager| = {(logits - ref.logits).abs().max():.2e}")
    for l in range(model.cfg.n_layers):
        d = (cache["pattern", l] - ref.attentions[l]).abs().max()
        print(f"layer {l}  max |pattern - HF output_attentions| = {d:.2e}")

    image = ids[0] == QWEN_IDS["image"]
    text_after = torch.zeros_like(image)
    text_after[int(image.nonzero().max()) + 2:] = True

    def knockout(pattern, hook):  # seed 000 Eq. 3-4: zero text->image attention, no renormalisation
        pattern[:, :, text_after[:, None] & image[None, :]] = 0.0

    with torch.no_grad():
        ko = model.run_with_hooks(**inputs, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), knockout)])
    shift = (ko[0, -1].softmax(-1) - logits[0, -1].softmax(-1)).abs().sum() / 2
    print(f"text->image knockout in all layers: total-variation change of the last "
          f"next-token distribution = {shift:.3f}")
    return 0


def _hooks(args: argparse.Namespace) -> int:
    if not args.online:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mechvlm import HookedVLM

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = HookedVLM.from_pretrained(args.model, dtype=dtype, device=args.device)
    ids = torch.arange(3, 3 + args.tokens)[None] % model.cfg.d_vocab
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=lambda n: n.startswith(("hook_", "blocks.0.", "ln_final")))
    print(model.cfg)
    for name, act in cache.items():
        print(f"{name:40s} {tuple(act.shape)} {act.dtype}")
    print(f"... and the same per-layer hooks for blocks 1..{model.cfg.n_layers - 1}; "
          f"{len(model.hook_dict)} hook points in all")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mechvlm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="parity with HF and a knockout on a small random Qwen2.5-VL")
    demo.add_argument("--layers", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(fn=_demo)
    hooks = sub.add_parser("hooks", help="list the hook points of a checkpoint with their shapes")
    hooks.add_argument("--model", required=True, help="hub id or local HF directory")
    hooks.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")
    hooks.add_argument("--device", default=None)
    hooks.add_argument("--tokens", type=int, default=8)
    hooks.add_argument("--online", action="store_true", help="allow hub downloads")
    hooks.set_defaults(fn=_hooks)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
