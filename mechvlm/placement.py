"""A `HookedVLM` placed over several devices, with CPU / disk offload, on accelerate.

The model is placed in whole *pieces*, in the order HF's own ``device_map`` visits them:
``vision`` (tower + projector), ``embed``, ``blocks.0`` ... ``blocks.{n-1}``, ``ln_final``,
``unembed``. A block is never split. `infer_device_map` computes the map with accelerate's
``infer_auto_device_map`` (``get_balanced_memory`` first for ``"auto"`` / ``"balanced"``, as
``transformers`` does), so a budget ``max_memory`` gives the split HF would give its own
model; a dict names the device of each piece (``"blocks"`` = every block, ``""`` = all).

How a placed model runs (`place`):

* A piece on a device holds its weights there; a forward pre-hook moves the piece's inputs
  to that device (accelerate's ``send_to_device``; the `AttentionMask` moves with its own
  ``to``, built once per device). So the residual stream moves at block boundaries and
  every hook point sees tensors on its block's device.
* An offloaded piece (``"disk"``; ``"cpu"`` when another device executes, as in HF)
  keeps its weights on the CPU or memory-mapped on disk and runs on the *main device*
  through accelerate's ``AlignDevicesHook``: the weights are loaded for the piece's forward
  and dropped after (they read as ``meta`` tensors in between, e.g. ``model.W_U`` of an
  offloaded ``unembed``).
* The vision features and the logits come back to the main device (the device of
  ``embed``, ``model.device``), where the inputs are built, as HF returns them.

``run_with_cache(device=...)`` (TransformerLens' argument) gathers cached activations on
one device; without it each stays on its block's device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

OFFLOAD_TARGETS = ("cpu", "disk")
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def pieces(model) -> list[str]:
    """The placement units of ``model``, in HF's order."""
    out = ["vision"] if model.vision is not None else []
    return out + ["embed"] + [f"blocks.{l}" for l in range(len(model.blocks))] + ["ln_final", "unembed"]


class _Layout(nn.Module):
    """The model's pieces as children in HF's order (vision first), for accelerate; it
    holds the model's own modules, nothing is copied. ``unembed`` is named ``lm_head``
    here: accelerate matches tied parameters by substring, and ``"embed."`` is inside
    ``"unembed.weight"`` (the tie would be missed)."""

    def __init__(self, model):
        super().__init__()
        if model.vision is not None:
            self.vision = model.vision
        self.embed = model.embed
        self.blocks = model.blocks
        self.ln_final = model.ln_final
        self.lm_head = model.unembed

    @staticmethod
    def piece_name(name: str) -> str:
        return "unembed" + name[len("lm_head"):] if name == "lm_head" or name.startswith("lm_head.") else name


def _no_split(model) -> list[str]:
    names = [type(model.blocks[0]).__name__]
    if model.vision is not None:
        names.append(type(model.vision).__name__)
    return names


def device_name(value) -> str:
    """A device map value as a device string: ints are accelerator indices (``0`` ->
    ``"cuda:0"``), ``"cuda"`` means ``"cuda:0"``, ``"cpu"`` / ``"disk"`` / ``"meta"`` as is."""
    if isinstance(value, bool):
        raise TypeError(f"a device map value must be a device, got {value!r}")
    if isinstance(value, int):
        kind = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else "cuda"
        return f"{kind}:{value}"
    if isinstance(value, torch.device):
        value = str(value)
    if not isinstance(value, str):
        raise TypeError(f"a device map value must be a device (int, str, torch.device), got {value!r}")
    if value == "disk":
        return value
    dev = torch.device(value)
    if dev.type not in ("cpu", "meta") and dev.index is None:
        dev = torch.device(dev.type, 0)
    return str(dev)


