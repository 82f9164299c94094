"""Loading a checkpoint that is what it claims to be: the path, and every tensor.

Hugging Face's ``from_pretrained`` initialises any weight the checkpoint lacks at random
and ignores any tensor the model does not expect, with only a log line; a missing local
directory gets the hub's repo-id message, and a file given instead of a folder gets advice
about ``weights_only``. mechvlm refuses all of these before any compute:

* `checkpoint_dir(name_or_path)`: the local folder (or None for a hub id), raising
  `FileNotFoundError` "no such directory" / `NotADirectoryError` for a file.
* `load_hf_checked(cls, name_or_path, **kw)`: ``cls.from_pretrained(...,
  output_loading_info=True)``, then `check_loading_info`, which raises
  `CheckpointMismatchError` naming the missing, unexpected and mismatched tensors (a single
  file, a sharded checkpoint whose index lost entries, the vision tower alike: HF compares
  what it read against every parameter of the model), after `check_shard_index`: in a
  sharded checkpoint, HF reads the shard files the index names, so an index entry removed
  from a shard that is still read goes unnoticed, and a shard no entry names is never read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

#: Keys shown per kind in the error message (the count of the rest follows).
SHOWN_KEYS = 12


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors are not the model's: some are missing, unexpected or of
    another shape. The message names them."""


def _looks_like_a_path(name: str) -> bool:
    """True when ``name`` cannot be a hub id (``owner/name`` or ``name``)."""
    if os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1:
        return True
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def checkpoint_dir(name_or_path: str | os.PathLike) -> Path | None:
    """The local checkpoint folder ``name_or_path`` names, or None when it can only be a hub
    id. Raises `NotADirectoryError` for a file and `FileNotFoundError` ("no such
    directory") for a path that does not exist."""
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(
            f"{name} is a file, not a checkpoint directory: give the folder that holds config.json and "
            "the weights (*.safetensors), as save_pretrained writes it")
    if _looks_like_a_path(name):
        raise FileNotFoundError(f"no such directory: {name} (a checkpoint directory with config.json "
                                "and the weights)")
    return None


def missing_checkpoint_error(name: str, error: Exception) -> FileNotFoundError:
    """A hub-id-shaped name that is not a local folder and that HF could not load either."""
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return FileNotFoundError(f"no such directory: {name}; nor could it be loaded as a hub model id "
                             f"({first})")


def load_hf_config(name_or_path: str | os.PathLike, **hf_kwargs):
    """``AutoConfig.from_pretrained`` after `checkpoint_dir`'s checks (a hub id that fails
    to load is reported as "no such directory" too, with HF's reason)."""
    import transformers

    name = os.fspath(name_or_path)
    local = checkpoint_dir(name)
    if local is not None and not (local / "config.json").is_file():
        raise FileNotFoundError(f"{name} is a directory without config.json: not a HF checkpoint directory")
    try:
        return transformers.AutoConfig.from_pretrained(name, **hf_kwargs)
    except OSError as e:
        if local is None:
            raise missing_checkpoint_error(name, e) from e
        raise


def _keys(values: Iterable, shown: int = SHOWN_KEYS) -> str:
    values = sorted(str(v) for v in values)
    text = ", ".join(values[:shown])
    return text + (f" (and {len(values) - shown} more)" if len(values) > shown else "")


def check_loading_info(info: Mapping, where: str) -> None:
    """Raise `CheckpointMismatchError` unless HF's ``loading_info`` (``from_pretrained(...,
    output_loading_info=True)``) reports no missing, unexpected or mismatched tensor and no
    error message."""
    missing = set(info.get("missing_keys") or ())
    unexpected = set(info.get("unexpected_keys") or ())
    mismatched = info.get("mismatched_keys") or ()
    errors = list(info.get("error_msgs") or ())
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) the model needs are missing (HF would initialise them at "
                     f"random): {_keys(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) in the checkpoint are not used by the model: "
                     f"{_keys(unexpected)}")
    if mismatched:
        shapes = [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in mismatched]
        parts.append(f"{len(shapes)} tensor(s) have another shape (checkpoint vs model): {_keys(shapes)}")
    if errors:
        parts.append("loading errors: " + "; ".join(str(e) for e in errors))
    if parts:
        raise CheckpointMismatchError(f"checkpoint {where} does not match its config's architecture: "
                                      + "; ".join(parts))


def check_shard_index(folder: str | os.PathLike) -> None:
    """In a sharded safetensors checkpoint, the index and the shards must agree: every
    tensor of a listed shard is in the index (under that shard), every indexed tensor is
    in its shard, and no ``*-of-*.safetensors`` shard in the folder is left out."""
    import json

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointMismatchError(f"{index} is not a safetensors index (no weight_map): {e}") from None
    from safetensors import safe_open

    problems = []
    listed = sorted(set(weight_map.values()))
    for shard in listed:
        if not (folder / shard).is_file():
            problems.append(f"the index names shard {shard}, which is not in the folder")
            continue
        with safe_open(str(folder / shard), framework="pt") as f:
            held = set(f.keys())
        indexed = {k for k, v in weight_map.items() if v == shard}
        if held - indexed:
            problems.append(f"shard {shard} holds {len(held - indexed)} tensor(s) the index does not list: "
                            f"{_keys(held - indexed)}")
        if indexed - held:
            problems.append(f"the index lists {len(indexed - held)} tensor(s) in shard {shard} that it does "
                            f"not hold: {_keys(indexed - held)}")
    unlisted = sorted(p.name for p in folder.glob("*-of-*.safetensors") if p.name not in listed)
    if unlisted:
        problems.append(f"shard file(s) {', '.join(unlisted)} are not in the index, so none of their tensors "
                        "would be loaded")
    if problems:
        raise CheckpointMismatchError(f"checkpoint {folder}: the shard index does not match the shards: "
                                      + "; ".join(problems))


def load_hf_checked(hf_class, name_or_path: str | os.PathLike, *, strict: bool = True, **hf_kwargs):
    """``hf_class.from_pretrained(name_or_path, **hf_kwargs)`` that refuses a checkpoint
    with a missing, unexpected or mismatched tensor (`check_shard_index`,
    `check_loading_info`). ``strict=False`` turns the refusal into a warning (for a
    checkpoint known to carry extra tensors; HF then initialises a missing one at random)."""
    import warnings

    def refuse(error: CheckpointMismatchError) -> None:
        if strict:
            raise error
        warnings.warn(f"{error} (loaded anyway: strict=False)", stacklevel=3)

    name = os.fspath(name_or_path)
    local = checkpoint_dir(name)
    if local is not None:
        try:
            check_shard_index(local)
        except CheckpointMismatchError as e:
            refuse(e)
    model, info = hf_class.from_pretrained(name, output_loading_info=True, **hf_kwargs)
    try:
        check_loading_info(info, name)
    except CheckpointMismatchError as e:
        refuse(e)
    return model
