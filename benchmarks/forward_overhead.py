"""Forward-pass overhead of mechvlm's hooked backbone against the Hugging Face model.

Setup: Qwen2.5-VL-3B text dimensions (d_model 2048, 16 heads / 2 KV heads, d_mlp 11008,
vocab 151936, tied embeddings) with few layers (4 by default) and the small synthetic
vision tower of `mechvlm.synthetic`, random weights drawn explicitly (seeded normal,
std 0.02; norm weights 1), one prompt of one image (patch grid 1x34x36 -> 306 merged
tokens) plus 50 text tokens (356 tokens in all).

Contenders, each a full forward (vision tower + language model + logits):

    mechvlm                  HookedVLM(input_ids, pixel_values, image_grid_thw)
    HF sdpa                  Qwen2_5_VLForConditionalGeneration(..., mm_token_type_ids,
                             use_cache=False), attn_implementation="sdpa"
    mechvlm pattern hooks    run_with_hooks with a no-op hook on every
                             blocks.{l}.attn.hook_pattern (forces the explicit softmax path)
    HF eager + attentions    the same HF weights with text attention "eager",
                             output_attentions=True
    mechvlm cache patterns   run_with_cache(names_filter=lambda n: n.endswith("hook_pattern"))
    HF sdpa again            only with --aa: an A/A control, HF sdpa timed twice per round
    vision tower             model.vision(pixel_values, image_grid_thw) alone (the same HF
                             module runs inside every contender: subtract it to compare the
                             language models)

HF gets ``mm_token_type_ids`` so that it builds the same 3-D mRoPE positions as mechvlm (the
logits are checked to agree before timing) and ``use_cache=False`` (mechvlm has no KV cache).
HF sdpa and HF eager share the same parameter tensors (a deep copy of the module tree with
the parameters memoised), so only two copies of the weights are held (about 5 GB at fp32).

Method: one process, agreement check (= warmup), then ``--reps`` rounds; in each round every contender is timed
once (interleaved, in a new seeded random order each round, so that no contender always runs
first or always after the same other one).
Reported: median, min and max wall ms per call and the median process-CPU ms; ratios
mechvlm / HF as ratio of medians, ratio of mins and median of the per-round ratios (the
verdict's estimate: both calls of a round see about the same load), the latter also on CPU
time, which waiting for a busy core does not inflate (OpenMP spin-waits still count).
Everything runs under ``torch.inference_mode()`` with a fixed number of threads
(``--threads``, default: the cores this process may use). The agreement check runs every
contender once before timing, which is the warmup (``--warmup`` adds untimed rounds).

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/forward_overhead.py           # ~2-3 min on 2 cores
    .venv/bin/python benchmarks/forward_overhead.py --layers 2 --reps 3         # quick check
    .venv/bin/python benchmarks/forward_overhead.py --device cuda --dtype bfloat16
    .venv/bin/python benchmarks/forward_overhead.py --profile                   # op-level diff

Target: unhooked mechvlm <= 1.03x HF sdpa.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import (  # noqa: E402
    available_cores,
    init_weights_,
    machine_info,
    paired_ratios,
    sync,
    time_interleaved,
)

TARGET_UNHOOKED_RATIO = 1.03
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- setup --
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (default float32)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--reps", type=int, default=6, help="timed rounds (default 6)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed rounds before the timed ones (default 0: the agreement check "
                        "already runs every contender once)")
    p.add_argument("--image-grid", default="1,34,36",
                   help="image patch grid t,h,w; h and w even (default 1,34,36 -> 306 LM tokens)")
    p.add_argument("--text-tokens", type=int, default=48,
                   help="random text tokens around the image (default 48; +2 vision start/end)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: the cores available to this process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="",
                   help="comma-separated contender keys not to time (e.g. mech_cache,hf_eager)")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "forward_overhead.json"),
                   help="where to write the results (default benchmarks/forward_overhead.json; '' for none)")
    p.add_argument("--aa", action="store_true",
                   help="also time HF sdpa a second time per round (an A/A control: its ratio to HF "
                        "sdpa shows how large a difference the noise alone makes)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile mechvlm vs HF sdpa with torch.profiler and print "
                        "the ops whose total time differs most")
    return p.parse_args(argv)


def build_models(args, device: torch.device, dtype: torch.dtype):
    """HF sdpa model, HF eager model sharing its parameters, and the HookedVLM copy."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mechvlm import synthetic
    from mechvlm.hooked_vlm import HookedVLM

    cfg = synthetic.qwen2_5_vl_3b_text_config(n_layers=args.layers)
    cfg._attn_implementation = "sdpa"
    try:  # skip HF's own (slow, discarded) init: we draw every weight below
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = contextlib.nullcontext
    # Built in the target dtype, as from_pretrained(dtype=...) does: parameters in `dtype`,
    # the fp32 rotary buffers (created with an explicit dtype) stay fp32.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            hf = Qwen2_5_VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    hf.tie_weights()
    init_weights_(hf, args.seed)
    hf = hf.to(device=device).eval().requires_grad_(False)
    if hf.config.tie_word_embeddings:
        assert hf.lm_head.weight is hf.model.language_model.embed_tokens.weight

    # Same weights, different attention: copy the module tree, share the parameter tensors.
    memo = {id(t): t for t in list(hf.parameters()) + list(hf.buffers())}
    hf_eager = copy.deepcopy(hf, memo)
    hf_eager.set_attn_implementation({"text_config": "eager"})  # vision tower stays sdpa in both
    assert hf_eager.config.text_config._attn_implementation == "eager"
    assert hf.config.text_config._attn_implementation == "sdpa"

    model = HookedVLM.from_hf(hf).eval()
    return hf, hf_eager, model