def infer_device_map(model, device_map: str = "auto", max_memory: Mapping | None = None) -> dict[str, str]:
    """Accelerate's map of ``model``'s pieces under ``max_memory`` (``{0: "20GiB", "cpu":
    "100GiB"}``; default: what the devices have free), computed as ``transformers``
    computes ``device_map=device_map`` for its own model: ``"auto"`` / ``"balanced"`` /
    ``"balanced_low_0"`` balance the GPUs (``get_balanced_memory``), ``"sequential"`` fills
    them in order. Blocks and the vision tower are never split; tied embeddings stay
    together. Returns ``{piece: device}`` for every piece."""
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    if device_map not in AUTO_MAPS:
        raise ValueError(f"device_map must be a dict or one of {AUTO_MAPS}, got {device_map!r}")
    layout = _Layout(model)
    no_split = _no_split(model)
    mem = dict(max_memory) if max_memory is not None else None
    if device_map == "sequential":
        mem = get_max_memory(mem)
    else:
        mem = get_balanced_memory(layout, max_memory=mem, no_split_module_classes=no_split, dtype=model.dtype,
                                  low_zero=device_map == "balanced_low_0")
    found = infer_auto_device_map(layout, max_memory=mem, no_split_module_classes=no_split, dtype=model.dtype)
    return expand_device_map(model, {_Layout.piece_name(k): v for k, v in found.items()})


def expand_device_map(model, device_map: Mapping) -> dict[str, str]:
    """``{piece: device}`` for every piece from a map whose keys are pieces or groups of
    them (``"blocks"``, ``""`` for the whole model); refuses keys inside a piece, unknown
    keys and pieces left without a device, naming them."""
    names = pieces(model)
    out: dict[str, str] = {}
    for key, value in device_map.items():
        key = str(key)
        covered = [p for p in names if key == "" or p == key or p.startswith(key + ".")]
        if not covered:
            inside = [p for p in names if key.startswith(p + ".")]
            if inside:
                raise ValueError(f"device_map key {key!r} is inside the piece {inside[0]!r}: mechvlm places whole "
                                 f"pieces ({_pieces_text(names)})")
            raise ValueError(f"device_map key {key!r} names no part of this model; its pieces are "
                             f"{_pieces_text(names)}")
        dev = device_name(value)
        for p in covered:  # the longest key wins, as in accelerate
            if p not in out or len(key) >= out[p][1]:
                out[p] = (dev, len(key))
    missing = [p for p in names if p not in out]
    if missing:
        raise ValueError(f"device_map gives no device to {', '.join(missing)} (every piece needs one: "
                         f"{_pieces_text(names)})")
    return {p: out[p][0] for p in names}


def _pieces_text(names: list[str]) -> str:
    blocks = [n for n in names if n.startswith("blocks.")]
    rest = [n for n in names if not n.startswith("blocks.")]
    return ", ".join(rest[:-2] + [f"blocks.0..blocks.{len(blocks) - 1}"] + rest[-2:])


def n_devices_map(model, n_devices: int, max_memory: Mapping | None = None) -> dict[str, str]:
    """TransformerLens' ``n_devices=k``: the blocks balanced over accelerators ``0..k-1``
    (TL's ``resolve_device_map``: ``"balanced"`` with the free memory of those k devices)."""
    from transformer_lens.utilities.multi_gpu import resolve_device_map

    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"n_devices must be a positive integer, got {n_devices!r}")
    kind, mem = resolve_device_map(n_devices, None, None, max_memory)
    if kind is None:
        return {}
    return infer_device_map(model, kind, mem)


