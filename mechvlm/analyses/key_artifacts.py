"""Input-agnostic image keys (seed 002): keys whose direction barely changes across images.

`key_artifacts` scores every (layer, grid cell, KV head) by the mean cosine similarity of
its key over all pairs of distinct images, ``mean_{i != j} cos(k_i, k_j)``, computed in
closed form from the unit vectors ``u_i``: ``(|sum_i u_i|^2 - n) / (n (n - 1))``. Keys above
``threshold`` are the input-agnostic "artifacts". `replace_artifact_keys` replaces them with
their mean over a reference set (pre-RoPE, so the model rotates them at their positions)
and measures how much the answer distribution moves, next to the same number of randomly
chosen keys replaced the same way (the control).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from mechvlm.analyses.forward_rows import last_positions, logits_at
from mechvlm.analyses.image_kv import ImageKV
from mechvlm.analyses.kv_baseline import image_kv_means, place_baseline
from mechvlm.image_layout import check_one_grid_images
from mechvlm.interventions import replace_where
from mechvlm.metrics._common import Batch


def mean_pairwise_cosine(x: Float[Tensor, "n *rest d"]) -> Float[Tensor, " *rest"]:
    """Mean cosine similarity over the ``n (n - 1)`` ordered pairs of distinct rows."""
    n = x.shape[0]
    if n < 2:
        raise ValueError("the mean pairwise cosine needs at least two inputs")
    u = F.normalize(x.double(), dim=-1)
    return ((u.sum(0).pow(2).sum(-1) - n) / (n * (n - 1))).float()


@dataclass
class KeyArtifactResult:
    """``consistency``: ``[layer, h, w, kv_head]`` mean pairwise cosine of the key across
    images (``value_consistency`` the same for the values, if recorded); ``artifacts``: the
    keys at or above ``threshold``."""

    consistency: Float[Tensor, "layer h w kv_head"]
    value_consistency: Float[Tensor, "layer h w kv_head"] | None
    threshold: float
    layers: list[int]
    grid: tuple[int, int]
    n_images: int
    settings: dict = field(default_factory=dict)

    @property
    def artifacts(self) -> Bool[Tensor, "layer h w kv_head"]:
        return self.consistency >= self.threshold

    @property
    def fraction(self) -> Float[Tensor, " layer"]:
        """Share of the (cell, KV head) keys of each layer that are artifacts."""
        return self.artifacts.flatten(1).float().mean(1)

    def to_dict(self) -> dict:
        return {"consistency": self.consistency, "value_consistency": self.value_consistency,
                "threshold": self.threshold, "artifacts": self.artifacts, "fraction": self.fraction,
                "layers": self.layers, "grid": self.grid, "n_images": self.n_images, "settings": self.settings}


def key_artifacts(kv: ImageKV, *, threshold: float = 0.9, kind: str = "key",
                  layers: Sequence[int] | None = None) -> KeyArtifactResult:
    """Input-agnostic keys of ``kv`` (`image_kv` of at least two images sharing a grid)."""
    layer_list = list(kv.layers) if layers is None else [int(l) for l in layers]
    cons = torch.stack([mean_pairwise_cosine(kv.stack(kind, l)) for l in layer_list])
    vals = None
    if "value" in kv.kinds:
        vals = torch.stack([mean_pairwise_cosine(kv.stack("value", l)) for l in layer_list])
    _, h, w = kv.image_grid[0].tolist()
    return KeyArtifactResult(consistency=cons, value_consistency=vals, threshold=threshold, layers=layer_list,
                             grid=(h, w), n_images=kv.n_images, settings={"kind": kind})


def _selection(model, batch, cells: Bool[Tensor, "layer h w kv"], layers: list[int]) -> dict[int, Tensor]:
    """Per layer ``[batch, pos, kv, 1]``: the image positions whose (cell, head) is chosen."""
    roles = model.roles(**batch)
    check_one_grid_images(roles.spans, "replace_artifact_keys")
    h, w = cells.shape[1:3]
    cell = (roles.grid_row * w + roles.grid_col).clamp_min(0)
    out = {}
    for i, l in enumerate(layers):
        flat = cells[i].reshape(h * w, -1).to(cell.device)
        out[l] = (flat[cell] & roles.image[..., None])[..., None]
    return out


def replace_artifact_keys(model, batches: Batch | Iterable[Batch], result: KeyArtifactResult, *,
                          reference: Batch | Iterable[Batch] | None = None, n_random: int = 3, seed: int = 0,
                          progress: bool = False) -> dict:
    """Replace the artifact keys (every image of ``batches``) with their reference mean.

    Returns the mean KL divergence ``KL(clean || edited)`` of the next-token distribution at
    the last position, the mean change of the clean top-1 token's probability, and the
    same for ``n_random`` sets of as many randomly chosen (cell, KV head) keys per layer."""
    batches = [batches] if isinstance(batches, dict) else list(batches)
    reference = batches if reference is None else ([reference] if isinstance(reference, dict) else list(reference))
    baseline = image_kv_means(model, reference, result.layers, per_cell=True, progress=progress)
    g = torch.Generator().manual_seed(seed)
    chosen = result.artifacts

    def random_like(cells: Tensor) -> Tensor:
        out = torch.zeros_like(cells)
        for i in range(cells.shape[0]):
            k = int(cells[i].sum())
            out[i].view(-1)[torch.randperm(cells[i].numel(), generator=g)[:k]] = True
        return out

    sets = {"artifacts": chosen, **{f"random{r}": random_like(chosen) for r in range(n_random)}}
    stats = {name: {"kl": 0.0, "dp_top1": 0.0} for name in sets}
    n = 0
    for batch in batches:
        keys, _ = place_baseline(model, baseline, batch, rotate=False)
        last = last_positions(batch)
        clean = logits_at(model, batch, [], last).float().log_softmax(-1)
        top = clean.argmax(-1)
        rows = torch.arange(len(top))
        for name, cells in sets.items():
            sel = _selection(model, batch, cells, result.layers)
            hooks = replace_where({f"blocks.{l}.attn.hook_k": keys[l] for l in result.layers},
                                  {f"blocks.{l}.attn.hook_k": sel[l] for l in result.layers})
            edited = logits_at(model, batch, hooks, last).float().log_softmax(-1)
            stats[name]["kl"] += float((clean.exp() * (clean - edited)).sum(-1).sum())
            stats[name]["dp_top1"] += float((edited[rows, top].exp() - clean[rows, top].exp()).sum())
        n += len(top)
    out = {name: {k: v / n for k, v in s.items()} for name, s in stats.items()}
    randoms = [out[f"random{r}"] for r in range(n_random)]
    return {"artifacts": out["artifacts"], "random_mean": {k: sum(r[k] for r in randoms) / max(1, len(randoms))
                                                           for k in ("kl", "dp_top1")},
            "random": randoms, "n_keys": [int(c.sum()) for c in chosen], "n_examples": n}
