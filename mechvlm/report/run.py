"""Run the seed-000 analyses on a checkpoint and an MMBench-format TSV.

1. Attention share text->image vs text->EOI per layer (METHODS §1, seed 000 Fig. 1).
2. Cumulative attention received by the image tokens from the text (§2, Fig. 2).
3. Attention knockout text->image and text->EOI in all layers, both readings, scored on
   the benchmark with the seed prompt and VLMEvalKit's letter extraction (§3, §5, Table 1).

Defaults are the shipped toy Qwen2.5-VL and the shipped synthetic TSV, so the command runs
offline; point ``model`` at any local Qwen2.5-VL or Gemma3 checkpoint directory (HF layout,
with its tokenizer and image processor) and ``mmbench`` at a real MMBench TSV for the real
thing. The metrics stream (no attention pattern is cached), so long prompts fit.

Before any compute: the arguments are checked, ``out`` must be writable and hold no file
mechvlm did not write there (`mechvlm.outdir`; ``overwrite=True`` replaces them), and the
TSV is read and its images decoded (a broken row fails in seconds, naming its line). The
folder's manifest lists what the report wrote.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ..hooked_vlm import HookedVLM
from ..metrics import attention_share, received_attention
from ..mmbench.conditions import CONDITIONS, resolve_conditions
from ..mmbench.evaluate import evaluate
from ..mmbench.prompt import mmbench_prompt
from ..mmbench.tsv import check_item_images, load_mmbench
from ..outdir import prepare_out_dir, write_manifest
from ..processing import InputBuilder
from ..roles import missing_roles
from .examples import example_heatmaps
from ..toy.benchmark import SHIPPED_TSV
from ..toy.checkpoint import SHIPPED

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class ReportConfig:
    model: str | None = None  # checkpoint directory (default: the shipped toy Qwen2.5-VL)
    mmbench: str | None = None  # MMBench TSV (default: the shipped synthetic one)
    limit: int | None = None  # first N rows of the TSV
    device: str = "cpu"
    dtype: str = "float32"
    out: str = "mechvlm-report"
    batch_size: int = 16
    max_new_tokens: int = 4
    conditions: tuple[str, ...] = tuple(CONDITIONS)
    analyses: tuple[str, ...] = ()  # optional sections (`mechvlm.report.sections.ANALYSES`)
    progress: bool = True
    overwrite: bool = False  # replace files in ``out`` that mechvlm did not write

    def check(self) -> None:
        """Refuse out-of-range arguments (naming them) before any work."""
        for name, value in (("limit", self.limit), ("batch_size", self.batch_size),
                            ("max_new_tokens", self.max_new_tokens)):
            if value is None and name == "limit":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        path = self.model_dir()
        if not path.is_dir():
            what = "is a file, not a directory" if path.exists() else "does not exist"
            raise FileNotFoundError(f"no such directory: {path} (the model directory {what}; give a local "
                                    "checkpoint directory with config.json, weights, tokenizer and image "
                                    "processor)")
        if not self.tsv().is_file():
            raise FileNotFoundError(f"no such file: {self.tsv()} (the MMBench TSV)")

    def model_dir(self) -> Path:
        return Path(self.model) if self.model else SHIPPED["qwen2_5_vl"]

    def tsv(self) -> Path:
        return Path(self.mmbench) if self.mmbench else SHIPPED_TSV


def load(cfg: ReportConfig) -> tuple[HookedVLM, InputBuilder]:
    cfg.check()
    path = cfg.model_dir()
    model = HookedVLM.from_pretrained(str(path), dtype=DTYPES[cfg.dtype], device=cfg.device)
    model.eval()
    return model, InputBuilder.from_pretrained(path)


def metric_batches(builder: InputBuilder, items, batch_size: int):
    """Left-padded batches of the seed prompts with their images, lazily."""
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        yield builder([mmbench_prompt(it) for it in chunk],
                      [[it.pil_image()] if it.image is not None else [] for it in chunk])


def share_keys(model) -> tuple[str, ...]:
    """Fig. 1's key roles: image vs EOI, or image vs text for a model without EOI (LLaVA)."""
    return ("image", "eoi") if "eoi" not in missing_roles(model.cfg) else ("image", "text")


def runnable_conditions(model, names) -> tuple[list[str], dict[str, str]]:
    """The conditions the model can run, and ``{name: why not}`` for the others (a
    text->EOI knockout on a model without EOI); they are reported, not silently dropped."""
    from ..mmbench.conditions import condition_by_name

    missing = missing_roles(model.cfg)
    keep, skipped = [], {}
    for name in names:
        key = condition_by_name(name).key
        if isinstance(key, str) and key in missing:
            skipped[name] = missing[key]
        else:
            keep.append(name)
    if not keep:
        raise ValueError(f"none of the conditions {list(names)} can run on this model: {skipped}")
    return keep, skipped


def run_report(cfg: ReportConfig) -> dict:
    """Compute everything, write ``cfg.out`` (report.html, results.json, CSVs); returns the
    results dict (the JSON's content)."""
    from .render import print_summary, write_outputs

    from .sections import ReportContext, resolve_analyses

    t0 = time.time()
    sections = resolve_analyses(cfg.analyses)  # unknown names fail before any compute
    resolve_conditions(list(cfg.conditions))
    cfg.check()
    out_state = prepare_out_dir(cfg.out, overwrite=cfg.overwrite)  # writable, nothing of the user's
    items = load_mmbench(cfg.tsv(), check_images=False)
    if cfg.limit is not None:
        items = items[:cfg.limit]
    if not items:
        raise ValueError(f"no items to evaluate in {cfg.tsv()}")
    check_item_images(items, cfg.tsv())  # a broken image fails now, not after the compute
    model, builder = load(cfg)
    batches = list(metric_batches(builder, items, cfg.batch_size))
    conditions, skipped = runnable_conditions(model, cfg.conditions)
    share = attention_share(model, batches, keys=share_keys(model), progress=cfg.progress)
    received = received_attention(model, batches, keep_received=False, progress=cfg.progress)
    knockout = evaluate(model, builder, items, conditions=conditions,
                        batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                        progress=cfg.progress)
    results = {
        "model": str(cfg.model_dir()), "model_type": builder.model_type,
        "mmbench": str(cfg.tsv()), "n_items": len(items),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "attention_share": share.to_dict(), "received_attention": received.to_dict(),
        "knockout": knockout, "skipped": skipped, "wall_s": None,
    }
    examples = example_heatmaps(model, builder, items)
    ctx = ReportContext(model=model, builder=builder, items=items, batches=batches, out=Path(cfg.out),
                        progress=cfg.progress, batch_size=cfg.batch_size)
    computed = [(s, s.compute(ctx)) for s in sections]
    results["analyses"] = {s.name: r.to_dict() for s, r in computed}
    results["wall_s"] = round(time.time() - t0, 2)
    write_outputs(results, share, received, Path(cfg.out), examples, sections=computed, ctx=ctx)
    write_manifest(cfg.out, out_state, command="mechvlm report")
    print_summary(results, Path(cfg.out))
    return results