def build_inputs(args, device: torch.device):
    from mechvlm import synthetic

    t, h, w = (int(v) for v in args.image_grid.split(","))
    before = min(16, args.text_tokens)  # a "system prompt" before the image, the question after
    g = torch.Generator().manual_seed(args.seed + 1)
    ids, grid = synthetic.qwen_prompt([before, (t, h, w), args.text_tokens - before], generator=g)
    pixel_values = synthetic.qwen_pixel_values(grid, generator=torch.Generator().manual_seed(args.seed + 2))
    mm_token_type_ids = (ids == synthetic.QWEN_IDS["image"]).to(torch.int32)
    return dict(input_ids=ids.to(device), pixel_values=pixel_values.to(device),
                image_grid_thw=grid.to(device), mm_token_type_ids=mm_token_type_ids.to(device))


# ------------------------------------------------------------------------ contenders --
def _noop_hook(tensor, hook):
    return None


def make_contenders(hf, hf_eager, model, inp, n_layers: int) -> dict[str, tuple[str, callable]]:
    ids, pv, grid, mm = inp["input_ids"], inp["pixel_values"], inp["image_grid_thw"], inp["mm_token_type_ids"]
    pattern_hooks = [(f"blocks.{l}.attn.hook_pattern", _noop_hook) for l in range(n_layers)]

    def hf_kwargs(**extra):
        return dict(input_ids=ids, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=mm,
                    use_cache=False, **extra)

    return {
        "mech": ("mechvlm, no hooks", lambda: model(ids, pv, grid)),
        "hf_sdpa": ("HF sdpa", lambda: hf(**hf_kwargs()).logits),
        "mech_pattern": ("mechvlm, no-op hook_pattern x all layers",
                         lambda: model.run_with_hooks(ids, pv, grid, fwd_hooks=pattern_hooks)),
        "hf_eager": ("HF eager, output_attentions=True",
                     lambda: hf_eager(**hf_kwargs(output_attentions=True))),
        "mech_cache": ("mechvlm, run_with_cache(hook_pattern)",
                       lambda: model.run_with_cache(ids, pv, grid,
                                                    names_filter=lambda n: n.endswith("hook_pattern"))),
        "vision": ("vision tower alone (in every row)", lambda: model.vision(pv, grid)),
        "hf_sdpa_aa": ("HF sdpa again (A/A control)", lambda: hf(**hf_kwargs()).logits),
    }


