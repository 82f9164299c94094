"""Which image tokens to keep under a budget: orderings of an image's tokens (seed 001).

A strategy ranks the tokens of one image; keeping ``k`` tokens keeps the first ``k`` of the
ranking, so the kept sets of one ranking are nested as ``k`` grows.

* ``first``: raster order (row-major over the merged grid).
* ``random``: a uniformly random order (seeded; one ranking per draw).
* ``top_attention``: descending attention received from the prompt's text (summed over
  layers, mean over heads; see `received_scores`), ties in raster order.
* ``spaced``: evenly spread over the grid, by farthest-point sampling: start at the cell
  nearest the grid's centre, then repeatedly take the cell farthest (Euclidean, in cells)
  from those taken, ties in raster order. Any prefix is spread over the whole image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechvlm.image_layout import ImageSpan

STRATEGIES = ("first", "random", "top_attention", "spaced")


def cell_coordinates(span: ImageSpan) -> Float[Tensor, "token 3"]:
    """``(t, row, col)`` of each token of ``span`` on its merged grid."""
    _, h, w = span.grid
    c = torch.tensor(span.cell_ids, dtype=torch.long)
    return torch.stack([c // (h * w), (c // w) % h, c % w], dim=-1).double()


def spaced_order(coords: Float[Tensor, "token 3"]) -> Int[Tensor, " token"]:
    """Farthest-point order of points (first: the point nearest their centroid)."""
    n = coords.shape[0]
    centre = coords.mean(0)
    first = int(((coords - centre) ** 2).sum(-1).argmin())  # argmin: the first of equals
    order = [first]
    dist = ((coords - coords[first]) ** 2).sum(-1)
    taken = torch.zeros(n, dtype=torch.bool)
    taken[first] = True
    for _ in range(n - 1):
        nxt = int(dist.masked_fill(taken, -1.0).argmax())  # argmax: the first of equals
        order.append(nxt)
        taken[nxt] = True
        dist = torch.minimum(dist, ((coords - coords[nxt]) ** 2).sum(-1))
    return torch.tensor(order, dtype=torch.long)


def token_order(strategy: str, span: ImageSpan, *, generator: torch.Generator | None = None,
                scores: Float[Tensor, " token"] | None = None) -> Int[Tensor, " token"]:
    """The ranking of ``span``'s tokens (indices ``0 .. n_tokens-1`` into the span) under
    ``strategy``; ``random`` needs ``generator``, ``top_attention`` the tokens' ``scores``."""
    n = span.n_tokens
    if strategy == "first":
        return torch.arange(n)
    if strategy == "random":
        return torch.randperm(n, generator=generator)
    if strategy == "top_attention":
        if scores is None or scores.shape != (n,):
            raise ValueError(f"top_attention needs one score per token of image {span.image} ({n})")
        return torch.sort(-scores.double(), stable=True).indices
    if strategy == "spaced":
        return spaced_order(cell_coordinates(span))
    raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")


def check_strategies(strategies: Sequence[str] | str) -> list[str]:
    strategies = [strategies] if isinstance(strategies, str) else list(strategies)
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise ValueError(f"unknown strategies {bad}; choose from {STRATEGIES}")
    return strategies


def received_scores(model, batch, roles, queries: Tensor) -> Float[Tensor, "batch pos"]:
    """Attention each image token receives from the ``queries`` (``[batch, pos]`` bool),
    summed over layers and averaged over heads (`mechvlm.metrics.received_attention`);
    0 elsewhere."""
    from mechvlm.metrics import received_attention

    res = received_attention(model, batch, query=queries, key="image", progress=False, n_grid=2)
    out = torch.zeros(roles.shape, dtype=torch.float64)
    for row, (r, pos) in enumerate(zip(res.received, res.positions)):
        out[row, pos] = r.double().mean(1).sum(0)  # [layer, head, key] -> [key]
    return out
