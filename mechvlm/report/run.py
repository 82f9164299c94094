"""Run the seed-000 analyses on a checkpoint and an MMBench-format TSV.

1. Attention share text->image vs text->EOI per layer (METHODS §1, seed 000 Fig. 1).
2. Cumulative attention received by the image tokens from the text (§2, Fig. 2).
3. Attention knockout text->image and text->EOI in all layers, both readings, scored on
   the benchmark with the seed prompt and VLMEvalKit's letter extraction (§3, §5, Table 1).

Defaults are the shipped toy Qwen2.5-VL and the shipped synthetic TSV, so the command runs
offline; point ``model`` at any local Qwen2.5-VL or Gemma3 checkpoint directory (HF layout,
with its tokenizer and image processor) and ``mmbench`` at a real MMBench TSV for the real
thing. The metrics stream (no attention pattern is cached), so long prompts fit.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ..hooked_vlm import HookedVLM
from ..metrics import attention_share, received_attention
from ..mmbench.conditions import CONDITIONS
from ..mmbench.evaluate import evaluate
from ..mmbench.prompt import mmbench_prompt
from ..mmbench.tsv import load_mmbench
from ..processing import InputBuilder
from .examples import example_heatmaps
from ..toy.benchmark import SHIPPED_TSV
from ..toy.checkpoint import SHIPPED
from ..training.registers import apply_registering, registering_of

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

    def model_dir(self) -> Path:
        return Path(self.model) if self.model else SHIPPED["qwen2_5_vl"]

    def tsv(self) -> Path:
        return Path(self.mmbench) if self.mmbench else SHIPPED_TSV


def load(cfg: ReportConfig) -> tuple[HookedVLM, InputBuilder]:
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    path = cfg.model_dir()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (give a local checkpoint "
                                "directory with config.json, weights, tokenizer and image processor)")
    model = HookedVLM.from_pretrained(str(path), dtype=DTYPES[cfg.dtype], device=cfg.device)
    model.eval()
    apply_registering(model)  # a Registering checkpoint runs under the mask it was trained with
    return model, InputBuilder.from_pretrained(path)


def metric_batches(builder: InputBuilder, items, batch_size: int):
    """Left-padded batches of the seed prompts with their images, lazily."""
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        yield builder([mmbench_prompt(it) for it in chunk], [[it.pil_image()] for it in chunk])


def run_report(cfg: ReportConfig) -> dict:
    """Compute everything, write ``cfg.out`` (report.html, results.json, CSVs); returns the
    results dict (the JSON's content)."""
    from .render import print_summary, write_outputs

    from .sections import ReportContext, resolve_analyses

    t0 = time.time()
    sections = resolve_analyses(cfg.analyses)  # unknown names fail before any compute
    model, builder = load(cfg)
    if registering_of(model).active:  # add its text -> registers attention share
        sections += [s for s in resolve_analyses(["registering"]) if s not in sections]
    items = load_mmbench(cfg.tsv())
    if cfg.limit is not None:
        items = items[:cfg.limit]
    if not items:
        raise ValueError(f"no items to evaluate in {cfg.tsv()}")
    batches = list(metric_batches(builder, items, cfg.batch_size))
    share = attention_share(model, batches, progress=cfg.progress)
    received = received_attention(model, batches, keep_received=False, progress=cfg.progress)
    knockout = evaluate(model, builder, items, conditions=list(cfg.conditions),
                        batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                        progress=cfg.progress)
    results = {
        "model": str(cfg.model_dir()), "model_type": builder.model_type,
        "mmbench": str(cfg.tsv()), "n_items": len(items),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "attention_share": share.to_dict(), "received_attention": received.to_dict(),
        "knockout": knockout, "wall_s": None,
    }
    examples = example_heatmaps(model, builder, items)
    ctx = ReportContext(model=model, builder=builder, items=items, batches=batches, out=Path(cfg.out),
                        progress=cfg.progress, batch_size=cfg.batch_size)
    computed = [(s, s.compute(ctx)) for s in sections]
    results["analyses"] = {s.name: r.to_dict() for s, r in computed}
    results["wall_s"] = round(time.time() - t0, 2)
    write_outputs(results, share, received, Path(cfg.out), examples, sections=computed, ctx=ctx)
    print_summary(results, Path(cfg.out))
    return results