# (mechvlm contender, HF contender, what is compared)
PAIRS = [
    ("mech", "hf_sdpa", "unhooked vs HF sdpa"),
    ("mech_pattern", "hf_eager", "pattern hooks vs HF eager+attentions"),
    ("mech_cache", "hf_eager", "run_with_cache(pattern) vs HF eager+attentions"),
    ("hf_sdpa_aa", "hf_sdpa", "A/A control: HF sdpa vs itself"),
]


def check_agreement(contenders, n_layers: int) -> dict:
    """Max |diff| of the logits (and attention patterns) before timing anything.

    Runs every contender once, which doubles as the warmup."""
    mech = contenders["mech"][1]()
    ref = contenders["hf_sdpa"][1]()
    out = {"logits_max_abs_diff_vs_hf_sdpa": float((mech.float() - ref.float()).abs().max()),
           "logits_bitwise_equal_to_hf_sdpa": bool(torch.equal(mech, ref)),
           "logits_max_abs": float(ref.float().abs().max())}
    del mech, ref
    done = {"mech", "hf_sdpa"}
    if "mech_cache" in contenders and "hf_eager" in contenders:
        _, cache = contenders["mech_cache"][1]()
        hf_out = contenders["hf_eager"][1]()
        diffs = [float((cache["pattern", l].float() - hf_out.attentions[l].float()).abs().max())
                 for l in range(n_layers)]
        out["pattern_max_abs_diff_vs_hf_eager"] = max(diffs)
        del cache, hf_out
        done |= {"mech_cache", "hf_eager"}
    for k in contenders.keys() - done:  # warm the rest up too
        contenders[k][1]()
    return out


# ------------------------------------------------------------------------- reporting --
def summarize(wall: dict, cpu: dict, contenders: dict) -> tuple[dict, dict]:
    rows = {}
    for k, ts in wall.items():
        rows[k] = {"label": contenders[k][0], "median_ms": statistics.median(ts), "min_ms": min(ts),
                   "max_ms": max(ts), "cpu_median_ms": statistics.median(cpu[k]),
                   "samples_ms": [round(t, 3) for t in ts], "cpu_samples_ms": [round(t, 3) for t in cpu[k]]}
    vision = rows.get("vision", {}).get("median_ms")
    pairs = {}
    for a, b, what in PAIRS:
        if a not in wall or b not in wall:
            continue
        entry = {"what": what, "mechvlm": a, "hf": b, **paired_ratios(wall[a], wall[b]),
                 "cpu": paired_ratios(cpu[a], cpu[b])}
        ma, mb = rows[a]["median_ms"], rows[b]["median_ms"]
        if vision is not None and mb > vision:
            entry["lm_only_ratio_of_medians"] = (ma - vision) / (mb - vision)
        pairs[f"{a}/{b}"] = entry
    return rows, pairs


