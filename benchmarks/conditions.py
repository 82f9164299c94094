"""Table 1's five conditions from one prefill (`mechvlm.prefix_sharing`), against one condition
and against five separate runs.

Contenders, on the same weights (Qwen2.5-VL-3B-shaped, ``--layers`` layers, one image of
``--image-tokens`` tokens between 16 and 48 text tokens; random seeded weights), greedy, no
stop token, ``--new-tokens`` new tokens per row:
    five_shared   `generate_conditions` over the five conditions of `CONDITIONS` (none,
                  text->image and text->EOI, each pre_softmax_mask and post_softmax_zero):
                  the prefix up to the first text token after the image prefilled once,
                  the KV cache forked per condition
    five_apart    the same five, each on its own (``share_prefix=False``: the path before issue 21)
    one           one condition on its own (text->image pre_softmax_mask, `greedy_generate`)
    one_aa        the same again: an A/A control (its ratio to ``one`` is the noise floor)
    hf_five       five HF ``generate(do_sample=False)`` runs (sdpa): no knockout, and four
                  knockouts as SDPA mask edits (text->image, text->EOI; HF has no post-softmax
                  zeroing without eager attention, so both readings run the mask edit, which
                  is the cheaper of the two)
and ``mechvlm report`` on both shipped toys, before (``share_prefix=False``) and after.
five_apart and hf_five are timed at the first ``--batches`` size only (they take five times
as long); at every size five_apart runs once, untimed, for the correctness column.
A metrics cell at the first batch size (the streaming ``attention_share``, text -> image / EOI, every
layer), on the same weights and prompts:
    share_five_shared  `attention_share_conditions` over the five conditions: the prefix
                       prefilled once, the rest of the prompt under the five side by side
    share_five_apart   the same five, each on its own (``share_prefix=False``: ``attention_share``
                       with the condition's hooks over the whole prompt, the path before)
    share_one          one condition on its own (text->image pre_softmax_mask)
    share_one_aa       the same again: the A/A control

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/conditions.py            # default: a short run
    .venv/bin/python benchmarks/conditions.py --quick --no-write          # tiny model: a smoke test
    .venv/bin/python benchmarks/conditions.py --device cuda --dtype bfloat16 --layers 36 --batches 8 \\
        --new-tokens 4,16 --no-write                                       # on a GPU

Method: one process; per (batch, new tokens) every contender once (warm-up; its outputs
give the correctness column: each shared condition's tokens == its own run's, and none /
text->image == HF), then ``--reps`` rounds in a new seeded random order each
(`_common.time_interleaved`); ratios are the median (min-max) of per-round paired ratios,
wall and process CPU time. Writes ``conditions.json`` and the ``conditions`` section of
``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
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
from generation import DTYPES, NEVER, HFMaskKnockout, build  # noqa: E402

ONE = "text→image:pre_softmax_mask"
PAIRS = [("five_shared", "one"), ("five_shared", "one_aa"), ("five_shared", "five_apart"), ("five_shared", "hf_five"),
         ("five_apart", "one"), ("one_aa", "one")]
TARGET = ("five_shared", "one", 1.6)
METRIC_PAIRS = [("share_five_shared", "share_one"), ("share_five_shared", "share_five_apart"),
                ("share_five_apart", "share_one"), ("share_one_aa", "share_one")]


def contenders(spec, hf, model, batch_size: int, new: int, dtype, device, apart: bool = True):
    from mechvlm.generation import greedy_generate
    from mechvlm.mmbench.conditions import CONDITIONS
    from mechvlm.prefix_sharing import generate_conditions, plan_conditions

    inp = P.make_inputs(spec.with_(batch=batch_size), hf.config, dtype, device)
    mech, kw = inp.mech, {k: v for k, v in inp.hf.items() if k not in ("logits_to_keep", "use_cache")}
    roles = model.roles(**mech)
    hf_image = HFMaskKnockout(roles.text.cpu(), roles.image.cpu()).model(hf)
    gen = dict(max_new_tokens=new, do_sample=False, eos_token_id=NEVER, pad_token_id=0)

    def hf_five():
        outs = [hf.generate(**kw, **gen)]
        for key in (roles.image, roles.eoi, roles.image, roles.eoi):
            outs.append(HFMaskKnockout(roles.text.cpu(), key.cpu()).model(hf).generate(**kw, **gen))
        return outs

    def five(share):
        return {k: g.sequences for k, g in generate_conditions(model, mech, CONDITIONS, new, NEVER,
                                                               share_prefix=share)[0].items()}

    plan = plan_conditions(model, mech, CONDITIONS, max_new_tokens=new)
    n, w, c = mech["input_ids"].shape[1], plan.shared_columns, len(CONDITIONS)
    layout = {"prompt": n, "shared_columns": w, "conditions": c, "floor": (w + c * (n - w)) / n}

    fns = {
        "five_shared": functools.partial(five, True),
        "five_apart": functools.partial(five, False),
        "one": lambda: greedy_generate(model, mech, new, NEVER, fwd_hooks=CONDITIONS[ONE]).sequences,
        "one_aa": lambda: greedy_generate(model, mech, new, NEVER, fwd_hooks=CONDITIONS[ONE]).sequences,
        "hf_five": hf_five,
    }
    if not apart:  # the two slow contenders run at the first batch size only
        fns = {k: v for k, v in fns.items() if k not in ("five_apart", "hf_five")}
    checks = {"hf_none": lambda: hf.generate(**kw, **gen), "hf_image": lambda: hf_image.generate(**kw, **gen),
              "five_apart": functools.partial(five, False)}
    return fns, checks, inp.n_tokens, layout


def metric_contenders(spec, hf, model, batch_size: int, dtype, device):
    """``attention_share`` under the five conditions, shared / apart, and one condition alone."""
    from mechvlm.metrics import attention_share, attention_share_conditions
    from mechvlm.mmbench.conditions import CONDITIONS

    mech = P.make_inputs(spec.with_(batch=batch_size), hf.config, dtype, device).mech

    def five(share):
        return attention_share_conditions(model, mech, None, progress=False, share_prefix=share)

    def one():
        return attention_share(model, mech, fwd_hooks=CONDITIONS[ONE], progress=False)

    return {"share_five_shared": functools.partial(five, True), "share_five_apart": functools.partial(five, False),
            "share_one": one, "share_one_aa": one}


def metric_cell(fns: dict, batch: int, reps: int, device, quick: bool, layout: dict) -> dict:
    """One metrics cell: correctness (max |raw| difference, shared vs apart), then timing;
    ``layout``: the batch's prompt / shared columns (the prompt-token floor)."""
    shared, apart = fns["share_five_shared"](), fns["share_five_apart"]()
    diff = max(float((shared[k].raw - apart[k].raw).abs().max()) for k in apart.results)
    wall, cpu = time_interleaved({k: (k, fn) for k, fn in fns.items()}, reps, 1, device, collect=not quick)
    return {"batch": batch, "wall_ms": wall, "cpu_ms": cpu, "max_raw_diff": diff, "layout": layout,
            "shared_batches": sum(shared.shared_batches.values()),
            "ratios": {f"{a}/{b}": paired_ratios(wall[a], wall[b]) for a, b in METRIC_PAIRS},
            "cpu_ratios": {f"{a}/{b}": paired_ratios(cpu[a], cpu[b]) for a, b in METRIC_PAIRS}}


