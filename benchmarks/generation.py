"""Generation cost: mechvlm (KV cache, hooks included) against HF ``generate``, per token.

Contenders, on the same weights (Qwen2.5-VL-3B-shaped or, ``--family gemma``, Gemma3-4B-shaped,
``--layers`` layers, one image of ``--image-tokens`` tokens + 64 text tokens; random seeded
weights), greedy, no stop token:
    mech        `greedy_generate` over the KV cache, no hooks
    hf          HF ``generate(do_sample=False)`` (sdpa, its DynamicCache)
    mech_ko     mechvlm with the text->image ``pre_softmax_mask`` knockout in every layer, the
                MMBench condition (a callable rebuilt every step, covering the new tokens)
    hf_ko       HF ``generate`` with the same knockout: every text layer's SDPA mask edited
                (``mask & ~cut``; generated tokens are text) through HF's AttentionInterface
    mech_nocache  mechvlm without the cache (the path before issue 14): batch 1, up to
                ``--nocache-max`` new tokens
    hf_aa       HF ``generate`` again: an A/A control (its ratio to ``hf`` is the noise floor)
and ``mechvlm report`` on the shipped toy, before (no cache, unsorted batches, explicit
post-softmax knockouts: the code paths before issue 14) and after.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generation.py            # full: ~30 min on 2 busy cores
    .venv/bin/python benchmarks/generation.py --quick --no-write          # tiny model: a smoke test
    .venv/bin/python benchmarks/generation.py --device cuda --dtype bfloat16 --layers 36 \\
        --image-tokens 1024 --batches 8 --report-reps 0 --no-write        # the GPU run of the issue
    (and --family gemma --layers 34: Gemma3-4B-shaped)

Method: one process; for each (batch, new tokens) every contender once (the warm-up, whose
outputs feed the correctness rows: mech == hf and mech_ko == hf_ko token for token), then
``--reps`` rounds in a new seeded random order each (`_common.time_interleaved`). Reported:
median (min-max) ms per generated token (wall / new tokens), tokens/s (batch x new / wall),
and ratios as the median (min-max) of per-round paired ratios. Writes ``generation.json`` and
the ``generation`` section of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
for p in (str(HERE), str(HERE.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)
import _peers as P  # noqa: E402
from _common import (  # noqa: E402
    machine_info,
    paired_ratios,
    save_result,
    time_before_after,
    time_interleaved,
    write_results_section,
)

NEVER = 10**6  # an EOS id no model emits: every call generates exactly the requested tokens
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TARGETS = {"mech": ("hf", 1.10), "mech_ko": ("hf_ko", 1.15)}


# ------------------------------------------------------------------ HF knockout --
class HFMaskKnockout:
    """HF's sdpa attention with every text layer's mask edited to ``mask & ~cut``: in the
    prefill ``cut = text query x image key`` (from the prompt), in a decode step the new
    token (text) loses every image key. Registered once as an HF attention implementation."""

    NAME = "mechvlm_bench_knockout"

    def __init__(self, text: torch.Tensor, image: torch.Tensor):
        self.text, self.image = text, image

    def __call__(self, module, query, key, value, attention_mask, **kw):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        q, k = query.shape[2], key.shape[2]
        b = query.shape[0]
        if attention_mask is None:  # HF skipped a plain causal mask
            attention_mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)[None, None]
        elif attention_mask.dtype != torch.bool:
            attention_mask = attention_mask == 0
        dev = query.device
        text = self.text.to(dev) if q == self.text.shape[1] and k == q else torch.ones(b, q, dtype=torch.bool, device=dev)
        image = torch.zeros(b, k, dtype=torch.bool, device=dev)
        n = min(k, self.image.shape[1])
        image[:, :n] = self.image[:, :n].to(dev)
        cut = (text[:, :, None] & image[:, None, :])[:, None]
        return sdpa_attention_forward(module, query, key, value, attention_mask & ~cut, **kw)

    def model(self, hf):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(self.NAME, self)
        AttentionMaskInterface.register(self.NAME, sdpa_mask)
        twin = P.shared_copy(hf)
        twin.set_attn_implementation({"text_config": self.NAME})
        return twin


# ---------------------------------------------------------------------- setup --
def build(args):
    from mechvlm import HookedVLM

    spec = P.Spec(family=args.family, layers=args.layers, image_tokens=args.image_tokens, quick=args.quick,
                  tiny_vision=True)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    hf = P.build_hf(spec, dtype, device)
    return spec, hf, HookedVLM._build(hf, dtype=None, device=None, copy_weights=False)


def contenders(spec, hf, model, batch_size: int, new: int, nocache_max: int, dtype, device):
    from mechvlm.generation import greedy_generate
    from mechvlm.mmbench.conditions import CONDITIONS

    inp = P.make_inputs(spec.with_(batch=batch_size), hf.config, dtype, device)
    mech, kw = inp.mech, {k: v for k, v in inp.hf.items() if k not in ("logits_to_keep", "use_cache")}
    roles = model.roles(**mech)
    hf_ko = HFMaskKnockout(roles.text.cpu(), roles.image.cpu()).model(hf)
    gen = dict(max_new_tokens=new, do_sample=False, eos_token_id=NEVER, pad_token_id=0)
    cond = CONDITIONS["text→image:pre_softmax_mask"]
    out = {
        "mech": lambda: greedy_generate(model, mech, new, NEVER).sequences,
        "hf": lambda: hf.generate(**kw, **gen),
        "mech_ko": lambda: greedy_generate(model, mech, new, NEVER, fwd_hooks=cond).sequences,
        "hf_ko": lambda: hf_ko.generate(**kw, **gen),
        "hf_aa": lambda: hf.generate(**kw, **gen),
    }
    if new <= nocache_max and batch_size == 1:
        out["mech_nocache"] = lambda: greedy_generate(model, mech, new, NEVER, use_past_kv_cache=False).sequences
    return out, inp.n_tokens


@contextlib.contextmanager
def before_issue_14():
    """The code paths `mechvlm report` took before issue 14: greedy generation without a KV
    cache (each condition on its own: no shared prefix either), batches in item order,
    post-softmax knockouts through the explicit pattern."""
    import importlib

    from mechvlm.components.attention import Attention

    ev = importlib.import_module("mechvlm.mmbench.evaluate")  # the package re-exports a function of that name
    ps = importlib.import_module("mechvlm.prefix_sharing")

    saved = ps.greedy_generate, ev.generate_conditions, ev.length_order, Attention.post_softmax_cuts
    ps.greedy_generate = functools.partial(saved[0], use_past_kv_cache=False)
    ev.generate_conditions = lambda *a, **k: saved[1](*a, **{**k, "share_prefix": False})  # evaluate passes it
    ev.length_order = lambda builder, items: list(range(len(items)))
    Attention.post_softmax_cuts = lambda self: None
    try:
        yield
    finally:
        ps.greedy_generate, ev.generate_conditions, ev.length_order, Attention.post_softmax_cuts = saved


def report_contenders(args, tmp: str) -> dict:
    from mechvlm.report.run import ReportConfig, run_report

    def run(tag):
        cfg = ReportConfig(out=os.path.join(tmp, tag), progress=False, limit=args.report_limit)
        if tag == "before":
            with before_issue_14():
                return run_report(cfg)["knockout"]
        return run_report(cfg)["knockout"]

    return {"report_before": functools.partial(run, "before"), "report_after": functools.partial(run, "after")}


# -------------------------------------------------------------------- results --
def _row(samples: list[float], new: int, batch: int) -> dict:
    per_token = [s / new for s in samples]
    return {"ms_per_token_median": statistics.median(per_token), "ms_per_token_min": min(per_token),
            "ms_per_token_max": max(per_token), "tokens_per_s": batch * new * 1e3 / statistics.median(samples)}


def markdown(result: dict) -> str:
    m, st = result["machine"], result["setup"]
    shape = "Gemma3-4B-shaped" if st.get("family") == "gemma" else "Qwen2.5-VL-3B-shaped"
    lines = ["## Generation with the KV cache (`benchmarks/generation.py`)", "",
             f"{shape}, {st['layers']} layers, {st['n_tokens']} prompt tokens ({st['image_tokens']} "
             f"image), {st['device']} {st['dtype']}, {m['torch_threads']} thread(s), {st['reps']} interleaved "
             f"rounds per cell; load average {m['loadavg_start'][0]:.1f} at start, "
             f"{m['loadavg_end'][0]:.1f} at end (a machine shared with other jobs: trust the paired "
             f"ratios, not the absolute times); {m['date']}, mechvlm {m.get('mechvlm_git')}."
             + (" **--quick: tiny model, not a result.**" if st["quick"] else ""), "",
             "ms per generated token = wall time of the whole call (prefill included) / new tokens; "
             "ratio = median (min-max) of the per-round paired ratios.", "",
             "| batch | new tokens | contender | ms/token median (min-max) | tokens/s | x reference, wall (paired) | "
             "x reference, CPU time | reference | same tokens |", "|---|---|---|---|---|---|---|---|---|"]
    refs = {"mech": "hf", "mech_ko": "hf_ko", "hf_aa": "hf", "mech_nocache": "hf", "hf_ko": "hf"}
    for cell in result["cells"]:
        for name, row in cell["rows"].items():
            ref = refs.get(name)
            cols = []
            for key in ("ratios", "cpu_ratios"):
                r = cell.get(key, {}).get(f"{name}/{ref}") if ref else None
                cols.append("-" if r is None else
                            f"{r['median_of_paired_ratios']:.3f} ({r['paired_ratio_min']:.2f}-{r['paired_ratio_max']:.2f})")
            same = cell["correct"].get(name, "")
            lines.append(f"| {cell['batch']} | {cell['new']} | {name} | {row['ms_per_token_median']:.1f} "
                         f"({row['ms_per_token_min']:.1f}-{row['ms_per_token_max']:.1f}) | "
                         f"{row['tokens_per_s']:.1f} | {cols[0]} | {cols[1]} | {ref or '-'} | {same} |")
    lines += ["", "Targets (median of paired ratios, wall; CPU time in brackets, the steadier number on a busy "
              "machine): mech <= 1.10x hf, mech_ko <= 1.15x hf_ko.", ""]
    for t in result["targets"]:
        c = f" (CPU time {t['cpu_value']:.3f})" if t.get("cpu_value") is not None else ""
        lines.append(f"- batch {t['batch']}, {t['new']} new tokens, {t['name']} / {t['ref']}: {t['value']:.3f}{c} "
                     f"(limit {t['limit']}): {'met' if t['met'] else '**missed**'}")
    runs = result["machine"].get("runs")
    if runs:
        lines += ["", f"Cells from {len(runs) + 1} runs of the script (same settings): load average at their starts "
                  + ", ".join(f"{r['loadavg_start'][0]:.1f}" for r in [m] + runs) + "."]
    if result.get("note"):
        lines += ["", f"Note: {result['note']}"]
    rep = result.get("report")
    if rep:
        b, a = rep["wall_ms"]["report_before"], rep["wall_ms"]["report_after"]
        r = rep["ratio"]
        lines += ["", f"`mechvlm report` on the shipped toy ({rep['limit'] or 'all'} items, every condition), "
                  f"{len(a)} interleaved rounds: before {statistics.median(b) / 1e3:.1f} s "
                  f"({min(b) / 1e3:.1f}-{max(b) / 1e3:.1f}), after {statistics.median(a) / 1e3:.1f} s "
                  f"({min(a) / 1e3:.1f}-{max(a) / 1e3:.1f}); after / before {r['median_of_paired_ratios']:.3f} "
                  f"({r['paired_ratio_min']:.2f}-{r['paired_ratio_max']:.2f}), CPU time "
                  f"{rep.get('cpu_ratio', {}).get('median_of_paired_ratios', float('nan')):.3f}; "
                  f"same Table 1: {rep['same_table']}. "
                  "Before = no KV cache, batches in item order, explicit post-softmax knockouts."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 round, small cells: a smoke test")
    ap.add_argument("--family", default="qwen", choices=["qwen", "gemma"],
                    help="Qwen2.5-VL-3B-shaped or Gemma3-4B-shaped (image tokens: a square)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--image-tokens", type=int, default=None, help="default 256 (--quick: 16)")
    ap.add_argument("--batches", default=None, help="default 1,8 (--quick: 1,2)")
    ap.add_argument("--new-tokens", default=None, help="default 4,16,64 (--quick: 2,4)")
    ap.add_argument("--reps", type=int, default=None, help="default 3 (--quick: 1)")
    ap.add_argument("--nocache-max", type=int, default=4, help="time mech_nocache up to this many new tokens")
    ap.add_argument("--report-reps", type=int, default=3, help="rounds of the report before/after (0: skip)")
    ap.add_argument("--report-limit", type=int, default=None, help="first N items of the shipped TSV")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    ap.add_argument("--json", default=str(HERE / "generation.json"))
    ap.add_argument("--no-write", action="store_true", help="print only (no JSON, no RESULTS.md)")
    ap.add_argument("--from-json", help="render the RESULTS.md section of a saved (possibly partial) run")
    ap.add_argument("--merge-json", nargs="*", default=[],
                    help="with --from-json: more saved runs whose cells / report are added (e.g. batch 8 run apart)")
    args = ap.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        for extra in args.merge_json:
            more = json.loads(Path(extra).read_text())
            result["cells"] += more.get("cells", [])
            result["targets"] += more.get("targets", [])
            result.setdefault("report", more.get("report"))
            result["machine"].setdefault("runs", []).append(more["machine"])
        result["machine"].setdefault("loadavg_end", result["machine"]["loadavg_start"])
        text = markdown(result)
        print(text)
        if not args.no_write:
            write_results_section(HERE / "RESULTS.md", "generation", text)
        return result
    for name, full, quick in (("image_tokens", 256, 16), ("batches", "1,8", "1,2"), ("new_tokens", "4,16,64", "2,4"),
                              ("reps", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.quick:
        args.report_reps, args.report_limit = min(args.report_reps, 1), args.report_limit or 2
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    result = {"machine": machine_info(device), "cells": [], "targets": []}
    spec, hf, model = build(args)
    result["setup"] = {"family": args.family, "layers": args.layers, "image_tokens": args.image_tokens, "device": args.device,
                       "dtype": args.dtype, "reps": args.reps, "quick": args.quick}
    with torch.inference_mode():
        for batch in [int(x) for x in args.batches.split(",")]:
            for new in [int(x) for x in args.new_tokens.split(",")]:
                fns, n_tokens = contenders(spec, hf, model, batch, new, args.nocache_max, dtype, device)
                result["setup"]["n_tokens"] = n_tokens
                print(f"[batch {batch}, {new} new tokens, {n_tokens} prompt tokens]", flush=True)
                outs = {k: fn() for k, fn in fns.items()}  # warm-up + correctness
                correct = {"mech": torch.equal(outs["mech"].cpu(), outs["hf"].cpu()),
                           "mech_ko": torch.equal(outs["mech_ko"].cpu(), outs["hf_ko"].cpu())}
                if "mech_nocache" in outs:
                    correct["mech_nocache"] = torch.equal(outs["mech_nocache"].cpu(), outs["hf"].cpu())
                del outs
                wall, cpu = time_interleaved({k: (k, fn) for k, fn in fns.items()}, args.reps, 0, device,
                                             collect=not args.quick)
                pairs = [(a, b) for a, b in [("mech", "hf"), ("mech_ko", "hf_ko"), ("hf_aa", "hf"), ("hf_ko", "hf"),
                                             ("mech_nocache", "hf")] if a in wall]
                cell = {"batch": batch, "new": new, "wall_ms": wall, "cpu_ms": cpu, "correct": correct,
                        "ratios": {f"{a}/{b}": paired_ratios(wall[a], wall[b]) for a, b in pairs},
                        "cpu_ratios": {f"{a}/{b}": paired_ratios(cpu[a], cpu[b]) for a, b in pairs},
                        "rows": {k: _row(v, new, batch) for k, v in wall.items()}}
                ratios = cell["ratios"]
                result["cells"].append(cell)
                for name, (ref, limit) in TARGETS.items():
                    v = ratios[f"{name}/{ref}"]["median_of_paired_ratios"]
                    c = cell["cpu_ratios"][f"{name}/{ref}"]["median_of_paired_ratios"]
                    result["targets"].append({"batch": batch, "new": new, "name": name, "ref": ref, "value": v,
                                              "cpu_value": c, "limit": limit, "met": v <= limit})
                save_result(args.json, result, not args.no_write)  # each finished cell survives a later failure
        del hf, model
        if args.report_reps:
            with tempfile.TemporaryDirectory() as tmp:
                result["report"] = time_before_after(
                    report_contenders(args, tmp), args.report_reps, device,
                    lambda b, a: all(b[c]["accuracy"] == a[c]["accuracy"] for c in a))
            result["report"]["limit"] = args.report_limit
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    text = markdown(result)
    print("\n" + text)
    save_result(args.json, result, not args.no_write)
    if not args.no_write:
        write_results_section(HERE / "RESULTS.md", "generation", text)
    return result


if __name__ == "__main__":
    main()