@dataclass
class Placement:
    """Where each piece of a placed model lives and runs.

    Attributes:
        device_map: ``{piece: device}`` as given (``"disk"``, ``"cpu"``, ``"cuda:1"``...).
        main_device: where offloaded pieces run and where inputs and outputs live
            (``model.device``): the device of ``embed``, or the first device that is not
            an offload target.
        offloaded: the pieces whose weights are loaded per forward.
        offload_folder: where ``"disk"`` pieces are memory-mapped.
    """

    device_map: dict[str, str]
    main_device: torch.device
    offloaded: frozenset[str] = frozenset()
    offload_folder: Path | None = None
    _handles: list = field(default_factory=list, repr=False)

    def execution_device(self, piece: str) -> torch.device:
        """The device ``piece`` computes on."""
        dev = self.device_map[piece]
        return self.main_device if piece in self.offloaded or dev == "disk" else torch.device(dev)

    @property
    def devices(self) -> list[torch.device]:
        """The distinct execution devices, in piece order."""
        out: list[torch.device] = []
        for p in self.device_map:
            d = self.execution_device(p)
            if d not in out:
                out.append(d)
        return out


def main_device_of(device_map: Mapping[str, str], cpu_offload: bool = True) -> torch.device:
    """The device of ``embed``, unless it is offloaded: then the first device that is not
    an offload target (``"disk"``, and ``"cpu"`` when ``cpu_offload``); else the CPU."""
    targets = OFFLOAD_TARGETS if cpu_offload else ("disk",)
    for dev in [device_map.get("embed"), *device_map.values()]:
        if dev is not None and dev not in targets:
            return torch.device(dev)
    return torch.device("cpu")


def place(model, device_map: Mapping, *, offload_folder: str | os.PathLike | None = None,
          cpu_offload: bool = True) -> Placement:
    """Place ``model`` (built on one device, usually the CPU) as ``device_map`` says (a
    dict, see `expand_device_map`); returns the `Placement`, also kept as
    ``model.placement``.

    ``"disk"`` pieces need ``offload_folder`` (a folder of their memory-mapped weights,
    one subfolder per piece). ``"cpu"`` pieces are offloaded to the CPU (weights streamed to
    the main device at each forward, as HF does) when another device runs the model and
    ``cpu_offload``; with ``cpu_offload=False`` they compute on the CPU.
    """
    if getattr(model, "placement", None) is not None:
        raise RuntimeError("this HookedVLM is already placed over devices; build a new one to place it again")
    full = expand_device_map(model, device_map)
    main = main_device_of(full, cpu_offload)
    offloaded = frozenset(p for p, d in full.items()
                          if d == "disk" or (d == "cpu" and cpu_offload and main.type != "cpu"))
    disk = [p for p in offloaded if full[p] == "disk"]
    if disk and offload_folder is None:
        raise ValueError(f"device_map puts {', '.join(disk)} on 'disk': pass offload_folder= (a folder for "
                         "their memory-mapped weights)")
    _check_tied(model, full, offloaded)
    placement = Placement(full, main, offloaded, Path(offload_folder) if disk else None)
    for piece in full:
        module = model.get_submodule(piece)
        if piece in offloaded:
            folder = placement.offload_folder / piece if full[piece] == "disk" else None
            _offload(module, main, folder)
        else:
            dev = torch.device(full[piece])
            module.to(dev)  # keeps the Parameter objects: tied embeddings stay tied
            placement._handles.append(module.register_forward_pre_hook(_inputs_to(dev), with_kwargs=True))
    for piece in ("vision", "unembed"):  # their outputs come back to the main device
        if piece in full:
            placement._handles.append(model.get_submodule(piece).register_forward_hook(_outputs_to(main)))
    model.placement = placement
    _refuse_moves(model)
    return placement


def _check_tied(model, full: dict[str, str], offloaded: frozenset[str]) -> None:
    if model.unembed.weight is model.embed.W_E and (
            full["unembed"] != full["embed"] or ("unembed" in offloaded) != ("embed" in offloaded)):
        raise ValueError(f"the unembedding is tied to the embedding (one weight) but device_map puts embed on "
                         f"{full['embed']!r} and unembed on {full['unembed']!r}: give them the same device")


def _inputs_to(device: torch.device):
    from accelerate.utils import send_to_device

    def move(module, args, kwargs):
        return send_to_device(args, device), send_to_device(kwargs, device)

    return move


