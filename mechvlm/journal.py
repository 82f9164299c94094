"""Append-only journals of per-unit results, for long runs that resume.

A journal is a folder of JSON-lines files, one per rank (``rank-000.jsonl``, ...). The
first line of each file is the header: what the run is (fingerprints of the model files,
the data and the settings, see `mechvlm.fingerprint`). Every later line is one row of one
unit's result::

    {"task": "knockout/none", "unit": 3, "fp": "<unit fingerprint>", "n": 8, "row": 0, "value": ...}

A unit (one batch) is written with one ``write`` and ``fsync``ed, so a killed run loses at
most the unit in flight; a torn last line (SIGKILL mid-write) is ignored when reading and
cut off before the next append. Tensors are stored exactly (dtype, shape and the raw bytes
in base64), so a result read back is bit-identical to the one computed.

Use::

    journal = Journal.open(folder, header, resume=True)   # refuses another run's journal
    task = journal.task("attention_share")                # or per_row=True: a line per row
    results = mechvlm.distributed.map_units(fn, units, journal=task)

`Journal.open` with ``resume=False`` starts afresh (it deletes the folder's journal files);
with ``resume=True`` it reads every rank's file (the number of processes may change between
runs) and refuses (`ResumeRefused`) a journal whose header differs from ``header``, naming
what changed.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import torch

from mechvlm import distributed
from mechvlm.fileio import write_text

FORMAT = "mechvlm-journal/1"
PATTERN = "rank-*.jsonl"


class ResumeRefused(RuntimeError):
    """The journal was written by another run (other model, data or settings)."""


def is_journal_file(name: str) -> bool:
    """True for a journal file name (``rank-000.jsonl``)."""
    return Path(name).match(PATTERN)


# --------------------------------------------------------------------------- encoding --
def encode(value: Any) -> Any:
    """JSON-able form of results: tensors exactly (dtype, shape, base64 bytes); dicts,
    lists / tuples (read back as lists), str, numbers, bools and None as themselves."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"__tensor__": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "data": base64.b64encode(data).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            dtype = getattr(torch, value["__tensor__"])
            raw = bytearray(base64.b64decode(value["data"]))
            flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            return flat.view(dtype).reshape(value["shape"]).clone()
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


# ---------------------------------------------------------------------------- journal --
def _header_difference(old: dict, new: dict) -> str:
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            fields = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            parts.append(f"{key} ({'; '.join(fields)})")
        else:
            parts.append(f"{key} ({a!r} -> {b!r})")
    return ", ".join(parts)


def _read_lines(path: Path) -> tuple[dict | None, list[dict], int]:
    """(header, rows, byte length of the whole lines); a torn or unreadable tail is left out."""
    data = path.read_bytes()
    header, rows, good = None, [], 0
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break  # torn by a kill mid-write
        try:
            line = json.loads(raw)
        except ValueError:
            break
        good += len(raw)
        if header is None:
            header = line
        else:
            rows.append(line)
    return header, rows, good


class JournalTask:
    """One loop's units in a `Journal` (what `mechvlm.distributed.map_units` reads and
    writes). ``per_row``: a unit's result is a list written one line per element (e.g. one
    line per MMBench item); otherwise one line per unit."""

    def __init__(self, journal: "Journal", name: str, per_row: bool):
        self.journal, self.name, self.per_row = journal, name, per_row

    def has(self, unit: int, fingerprint: str) -> bool:
        """Whether the unit is completely recorded, for these inputs (not counted as read
        back); recorded for other inputs raises `ResumeRefused`."""
        rec = self.journal._done.get((self.name, unit))
        if rec is None or len(rec["rows"]) != rec["n"]:
            return False
        if rec["fp"] != fingerprint:
            raise ResumeRefused(f"{self.journal.folder}: unit {unit} of {self.name!r} was recorded for other inputs "
                                "(its content changed although the run's fingerprints match); start again "
                                "without resume")
        return True

    def get(self, unit: int, fingerprint: str):
        """The unit's recorded result, or None when it is not (completely) recorded."""
        if not self.has(unit, fingerprint):
            return None
        rec = self.journal._done[(self.name, unit)]
        self.journal.reused += 1
        rows = [decode(rec["rows"][k]) for k in range(rec["n"])]
        return rows if self.per_row else rows[0]

    def sub(self, suffix: str) -> "JournalTask":
        """The task ``<name>/<suffix>`` of the same journal (a second loop of one analysis)."""
        return JournalTask(self.journal, f"{self.name}/{suffix}", self.per_row)

    def put(self, unit: int, fingerprint: str, result) -> None:
        rows = list(result) if self.per_row else [result]
        lines = [json.dumps({"task": self.name, "unit": unit, "fp": fingerprint, "n": len(rows), "row": k,
                             "value": encode(row)}) for k, row in enumerate(rows)]
        self.journal._append(("\n".join(lines) + "\n").encode() if lines else b"")
        self.journal.written += 1


