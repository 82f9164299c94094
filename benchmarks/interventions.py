"""Cost of a text->image knockout in ALL layers, in each mode, against the unhooked
forward (interleaved rounds, medians; target <= 1.10x for ``pre_softmax_mask``).

The memory side of the interventions issue (peak memory of the streaming
``attention_share`` against caching every pattern) is `metrics_streaming.py`.

Setup: Qwen2.5-VL-3B text dimensions (``synthetic.qwen2_5_vl_3b_text_config``), random
weights, one image + ~50 text tokens, fp32 CPU, ``torch.set_flush_denormal(True)``.

    HF_HUB_OFFLINE=1 python benchmarks/interventions.py            # ~4 min on 2 cores
    python benchmarks/interventions.py --layers 2 --reps 3 --grid 1,16,16   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import init_weights_, machine_info  # noqa: E402


def build(layers: int, grid: tuple[int, int, int], seed: int = 0):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mechvlm import HookedVLM
    from mechvlm.synthetic import qwen2_5_vl_3b_text_config, qwen_pixel_values, qwen_prompt

    torch.manual_seed(seed)
    hf = Qwen2_5_VLForConditionalGeneration._from_config(qwen2_5_vl_3b_text_config(n_layers=layers)).eval()
    init_weights_(hf, seed)
    model = HookedVLM.from_hf(hf)
    del hf
    g = torch.Generator().manual_seed(seed)
    ids, grid_thw = qwen_prompt([20, grid, 30], vocab=151936, generator=g)
    batch = dict(input_ids=ids, pixel_values=qwen_pixel_values(grid_thw, generator=g), image_grid_thw=grid_thw)
    return model, batch


def time_knockouts(args) -> dict:
    from mechvlm.interventions import knockout

    model, batch = build(args.layers, args.grid)
    roles = model.roles(**batch)
    contenders = {
        "unhooked": lambda: model(**batch),
        "pre_softmax_mask": lambda: model.run_with_hooks(**batch, fwd_hooks=knockout(roles, mode="pre_softmax_mask")),
        "post_softmax_zero": lambda: model.run_with_hooks(**batch, fwd_hooks=knockout(roles, mode="post_softmax_zero")),
    }
    samples = {k: [] for k in contenders}
    names = list(contenders)
    with torch.inference_mode():
        for fn in contenders.values():
            fn()  # warmup
        for r in range(args.reps):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                contenders[name]()
                samples[name].append(1e3 * (time.perf_counter() - t0))
    base = statistics.median(samples["unhooked"])
    return {name: {"median_ms": statistics.median(s), "min_ms": min(s), "max_ms": max(s),
                   "ratio_vs_unhooked": statistics.median(s) / base} for name, s in samples.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--grid", type=lambda s: tuple(int(x) for x in s.split(",")), default=(1, 34, 36))
    p.add_argument("--json", default=str(HERE / "interventions.json"))
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    result = {"machine": machine_info(), "setup": {"layers": args.layers, "grid": args.grid, "reps": args.reps}}
    result["knockout_time"] = time_knockouts(args)
    print(f"\nknockout text->image in all {args.layers} layers (median of {args.reps} interleaved rounds)")
    print(f"{'contender':22s} {'median ms':>10s} {'min':>9s} {'max':>9s} {'vs unhooked':>12s}")
    for name, r in result["knockout_time"].items():
        print(f"{name:22s} {r['median_ms']:10.1f} {r['min_ms']:9.1f} {r['max_ms']:9.1f} {r['ratio_vs_unhooked']:11.3f}x")
    from mechvlm.fileio import write_text

    write_text(args.json, json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
