"""GPU checks of issue 19 (placement over devices, torchrun on CUDA), for a machine with a GPU.

    python scripts/gpu_placement_check.py --out gpu_placement.json          # one GPU, ~3-5 min
    python scripts/gpu_placement_check.py --tiny --device cpu --out x.json  # smoke test of the script

What it checks, on a full-depth (36 blocks) Qwen2.5-VL-3B-shaped random model in bf16:

1. Split between ``cuda:0`` and CPU offload (blocks 18-35 and ``ln_final`` on ``"cpu"``:
   accelerate streams their weights to the GPU at each forward, as HF's ``device_map``
   does): logits against the unsplit model on ``cuda:0`` (expected bit-identical: the same
   kernels run on the same device), and forward tokens/s of both (median of timed runs).
2. A true two-device split on one GPU: the same blocks *computing* on the CPU
   (``place(..., cpu_offload=False)``): logits close to the unsplit model (CPU vs GPU
   kernels), and the cross-device paths: hooks see their block's device, run_with_cache
   gathers on one device, attention_share and a knockout run and agree with the unsplit
   model.
3. ``torchrun --standalone --nproc-per-node 1 -m mechvlm report --device cuda`` on the shipped
   toy: the same predictions as ``python -m mechvlm report --device cuda``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mechvlm.fileio import write_text


def build_hf(n_layers: int, tiny: bool, device: str, dtype: torch.dtype):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mechvlm.synthetic import qwen2_5_vl_3b_text_config, qwen2_5_vl_config

    cfg = qwen2_5_vl_config(n_layers=n_layers) if tiny else qwen2_5_vl_3b_text_config(n_layers=n_layers)
    torch.manual_seed(0)
    with torch.device(device):
        hf = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype).eval()
    return hf


def make_batch(batch: int, text: int, device: str):
    from mechvlm.synthetic import QWEN_IDS, left_pad, qwen_pixel_values, qwen_prompt

    g = torch.Generator().manual_seed(1)
    rows, grids = [], []
    for r in range(batch):
        ids, grid = qwen_prompt([text // 2, (1, 16, 16), text // 2 + r], generator=g)
        rows.append(ids[0])
        grids.append(grid)
    input_ids, mask = left_pad(rows, QWEN_IDS["pad"])
    grid = torch.cat(grids)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "image_grid_thw": grid.to(device),
            "pixel_values": qwen_pixel_values(grid, generator=g).to(device)}


def timed(fn, repeats: int, sync) -> list[float]:
    out = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def split_map(n_layers: int, main: str, rest: str) -> dict:
    half = n_layers // 2
    return {"": main, **{f"blocks.{l}": rest for l in range(half, n_layers)}, "ln_final": rest}


def check_placement(args, report: dict) -> None:
    from mechvlm import HookedVLM, attention_share
    from mechvlm.interventions import knockout
    from mechvlm.placement import place

    dtype = torch.float32 if args.tiny else torch.bfloat16
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    hf = build_hf(args.layers, args.tiny, args.device, dtype)
    batch = make_batch(args.batch, args.text, args.device)
    n_tokens = batch["input_ids"].numel()
    unsplit = HookedVLM.from_hf(hf)
    with torch.no_grad():
        want = unsplit(**batch).float()
    offload_target = "cpu" if cuda else "disk"  # on a CPU-only machine only disk offload is offload
    folder = tempfile.mkdtemp(prefix="mechvlm-offload-")
    split = HookedVLM.from_hf(hf, device_map=split_map(args.layers, args.device, offload_target),
                              offload_folder=folder)
    with torch.no_grad():
        got = split(**batch).float()
        t_unsplit = timed(lambda: unsplit(**batch, return_type=None), args.repeats, sync)
        t_split = timed(lambda: split(**batch, return_type=None), args.repeats, sync)
    report["offload_split"] = {
        "map": f"blocks 0-{args.layers // 2 - 1} on {args.device}, blocks {args.layers // 2}-{args.layers - 1} "
               f"and ln_final offloaded to {offload_target}",
        "max_abs_logit_diff": float((got - want).abs().max()), "bit_identical": bool(torch.equal(got, want)),
        "tokens": n_tokens,
        "tokens_per_s_unsplit": n_tokens / statistics.median(t_unsplit),
        "tokens_per_s_split": n_tokens / statistics.median(t_split),
        "times_s": {"unsplit": t_unsplit, "split": t_split}}
    del split
    if not cuda:
        return
    # a true two-device split: half the blocks compute on the CPU
    two = HookedVLM.from_hf(hf)
    place(two, split_map(args.layers, args.device, "cpu"), cpu_offload=False)
    small = make_batch(1, 32, args.device)
    seen = {}

    def record(t, hook):
        seen[hook.name] = str(t.device)

    names = [f"blocks.{l}.hook_resid_pre" for l in (0, args.layers - 1)]
    with torch.no_grad():
        ref = unsplit(**small).float()
        out = two.run_with_hooks(**small, fwd_hooks=[(n, record) for n in names]).float()
        _, cache = two.run_with_cache(**small, names_filter=lambda n: n.endswith("hook_resid_post"), device="cpu")
        roles = two.roles(**small)
        ko_two = two.run_with_hooks(**small, fwd_hooks=knockout(roles, "text", "image")).float()
        ko_ref = unsplit.run_with_hooks(**small, fwd_hooks=knockout(roles, "text", "image")).float()
    share_two = attention_share(two, small, progress=False).mean_head_share
    share_ref = attention_share(unsplit, small, progress=False).mean_head_share
    report["cpu_gpu_split"] = {
        "hook_devices": seen, "logits_device": str(out.device),
        "max_abs_logit_diff": float((out - ref).abs().max()), "logit_scale": float(ref.abs().max()),
        "same_argmax": bool(torch.equal(out.argmax(-1), ref.argmax(-1))),
        "cache_devices": sorted({str(v.device) for v in cache.values()}),
        "knockout_max_abs_diff": float((ko_two - ko_ref).abs().max()),
        "attention_share_max_abs_diff": float((share_two - share_ref).abs().max())}


def check_torchrun(args, report: dict) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    common = ["report", "--device", args.device, "--limit", "16", "--batch-size", "8", "--no-progress"]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, launcher in (("python", [sys.executable, "-m", "mechvlm"]),
                               ("torchrun", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc-per-node", "1", "-m", "mechvlm"])):
            out = Path(tmp) / name
            t = time.perf_counter()
            proc = subprocess.run([*launcher, *common, "--out", str(out)], env=env, capture_output=True, text=True)
            runs[name] = {"returncode": proc.returncode, "wall_s": time.perf_counter() - t,
                          "stderr_tail": proc.stderr[-1500:] if proc.returncode else ""}
            if proc.returncode == 0:
                res = json.loads((out / "results.json").read_text())
                runs[name]["predictions"] = {c: [r["prediction"] for r in s["items"]] for c, s in res["knockout"].items()}
    ok = all(r["returncode"] == 0 for r in runs.values())
    report["torchrun"] = {"runs": {k: {kk: vv for kk, vv in v.items() if kk != "predictions"} for k, v in runs.items()},
                          "same_predictions": ok and runs["python"]["predictions"] == runs["torchrun"]["predictions"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", type=int, default=256, help="text tokens per row (plus a 64-token image)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="a tiny model (smoke test of this script)")
    parser.add_argument("--skip-torchrun", action="store_true")
    parser.add_argument("--out", default="gpu_placement.json")
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "layers": args.layers, "tiny": args.tiny}
    check_placement(args, report)
    if not args.skip_torchrun:
        check_torchrun(args, report)
    text = json.dumps(report, indent=1)
    print(text)
    write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