def print_table(rows: dict, pairs: dict, info: dict, setup: dict) -> None:
    print()
    print(f"forward_overhead: {setup['layers']} layers, {setup['seq_len']} tokens "
          f"({setup['image_tokens']} image), {setup['dtype']} on {setup['device']}, "
          f"{info['torch_threads']} threads, {setup['reps']} rounds | torch {info['torch']}, "
          f"transformers {info['transformers']} | {info['cpu_model']}")
    w = max(len(r["label"]) for r in rows.values())
    print(f"{'contender':<{w}}  {'median ms':>10}  {'min ms':>9}  {'max ms':>9}  {'CPU ms (median)':>15}")
    for r in rows.values():
        print(f"{r['label']:<{w}}  {r['median_ms']:>10.1f}  {r['min_ms']:>9.1f}  {r['max_ms']:>9.1f}  "
              f"{r['cpu_median_ms']:>15.1f}")
    print()
    print(f"{'ratio mechvlm / HF (wall)':<48}  {'of medians':>10}  {'of mins':>7}  {'paired (min-max)':>22}  "
          f"{'LM only':>7}  {'CPU paired':>10}")
    for p in pairs.values():
        lm = p.get("lm_only_ratio_of_medians")
        rng = f"{p['median_of_paired_ratios']:.3f} ({p['paired_ratio_min']:.3f}-{p['paired_ratio_max']:.3f})"
        print(f"{p['what']:<48}  {p['ratio_of_medians']:>10.3f}  {p['ratio_of_mins']:>7.3f}  {rng:>22}  "
              f"{(f'{lm:.3f}' if lm is not None else '-'):>7}  {p['cpu']['median_of_paired_ratios']:>10.3f}")
    un = pairs.get("mech/hf_sdpa")
    if un is not None:
        r = un["median_of_paired_ratios"]  # the estimate least sensitive to a shared, drifting CPU
        verdict = "OK" if r <= TARGET_UNHOOKED_RATIO else "ABOVE TARGET"
        print(f"\nunhooked target <= {TARGET_UNHOOKED_RATIO:.2f}x HF sdpa (wall, median of paired ratios): "
              f"{verdict} at {r:.3f} (ratio of medians {un['ratio_of_medians']:.3f}, of mins "
              f"{un['ratio_of_mins']:.3f}; CPU time paired {un['cpu']['median_of_paired_ratios']:.3f})"
              + (" -- too few rounds to conclude" if len(rows["mech"]["samples_ms"]) < 5 else ""))
        load = info.get("loadavg_end")
        if load is not None and load[0] > info["cores_available"] + 1:
            print("  noisy run: the machine was busy (see the load average below); rerun on an idle "
                  "machine, or read the CPU-time ratio and an --aa control")
    if info.get("loadavg_start") is not None:
        print(f"load average at start {info['loadavg_start'][0]:.2f}, at end {info['loadavg_end'][0]:.2f} "
              f"(well above {info['cores_available']} means the CPU was shared and the numbers are noisy; "
              f"CPU time is then the steadier measure, --aa shows the noise floor)")


