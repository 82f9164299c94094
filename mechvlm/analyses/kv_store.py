"""`image_kv` streamed to disk: safetensors shards with a manifest, and their reader.

Layout of ``out_dir``::

    index.json              manifest: format, meta, layers, kinds, shards, batches_done, complete
    shard-00000.safetensors one `ImageKV` per shard: every feature table ("key.3", "vision", ...)
    shard-00001.safetensors plus image_example / image_slot / image_grid / image_offset
    ...

Every file is written atomically (`mechvlm.fileio`), the manifest after each shard, so an
interrupted run leaves whole shards and a manifest that says how many batches they hold:
``image_kv(..., out_dir=..., resume=True)`` continues from there. `ImageKVStore.load` reads
only the tables asked for (one layer at a time fits in memory for any dataset size).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from mechvlm.analyses.image_kv import ImageKV, feature_name
from mechvlm.fileio import write_bytes, write_json

FORMAT = "mechvlm.image_kv/1"
INDEX = "index.json"
_META_TENSORS = ("image_example", "image_slot", "image_grid", "image_offset")


class ImageKVStore:
    """Reader of an `image_kv` shard folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX
        if not index.is_file():
            raise FileNotFoundError(f"{self.path} holds no {INDEX}: not an image_kv shard folder")
        self.manifest = json.loads(index.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{index} has format {self.manifest.get('format')!r}, expected {FORMAT!r}")

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def kinds(self) -> list[str]:
        return list(self.manifest["kinds"])

    @property
    def n_images(self) -> int:
        return sum(s["n_images"] for s in self.manifest["shards"])

    def iter_shards(self, names: Sequence[str] | None = None) -> Iterator[ImageKV]:
        """One `ImageKV` per shard holding the tables ``names`` (default all)."""
        from safetensors import safe_open

        for shard in self.manifest["shards"]:
            with safe_open(str(self.path / shard["file"]), framework="pt") as f:
                keys = [k for k in f.keys() if k not in _META_TENSORS]
                chosen = keys if names is None else list(names)
                missing = [n for n in chosen if n not in keys]
                if missing:
                    raise KeyError(f"{shard['file']} has no tables {missing}; it holds {sorted(keys)}")
                yield ImageKV(features={n: f.get_tensor(n) for n in chosen},
                              **{m: f.get_tensor(m) for m in _META_TENSORS},
                              layers=self.layers, kinds=self.kinds, meta=dict(self.manifest["meta"]))

    def load(self, kinds: Iterable[str] | None = None, layers: Iterable[int] | None = None) -> ImageKV:
        """All images, with only the tables of ``kinds`` x ``layers`` (default all), in memory."""
        kinds = self.kinds if kinds is None else list(kinds)
        layers = self.layers if layers is None else [int(l) for l in layers]
        names = [feature_name(k, None if k == "vision" else l) for k in kinds
                 for l in ([None] if k == "vision" else layers)]
        out = ImageKV.concat(list(self.iter_shards(names)))
        out.layers = [l for l in self.layers if l in layers]
        out.kinds = [k for k in self.kinds if k in kinds]
        return out


def _shard_bytes(part: ImageKV) -> bytes:
    from safetensors.torch import save

    tensors = {n: t.contiguous() for n, t in part.features.items()}
    tensors.update({m: getattr(part, m).contiguous() for m in _META_TENSORS})
    return save(tensors, metadata={"format": FORMAT})


def _prepare(out: Path, overwrite: bool, resume: bool) -> dict | None:
    """The manifest to resume from (None: start afresh); clears an old run on ``overwrite``."""
    index = out / INDEX
    if not out.exists() or not any(out.iterdir()):
        return None
    if not index.is_file():
        if overwrite:
            return None
        raise FileExistsError(f"{out} exists and is not an image_kv shard folder; choose an empty folder "
                              "or pass overwrite=True")
    manifest = json.loads(index.read_text())
    if overwrite:
        for shard in manifest.get("shards", []):
            (out / shard["file"]).unlink(missing_ok=True)
        index.unlink()
        return None
    if manifest.get("complete"):
        raise FileExistsError(f"{out} already holds a finished image_kv run; pass overwrite=True to replace it")
    if not resume:
        raise FileExistsError(f"{out} holds an unfinished image_kv run ({manifest['batches_done']} batches); "
                              "pass resume=True to continue it or overwrite=True to start again")
    return manifest


def write_shards(out_dir: str | Path, make_parts: Callable[[int], Iterable[ImageKV]], *, meta: dict,
                 shard_tokens: int, overwrite: bool, resume: bool) -> ImageKVStore:
    """Drive ``make_parts(skip)`` (one `ImageKV` per batch, the first ``skip`` batches
    skipped) and write its parts as shards of about ``shard_tokens`` image tokens."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be at least 1, got {shard_tokens}")
    out = Path(out_dir)
    manifest = _prepare(out, overwrite, resume)
    out.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        manifest = {"format": FORMAT, "meta": meta, "layers": None, "kinds": None, "shards": [],
                    "batches_done": 0, "complete": False}
    pending: list[ImageKV] = []
    done = manifest["batches_done"]

    def flush(batches_done: int) -> None:
        if pending:
            part = ImageKV.concat(pending)
            name = f"shard-{len(manifest['shards']):05d}.safetensors"
            write_bytes(out / name, _shard_bytes(part))
            manifest["shards"].append({"file": name, "n_images": part.n_images,
                                       "n_tokens": int(part.image_grid.prod(-1).sum())})
            manifest["layers"], manifest["kinds"] = part.layers, part.kinds
            pending.clear()
        manifest["batches_done"] = batches_done
        write_json(out / INDEX, manifest)

    seen = done
    for seen, part in enumerate(make_parts(done), start=done + 1):
        pending.append(part)
        if sum(int(p.image_grid.prod(-1).sum()) for p in pending) >= shard_tokens:
            flush(seen)
    if not pending and not manifest["shards"]:
        raise ValueError("no batches given")
    manifest["complete"] = True
    flush(seen)
    return ImageKVStore(out)


__all__ = ["FORMAT", "ImageKVStore", "write_shards"]