def _metric_lines(cells: list) -> list:
    if not cells:
        return []
    lines = ["", "Metrics: `attention_share` (text -> image / EOI, every layer) under the five conditions. "
             "share_five_shared = `attention_share_conditions` (prefix prefilled once, the rest of the prompt "
             "under the five side by side); share_five_apart = each condition's own `attention_share` over "
             "the whole prompt; share_one = one knockout condition. Same raw = largest |raw mass| difference, "
             "shared vs apart.", "",
             "| batch | contender | ms median (min-max) | ratio | wall, paired | CPU time, paired |",
             "|---|---|---|---|---|---|"]
    for cell in cells:
        for name, w in cell["wall_ms"].items():
            lines.append(f"| {cell['batch']} | {name} | {statistics.median(w):.0f} ({min(w):.0f}-{max(w):.0f}) | | | |")
        for a, b in METRIC_PAIRS:
            key = f"{a}/{b}"
            lines.append(f"| {cell['batch']} | | | {key} | {_fmt(cell['ratios'].get(key))} | "
                         f"{_fmt(cell['cpu_ratios'].get(key))} |")
        lines.append(f"| {cell['batch']} | same raw | | {cell['max_raw_diff']:.1e} | | |")
    lines.append("")
    for cell in cells:  # the prompt columns each contender runs, if every column cost the same
        lay = cell["layout"]
        lines.append(f"- batch {cell['batch']}: prompt-token floor share_five_shared/share_one {lay['floor']:.3f}, "
                     f"share_five_shared/share_five_apart {lay['floor'] / lay['conditions']:.3f} "
                     f"({lay['shared_columns']} shared of {lay['prompt']} columns)")
    return lines


