"""Atomic file output: a file is written to a temporary file in its folder, then renamed.

An interrupted or full-disk run leaves the previous file (or none), never a truncated one:
``os.replace`` is atomic on POSIX and Windows when source and target share a folder. Every
file mechvlm writes for the user goes through these helpers.

* `atomic_write(path, mode)`: a context manager yielding an open file object.
* `write_text`, `write_bytes`, `write_json`: one-call forms.
* `atomic_dir(path)`: a context manager yielding a temporary sibling folder that replaces
  ``path`` when the block exits without an exception (for ``save_pretrained``-style
  outputs that are a whole folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8",
                 newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success it is fsynced and renamed onto
    ``path``; on an exception it is removed and ``path`` is left as it was.

    ``mode`` is ``"w"`` (text) or ``"wb"`` (binary).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        kwargs = {} if "b" in mode else {"encoding": encoding, "newline": newline}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> Path:
    """``json.dumps(obj)`` + newline, written atomically (NaN is not allowed: pass None)."""
    return write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; when the block succeeds it takes
    ``path``'s place (a previous folder there is moved aside first and deleted after the
    rename). On an exception the temporary folder is deleted and ``path`` is untouched."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
        os.replace(path, old / "previous")
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:  # put the previous folder back
            os.replace(old / "previous", path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(parent)
