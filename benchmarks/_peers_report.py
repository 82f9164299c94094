"""Targets and the Markdown report of ``compare_peers.py`` (from its JSON result alone)."""

from __future__ import annotations

from pathlib import Path

FAMILY_NAMES = {"qwen": "Qwen2.5-VL-3B-shaped", "gemma": "Gemma3-4B-shaped"}
PLAIN = "mech"  # the plain forward the memory of the other rows is compared with


def _paired(row: dict, ref: str) -> float | None:
    v = row.get("vs", {}).get(ref)
    return None if v is None else v["median_of_paired_ratios"]


def _fmt_ratio(row: dict | None, ref: str) -> str:
    if row is None or ref not in row.get("vs", {}):
        return "-"
    v = row["vs"][ref]
    return f"{v['median_of_paired_ratios']:.3f} ({v['paired_ratio_min']:.2f}-{v['paired_ratio_max']:.2f})"


def _fmt_ms(row: dict) -> str:
    return f"{row['median_ms']:.0f} ({row['min_ms']:.0f}-{row['max_ms']:.0f})"


def _mem(section: dict | None, tool: str) -> tuple[str, str]:
    if not section or tool not in section:
        return "-", "-"
    extra = section[tool]["extra_peak_mib"]
    base = section.get(PLAIN, {}).get("extra_peak_mib")
    return f"{extra:.0f}", (f"{extra / base:.2f}" if base else "-")


# ----------------------------------------------------------------------------- targets --
def targets(result: dict) -> list[dict]:
    """One row per (target, family, compared pair): the value and whether it meets it."""
    out = []

    def add(measure, target, family, value, limit, better="low", detail=""):
        met = None if value is None else (value <= limit if better == "low" else value >= limit)
        out.append({"measure": measure, "target": target, "family": family, "value": value, "met": met,
                    "detail": detail})

    for fam, r in result["families"].items():
        add("unhooked forward / HF sdpa", "<= 1.03", fam, _paired(r["forward"]["mech"], "hf_sdpa"), 1.03)
        add("pre-softmax knockout / HF sdpa", "<= 1.10", fam, _paired(r["knockout"]["mech_ko_pre"], "hf_sdpa"), 1.10)
        share = r["share"]["mech_share"]
        add("streaming attention_share / HF eager forward", "<= 1.3", fam, _paired(share, "hf_eager"), 1.3)
        add("streaming attention_share / HF eager attentions -> share", "<= 1.3", fam,
            _paired(share, "hf_eager_share"), 1.3)
        mem = r.get("memory", {}).get("share")
        if mem:
            add("attention_share extra peak / plain forward", "<= 1.2", fam,
                mem["mech_share"]["extra_peak_mib"] / mem[PLAIN]["extra_peak_mib"], 1.2)
        for peer in ("nn_ko_pre", "nn_ko_pre_eager", "nn_ko_post", "bridge_ko_pre", "bridge_ko_post"):
            row = r["knockout"].get(peer)
            if row is None:
                continue
            mech = next(iter(row["vs"].keys() - {"hf_sdpa", "hf_eager"}))
            add(f"{peer} / {mech} (same knockout)", ">= 1.2", fam, _paired(row, mech), 1.2, better="high",
                detail=f"{row['label']} vs mechvlm")
    return out


# ---------------------------------------------------------------------------- markdown --
def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _family(fam: str, r: dict) -> list[str]:
    s = r["setup"]
    mem = r.get("memory", {})
    lines = [(f"## {FAMILY_NAMES.get(fam, fam)}: {s['layers']} layers, d_model {s['d_model']}, "
              f"vocab {s['vocab']}, {s['n_tokens']} tokens ({s['image_tokens']} image)"), ""]
    lines += ["### 1. Forward pass", ""]
    lines += _table(["tool", "ms median (min-max)", "x HF sdpa (paired, min-max)"],
                    [[row["label"], _fmt_ms(row), _fmt_ratio(row, "hf_sdpa")] for row in r["forward"].values()])
    lines += ["", "### 2. Caching every attention pattern", ""]
    rows = []
    for k, row in r["patterns"].items():
        rows.append([row["label"], _fmt_ms(row), _fmt_ratio(row, "hf_sdpa"), _fmt_ratio(row, "hf_eager"),
                     *_mem(mem.get("patterns"), k)])
    rows.append([f"plain forward: {r['forward']['mech']['label']}", _fmt_ms(r["forward"]["mech"]),
                 _fmt_ratio(r["forward"]["mech"], "hf_sdpa"), "-", *_mem(mem.get("patterns"), "mech")])
    rows.append(["plain forward: HF sdpa", _fmt_ms(r["forward"]["hf_sdpa"]), "1", "-",
                 *_mem(mem.get("patterns"), "hf_sdpa")])
    lines += _table(["tool", "ms median (min-max)", "x HF sdpa", "x HF eager", "extra peak MiB",
                     "x mechvlm plain forward"], rows)
    lines += ["", "### 3. Knockout text -> image in every layer", ""]
    rows = []
    for k, row in r["knockout"].items():
        mech = [m for m in row["vs"] if m not in ("hf_sdpa", "hf_eager")]
        rows.append([row["label"], _fmt_ms(row), _fmt_ratio(row, "hf_sdpa"), _fmt_ratio(row, "hf_eager"),
                     _fmt_ratio(row, mech[0]) + f" vs {mech[0]}" if mech else "-"])
    for k, how in r.get("knockout_bridge", {}).items():
        if how != "timed":
            rows.append([k, "not timed: " + how, "-", "-", "-"])
    lines += _table(["tool", "ms median (min-max)", "x HF sdpa", "x HF eager", "peer time / mechvlm time"], rows)
    if r.get("profile"):
        lines += ["", ("Where the time goes (torch.profiler, self CPU time of one call; matrix products = "
                       "aten::mm/addmm/bmm, attention = SDPA kernels and softmax):"), ""]
        rows = [[(r["knockout"].get(k) or r["forward"].get(k) or {"label": k})["label"], f"{p['total_ms']:.0f}",
                 f"{p['gemm_ms']:.0f} ({p['gemm_ms'] / p['total_ms']:.1%})",
                 f"{p['attention_ms']:.0f} ({p['attention_ms'] / p['total_ms']:.1%})",
                 f"{p['other_ms']:.0f} ({p['other_ms'] / p['total_ms']:.1%})"] for k, p in r["profile"].items()]
        lines += _table(["tool", "self ms", "matrix products", "attention", "other"], rows)
    lines += ["", f"### 4. attention_share text -> (image, EOI) over {s['share_batch']} examples", ""]
    rows = []
    for k, row in r["share"].items():
        rows.append([row["label"], _fmt_ms(row), _fmt_ratio(row, "hf_eager"), _fmt_ratio(row, "hf_eager_share"),
                     *_mem(mem.get("share"), k)])
    rows.append(["plain forward: mechvlm, no hooks (memory only)", "-", "-", "-", *_mem(mem.get("share"), "mech")])
    lines += _table(["tool", "ms median (min-max)", "x HF eager forward", "x HF eager -> share",
                     "extra peak MiB", "x mechvlm plain forward"], rows)
    if r.get("notes"):
        lines += [""] + [f"Note: {n}." for n in r["notes"]]
    return lines + [""]