@contextlib.contextmanager
def before_issue_21():
    """`mmbench.evaluate` with every condition on its own (the path before issue 21)."""
    ev = importlib.import_module("mechvlm.mmbench.evaluate")  # the package re-exports a function of that name
    saved = ev.generate_conditions
    # evaluate passes share_prefix itself, which would override a functools.partial's keyword
    ev.generate_conditions = lambda *a, **k: saved(*a, **{**k, "share_prefix": False})
    try:
        yield
    finally:
        ev.generate_conditions = saved


def report_contenders(limit: int | None, tmp: str) -> dict:
    from mechvlm.report.run import ReportConfig, run_report

    def run(tag):
        cfg = ReportConfig(out=os.path.join(tmp, tag), progress=False, limit=limit, overwrite=True)
        with before_issue_21() if tag == "before" else contextlib.nullcontext():
            return run_report(cfg)
    return {"report_before": functools.partial(run, "before"), "report_after": functools.partial(run, "after")}


def _tables(report: dict) -> list:
    """The Table-1 accuracies of every model of a `run_report` result."""
    return [{c: s["accuracy"] for c, s in m["knockout"].items()} for m in report["models"]]


def _fmt(r: dict | None) -> str:
    return "-" if r is None else f"{r['median_of_paired_ratios']:.3f} ({r['paired_ratio_min']:.2f}-{r['paired_ratio_max']:.2f})"


def cell_of(result: dict, target: dict) -> dict:
    return next(c for c in result["cells"] if c["batch"] == target["batch"] and c["new"] == target["new"])


def _noise_warning(cell: dict) -> str:
    """A warning when the A/A control of the cell is off by more than 5 %: the paired ratios
    then carry that much noise (e.g. the first call of a deep model paying its page faults)."""
    aa = cell["ratios"].get("one_aa/one")
    if aa is None or abs(aa["median_of_paired_ratios"] - 1) <= 0.05:
        return ""
    alt = cell["ratios"].get("five_shared/one_aa")
    return (f". **Not conclusive: the A/A control is {aa['median_of_paired_ratios']:.3f} "
            f"({aa['paired_ratio_min']:.2f}-{aa['paired_ratio_max']:.2f})**"
            + (f"; against one_aa the ratio is {alt['median_of_paired_ratios']:.3f}" if alt else ""))


