"""Resuming ``mechvlm report``: its journal, and the run it belongs to.

The report's loops (attention share, received attention, every MMBench condition, for
every model) append each batch's results to ``<out>/journal/rank-NNN.jsonl``
(`mechvlm.journal`) as they are computed. ``mechvlm report ... --resume`` reruns the same command: the batches recorded
are read back, the others computed, and results.json is the one an uninterrupted run
writes. The journal's header pins the run: the model folders' and the TSV's content
fingerprints (`mechvlm.fingerprint`) and every setting that changes a number (all of
`ReportConfig` except ``out``, ``overwrite``, ``resume``, ``progress`` and ``device_map``; of ``device``
only its type). ``--resume`` against another model, TSV or setting is refused, naming
what changed. The number of processes (``torchrun --nproc-per-node``) may change.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..distributed import is_main, run_on_main
from ..fingerprint import file_fingerprint, folder_fingerprint
from ..journal import Journal, is_journal_file
from ..outdir import OutputExistsError, prepare_out_dir

JOURNAL_DIR = "journal"
#: Settings that do not change any number of the report (a model split over GPUs of one
#: type computes what one GPU computes).
NOT_PINNED = ("out", "overwrite", "resume", "progress", "device_map")


def _journal_file(rel: str) -> bool:
    head, _, name = rel.partition("/")
    return head == JOURNAL_DIR and is_journal_file(name)


def prepare_report_out(cfg):
    """`mechvlm.outdir.prepare_out_dir` for the report (on rank 0; its error reaches every
    rank): with ``resume`` the journal of the interrupted run is ours; without, a folder
    holding one is refused with a hint to resume it."""
    def prepare():
        try:
            return prepare_out_dir(cfg.out, overwrite=cfg.overwrite, ours=_journal_file if cfg.resume else None)
        except OutputExistsError as e:
            if not cfg.resume and any(Path(cfg.out, JOURNAL_DIR).glob("rank-*.jsonl")):
                raise OutputExistsError(f"{e}. It holds the journal of an interrupted report: pass --resume to "
                                        "continue it") from e
            raise

    return run_on_main(prepare)


def run_header(cfg, labels: list[str]) -> dict:
    """What a report run is, for its journal (see the module doc): ``labels`` name the
    models in order."""
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()
                if k not in NOT_PINNED and k != "model"}
    settings["models"] = [str(p) for p in cfg.model_dirs()]  # ``model=X`` and ``models=(X,)`` are one run
    settings["device"] = torch.device(cfg.device).type
    return {"models": {label: folder_fingerprint(path) for label, path in zip(labels, cfg.model_dirs(), strict=True)},
            "mmbench": file_fingerprint(cfg.tsv()), "settings": settings}


def open_report_journal(cfg, labels: list[str]) -> Journal:
    """The report's journal in ``cfg.out`` (resumed when ``cfg.resume``); collective under
    a process group. Each model's loops are tasks of its scope ``"<label>/"``."""
    journal = Journal.open(Path(cfg.out) / JOURNAL_DIR, run_header(cfg, labels), resume=cfg.resume)
    if cfg.resume and is_main():
        print(f"resuming: {journal.n_done} batches recorded in {journal.folder}")
    return journal
