"""mechvlm against what a user would pick instead, side by side on the same weights and inputs.

Peers: Hugging Face transformers (sdpa / eager), TransformerLens 4.x ``TransformerBridge``
(built around its own deepcopy of the HF model) and nnsight 0.8 (tracing its own deepcopy).
Models: Qwen2.5-VL-3B-shaped and Gemma3-4B-shaped language models (``mechvlm.synthetic``:
the real widths, vocabularies and heads; few layers), random seeded weights, fp32 CPU.

Sections (per family; all timings interleaved in one process, a new random order per round):
    forward    one forward: mechvlm unhooked vs HF sdpa vs HF eager vs the bridge
    patterns   caching every attention pattern: mechvlm run_with_cache vs HF eager
               output_attentions vs bridge run_with_cache (+ peak memory)
    knockout   text->image in all layers: mechvlm (both modes), nnsight (mask edit on HF
               sdpa; softmax input / output edit in HF eager), the bridge where its edit
               takes effect (probed first: where it is discarded that is a correctness row)
    share      attention_share text->{image, EOI} over a batch of examples: mechvlm's
               streaming metric vs the share computed from HF eager attentions and from the
               bridge cache (+ peak memory against a plain forward)
    scaling    the share section at 64 -> 256 -> 1024 -> 4096 image tokens (Qwen shape,
               2 layers, a one-block windowed vision tower)
Every tool returns the logits of the last position only (see `_peers`). Correctness rows
(max |diff| of logits, patterns, shares between the tools and HF) come from the first call
of each contender, which is also the warm-up. Peak memory: a fresh subprocess per (tool,
measure) (per tool for the scaling curve), the extra peak RSS over the RSS after loading.

    HF_HUB_OFFLINE=1 taskset -c 1 .venv/bin/python benchmarks/compare_peers.py       # ~25 min, 1 core
    .venv/bin/python benchmarks/compare_peers.py --quick --out-dir /tmp/peers          # tiny, seconds
    .venv/bin/python benchmarks/compare_peers.py --device cuda --dtype bfloat16 --full-depth

Writes ``RESULTS.md`` and ``compare_peers.json`` into ``--out-dir`` (default benchmarks/).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
for p in (str(HERE), str(HERE.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)
import _peers as P  # noqa: E402
from _common import (  # noqa: E402
    machine_info,
    paired_ratios,
    time_interleaved,
)
from _peers_checks import (  # noqa: E402
    BRIDGE_KO,
    Checks,
    check_knockout_scaling,
    check_main,
    check_share,
)
from _peers_memory import DTYPES, run_memory  # noqa: E402

MAIN = ["hf_sdpa", "hf_sdpa_aa", "hf_eager", "mech", "bridge", "hf_eager_attn", "mech_cache", "bridge_cache",
        "mech_ko_pre", "mech_ko_post", "nn_ko_pre", "nn_ko_pre_eager", "nn_ko_post"]
SHARE = ["mech_share", "hf_eager_share", "bridge_share", "hf_eager"]
SCALING = SHARE
SCALING_KO = ["mech_ko_pre", "nn_ko_pre", "nn_ko_pre_eager"]  # timed from --scaling-knockout-from on
MEMORY = {"patterns": ["mech", "hf_sdpa", "hf_eager_attn", "mech_cache", "bridge_cache"],
          "share": ["mech", "mech_share", "hf_eager_share", "bridge_share"]}
SCALING_MEMORY = ["mech", "mech_share", "hf_eager_share", "bridge_share"]
SECTIONS = {  # rows of each report section -> the references their ratios are taken against
    "forward": (["mech", "hf_sdpa", "hf_eager", "bridge", "hf_sdpa_aa"], ["hf_sdpa"]),
    "patterns": (["mech_cache", "hf_eager_attn", "bridge_cache"], ["hf_sdpa", "hf_eager", "hf_eager_attn"]),
    "knockout": (["mech_ko_pre", "mech_ko_post", "nn_ko_pre", "nn_ko_pre_eager", "nn_ko_post",
                  *BRIDGE_KO], ["hf_sdpa", "hf_eager"]),
}
PROFILE = ["hf_sdpa", "mech", "mech_ko_pre", "nn_ko_pre", "mech_ko_post", "nn_ko_post"]
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int4pack_mm"}
ATTENTION_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax", "aten::_safe_softmax",
                 "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
                 "aten::_scaled_dot_product_cudnn_attention", "aten::_efficient_attention_forward"}
SAME_KNOCKOUT = [("nn_ko_pre", "mech_ko_pre"), ("nn_ko_pre_eager", "mech_ko_pre"), ("nn_ko_post", "mech_ko_post"),
                 ("bridge_ko_pre", "mech_ko_pre"), ("bridge_ko_post", "mech_ko_post")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny configs, 2 rounds, one memory process per family")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--full-depth", action="store_true", help="all layers (Qwen2.5-VL-3B 36, Gemma3-4B 34)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--families", default="qwen,gemma")
    p.add_argument("--image-tokens", type=int, default=256, help="LM tokens of the image (default 256)")
    p.add_argument("--batch", type=int, default=3, help="examples of the share section (default 3)")
    p.add_argument("--reps", type=int, default=4, help="timed rounds of forward/patterns/knockout (default 4)")
    p.add_argument("--share-reps", type=int, default=3, help="timed rounds of the share section (default 3)")
    p.add_argument("--scaling", default="64,256,1024,4096", help="image tokens of the scaling curve ('' = none)")
    p.add_argument("--scaling-reps", default="3,3,2,1", help="timed rounds at each scaling point")
    p.add_argument("--scaling-layers", type=int, default=2)
    p.add_argument("--scaling-knockout-from", type=int, default=4096,
                   help="also time the pre-softmax knockouts from this many image tokens on (default 4096)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; pin the process with taskset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the op profile (matrix products / attention / other) of the knockouts")
    p.add_argument("--out-dir", default=str(HERE), help="where RESULTS.md and compare_peers.json go")
    p.add_argument("--machine-note", default="", help="what else the machine was doing (goes into RESULTS.md)")
    p.add_argument("--from-json", default=None,
                   help="measure nothing: rewrite RESULTS.md (targets, tables) from this compare_peers.json")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.image_tokens, args.batch, args.reps, args.share_reps = 2, 16, 2, 2, 1
        args.scaling, args.scaling_reps, args.scaling_layers, args.scaling_knockout_from = "4,16", "1", 2, 16
    return args


T0 = time.perf_counter()


def log(*a, **kw):
    print(f"[{(time.perf_counter() - T0) / 60:5.1f} min]", *a, **{"flush": True, **kw})


# ------------------------------------------------------------------------ warm-up --
def first_calls(names, models, inp, checks_out: dict) -> dict:
    """One call of each contender (the warm-up), its output kept for the checks; the warnings
    each call raised are kept too (the bridge warns when it discards an edit)."""
    fns = {}
    for n in names:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn = P.contender(n, models, inp)
            t0 = time.perf_counter()
            checks_out[n] = fn()
            log(f"  first call {n:<16} {time.perf_counter() - t0:7.2f}s")
        msgs = sorted({str(w.message) for w in caught})
        if msgs:
            checks_out.setdefault("_warnings", {})[n] = msgs
        fns[n] = (P.LABELS[n], fn)
    gc.collect()
    gc.freeze()  # what exists now (models, libraries) is never scanned again: a cheap gc per timed call
    return fns


# ----------------------------------------------------------------------------- timing --
def summarize(wall, cpu, refs_by_row: dict) -> dict:
    import statistics

    rows = {}
    for k, ts in wall.items():
        row = {"label": P.LABELS[k], "median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts),
               "cpu_median_ms": statistics.median(cpu[k]), "samples_ms": [round(t, 2) for t in ts], "vs": {}}
        row["vs_cpu"] = {}
        for ref in refs_by_row.get(k, []):
            if ref in wall and ref != k:
                row["vs"][ref] = paired_ratios(ts, wall[ref])
                row["vs_cpu"][ref] = paired_ratios(cpu[k], cpu[ref])
        rows[k] = row
    return rows


def profile_ops(fns: dict, names: list[str], device) -> dict:
    """One profiled call per contender (after a throwaway session): self time in matrix
    products, in attention kernels (SDPA, softmax) and in everything else."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for n in [names[0], *names]:
        with profile(activities=acts) as prof:
            fns[n][1]()
        tot = {"gemm_ms": 0.0, "attention_ms": 0.0, "other_ms": 0.0}
        for ev in prof.key_averages():
            t = (ev.self_device_time_total if device.type == "cuda" else ev.self_cpu_time_total) / 1e3
            kind = "gemm_ms" if ev.key in GEMM_OPS else "attention_ms" if ev.key in ATTENTION_OPS else "other_ms"
            tot[kind] += t
        tot["total_ms"] = sum(tot.values())
        out[n] = tot
    return out


