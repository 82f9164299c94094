"""Run the seed-000 analyses on one or several checkpoints and an MMBench-format TSV.

1. Attention share text->image vs text->EOI per layer (seed 000 Eq. 1-2, Fig. 1;
   ``docs/analyses/attention_share.md``).
2. Cumulative attention received by the image tokens from the text (Fig. 2;
   ``docs/analyses/received_attention.md``).
3. Attention knockout text->image and text->EOI in all layers, both readings, scored on
   the benchmark with the seed prompt and VLMEvalKit's letter extraction (Table 1;
   ``docs/analyses/knockout.md``).

Every model is evaluated on the same items, one after the other (a model is released
before the next one loads, so several large checkpoints run on one GPU). The default is
both shipped toys (`mechvlm.toy.checkpoint.SHIPPED`) on the shipped synthetic TSV, so the
command runs offline and prints the seed's Table 1 shape (model x {none, text->img,
text->EOI}, both modes); point ``models`` at local Qwen2.5-VL / Gemma3 checkpoint
directories (HF layout, with tokenizer and image processor) and ``mmbench`` at a real
MMBench TSV for the real thing. The metrics stream (no attention pattern is cached).

Before any compute: the arguments are checked, every checkpoint directory and the TSV must
exist, ``out`` must be writable and hold no file mechvlm did not write there
(`mechvlm.outdir`; ``overwrite=True`` replaces them), and the TSV is read and its images
decoded (a broken row fails in seconds, naming its line). The folder's manifest lists what
the report wrote.
"""

from __future__ import annotations