def markdown(result: dict) -> str:
    m, st = result["machine"], result["setup"]
    lines = ["## Table 1's five conditions from one prefill (`benchmarks/conditions.py`)", "",
             f"Qwen2.5-VL-3B-shaped, {st['layers']} layers, {st['n_tokens']} prompt tokens ({st['image_tokens']} "
             f"image), {st['device']} {st['dtype']}, {m['torch_threads']} thread(s), {st['reps']} interleaved "
             f"rounds per cell; load average {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at "
             "end" + (": **a short run on a machine shared with other jobs** (trust the paired ratios, not the "
                      "absolute times)" if max(m['loadavg_start'][0], m['loadavg_end'][0]) > 1.5 else
                      " (no other job running)") + f"; {m['date']}, mechvlm {m.get('mechvlm_git')}."
             + (" **--quick: tiny model, not a result.**" if st["quick"] else ""), "",
             "five_shared = the five conditions of Table 1 with the prefix prefilled once and the five "
             "continued side by side along the batch from it (the KV cache rows repeated); five_apart = the five, each on its own; one = one knockout condition; "
             "hf_five = five HF `generate` runs (no knockout + four SDPA-mask knockouts). Times are whole "
             "calls (prefill + all new tokens of all conditions).", "",
             "| batch | new tokens | contender | ms median (min-max) | ratio | wall, paired | CPU time, paired |",
             "|---|---|---|---|---|---|---|"]
    for cell in result["cells"]:
        for name, w in cell["wall_ms"].items():
            lines.append(f"| {cell['batch']} | {cell['new']} | {name} | {statistics.median(w):.0f} "
                         f"({min(w):.0f}-{max(w):.0f}) | | | |")
        for a, b in PAIRS:
            key = f"{a}/{b}"
            if key not in cell["ratios"] and a in cell["wall_ms"] and b in cell["wall_ms"]:  # an older JSON
                cell["ratios"][key] = paired_ratios(cell["wall_ms"][a], cell["wall_ms"][b])
                cell["cpu_ratios"][key] = paired_ratios(cell["cpu_ms"][a], cell["cpu_ms"][b])
            if key not in cell["ratios"]:
                continue
            lines.append(f"| {cell['batch']} | {cell['new']} | | | {key} | {_fmt(cell['ratios'].get(key))} | "
                         f"{_fmt(cell['cpu_ratios'].get(key))} |")
        lines.append(f"| {cell['batch']} | {cell['new']} | same tokens | | {cell['correct']} | | |")
    lines += ["", f"Target: five_shared <= {TARGET[2]}x one (median of paired ratios, wall; CPU time in brackets). "
              "Floor: what the prompt alone costs when tokens cost the same, (shared columns + 5 x the rest) / prompt "
              "columns; the decode steps and the unembedding of every step come on top, once per condition and row. "
              "`mmbench.evaluate` batches 8 items by default, `mechvlm report` 16.", ""]
    for t in result["targets"]:
        lay = cell_of(result, t)["layout"]
        lines.append(f"- batch {t['batch']}, {t['new']} new tokens: {t['value']:.3f} (CPU time {t['cpu_value']:.3f}): "
                     f"{'met' if t['met'] else '**not met**'}; prompt-token floor {lay['floor']:.3f} ("
                     f"{lay['shared_columns']} shared + {lay['conditions']} x {lay['prompt'] - lay['shared_columns']} "
                     f"over {lay['prompt']} columns)" + _noise_warning(cell_of(result, t)))
    lines += _metric_lines(result.get("metric_cells", []))
    rep = result.get("report")
    if rep:
        b, a = rep["wall_ms"]["report_before"], rep["wall_ms"]["report_after"]
        lines += ["", f"`mechvlm report` on both shipped toys ({rep['limit'] or 'all'} items, every condition, "
                  f"the whole report: metrics, Table 1, figures), {len(a)} interleaved rounds: before "
                  f"{statistics.median(b) / 1e3:.1f} s ({min(b) / 1e3:.1f}-{max(b) / 1e3:.1f}), after "
                  f"{statistics.median(a) / 1e3:.1f} s ({min(a) / 1e3:.1f}-{max(a) / 1e3:.1f}); after / before "
                  f"{_fmt(rep['ratio'])}, CPU time {_fmt(rep['cpu_ratio'])}; same Table 1: {rep['same_table']}. "
                  "Before = every condition on its own (`share_prefix=False`)."
                  + (f" Timed in a later run ({m['report_rerun']['date']}, load average "
                     f"{m['report_rerun']['loadavg_start'][0]:.1f})." if m.get("report_rerun") else "")]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 round: a smoke test")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--image-tokens", type=int, default=None, help="default 256 (--quick: 16)")
    ap.add_argument("--batches", default=None, help="default 2,8 (--quick: 2); five_apart and hf_five run at "
                    "the first only")
    ap.add_argument("--new-tokens", default=None, help="default 2 (--quick: 2)")
    ap.add_argument("--reps", type=int, default=None, help="default 3 (--quick: 1)")
    ap.add_argument("--report-reps", type=int, default=2, help="rounds of the report before/after (0: skip)")
    ap.add_argument("--report-limit", type=int, default=32, help="first N items of the shipped TSV")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    ap.add_argument("--json", default=str(HERE / "conditions.json"))
    ap.add_argument("--no-write", action="store_true", help="print only (no JSON, no RESULTS.md)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    ap.add_argument("--no-apart", action="store_true", help="time five_apart / hf_five at no batch size")
    ap.add_argument("--no-checks", action="store_true",
                    help="skip the untimed correctness runs (a deep model on a CPU; the default run checks the tokens)")
    ap.add_argument("--no-metrics", action="store_true", help="skip the attention_share cell")
    ap.add_argument("--section", default="conditions", help="the RESULTS.md section to write")
    ap.add_argument("--report-only", action="store_true",
                    help="time only the report before/after; the cells are read back from --json")
    args = ap.parse_args(argv)
    for name, full, quick in (("image_tokens", 256, 16), ("batches", "2,8", "2"), ("new_tokens", "4", "2"),
                              ("reps", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.quick:
        args.report_reps, args.report_limit = min(args.report_reps, 1), min(args.report_limit, 4)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    result = {"machine": machine_info(device), "cells": [], "targets": []}
    if args.report_only:
        result = json.loads(Path(args.json).read_text())
        result["machine"]["report_rerun"] = machine_info(device)
    args.family = "qwen"
    spec, hf, model = (None, None, None) if args.report_only else build(args)
    if not args.report_only:
        result["setup"] = {"layers": args.layers, "image_tokens": args.image_tokens, "device": args.device,
                           "dtype": args.dtype, "reps": args.reps, "quick": args.quick}
    with torch.inference_mode():
        batches = [] if args.report_only else [int(x) for x in args.batches.split(",")]
        for batch in batches:
            for new in [int(x) for x in args.new_tokens.split(",")]:
                fns, checks, n_tokens, layout = contenders(spec, hf, model, batch, new, dtype, device,
                                                           apart=batch == batches[0] and not args.no_apart)
                result["setup"]["n_tokens"] = n_tokens
                print(f"[batch {batch}, {new} new tokens, {n_tokens} prompt tokens]", flush=True)
                if args.no_checks:
                    correct = {"not checked (--no-checks)": None}
                else:
                    shared, apart = fns["five_shared"](), checks["five_apart"]()
                    correct = {"shared == apart": all(torch.equal(shared[k], apart[k]) for k in apart),
                               "none == hf": torch.equal(shared["none"].cpu(), checks["hf_none"]().cpu()),
                               "text→image == hf": torch.equal(shared[ONE].cpu(), checks["hf_image"]().cpu())}
                wall, cpu = time_interleaved({k: (k, fn) for k, fn in fns.items()}, args.reps, args.warmup, device,
                                             collect=not args.quick)
                pairs = [(a, b) for a, b in PAIRS if a in wall and b in wall]
                cell = {"batch": batch, "new": new, "wall_ms": wall, "cpu_ms": cpu, "correct": correct,
                        "layout": layout,
                        "ratios": {f"{a}/{b}": paired_ratios(wall[a], wall[b]) for a, b in pairs},
                        "cpu_ratios": {f"{a}/{b}": paired_ratios(cpu[a], cpu[b]) for a, b in pairs}}
                result["cells"].append(cell)
                v = cell["ratios"]["five_shared/one"]["median_of_paired_ratios"]
                aa = cell["ratios"]["one_aa/one"]["median_of_paired_ratios"]
                result["targets"].append({"batch": batch, "new": new, "value": v, "limit": TARGET[2],
                                          "cpu_value": cell["cpu_ratios"]["five_shared/one"]["median_of_paired_ratios"],
                                          "met": v <= TARGET[2] and abs(aa - 1) <= 0.05})
                save_result(args.json, result, not args.no_write)
            if batch != batches[0] or args.no_metrics:  # the metrics cell at the first batch size only
                continue
            print(f"[batch {batch}: attention_share under the five conditions]", flush=True)
            result.setdefault("metric_cells", []).append(
                metric_cell(metric_contenders(spec, hf, model, batch, dtype, device), batch, args.reps, device,
                            args.quick, layout))
            save_result(args.json, result, not args.no_write)
        del hf, model
        if args.report_reps:
            with tempfile.TemporaryDirectory() as tmp:
                result["report"] = time_before_after(report_contenders(args.report_limit, tmp), args.report_reps,
                                                     device, lambda b, a: _tables(b) == _tables(a))
            result["report"]["limit"] = args.report_limit
    if args.report_only:
        result["machine"]["report_rerun"]["loadavg_end"] = list(os.getloadavg())
    else:
        result["machine"]["loadavg_end"] = list(os.getloadavg())
    text = markdown(result)
    print("\n" + text)
    save_result(args.json, result, not args.no_write)
    if not args.no_write:
        write_results_section(HERE / "RESULTS.md", args.section, text)
    return result


if __name__ == "__main__":
    main()