def timed(fns: dict, reps: int, device, seed: int, refs: dict, collect: bool = True) -> dict:
    wall, cpu = time_interleaved(fns, reps, 0, device, seed=seed, log=log, collect=collect)
    return summarize(wall, cpu, refs)


# ---------------------------------------------------------------------------- families --
def run_family(family: str, args, dtype, device, tmp: str, jobs: list) -> dict:
    layers = P.FULL_DEPTH[family] if args.full_depth else args.layers
    spec = P.Spec(family=family, layers=layers, image_tokens=args.image_tokens, quick=args.quick,
                  seed=args.seed, **({"text_before": 4, "text_after": 8} if args.quick else {}))
    t0 = time.perf_counter()
    hf = P.build_hf(spec, dtype, device)
    weights = os.path.join(tmp, f"{family}.safetensors")
    if not args.skip_memory:
        P.save_weights(hf, weights)
        sspec = spec.with_(batch=args.batch)
        jobs += [{"tool": t, "spec": spec if sec == "patterns" else sspec, "weights": weights, "section": sec}
                 for sec, tools in MEMORY.items() for t in tools]
    models = P.Models(hf)
    inp = P.make_inputs(spec, hf.config, dtype, device)
    log(f"[{family}] built in {time.perf_counter() - t0:.0f}s: {layers} layers, {inp.n_tokens} tokens "
        f"({inp.n_image} image)")
    checks = Checks(dtype)
    res = {"setup": {"layers": layers, "n_tokens": inp.n_tokens, "image_tokens": inp.n_image,
                     "text_before_image": spec.text_before, "text_after_image": spec.text_after,
                     "share_batch": args.batch, "d_model": hf.config.get_text_config().hidden_size,
                     "vocab": hf.config.get_text_config().vocab_size}}
    with torch.inference_mode():
        out: dict = {}
        fns = first_calls(MAIN + list(BRIDGE_KO), models, inp, out)
        bridge_ko = check_main(checks, out)
        res["warnings"] = out.get("_warnings", {})
        hf_first = out["hf_sdpa"]
        for k in BRIDGE_KO:
            if k not in bridge_ko:
                del fns[k]
        del out
        gc.collect()
        log(f"[{family}] forward / patterns / knockout: {args.reps} rounds of {len(fns)}")
        refs = {k: list(SECTIONS[s][1]) for s in SECTIONS for k in SECTIONS[s][0]}
        for peer, mech in SAME_KNOCKOUT:
            refs.setdefault(peer, []).append(mech)
        main_rows = timed(fns, args.reps, device, args.seed, refs, collect=not args.quick)
        for s, (rows, _) in SECTIONS.items():
            res[s] = {k: main_rows[k] for k in rows if k in main_rows}
        if args.profile:
            res["profile"] = profile_ops(fns, PROFILE, device)
        res["knockout_bridge"] = {k: ("timed" if k in bridge_ko else "edit discarded: correctness row only")
                                  for k in BRIDGE_KO}

        sspec = spec.with_(batch=args.batch)
        sinp = P.make_inputs(sspec, hf.config, dtype, device)
        out = {}
        sfns = first_calls(SHARE, models, sinp, out)
        check_share(checks, out, "share")
        del out
        log(f"[{family}] share over {args.batch} examples: {args.share_reps} rounds")
        srefs = {k: ["hf_eager", "hf_eager_share"] for k in SHARE}
        res["share"] = timed(sfns, args.share_reps, device, args.seed + 1, srefs, collect=not args.quick)
        checks.add("forward", "HF sdpa logits unchanged after every tool ran (they share its weights)",
                   P.contender("hf_sdpa", models, inp)(), hf_first, expect="equal")
    res["notes"] = models.notes
    res["correctness"] = checks.rows
    gc.unfreeze()
    del hf
    gc.collect()
    return res


