"""Output folders and files that never take what the user owns: ``--out`` and ``--overwrite``.

A folder mechvlm writes (a report, a trained checkpoint) carries a small manifest,
``.mechvlm-manifest.json``: the files mechvlm wrote there, with their SHA-256. Before any
compute, a command checks its ``--out``:

* `prepare_out_dir(folder, overwrite=...)`: refuses (`OutputExistsError`) a folder that
  holds a file the manifest does not list, or one changed since mechvlm wrote it, unless
  ``overwrite``; checks that the folder can be written (`OutputNotWritableError`); returns a
  snapshot for `write_manifest`, which records the files this run wrote (plus the earlier
  ones still untouched).
* `prepare_out_file(path, overwrite=...)`: a single output file (``make-mmbench --out``):
  an existing file is refused unless ``overwrite``; the folder must be writable.

The files themselves are written with `mechvlm.fileio` (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mechvlm.fileio import write_json

MANIFEST_NAME = ".mechvlm-manifest.json"
MANIFEST_FORMAT = "mechvlm-outputs/1"
#: Files listed in an error message (the count of the rest follows).
SHOWN_FILES = 8


class OutputExistsError(FileExistsError):
    """The output would replace files mechvlm did not write (pass ``--overwrite``)."""


class OutputNotWritableError(PermissionError):
    """The output folder cannot be created or written."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_stale_temp(name: str) -> bool:
    """A temporary file `mechvlm.fileio` leaves only when killed mid-write."""
    return name.startswith(".") and (name.endswith(".tmp") or name.endswith(".old"))


def _files(folder: Path) -> list[Path]:
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _is_stale_temp(d))
        for n in sorted(names):
            if n == MANIFEST_NAME and Path(root) == folder or _is_stale_temp(n):
                continue
            out.append(Path(root) / n)
    return out


def read_manifest(folder: str | os.PathLike) -> dict[str, str]:
    """``{relative path: sha256}`` of the files mechvlm wrote in ``folder`` ({} if none)."""
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """Files in ``folder`` (recursively) that mechvlm did not write there: not in its
    manifest, or changed since."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    out = []
    for p in _files(folder):
        rel = p.relative_to(folder).as_posix()
        if manifest.get(rel) != _sha256(p):
            out.append(rel)
    return out


def _listing(names: list[str]) -> str:
    text = ", ".join(names[:SHOWN_FILES])
    return text + (f" (and {len(names) - SHOWN_FILES} more)" if len(names) > SHOWN_FILES else "")


def check_writable(folder: str | os.PathLike, *, arg: str = "--out") -> Path:
    """Create ``folder`` (and its parents) if needed and check that a file can be written
    in it (a probe file is created and removed)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mechvlm-write-probe.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputNotWritableError(f"{arg} {folder}: the folder cannot be written ({e.strerror or e})") from e
    return folder


@dataclass
class OutDirSnapshot:
    """The state of an output folder before a run (see `write_manifest`)."""

    folder: Path
    stats: dict[str, tuple[int, int, int]] = field(default_factory=dict)


def _stat_key(p: Path) -> tuple[int, int, int]:
    st = p.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def prepare_out_dir(folder: str | os.PathLike, *, overwrite: bool = False, arg: str = "--out",
                    check_parent_only: bool = False, ours=None) -> OutDirSnapshot:
    """Check an output folder before any compute (see the module doc); returns the snapshot
    `write_manifest` needs. ``check_parent_only``: the folder is replaced as a whole
    (`mechvlm.fileio.atomic_dir`), so only its parent must be writable. ``ours(relative
    path)``: files the caller vouches for although the manifest does not list them (a
    resumed run's journal)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{arg} {folder} is a file, not a folder; choose another {arg}")
    if folder.is_dir() and not overwrite:
        foreign = [f for f in foreign_files(folder) if ours is None or not ours(f)]
        if foreign:
            raise OutputExistsError(
                f"{arg} {folder} holds {len(foreign)} file(s) mechvlm did not write there (or that changed "
                f"since): {_listing(foreign)}. Choose another {arg}, or pass --overwrite to replace them")
    if check_parent_only:
        parent = folder.parent if str(folder.parent) else Path(".")
        check_writable(parent, arg=arg)
    else:
        check_writable(folder, arg=arg)
    snap = OutDirSnapshot(folder)
    if folder.is_dir():
        snap.stats = {p.relative_to(folder).as_posix(): _stat_key(p) for p in _files(folder)}
    return snap


def manifest_entries(folder: str | os.PathLike, snapshot: OutDirSnapshot | None = None) -> dict[str, str]:
    """``{relative path: sha256}``: the files written since ``snapshot`` (all files when
    None), plus those of the previous manifest still unchanged."""
    folder = Path(folder)
    old = read_manifest(folder)
    files = {}
    for p in _files(folder):
        rel = p.relative_to(folder).as_posix()
        digest = _sha256(p)
        written = snapshot is None or snapshot.stats.get(rel) != _stat_key(p)
        if written or old.get(rel) == digest:
            files[rel] = digest
    return files


def write_manifest(folder: str | os.PathLike, snapshot: OutDirSnapshot | None = None, *,
                   command: str = "mechvlm") -> Path:
    """Write ``folder``'s manifest (`manifest_entries`); returns its path."""
    folder = Path(folder)
    data = {"format": MANIFEST_FORMAT, "command": command, "files": manifest_entries(folder, snapshot)}
    return write_json(folder / MANIFEST_NAME, data)


def prepare_out_file(path: str | os.PathLike, *, overwrite: bool = False, arg: str = "--out") -> Path:
    """Check a single output file before any compute: an existing file (or a folder) is
    refused unless ``overwrite``; its folder must be writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{arg} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{arg} {path} exists; choose another {arg}, or pass --overwrite to replace it")
    check_writable(path.parent if str(path.parent) else Path("."), arg=arg)
    return path
