"""Helpers shared by the interventions: layer selection and per-device mask caches."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

Hooks = list[tuple[object, object]]


def layer_names(layers: Iterable[int] | int | None, suffix: str):
    """Hook names ``blocks.{l}.{suffix}`` for the given layers, or a filter for all layers."""
    if layers is None:
        return [(lambda name, s=suffix: name.startswith("blocks.") and name.endswith("." + suffix))]
    if isinstance(layers, int):
        layers = [layers]
    layers = sorted(set(int(l) for l in layers))
    if not layers:
        raise ValueError("an empty layer selection")
    return [f"blocks.{l}.{suffix}" for l in layers]


class OnDevice:
    """Caches a tensor per (device) so a hook moves it once, not once per layer."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor
        self._by_device: dict[torch.device, Tensor] = {}

    def get(self, device: torch.device) -> Tensor:
        if device not in self._by_device:
            self._by_device[device] = self.tensor.to(device)
        return self._by_device[device]


def head_selector(heads: Iterable[int] | int | None) -> list[int] | None:
    if heads is None:
        return None
    if isinstance(heads, int):
        heads = [heads]
    heads = sorted(set(int(h) for h in heads))
    if not heads:
        raise ValueError("an empty head selection")
    if heads[0] < 0:
        raise ValueError(f"heads: {heads[0]} is not a head index (heads count from 0; negative indices "
                         "are refused rather than wrapped)")
    return heads
