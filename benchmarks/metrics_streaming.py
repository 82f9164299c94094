"""Cost of the streaming attention metrics against a plain forward and HF eager.

Setup: as ``forward_overhead.py``: Qwen2.5-VL-3B text dimensions (d_model 2048, 16 heads /
2 KV heads, d_mlp 11008, vocab 151936, tied) with few layers (4 by default), the small
synthetic vision tower, random weights (seeded N(0, 0.02), norms 1); one prompt of one image
(patch grid 1x56x56 -> 784 merged tokens by default) with 16 text tokens before it and
``--text-tokens - 16`` (query) text tokens after it.

Contenders (each one forward of vision tower + language model):

    mech                 HookedVLM forward, return_type=None (no unembedding: the metrics
                         skip it too, so this is the strict baseline)
    mech_logits          HookedVLM forward with logits
    attention_share      mechvlm.attention_share(keys=image, eoi) over all layers
    received_attention   mechvlm.received_attention over all layers
    hf_eager             HF, text attention "eager", no output_attentions (logits)
    hf_sdpa              HF, "sdpa" (logits)
    mech_cache_patterns  the naive way: run_with_cache of every hook_pattern (for scale)

Memory: each contender runs once in a fresh subprocess (only its model built; glibc told to
return large frees to the OS with ``MALLOC_MMAP_THRESHOLD_``); peak RSS is reset through
``/proc/self/clear_refs`` right before the forward and read back from ``VmHWM``; reported is
the forward's extra peak (peak - RSS before the forward, i.e. without the weights).
Time: one process, every contender timed once per round, interleaved, order rotated;
median ms per call.

Targets (the brief of the metrics): attention metrics' extra peak <= 1.2x the plain forward's
(``mech``), time <= 1.3x HF eager.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/metrics_streaming.py            # CPU, ~5 min on 2 cores
    .venv/bin/python benchmarks/metrics_streaming.py --layers 2 --reps 2          # quick
    .venv/bin/python benchmarks/metrics_streaming.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MALLOC_ENV, extra_peak, init_weights_  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONTENDERS = ("mech", "mech_logits", "attention_share", "received_attention", "hf_eager", "hf_sdpa",
              "mech_cache_patterns")
HF_KINDS = {"hf_eager": "eager", "hf_sdpa": "sdpa"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--image-grid", default="1,56,56", help="patch grid t,h,w (default 784 LM tokens)")
    p.add_argument("--text-tokens", type=int, default=80, help="text tokens (16 before the image)")
    p.add_argument("--batch", type=int, default=1, help="rows (copies of the prompt)")
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "metrics_streaming.json"))
    p.add_argument("--measure-memory-of", default=None, help=argparse.SUPPRESS)  # subprocess mode
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ build --
def build_hf(args, device, dtype, attn: str):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mechvlm import synthetic

    cfg = synthetic.qwen2_5_vl_3b_text_config(n_layers=args.layers)
    cfg._attn_implementation = "sdpa"
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        hf = Qwen2_5_VLForConditionalGeneration(cfg)
    hf.tie_weights()
    init_weights_(hf, args.seed)
    hf = hf.to(device=device, dtype=dtype).eval().requires_grad_(False)
    hf.set_attn_implementation({"text_config": attn})
    return hf


def build_inputs(args, device) -> dict:
    from mechvlm import synthetic

    t, h, w = (int(v) for v in args.image_grid.split(","))
    g = torch.Generator().manual_seed(args.seed + 1)
    ids, grid = synthetic.qwen_prompt([16, (t, h, w), args.text_tokens - 16], generator=g)
    pv = synthetic.qwen_pixel_values(grid, generator=torch.Generator().manual_seed(args.seed + 2))
    b = args.batch
    return dict(input_ids=ids.repeat(b, 1).to(device), pixel_values=pv.repeat(b, 1).to(device),
                image_grid_thw=grid.repeat(b, 1).to(device))


def contender(name: str, model, hf, batch: dict):
    import mechvlm

    mm = (batch["input_ids"] == mechvlm.synthetic.QWEN_IDS["image"]).to(torch.int32)
    if name == "mech":
        return lambda: model(**batch, return_type=None)
    if name == "mech_logits":
        return lambda: model(**batch)
    if name == "attention_share":
        return lambda: mechvlm.attention_share(model, batch, keys=("image", "eoi"), progress=False)
    if name == "received_attention":
        return lambda: mechvlm.received_attention(model, batch, progress=False)
    if name == "mech_cache_patterns":
        return lambda: model.run_with_cache(**batch, names_filter=lambda n: n.endswith("hook_pattern"))
    if name in HF_KINDS:
        return lambda: hf(**batch, mm_token_type_ids=mm, use_cache=False)
    raise ValueError(name)


def build_for(names, args, device, dtype):
    """The models the contenders need: HF models by attention kind, one HookedVLM."""
    from mechvlm import HookedVLM

    hfs, model = {}, None
    if any(n not in HF_KINDS for n in names):
        hf = build_hf(args, device, dtype, "sdpa")
        model = HookedVLM.from_hf(hf).eval()
        del hf
    for n in names:
        if n in HF_KINDS:
            hfs[n] = build_hf(args, device, dtype, HF_KINDS[n])
    return hfs, model


# ----------------------------------------------------------------------------- memory --
def measure_memory_here(name: str, args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    hfs, model = build_for([name], args, device, dtype)
    batch = build_inputs(args, device)
    fn = contender(name, model, hfs.get(name), batch)
    with torch.inference_mode():
        return extra_peak(fn, device)


def measure_memory(args, argv) -> dict:
    out = {}
    env = dict(os.environ, **MALLOC_ENV)
    for name in CONTENDERS:
        cmd = [sys.executable, __file__, *argv, "--measure-memory-of", name]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"memory run of {name} failed:\n{res.stderr[-3000:]}")
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"  memory {name:<20} extra peak {out[name]['extra_peak_mib']:8.1f} MiB", flush=True)
    return out


# ------------------------------------------------------------------------------- time --
def measure_time(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    names = [n for n in CONTENDERS if n != "mech_cache_patterns"]
    hfs, model = build_for(names, args, device, dtype)
    batch = build_inputs(args, device)
    fns = {n: contender(n, model, hfs.get(n), batch) for n in names}
    times = {n: [] for n in names}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        for r in range(args.warmup + args.reps):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                sync()
                t0 = time.perf_counter()
                fns[n]()
                sync()
                if r >= args.warmup:
                    times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for n, v in times.items()}


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.measure_memory_of:
        print(json.dumps(measure_memory_here(args.measure_memory_of, args)))
        return {}
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    t0 = time.perf_counter()
    setup = {k: getattr(args, k) for k in ("device", "dtype", "layers", "image_grid", "text_tokens", "batch",
                                           "reps", "warmup", "seed")}
    ids = build_inputs(args, "cpu")["input_ids"]
    setup["seq_len"] = int(ids.shape[1])
    setup["threads"] = torch.get_num_threads()
    print(f"setup: {setup}", flush=True)
    result = {"benchmark": "metrics_streaming", "setup": setup}
    if not args.skip_memory:
        mem = measure_memory(args, [a for a in argv if not a.startswith("--measure-memory-of")])
        base = mem["mech"]["extra_peak_mib"]
        result["memory"] = mem
        result["memory_ratio_vs_mech"] = {n: mem[n]["extra_peak_mib"] / base for n in mem}
    if not args.skip_time:
        tm = measure_time(args)
        result["time"] = tm
        result["time_ratio_vs_hf_eager"] = {n: tm[n]["median_ms"] / tm["hf_eager"]["median_ms"] for n in tm}
        result["time_ratio_vs_mech"] = {n: tm[n]["median_ms"] / tm["mech"]["median_ms"] for n in tm}
        for n, v in tm.items():
            print(f"  time {n:<20} {v['median_ms']:9.1f} ms  ({result['time_ratio_vs_hf_eager'][n]:.2f}x HF eager, "
                  f"{result['time_ratio_vs_mech'][n]:.2f}x mech)")
    if "memory_ratio_vs_mech" in result:
        for n, v in result["memory_ratio_vs_mech"].items():
            print(f"  memory {n:<20} {v:5.2f}x the plain forward's extra peak")
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        from mechvlm.fileio import write_text

        write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
