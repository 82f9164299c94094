"""The seed's post-softmax knockout in bounded memory: time and extra peak memory against a
plain forward, at a long image (default 4,096 image tokens; target <= 1.3x both).

Contenders (text->image in every layer, Qwen2.5-VL-3B-shaped, 2 layers, one windowed vision
block, last-position logits as in compare_peers):
    plain                  no hooks (SDPA)
    pre_softmax_mask       knockout through the attention mask (SDPA)
    post_softmax_zero      knockout as written, no renormalisation: SDPA over the kept keys,
                           rows rescaled by the mass they kept (no pattern materialised)
    post_softmax_explicit  the same knockout with a no-op observer at every hook_pattern, which
                           brings back the explicit softmax (what post_softmax_zero cost before)

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/post_softmax_knockout.py             # ~6 min on 2 cores
    .venv/bin/python benchmarks/post_softmax_knockout.py --quick --no-write           # tiny (the test)
    .venv/bin/python benchmarks/post_softmax_knockout.py --device cuda --dtype bfloat16 --layers 36

Time: interleaved rounds (`_common.time_interleaved`), paired ratios against ``plain``, and an
A/A control (``plain`` timed twice per round). Memory: one fresh subprocess per contender,
the extra peak (RSS on CPU, the allocator on CUDA) of one call over what the process held
before it (`_common.extra_peak`). Correctness: max |logits| difference bounded vs explicit.
Writes ``post_softmax_knockout.json`` and its section of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
for p in (str(HERE), str(HERE.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)
import _peers as P  # noqa: E402
from _common import (  # noqa: E402
    MALLOC_ENV,
    extra_peak,
    machine_info,
    paired_ratios,
    time_interleaved,
    save_result,
    write_results_section,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CONTENDERS = ["plain", "pre_softmax_mask", "post_softmax_zero", "post_softmax_explicit"]


def build(args):
    spec = P.Spec(family="qwen", layers=args.layers, image_tokens=args.image_tokens, quick=args.quick,
                  tiny_vision=True)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    models = P.Models(P.build_hf(spec, dtype, device), private=True)
    return models, P.make_inputs(spec, models.hf.config, dtype, device)


def contender(name: str, models, inp):
    from mechvlm.interventions import knockout

    model = models.mech
    roles = model.roles(**inp.mech)
    if name == "plain":
        hooks = []
    elif name == "pre_softmax_mask":
        hooks = knockout(roles, "text", "image", mode="pre_softmax_mask")
    else:
        hooks = knockout(roles, "text", "image", mode="post_softmax_zero")
        if name == "post_softmax_explicit":
            hooks += [(n, lambda t, hook: None) for n, _ in list(hooks)]

    def run():
        model.run_with_hooks(**inp.mech, return_type=None, fwd_hooks=hooks)
        return model.last.logits()

    return run


def memory_worker(payload: str) -> None:
    """Subprocess: build the model once, then per tool a warm-up call and a measured call."""
    args = argparse.Namespace(**json.loads(payload))
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    with torch.inference_mode():
        models, inp = build(args)
        for tool in args.tools:
            fn = contender(tool, models, inp)
            fn()  # warm-up on the real input (allocator, kernels)
            res = extra_peak(fn, args.device)
            print("MEMORY " + json.dumps({**res, "tool": tool, "n_tokens": inp.n_tokens}), flush=True)


def measure_memory(args) -> dict:
    """A fresh process per contender (``--quick``: one for all; its numbers are no result)."""
    out = {}
    for tools in ([CONTENDERS] if args.quick else [[t] for t in CONTENDERS]):
        payload = json.dumps({**vars(args), "tools": tools})
        res = subprocess.run([sys.executable, __file__, "--memory-worker", payload], capture_output=True,
                             text=True, env=dict(os.environ, **MALLOC_ENV), check=False)
        if res.returncode != 0:
            raise RuntimeError(f"memory worker {tools} failed:\n{res.stderr[-3000:]}")
        for line in res.stdout.splitlines():
            if line.startswith("MEMORY "):
                m = json.loads(line[7:])
                out[m["tool"]] = m
                print(f"  memory {m['tool']:<22} extra peak {m['extra_peak_mib']:9.1f} MiB", flush=True)
    return out


def markdown(result: dict) -> str:
    """The RESULTS.md section; a run with one part only (``--only``) shows '-' for the other."""
    m, st, t, mem = result["machine"], result["setup"], result.get("time"), result.get("memory", {})
    base_mem = mem["plain"]["extra_peak_mib"] if "plain" in mem else None
    lines = ["## Post-softmax knockout in bounded memory (`benchmarks/post_softmax_knockout.py`)", "",
             f"Text->image knockout in all {st['layers']} layers, Qwen2.5-VL-3B-shaped, {st['n_tokens']} tokens "
             f"({st['image_tokens']} image), {st['device']} {st['dtype']}, {m['torch_threads']} thread(s); "
             f"{st['reps']} interleaved rounds; load average {m['loadavg_start'][0]:.1f} at start "
             f"(a shared machine: other jobs ran meanwhile); {m['date']}, mechvlm {m.get('mechvlm_git')}."
             + (" **--quick: tiny model, not a result.**" if st["quick"] else ""), "",
             "| mode | ms median (min-max) | time x plain (paired, min-max) | extra peak MiB | memory x plain |",
             "|---|---|---|---|---|"]
    for name in CONTENDERS + ["plain_aa"]:
        w = t["wall_ms"].get(name) if t else None
        r = t["ratios"].get(name) if t else None
        ratio = "-" if r is None else (f"{r['median_of_paired_ratios']:.3f} "
                                       f"({r['paired_ratio_min']:.2f}-{r['paired_ratio_max']:.2f})")
        ms = "-" if w is None else f"{statistics.median(w):.0f} ({min(w):.0f}-{max(w):.0f})"
        mm = mem.get(name)
        label = "plain again (A/A control)" if name == "plain_aa" else name
        lines.append(f"| {label} | {ms} | {ratio} | "
                     + (f"{mm['extra_peak_mib']:.0f} | {mm['extra_peak_mib'] / base_mem:.2f} |" if mm else "- | - |"))
    r = t["ratios"]["post_softmax_zero"]["median_of_paired_ratios"] if t else None
    mr = mem["post_softmax_zero"]["extra_peak_mib"] / base_mem if "post_softmax_zero" in mem else None
    if r is None or mr is None:
        verdict = "not measured in full (" + ("time" if r is None else "memory") + " part missing)"
    else:
        verdict = "met" if r <= 1.3 and mr <= 1.3 else "**missed**"
    fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    diff = result.get("max_abs_logits_diff")
    lines += ["", f"Target `post_softmax_zero` <= 1.3x plain in time and extra peak memory: {verdict} "
              f"({fmt(r)} time, {fmt(mr)} memory)."
              + ("" if diff is None else f" max |logits diff| bounded vs explicit: {diff:.1e}.")
              + " The explicit row is what the knockout cost before "
              "(any other hook at `hook_pattern` still takes that path, by design)."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and image, 2 rounds: a smoke test")
    p.add_argument("--image-tokens", type=int, default=4096)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    p.add_argument("--json", default=str(HERE / "post_softmax_knockout.json"))
    p.add_argument("--no-write", action="store_true", help="print only (no JSON, no RESULTS.md)")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    p.add_argument("--only", choices=["time", "memory"],
                   help="run one part; the other is read from --json (same setup) when it is there")
    args = p.parse_args(argv)
    if args.memory_worker:
        return memory_worker(args.memory_worker)
    if args.quick:
        args.image_tokens, args.reps = 16, 2
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    setup = {k: getattr(args, k) for k in ("image_tokens", "layers", "reps", "device", "dtype", "quick")}
    result = {"machine": machine_info(args.device), "setup": setup}
    old = json.loads(Path(args.json).read_text()) if args.only and Path(args.json).exists() else {}
    if {k: v for k, v in old.get("setup", {}).items() if k not in ("n_tokens", "reps")} != \
            {k: v for k, v in setup.items() if k != "reps"}:
        old = {}
    result.update({k: old[k] for k in ("time", "max_abs_logits_diff", "memory") if k in old})
    if args.only != "memory":
        with torch.inference_mode():
            models, inp = build(args)
            fns = {name: contender(name, models, inp) for name in CONTENDERS}
            bounded, explicit = fns["post_softmax_zero"](), fns["post_softmax_explicit"]()
            result["max_abs_logits_diff"] = float((bounded - explicit).abs().max())
            setup["n_tokens"] = inp.n_tokens
            contenders = {name: (name, fn) for name, fn in fns.items()}
            contenders["plain_aa"] = ("plain_aa", fns["plain"])
            wall, cpu = time_interleaved(contenders, args.reps, warmup=0, device=torch.device(args.device),
                                         collect=not args.quick)
        del models, fns, contenders
        result["time"] = {"wall_ms": wall, "cpu_ms": cpu,
                          "ratios": {k: paired_ratios(wall[k], wall["plain"]) for k in wall if k != "plain"}}
        save_result(args.json, result, not args.no_write)  # the timing survives a failure in the memory part
    setup.setdefault("n_tokens", old.get("setup", {}).get("n_tokens"))
    if args.only != "time":
        result["memory"] = measure_memory(args)
        setup["n_tokens"] = setup["n_tokens"] or next(iter(result["memory"].values()))["n_tokens"]
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    save_result(args.json, result, not args.no_write)
    if "time" in result or "memory" in result:
        text = markdown(result)
        print("\n" + text)
        if not args.no_write:
            write_results_section(HERE / "RESULTS.md", "post_softmax_knockout", text)
    return result


if __name__ == "__main__":
    main()