def _outputs_to(device: torch.device):
    def move(module, args, output):
        return output.to(device) if isinstance(output, torch.Tensor) else output

    return move


def _offload(module: nn.Module, execution_device: torch.device, folder: Path | None) -> None:
    """Accelerate's offload of one piece: weights kept on the CPU (``folder`` None) or
    memory-mapped in ``folder``, loaded onto ``execution_device`` for each forward."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import OffloadedWeightsLoader, offload_state_dict

    weights_map = None  # AlignDevicesHook keeps a CPU copy of the weights itself
    if folder is not None:
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        offload_state_dict(folder, state)
        weights_map = OffloadedWeightsLoader(save_folder=str(folder))
    add_hook_to_module(module, AlignDevicesHook(execution_device=execution_device, offload=True,
                                                weights_map=weights_map, place_submodules=True))


def _refuse_moves(model) -> None:
    """``model.to / cuda / cpu`` would break the placement: refuse them, naming why."""
    def refuse(*args, **kwargs):
        raise RuntimeError("this HookedVLM is placed over devices (device_map / n_devices): moving it as a whole "
                           "would break the placement; build it again with another device_map instead")

    for name in ("to", "cuda", "cpu"):
        object.__setattr__(model, name, refuse)


def rank_max_memory() -> dict | None:
    """This process's share of the node's accelerators for an automatic ``device_map``:
    under ``torchrun`` with ``LOCAL_WORLD_SIZE = r`` processes per node, local rank ``i``
    gets accelerators ``i*g .. i*g+g-1`` (``g = count // r``) with their free memory, plus
    the CPU; None in a single process (every accelerator)."""
    from accelerate.utils import get_max_memory

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world <= 1:
        return None
    count = torch.accelerator.device_count() if torch.accelerator.is_available() else 0
    per_rank = count // local_world
    if per_rank < 1:
        raise ValueError(f"{local_world} processes per node share {count} accelerators: an automatic device_map "
                         "needs at least one per process (run fewer processes per node)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    mine = range(local_rank * per_rank, (local_rank + 1) * per_rank)
    free = get_max_memory()
    return {**{i: free[i] for i in mine}, "cpu": free["cpu"] // local_world}


def check_placement_arguments(*, device=None, device_map=None, max_memory=None, n_devices=None) -> None:
    """Refuse contradictory placement arguments before anything is loaded."""
    if n_devices is not None and device_map is not None:
        raise ValueError("pass device_map or n_devices, not both")
    if device is not None and (device_map is not None or n_devices is not None):
        raise ValueError("device and device_map / n_devices are mutually exclusive: pass one")
    if max_memory is not None and device_map is None and n_devices is None:
        raise ValueError("max_memory needs device_map='auto' (or another automatic map) or n_devices")
    if isinstance(device_map, str) and device_map not in AUTO_MAPS:
        device_name(device_map)  # a device string ("cuda:1"): every piece there


def place_as_asked(model, *, device_map=None, max_memory=None, n_devices=None, offload_folder=None,
                   cpu_offload: bool = True):
    """Place ``model`` as `HookedVLM.from_pretrained` / ``from_hf`` were asked
    (``device_map`` / ``max_memory`` / ``n_devices``); returns ``model`` (unplaced when
    nothing was asked, or when ``n_devices`` is 1)."""
    check_placement_arguments(device_map=device_map, max_memory=max_memory, n_devices=n_devices)
    if n_devices is not None:
        full = n_devices_map(model, n_devices, max_memory)
    elif device_map is None:
        full = None
    elif isinstance(device_map, str) and device_map in AUTO_MAPS:
        full = infer_device_map(model, device_map, max_memory)
    elif isinstance(device_map, Mapping):
        full = expand_device_map(model, device_map)
    else:  # one device for everything, as HF's device_map="cuda:1"
        full = expand_device_map(model, {"": device_map})
    if full:
        place(model, full, offload_folder=offload_folder, cpu_offload=cpu_offload)
    return model