import contextlib
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
from ..distributed import is_main
from ..outdir import write_manifest
from ..placement import rank_max_memory
from ..processing import InputBuilder
from ..roles import missing_roles
from ..toy.benchmark import SHIPPED_TSV
from ..toy.checkpoint import FAMILIES, SHIPPED
from ..training.registers import apply_registering, registering_of
from .examples import example_attention
from .resume import open_report_journal, prepare_report_out

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class ReportConfig:
    model: str | None = None  # one checkpoint directory (kept for one-model callers; see `models`)
    models: tuple[str, ...] = ()  # checkpoint directories, all on the same items (default: both shipped toys)
    mmbench: str | None = None  # MMBench TSV (default: the shipped synthetic one)
    limit: int | None = None  # first N rows of the TSV
    device: str = "cpu"
    device_map: str | None = None  # "auto" (...): each model split over the GPUs (`mechvlm.placement`)
    dtype: str = "float32"
    out: str = "mechvlm-report"
    batch_size: int = 16
    max_new_tokens: int = 4
    conditions: tuple[str, ...] = tuple(CONDITIONS)
    analyses: tuple[str, ...] = ()  # optional sections (`mechvlm.report.sections.ANALYSES`)
    examples: int = 4  # items drawn as attention-on-image rows (one per category)
    progress: bool = True
    overwrite: bool = False  # replace files in ``out`` that mechvlm did not write
    resume: bool = False  # continue an interrupted run from ``out``'s journal (`report.resume`)

    def check(self) -> None:
        """Refuse out-of-range arguments and missing inputs (naming them) before any work."""
        for name, value in (("limit", self.limit), ("batch_size", self.batch_size),
                            ("max_new_tokens", self.max_new_tokens)):
            if value is None and name == "limit":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.examples, bool) or not isinstance(self.examples, int) or self.examples < 0:
            raise ValueError(f"examples must be a non-negative integer, got {self.examples!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for path in self.model_dirs():  # every checkpoint is checked before the first one runs
            if not path.is_dir():
                what = "is a file, not a directory" if path.exists() else "does not exist"
                raise FileNotFoundError(f"no such directory: {path} (the model directory {what}; give a local "
                                        "checkpoint directory with config.json, weights, tokenizer and image "
                                        "processor)")
        if not self.tsv().is_file():
            raise FileNotFoundError(f"no such file: {self.tsv()} (the MMBench TSV)")

    def model_dirs(self) -> list[Path]:
        """The checkpoints in order: ``model`` then ``models``; both shipped toys when neither
        is given."""
        given = ([self.model] if self.model else []) + list(self.models)
        return [Path(m) for m in given] if given else [SHIPPED[f] for f in FAMILIES]

    def model_dir(self) -> Path:
        return self.model_dirs()[0]

    def tsv(self) -> Path:
        return Path(self.mmbench) if self.mmbench else SHIPPED_TSV


@dataclasses.dataclass
class ModelRun:
    """Everything the report keeps of one model once it is released: the metric results,
    the knockout evaluation, the example grids, and the optional sections already drawn
    (``sections``: ``[(section, result, page items, widget count)]``)."""

    label: str
    path: str
    model_type: str
    n_layers: int
    share: object
    received: object
    knockout: dict
    examples: list[dict]
    sections: list = dataclasses.field(default_factory=list)
    wall_s: float = 0.0
    skipped: dict = dataclasses.field(default_factory=dict)  # condition -> why the model cannot run it

    @property
    def analyses(self) -> dict:
        return {s.name: r.to_dict() for s, r, _, _ in self.sections}


def model_labels(paths: list[Path]) -> list[str]:
    """A short label per checkpoint (its directory name; ``name#2`` ... for repeats)."""
    out, seen = [], {}
    for p in paths:
        name = p.name or str(p)
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def load(cfg: ReportConfig, path: Path | None = None) -> tuple[HookedVLM, InputBuilder]:
    cfg.check()
    path = Path(path) if path is not None else cfg.model_dir()
    if cfg.device_map:  # under torchrun, each process splits its model over its share of the node's GPUs
        model = HookedVLM.from_pretrained(str(path), dtype=DTYPES[cfg.dtype], device_map=cfg.device_map,
                                          max_memory=rank_max_memory())
    else:
        model = HookedVLM.from_pretrained(str(path), dtype=DTYPES[cfg.dtype], device=cfg.device)
    model.eval()
    apply_registering(model)  # a Registering checkpoint runs under the mask it was trained with
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


def run_model(cfg: ReportConfig, path: Path, label: str, items, sections, *, index: int = 0,
              n_models: int = 1, journal=None) -> ModelRun:
    """Load one checkpoint, compute its part of the report, draw its optional sections and
    release it. ``journal``: this model's scope of the run's journal (`report.resume`)."""
    from ..viz import Page
    from .sections import ReportContext

    t0 = time.time()
    model, builder = load(cfg, path)
    if cfg.progress and n_models > 1:
        print(f"[{index + 1}/{n_models}] {label} ({path})", flush=True)
    if registering_of(model).active and all(s.name != "registering" for s in sections):
        from .sections import resolve_analyses  # a Registering checkpoint: its text -> registers share

        sections = [*sections, *resolve_analyses(["registering"])]
    batches = list(metric_batches(builder, items, cfg.batch_size))
    task = journal.task if journal is not None else (lambda name: None)
    conditions, skipped = runnable_conditions(model, cfg.conditions)
    share = attention_share(model, batches, keys=share_keys(model), progress=cfg.progress,
                            journal=task("attention_share"))
    received = received_attention(model, batches, keep_received=False, progress=cfg.progress,
                                  journal=task("received_attention"))
    knockout = evaluate(model, builder, items, conditions=conditions,
                        batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                        progress=cfg.progress, journal=journal)
    examples = example_attention(model, builder, items, n=cfg.examples)
    ctx = ReportContext(model=model, builder=builder, items=items, batches=batches, out=Path(cfg.out),
                        progress=cfg.progress, batch_size=cfg.batch_size, label=label,
                        model_index=index, n_models=n_models, journal=journal)
    drawn = []
    for s in sections:
        result = s.compute(ctx)
        sub = Page(label)
        s.render(result, sub, ctx)
        drawn.append((s, result, sub.items, sub.n_widgets))
    run = ModelRun(label=label, path=str(path), model_type=builder.model_type, n_layers=model.cfg.n_layers,
                   share=share, received=received, knockout=knockout, examples=examples, sections=drawn,
                   wall_s=round(time.time() - t0, 2), skipped=skipped)
    del model, ctx, batches
    if str(cfg.device).startswith("cuda"):
        torch.cuda.empty_cache()
    return run


def compute_runs(cfg: ReportConfig, *, prepare_out: bool = False):
    """Everything but the writing: ``(items, runs, run info)``, plus the state of ``out``
    before the run (`mechvlm.outdir.prepare_out_dir`) when ``prepare_out``. Unknown sections
    or conditions, bad arguments, missing checkpoints, a ``out`` that cannot be written and
    broken TSV rows fail before any model loads."""
    from .runinfo import run_info
    from .sections import resolve_analyses

    t0 = time.time()
    sections = resolve_analyses(cfg.analyses)  # unknown names fail before any compute
    resolve_conditions(list(cfg.conditions))  # so do unknown conditions
    cfg.check()
    out_state = prepare_report_out(cfg) if prepare_out else None  # rank 0 checks; its error reaches every rank
    items = load_mmbench(cfg.tsv(), check_images=False)
    if cfg.limit is not None:
        items = items[:cfg.limit]
    if not items:
        raise ValueError(f"no items to evaluate in {cfg.tsv()}")
    check_item_images(items, cfg.tsv())  # a broken image fails now, not after the compute
    paths = cfg.model_dirs()
    labels = model_labels(paths)
    # the journal of a writing run; a --resume of another run is refused here, before any model loads
    with open_report_journal(cfg, labels) if prepare_out else contextlib.nullcontext() as journal:
        runs = [run_model(cfg, p, label, items, sections, index=i, n_models=len(paths),
                          journal=journal.scope(f"{label}/") if journal else None)
                for i, (p, label) in enumerate(zip(paths, labels))]
    info = run_info(cfg, wall_s=round(time.time() - t0, 2), runs=runs)
    return (items, runs, info, out_state) if prepare_out else (items, runs, info)


def run_report(cfg: ReportConfig) -> dict:
    """Compute everything, write ``cfg.out`` (report.html, results.json, CSVs); returns the
    results dict (the JSON's content: see `mechvlm.report.render`)."""
    from .render import print_summary, results_dict, write_outputs

    items, runs, info, out_state = compute_runs(cfg, prepare_out=True)
    if not is_main():  # under torchrun every rank holds the gathered results; rank 0 writes them
        return results_dict(runs, cfg, items, info)
    results = write_outputs(runs, cfg, items, Path(cfg.out), info)
    write_manifest(cfg.out, out_state, command="mechvlm report")
    print_summary(results, Path(cfg.out))
    return results