def run_scaling(args, dtype, device, tmp: str, jobs: list) -> dict | None:
    points = [int(x) for x in args.scaling.split(",") if x.strip()]
    if not points:
        return None
    reps = [int(x) for x in args.scaling_reps.split(",")]
    reps += [reps[-1]] * (len(points) - len(reps))
    layers = P.FULL_DEPTH["qwen"] if args.full_depth else args.scaling_layers
    spec = P.Spec(family="qwen", layers=layers, image_tokens=points[0], quick=args.quick, tiny_vision=True,
                  seed=args.seed, **({"text_before": 4, "text_after": 8} if args.quick else {}))
    hf = P.build_hf(spec, dtype, device)
    weights = os.path.join(tmp, "scaling.safetensors")
    if not args.skip_memory:
        P.save_weights(hf, weights)
        jobs += [{"tool": t, "spec": spec.with_(image_tokens=n), "weights": weights, "section": "scaling",
                  "process": f"scaling {t}"} for t in SCALING_MEMORY for n in points]
    models = P.Models(hf)
    checks = Checks(dtype)
    res = {"family": "qwen", "layers": layers, "vision": "one windowed block (no full-attention block)",
           "points": []}
    with torch.inference_mode():
        for i, (n_img, r) in enumerate(zip(points, reps)):
            inp = P.make_inputs(spec.with_(image_tokens=n_img), hf.config, dtype, device)
            log(f"[scaling] {n_img} image tokens ({inp.n_tokens} in all): {r} rounds")
            out: dict = {}
            names = SCALING + (SCALING_KO if n_img >= args.scaling_knockout_from else [])
            if i == 0:  # the warm-up of every contender (later points run warm code)
                fns = first_calls(SCALING + SCALING_KO, models, inp, out)
                fns = {n: fns[n] for n in names}
            else:
                fns = _keeping_first({n: (P.LABELS[n], P.contender(n, models, inp)) for n in names}, out)
            wall, cpu = time_interleaved(fns, r, 0, device, seed=args.seed + 2 + i, log=log, collect=not args.quick)
            note = f" at {n_img} image tokens"
            check_share(checks, out, "scaling", note)
            if "mech_ko_pre" in out and "nn_ko_pre" in out:
                check_knockout_scaling(checks, out, note)
            refs = {k: ["hf_eager", "hf_eager_share"] for k in SCALING}
            refs.update({k: ["hf_eager", "mech_ko_pre"] for k in SCALING_KO})
            res["points"].append({"image_tokens": n_img, "n_tokens": inp.n_tokens, "rounds": r,
                                  "time": summarize(wall, cpu, refs)})
            del out, fns
            gc.collect()
    res["correctness"] = checks.rows
    gc.unfreeze()
    del hf
    gc.collect()
    return res