def profile_pair(contenders: dict, device: torch.device, top: int = 25) -> dict:
    """torch.profiler totals per (op, input shapes), mechvlm minus HF sdpa."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    totals = {"mech": {}, "hf_sdpa": {}}
    # A throwaway session first (the first one pays the profiler's start-up), then each
    # contender profiled twice, interleaved; per op, the smaller total is kept.
    for key in ("vision", "mech", "hf_sdpa", "mech", "hf_sdpa"):
        with profile(activities=acts, record_shapes=True) as prof:
            out = contenders[key][1]()
            sync(device)
            del out
        if key not in totals:
            continue
        d = {}
        for ev in prof.key_averages(group_by_input_shape=True):
            t = ev.self_device_time_total if device.type == "cuda" else ev.self_cpu_time_total
            d[(ev.key, str(ev.input_shapes)[:90])] = (t / 1e3, ev.count)
        if totals[key]:
            d = {k: min(v, totals[key].get(k, v)) for k, v in d.items()}
        totals[key] = d
    keys = set(totals["mech"]) | set(totals["hf_sdpa"])
    diff = []
    for k in keys:
        (tm, cm), (th, ch) = totals["mech"].get(k, (0.0, 0)), totals["hf_sdpa"].get(k, (0.0, 0))
        diff.append((tm - th, tm, cm, th, ch, k))
    diff.sort(key=lambda d: -abs(d[0]))
    sm = sum(v[0] for v in totals["mech"].values())
    sh = sum(v[0] for v in totals["hf_sdpa"].values())
    print(f"\nprofile (self {'device' if device.type == 'cuda' else 'CPU'} time per call, min of 2 calls): "
          f"mechvlm {sm:.1f} ms, HF sdpa {sh:.1f} ms; largest differences:")
    print(f"{'mech-HF ms':>10} {'mech ms':>9} {'#':>4} {'HF ms':>9} {'#':>4}  op / input shapes")
    for dt, tm, cm, th, ch, (name, shapes) in diff[:top]:
        print(f"{dt:>10.2f} {tm:>9.2f} {cm:>4} {th:>9.2f} {ch:>4}  {name} {shapes}")
    return {"mech_self_ms": sm, "hf_sdpa_self_ms": sh,
            "largest_differences": [{"op": k[0], "shapes": k[1], "mech_ms": tm, "mech_calls": cm,
                                     "hf_ms": th, "hf_calls": ch} for _, tm, cm, th, ch, k in diff[:top]]}


# ------------------------------------------------------------------------------ main --
def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads or available_cores())
    torch.manual_seed(args.seed)

    import transformers

    # Silences one known warning: HF eager with output_attentions=True also passes the flag
    # to the (sdpa) vision tower, which says it cannot return attentions; none are wanted there.
    transformers.logging.set_verbosity_error()

    t0 = time.perf_counter()
    info = machine_info(device)
    hf, hf_eager, model = build_models(args, device, dtype)
    inp = build_inputs(args, device)
    contenders = make_contenders(hf, hf_eager, model, inp, args.layers)
    if not args.aa:
        del contenders["hf_sdpa_aa"]
    for k in filter(None, (s.strip() for s in args.skip.split(","))):
        if k not in contenders:
            raise SystemExit(f"--skip: unknown contender {k!r}; known: {', '.join(contenders)}")
        if k in ("mech", "hf_sdpa"):
            raise SystemExit("--skip: mech and hf_sdpa are always timed")
        del contenders[k]
    n_image = int((inp["input_ids"] == model.cfg.image_token_id).sum())
    setup = {"layers": args.layers, "seq_len": int(inp["input_ids"].shape[1]), "image_tokens": n_image,
             "image_grid": args.image_grid, "text_tokens": args.text_tokens, "dtype": str(dtype),
             "device": str(device), "reps": args.reps, "warmup": args.warmup, "seed": args.seed,
             "config": "synthetic.qwen2_5_vl_3b_text_config", "d_model": model.cfg.d_model,
             "n_heads": model.cfg.n_heads, "n_kv_heads": model.cfg.n_kv_heads, "d_mlp": model.cfg.d_mlp,
             "d_vocab": model.cfg.d_vocab}
    print(f"built models and inputs in {time.perf_counter() - t0:.1f}s: {setup['seq_len']} tokens "
          f"({n_image} image), {args.layers} layers, {dtype}, {device}, {torch.get_num_threads()} threads",
          flush=True)

    with torch.inference_mode():
        agreement = check_agreement(contenders, args.layers)
        print("agreement: " + ", ".join(f"{k} {v}" if isinstance(v, bool) else f"{k} {v:.2e}"
                                        for k, v in agreement.items()), flush=True)
        wall, cpu = time_interleaved(contenders, args.reps, args.warmup, device, seed=args.seed)
        prof = profile_pair(contenders, device) if args.profile else None

    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    rows, pairs = summarize(wall, cpu, contenders)
    print_table(rows, pairs, info, setup)
    result = {"benchmark": "forward_overhead", "machine": info, "setup": setup, "agreement": agreement,
              "contenders": rows, "ratios": pairs, "target_unhooked_ratio": TARGET_UNHOOKED_RATIO,
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "wall_s": round(time.perf_counter() - t0, 1)}
    if prof is not None:
        result["profile"] = prof
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        from mechvlm.fileio import write_text

        write_text(path, json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    print(f"total {result['wall_s']:.0f}s")
    return result


if __name__ == "__main__":
    main()
