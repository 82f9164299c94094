"""Content fingerprints of the files a run reads (checkpoint folders, data files), so a
resumed run can tell that its inputs are the ones the interrupted run used.

Files up to `FULL_HASH_BYTES` are hashed whole (SHA-256). Larger ones (weight shards of
many GB) are fingerprinted by their size and `SAMPLES` blocks of `SAMPLE_BYTES` spread
evenly over the file, first and last block included: any re-save, fine-tune or truncation
changes them, and a 150 GB checkpoint is fingerprinted in a second instead of minutes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

FULL_HASH_BYTES = 64 << 20
SAMPLES = 16
SAMPLE_BYTES = 1 << 20


def file_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's content, sampled above `FULL_HASH_BYTES` (see module doc)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(f"size={size};".encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            step = (size - SAMPLE_BYTES) / (SAMPLES - 1)
            for k in range(SAMPLES):
                f.seek(int(k * step))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def folder_fingerprint(folder: str | os.PathLike, *, skip=lambda rel: False) -> str:
    """One SHA-256 over the relative names and `file_fingerprint` of every file under
    ``folder`` (sorted; hidden files and those ``skip(relative_name)`` selects left out)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if not skip(rel):
                h.update(f"{rel}\0{file_fingerprint(Path(root) / name)}\n".encode())
    return h.hexdigest()