def _scaling(sc: dict) -> list[str]:
    tools = list(sc["points"][0]["time"])
    labels = {k: sc["points"][0]["time"][k]["label"] for k in tools}
    lines = [(f"## 5. Scaling of attention_share with the image (Qwen2.5-VL-3B-shaped, {sc['layers']} layers, "
              f"vision tower: {sc['vision']}; one example)"), "",
             ("Time, ms median (min-max; one round at the largest size), and the ratio of the streaming "
              "metric to HF eager:"), ""]
    rows = []
    for pt in sc["points"]:
        t = pt["time"]
        rows.append([pt["image_tokens"], pt["n_tokens"], pt["rounds"], *[_fmt_ms(t[k]) for k in tools],
                     _fmt_ratio(t["mech_share"], "hf_eager"), _fmt_ratio(t["mech_share"], "hf_eager_share")])
    lines += _table(["image tokens", "tokens", "rounds", *[labels[k] for k in tools],
                     "share / HF eager fwd", "share / HF eager -> share"], rows)
    if "memory" in sc["points"][0]:
        mtools = list(sc["points"][0]["memory"])
        lines += ["", "Extra peak memory, MiB (x the plain mechvlm forward):", ""]
        rows = [[pt["image_tokens"], *[f"{pt['memory'][k]['extra_peak_mib']:.0f} ({_mem(pt['memory'], k)[1]})"
                                        for k in mtools]] for pt in sc["points"]]
        labels.setdefault("mech", "mechvlm plain forward")
        lines += _table(["image tokens", *[labels.get(k, k) for k in mtools]], rows)
    return lines + [""]


def _targets(rows: list[dict]) -> list[str]:
    out = []
    for t in rows:
        v = "-" if t["value"] is None else f"{t['value']:.3f}"
        met = {True: "met", False: "**missed**", None: "-"}[t["met"]]
        out.append([t["measure"], t["target"], FAMILY_NAMES.get(t["family"], t["family"]), v, met])
    return _table(["measure", "target", "model", "value (median of paired ratios)", ""], out)


def _correctness(result: dict) -> list[str]:
    rows = []
    groups = [(FAMILY_NAMES.get(f, f), r["correctness"]) for f, r in result["families"].items()]
    if result.get("scaling"):
        groups.append(("scaling", result["scaling"]["correctness"]))
    for name, checks in groups:
        for c in checks:
            verdict = {True: "pass", False: "**FAIL**", None: "observed"}[c["pass"]]
            bound = {"agree": f"<= {c['bound']:.1e}", "differ": f"> {c['bound']:.1e}", "equal": "== 0"}
            rows.append([name, c["section"], c["check"], f"{c['max_abs_diff']:.2e}", bound.get(c["expect"], "-"),
                         verdict, c["note"].replace("|", "\\|")])
    return _table(["model", "section", "check", "max abs diff", "bound", "", "note"], rows)


def write_markdown(result: dict, path: Path, discussion: str = "") -> None:
    m = result["machine"]
    st = result["setup"]
    quick = " (**--quick**: tiny models, not results)" if result.get("quick") else ""
    lines = ["# mechvlm against its peers", "",
             (f"Written by `benchmarks/compare_peers.py` on {m['date']} in {result['wall_s'] / 60:.1f} min"
              f"{quick}."), "",
             (f"- Machine: {m['cpu_model']} ({m['cpu_count']} cores), {st['device']}, {st['dtype']}; "
              f"torch threads {m['torch_threads']}, affinity {m.get('affinity')}; load average "
              f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end."),
             (f"- Versions: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
              f"transformer-lens {m.get('transformer_lens')}, nnsight {m.get('nnsight')}, mechvlm "
              f"{m.get('mechvlm_git')}."),
             f"- Command: `{result['command']}`", ""]
    lines += [discussion, ""] if discussion else []
    lines += ["## Targets", ""] + _targets(result["targets"]) + [""]
    for fam, r in result["families"].items():
        lines += _family(fam, r)
    if result.get("scaling"):
        lines += _scaling(result["scaling"])
    lines += ["## Correctness (max |difference|, compared with the cross-check tolerances)", ""]
    lines += _correctness(result) + [""]
    Path(path).write_text("\n".join(lines))