class Journal:
    """The journal folder of one run, opened by one rank (see the module doc).

    Attributes:
        folder, header, rank: where, what run, which rank's file this process appends to.
        reused: units read back instead of computed (this process); written: units appended.
    """

    def __init__(self, folder: Path, header: dict, rank: int, done: dict):
        self.folder, self.header, self.rank = folder, header, rank
        self._done = done
        self.reused = 0
        self.written = 0
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / f"rank-{self.rank:03d}.jsonl"

    @classmethod
    def open(cls, folder: str | os.PathLike, header: dict, *, resume: bool) -> "Journal":
        """Open (``resume``) or start the journal in ``folder`` for the run ``header``
        describes (JSON-able). Collective under a process group: every rank calls it."""
        folder = Path(folder)
        header = json.loads(json.dumps(header))  # as it reads back
        rank, _ = distributed.rank_world()
        done: dict = {}
        if resume:
            for path in sorted(folder.glob(PATTERN)):
                old, rows, _ = _read_lines(path)
                if old is None:
                    continue
                if old.get("format") != FORMAT or old.get("header") != header:
                    why = _header_difference(old.get("header") or {}, header) if old.get("format") == FORMAT \
                        else f"format {old.get('format')!r}"
                    raise ResumeRefused(f"resume refused: the journal {path} was written by another run; "
                                        f"changed: {why}. Start again without --resume (with --overwrite)")
                for row in rows:
                    rec = done.setdefault((row["task"], row["unit"]), {"fp": row["fp"], "n": row["n"], "rows": {}})
                    if rec["fp"] != row["fp"] or rec["n"] != row["n"]:  # recomputed with other inputs
                        rec.update(fp=row["fp"], n=row["n"], rows={})
                    rec["rows"][row["row"]] = row["value"]
        else:
            def clear():
                for path in folder.glob(PATTERN):
                    path.unlink()
            distributed.run_on_main(clear)
        distributed.barrier()  # every rank has read before any file is cut or created
        journal = cls(folder, header, rank, done)
        journal._open_own_file()
        distributed.barrier()
        return journal

    def task(self, name: str, *, per_row: bool = False) -> JournalTask:
        return JournalTask(self, name, per_row)

    def scope(self, prefix: str) -> "JournalScope":
        """A view whose tasks are named ``prefix + name`` (e.g. one per model of a run)."""
        return JournalScope(self, prefix)

    @property
    def n_done(self) -> int:
        """Complete units recorded when the journal was opened."""
        return sum(len(r["rows"]) == r["n"] for r in self._done.values())

    def _open_own_file(self) -> None:
        path = self.path
        header = _read_lines(path) if path.exists() else None
        if header is not None and header[0] is not None:
            with open(path, "r+b") as f:  # cut a torn tail: the next line must start clean
                f.truncate(header[2])
                os.fsync(f.fileno())
        else:  # no file, or not even a whole header line
            write_text(path, json.dumps({"format": FORMAT, "header": self.header}) + "\n")
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JournalScope:
    """`Journal.scope`: ``task(name)`` is the journal's ``task(prefix + name)``."""

    def __init__(self, journal: Journal, prefix: str):
        self.journal, self.prefix = journal, prefix

    def task(self, name: str, *, per_row: bool = False) -> JournalTask:
        return self.journal.task(self.prefix + name, per_row=per_row)
