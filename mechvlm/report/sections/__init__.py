"""Optional sections of ``mechvlm report``: ``--analyses NAME[,NAME...]``.

A section is one analysis run on the report's model and items and drawn on its page. Each
lives in a module of this package and is registered in `ANALYSES` by `register_analysis`;
the report runs the requested ones after the seed-000 pipeline and stores each result's
``to_dict()`` under ``results["analyses"][name]``.

A section supplies:

* ``compute(ctx: ReportContext) -> result``: the analysis (a result dataclass with
  ``to_dict()``); it shows a progress bar when ``ctx.progress`` and loops over
  ``ctx.batches`` (or ``ctx.items``) itself.
* ``render(result, page, ctx)``: headings, figures and tables on the `mechvlm.viz.Page`.

Several models (``mechvlm report --model A --model B``): ``compute`` and ``render`` run
once per model, right after that model's own part of the report and while it is still
loaded (``ctx.model``; ``ctx.label`` names it, ``ctx.model_index`` / ``ctx.n_models`` say
where it stands). The page groups them **by section**: each section appears once, in the
order of ``--analyses``, holding one block per model in the order of ``--model`` (a block
is what ``render`` drew, under a "model: LABEL" tag). ``results["models"][i]["analyses"]``
holds each model's ``to_dict()``; ``results["analyses"]`` is the first model's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ReportContext:
    """What a section may use. ``batches`` are the left-padded seed-prompt batches (with
    images) of ``items``, built once and shared by every section."""

    model: Any
    builder: Any
    items: Sequence
    batches: list[dict]
    out: Path
    progress: bool = True
    batch_size: int = 16
    label: str = ""  # the model's label on the page (its directory name)
    model_index: int = 0
    n_models: int = 1
    journal: Any = None  # this model's scope of the run's journal (`mechvlm.report.resume`), or None

    def journal_task(self, name: str):
        """The journal task ``name`` for a section's loop (None without a journal)."""
        return None if self.journal is None else self.journal.task(name)


@dataclass(frozen=True)
class AnalysisSection:
    name: str
    title: str
    description: str
    compute: Callable[[ReportContext], Any]
    render: Callable[[Any, Any, ReportContext], None]


ANALYSES: dict[str, AnalysisSection] = {}


def register_analysis(section: AnalysisSection) -> AnalysisSection:
    if section.name in ANALYSES:
        raise ValueError(f"report section {section.name!r} is registered twice")
    ANALYSES[section.name] = section
    return section


def resolve_analyses(names: Iterable[str] | str | None) -> list[AnalysisSection]:
    """Sections by name (a list, or one comma-separated string); unknown names raise and
    list the known ones."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    out = []
    for n in names:
        n = n.strip()
        if not n:
            continue
        if n not in ANALYSES:
            raise ValueError(f"unknown report analysis {n!r}; known: {', '.join(sorted(ANALYSES))}")
        out.append(ANALYSES[n])
    return out


# the built-in sections register themselves on import (one module per analysis)
from . import logit_lens as _logit_lens  # noqa: E402,F401
from . import registering as _registering  # noqa: E402,F401
from . import token_budget as _token_budget  # noqa: E402,F401
from . import token_categories as _token_categories  # noqa: E402,F401
from . import token_contribution as _token_contribution  # noqa: E402,F401
from . import kv_probes as _kv_probes  # noqa: E402,F401
from . import key_artifacts as _key_artifacts  # noqa: E402,F401
from . import head_attribution as _head_attribution  # noqa: E402,F401
from . import causal_tracing as _causal_tracing  # noqa: E402,F401
from . import share_conditions as _share_conditions  # noqa: E402,F401
