"""Scores of the seed-002 probes: mIoU of a segmentation on the token grid, PCK of matched
keypoints, and the chance levels they are compared with."""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor


def miou(pred: Int[Tensor, " n"], truth: Int[Tensor, " n"], n_classes: int = 2) -> float:
    """Mean intersection-over-union over the classes, pooled over every token given:
    ``IoU_c = |pred = c and truth = c| / |pred = c or truth = c|``; classes absent from
    both are skipped."""
    pred, truth = torch.as_tensor(pred).flatten().long(), torch.as_tensor(truth).flatten().long()
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and truth {tuple(truth.shape)} differ in size")
    ious = []
    for c in range(n_classes):
        p, t = pred == c, truth == c
        union = int((p | t).sum())
        if union:
            ious.append(int((p & t).sum()) / union)
    return float(sum(ious) / len(ious)) if ious else float("nan")


def majority_labels(clusters: Int[Tensor, " n"], truth: Int[Tensor, " n"], n_classes: int = 2) -> Tensor:
    """Each cluster takes the class most of its tokens have (ties: the lower class)."""
    clusters, truth = clusters.long(), truth.long()
    out = torch.empty_like(truth)
    for c in clusters.unique():
        members = clusters == c
        out[members] = torch.bincount(truth[members], minlength=n_classes).argmax()
    return out


def pck(pred: Int[Tensor, "k 2"], truth: Int[Tensor, "k 2"], grid: tuple[int, int], alpha: float = 0.0) -> float:
    """Percentage of correct keypoints: a predicted ``(row, col)`` cell counts when it lies
    within ``alpha * max(h, w)`` cells (Euclidean) of the true one (``alpha=0``: the same cell)."""
    pred, truth = torch.as_tensor(pred).reshape(-1, 2).double(), torch.as_tensor(truth).reshape(-1, 2).double()
    if len(truth) == 0:
        return float("nan")
    dist = (pred - truth).norm(dim=-1)
    return float((dist <= alpha * max(grid) + 1e-9).double().mean())


def pck_chance(truth: Int[Tensor, "k 2"], grid: tuple[int, int], alpha: float = 0.0) -> float:
    """Expected PCK of a uniformly random cell."""
    h, w = grid
    cells = torch.cartesian_prod(torch.arange(h), torch.arange(w)).double()
    truth = torch.as_tensor(truth).reshape(-1, 2).double()
    if len(truth) == 0:
        return float("nan")
    within = (torch.cdist(truth, cells) <= alpha * max(grid) + 1e-9).double()
    return float(within.mean())