def _keeping_first(fns: dict, out: dict) -> dict:
    """The contenders, each keeping its first output in ``out`` (for the checks)."""
    def wrap(k, fn):
        def call():
            r = fn()
            out.setdefault(k, r)
            return r
        return call
    return {k: (label, wrap(k, fn)) for k, (label, fn) in fns.items()}


# ------------------------------------------------------------------------------- main --
def main(argv=None) -> dict:
    args = parse_args(argv)
    import transformers
    from _peers_report import targets, write_markdown

    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        result["targets"] = targets(result)
        write_markdown(result, Path(args.out_dir) / "RESULTS.md")
        return result

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    t0 = time.perf_counter()
    info = machine_info(device)
    for lib in ("nnsight",):
        from importlib.metadata import version
        info[lib] = version(lib)
    info["affinity"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    result = {"benchmark": "compare_peers", "machine": info, "quick": args.quick, "machine_note": args.machine_note,
              "setup": {k: getattr(args, k) for k in ("device", "dtype", "full_depth", "layers", "image_tokens",
                                                       "batch", "reps", "share_reps", "scaling", "scaling_reps",
                                                       "scaling_layers", "threads", "seed")},
              "command": shlex.join([Path(sys.executable).name, *sys.argv]), "families": {}}
    jobs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="compare_peers_") as tmp:
        for family in args.families.split(","):
            result["families"][family] = run_family(family, args, dtype, device, tmp, jobs)
            gc.collect()
        result["scaling"] = run_scaling(args, dtype, device, tmp, jobs)
        gc.collect()
        if jobs:
            log(f"memory: {len(jobs)} measures")
            for m in run_memory(jobs, args, log=log):
                if m["section"] == "scaling":
                    pt = next(p for p in result["scaling"]["points"] if p["image_tokens"] == m["image_tokens"])
                    pt.setdefault("memory", {})[m["tool"]] = m
                else:
                    fam = result["families"][m["family"]]
                    fam.setdefault("memory", {}).setdefault(m["section"], {})[m["tool"]] = m
    info["loadavg_end"] = list(os.getloadavg())
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["targets"] = targets(result)
    rows = [r for f in result["families"].values() for r in f["correctness"]]
    rows += result["scaling"]["correctness"] if result["scaling"] else []
    result["correctness_pass"] = all(r["pass"] is not False for r in rows)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from mechvlm.fileio import write_text

    write_text(out / "compare_peers.json", json.dumps(result, indent=1, default=str) + "\n")
    write_markdown(result, out / "RESULTS.md")
    log(f"wrote {out / 'RESULTS.md'} and {out / 'compare_peers.json'} in {result['wall_s']:.0f}s; "
        f"correctness {'PASS' if result['correctness_pass'] else 'FAIL'}")
    return result


if __name__ == "__main__":
    main()
