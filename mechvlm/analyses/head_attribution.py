"""Head attribution (seed 004, METHODS §12): which attention heads carry the image to the answer.

M random joint ablation masks over every (layer, head) are sampled (each head ablated with
probability ``ablate_prob``); each mask is run on every example and the drop of the target
metric (clean minus ablated; the target's logit, log-probability or logit difference at the
answer position) is recorded. A ridge regression ``drop ~ b + sum_h w_h * ablated_h``
(held-out R^2 on masks kept out of the fit, percentile bootstrap intervals over the masks)
gives each head's attribution ``w_h``; positive: the head raises the target.

Ablating a head (``ablation``):

* ``"image_kv"``: its image key/value pairs are replaced by their mean over a reference set
  (`kv_baseline.image_kv_means`, per grid cell). Under GQA a query head has no K/V of its
  own; ``unit="query_head"`` (default) makes that one query head see the mean pairs while
  the other heads of its KV group keep the real ones (`interventions.ablate_image_kv`);
  ``unit="kv_head"`` ablates the KV head, i.e. its whole group, and the masks are over
  (layer, KV head).
* ``"output"``: its output ``hook_z`` is replaced, at every position, by its mean over the
  reference set (`interventions.mean_head_outputs`).

Several masks run in one forward: the batch is stacked ``masks_per_forward`` times and row
``c * ex + e`` applies mask ``c`` to example ``e`` (`forward_rows`). For comparison the
result also holds the single-head ablation effects and each head's attention from the
answer position to the image (`attention_share`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechvlm.analyses.estimators import bootstrap, r_squared, ridge_fit, single_thread
from mechvlm.analyses.forward_rows import image_embeds, last_positions, logits_at, repeat_batch
from mechvlm.analyses.kv_baseline import image_kv_means, place_baseline
from mechvlm.distributed import fingerprint_of, map_units
from mechvlm.interventions import ablate_head_outputs, ablate_image_kv, mean_head_outputs
from mechvlm.metrics._common import Batch

ABLATIONS = ("image_kv", "output")
METRICS = ("logit", "logprob", "logit_diff")


@dataclass
class HeadAttributionResult:
    """Attribution of every (layer, unit), ``unit`` = query head, or KV head for
    ``unit="kv_head"``.

    Attributes:
        weights: ``[layer, unit]`` ridge coefficient ``w_h`` of the drop (positive: ablating
            the head lowers the target); ci_low / ci_high: its bootstrap interval.
        intercept, r2_train, r2_test: the fit; R^2 on the held-out masks.
        masks: ``[mask, layer, unit]`` the sampled ablations; drops: ``[mask, example]``.
        clean: ``[example]`` the clean metric; targets: ``[example]`` the target ids.
        single: ``[layer, unit]`` mean drop when only that head is ablated (or None).
        attention: ``[layer, unit]`` mean attention of the answer position to the image
            tokens (summed over a KV group for ``kv_head``; or None).
        n_forwards, wall_s: the cost; settings: how it ran.
    """

    weights: Float[Tensor, "layer unit"]
    ci_low: Float[Tensor, "layer unit"]
    ci_high: Float[Tensor, "layer unit"]
    intercept: float
    r2_train: float
    r2_test: float
    masks: Bool[Tensor, "mask layer unit"]
    drops: Float[Tensor, "mask example"]
    clean: Float[Tensor, " example"]
    targets: Tensor
    single: Float[Tensor, "layer unit"] | None
    attention: Float[Tensor, "layer unit"] | None
    n_forwards: int
    wall_s: float
    settings: dict = field(default_factory=dict)

    def ranking(self, by: str = "weight") -> list[tuple[int, int]]:
        """(layer, unit) by decreasing attribution (``by="abs"``: by its magnitude)."""
        if by not in ("weight", "abs"):
            raise ValueError(f"by must be 'weight' or 'abs', got {by!r}")
        n_units = self.weights.shape[1]
        w = self.weights.flatten()
        w = w.abs() if by == "abs" else w
        return [(int(i) // n_units, int(i) % n_units) for i in w.argsort(descending=True, stable=True)]

    def top_heads(self, k: int) -> list[tuple[int, int]]:
        return self.ranking()[:k]

    def correlations(self) -> dict:
        """Pearson and Spearman correlation of the weights with the single-head drops and
        with the attention to the image."""
        out = {}
        for name, other in (("single", self.single), ("attention", self.attention)):
            if other is not None:
                out[name] = {"pearson": _pearson(self.weights, other),
                             "spearman": _pearson(_ranks(self.weights), _ranks(other))}
        return out

    def to_dict(self) -> dict:
        return {"weights": self.weights, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "intercept": self.intercept, "r2_train": self.r2_train, "r2_test": self.r2_test,
                "masks": self.masks, "drops": self.drops, "clean": self.clean, "targets": self.targets,
                "single": self.single, "attention": self.attention, "correlations": self.correlations(),
                "top_heads": self.top_heads(min(10, self.weights.numel())), "n_forwards": self.n_forwards,
                "wall_s": self.wall_s, "settings": self.settings}


def _ranks(x: Tensor) -> Tensor:
    return x.flatten().double().argsort().argsort().double()


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den else float("nan")


def sample_masks(n_masks: int, n_layers: int, n_units: int, ablate_prob: float, seed: int = 0) -> Tensor:
    """``[n_masks, n_layers, n_units]``: each head ablated independently with ``ablate_prob``."""
    if not 0 < ablate_prob < 1:
        raise ValueError(f"ablate_prob must be in (0, 1), got {ablate_prob}")
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_masks, n_layers, n_units, generator=g) < ablate_prob


def fit_head_attribution(masks: Bool[Tensor, "mask layer unit"], drops: Float[Tensor, " mask"], *,
                         ridge: float = 1.0, test_fraction: float = 0.2, n_bootstrap: int = 200,
                         seed: int = 0) -> dict:
    """Ridge fit of ``drops ~ b + sum_h w_h masks_h`` on a train split of the masks.

    Returns ``weights`` / ``ci_low`` / ``ci_high`` ``[layer, unit]``, ``intercept``,
    ``r2_train`` and ``r2_test`` (on the held-out ``test_fraction`` of the masks)."""
    m, shape = masks.shape[0], masks.shape[1:]
    x = masks.reshape(m, -1).double()
    y = torch.as_tensor(drops).double().flatten()
    if y.shape[0] != m:
        raise ValueError(f"{m} masks but {y.shape[0]} drops")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(m, generator=g)
    n_test = int(round(test_fraction * m))
    test, train = order[:n_test], order[n_test:]
    with single_thread():
        w, b = ridge_fit(x[train], y[train], ridge)
        lo, hi = bootstrap(lambda idx: ridge_fit(x[train][idx], y[train][idx], ridge)[0], len(train),
                           samples=n_bootstrap, seed=seed) if n_bootstrap else (w * float("nan"), w * float("nan"))
    pred = lambda rows: x[rows] @ w + b  # noqa: E731
    return {"weights": w.view(shape).float(), "ci_low": lo.view(shape).float(), "ci_high": hi.view(shape).float(),
            "intercept": float(b), "r2_train": r_squared(y[train], pred(train)),
            "r2_test": r_squared(y[test], pred(test)) if n_test >= 2 else float("nan")}


def _metric(logits: Tensor, targets: Tensor, foils: Tensor | None, metric: str) -> Tensor:
    logits = logits.float()
    rows = torch.arange(len(targets), device=logits.device)
    if metric == "logprob":
        logits = logits.log_softmax(-1)
    out = logits[rows, targets.to(logits.device)]
    if metric == "logit_diff":
        out = out - logits[rows, foils.to(logits.device)]
    return out.cpu()


class HeadAblator:
    """One ablation mode (``ablation``, ``unit``) with its baseline from the ``reference``
    batches; ``for_batch(batch)`` places the baseline once and returns ``hooks(ablated)``."""

    def __init__(self, model, ablation: str, unit: str, reference, per_cell: bool, progress: bool):
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
        self.model, self.ablation, self.unit = model, ablation, unit
        if ablation == "image_kv":
            self.baseline = image_kv_means(model, reference, per_cell=per_cell, progress=progress)
        else:
            if unit != "query_head":
                raise ValueError("ablation='output' ablates query heads; unit='kv_head' is for image_kv")
            self.means = mean_head_outputs(model, reference)

    def n_units(self) -> int:
        return self.model.cfg.n_kv_heads if self.unit == "kv_head" else self.model.cfg.n_heads

    def for_batch(self, batch: Batch):
        if self.ablation == "output":
            return lambda ablated: ablate_head_outputs(ablated, self.means)
        keys, values = place_baseline(self.model, self.baseline, batch, rotate=self.unit == "query_head")
        image = self.model.roles(**batch).image
        return lambda ablated: ablate_image_kv(ablated, image, keys, values, unit=self.unit,
                                               attn_scale=self.model.cfg.attn_scale)


def _as_list(x, n: int, name: str) -> list | None:
    if x is None:
        return None
    vals = torch.as_tensor(x).flatten().tolist() if not isinstance(x, list) else [int(v) for v in x]
    if len(vals) != n:
        raise ValueError(f"{len(vals)} {name} for {n} examples")
    return vals


def ablation_drops(model, batches: Sequence[Batch], masks: Bool[Tensor, "mask layer unit"], ablator: HeadAblator, *,
                   targets=None, foils=None, metric: str = "logit", masks_per_forward: int = 32,
                   progress: bool = True, journal=None) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(drops [mask, example], clean [example], targets [example], n_forwards)``: every
    mask on every example, ``masks_per_forward`` masks per forward.

    One unit of `mechvlm.distributed.map_units` per batch: sharded over the ranks of an
    initialised process group, and resumable with ``journal`` (a `mechvlm.journal.JournalTask`;
    a batch's record is tied to the masks, targets and ablation settings, so another
    setting is refused rather than read back)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "logit_diff" and foils is None:
        raise ValueError("metric='logit_diff' needs foils (one token id per example)")
    sizes = [int(b["input_ids"].shape[0]) for b in batches]
    targets, foils = _as_list(targets, sum(sizes), "targets"), _as_list(foils, sum(sizes), "foils")
    offsets = [sum(sizes[:i]) for i in range(len(batches))]
    units = [(batch, None if targets is None else targets[at:at + ex], None if foils is None else foils[at:at + ex])
             for batch, at, ex in zip(batches, offsets, sizes)]
    setting = fingerprint_of([masks, metric, masks_per_forward, ablator.ablation, ablator.unit,
                              ablator.baseline.to_dict() if ablator.ablation == "image_kv" else ablator.means])

    def one_batch(unit) -> dict:
        batch, batch_targets, batch_foils = unit
        ex = int(batch["input_ids"].shape[0])
        emb = image_embeds(model, batch)
        last = last_positions(batch)
        make_hooks = ablator.for_batch(batch)
        clean_logits = logits_at(model, repeat_batch(batch, 1, emb), [], last)
        n_forwards = 1
        tgt = torch.tensor(batch_targets) if batch_targets else clean_logits.argmax(-1).cpu()
        foil = torch.tensor(batch_foils) if batch_foils else None
        clean = _metric(clean_logits, tgt, foil, metric)
        out = []
        for start in range(0, masks.shape[0], masks_per_forward):
            chunk = masks[start:start + masks_per_forward]
            copies = chunk.shape[0]
            ablated = chunk.repeat_interleave(ex, dim=0)
            logits = logits_at(model, repeat_batch(batch, copies, emb), make_hooks(ablated), last.repeat(copies))
            n_forwards += 1
            value = _metric(logits, tgt.repeat(copies), None if foil is None else foil.repeat(copies), metric)
            out.append(clean[None] - value.view(copies, ex))
        return {"drops": torch.cat(out), "clean": clean, "targets": tgt, "n_forwards": n_forwards}

    parts = map_units(one_batch, units, fingerprint=lambda u: fingerprint_of([u, setting]), journal=journal,
                      progress=progress, desc="head ablations")
    return (torch.cat([p["drops"] for p in parts], 1), torch.cat([p["clean"] for p in parts]),
            torch.cat([p["targets"] for p in parts]), sum(p["n_forwards"] for p in parts))


def _attention_to_image(model, batches, unit: str) -> Tensor:
    from mechvlm.metrics import attention_share

    share = attention_share(model, batches, query="last", keys=("image", "eoi"), progress=False)
    att = share.raw[..., 0].nanmean(0).float()  # [layer, head]
    if unit == "kv_head":
        att = att.view(att.shape[0], model.cfg.n_kv_heads, -1).sum(-1)
    return att


def head_attribution(
    model,
    batches: Batch | Iterable[Batch],
    *,
    targets=None,
    foils=None,
    metric: str = "logit",
    n_masks: int = 512,
    ablate_prob: float = 0.1,
    ablation: str = "image_kv",
    unit: str = "query_head",
    reference: Batch | Iterable[Batch] | None = None,
    per_cell: bool = True,
    masks_per_forward: int = 32,
    ridge: float = 1.0,
    test_fraction: float = 0.2,
    n_bootstrap: int = 200,
    single_head: bool = True,
    attention: bool = True,
    seed: int = 0,
    progress: bool = True,
    journal=None,
) -> HeadAttributionResult:
    """Head attribution by random joint ablations and a ridge fit (see the module doc).

    Args:
        batches: the examples (left-padded batches, ``model(**batch)`` kwargs).
        targets: one token id per example (flat, in example order), default the clean
            prediction at the last position; foils: the second token of ``logit_diff``.
        metric: ``"logit"`` (the target's logit), ``"logprob"`` or ``"logit_diff"``.
        n_masks, ablate_prob, seed: the random masks.
        ablation, unit: how a head is ablated (module doc).
        reference: the batches the baseline means come from (default ``batches``).
        per_cell: image K/V means per grid cell (default) or pooled over the image tokens.
        masks_per_forward: masks stacked in one forward (rows = masks x examples of a batch).
        ridge, test_fraction, n_bootstrap: the fit (`fit_head_attribution`).
        single_head, attention: also measure each head alone and its attention to the image.
        journal: a `mechvlm.journal.JournalTask`: the ablation forwards of the batches it
            holds are read back, the others computed and appended (a resumable run; the
            single-head loop is its sub-task ``single``).

    Under an initialised process group (``torchrun``) the batches of the ablation loops are
    shared out over the ranks (`mechvlm.distributed.map_units`); every rank returns the
    one-process result.
    """
    t0 = time.perf_counter()
    batches = [batches] if isinstance(batches, dict) else list(batches)
    reference = batches if reference is None else ([reference] if isinstance(reference, dict) else list(reference))
    ablator = HeadAblator(model, ablation, unit, reference, per_cell, progress)
    masks = sample_masks(n_masks, model.cfg.n_layers, ablator.n_units(), ablate_prob, seed)
    drops, clean, tgts, n_fwd = ablation_drops(model, batches, masks, ablator, targets=targets, foils=foils,
                                               metric=metric, masks_per_forward=masks_per_forward, progress=progress,
                                               journal=journal)
    fit = fit_head_attribution(masks, drops.mean(1), ridge=ridge, test_fraction=test_fraction,
                               n_bootstrap=n_bootstrap, seed=seed)
    single = None
    if single_head:
        eye = torch.eye(masks[0].numel(), dtype=torch.bool).view(-1, *masks.shape[1:])
        s_drops, _, _, n_single = ablation_drops(model, batches, eye, ablator, targets=tgts, foils=foils,
                                                 metric=metric, masks_per_forward=masks_per_forward,
                                                 progress=progress, journal=journal and journal.sub("single"))
        single = s_drops.mean(1).view(masks.shape[1:]).float()
        n_fwd += n_single
    att = _attention_to_image(model, batches, unit) if attention else None
    settings = {"metric": metric, "n_masks": n_masks, "ablate_prob": ablate_prob, "ablation": ablation,
                "unit": unit, "per_cell": per_cell, "masks_per_forward": masks_per_forward, "ridge": ridge,
                "test_fraction": test_fraction, "n_bootstrap": n_bootstrap, "seed": seed,
                "n_examples": int(drops.shape[1])}
    return HeadAttributionResult(masks=masks, drops=drops, clean=clean, targets=tgts, single=single, attention=att,
                                 n_forwards=n_fwd, wall_s=time.perf_counter() - t0, settings=settings, **fit)


def accuracy_with_heads_ablated(model, batches: Sequence[Batch], heads: Sequence[tuple[int, int]], targets, *,
                                ablation: str = "image_kv", unit: str = "query_head", reference=None,
                                per_cell: bool = True, progress: bool = False) -> float:
    """Top-1 accuracy (the argmax at the last position equals the target) with ``heads``
    ablated together (``[]``: the clean accuracy)."""
    batches = list(batches)
    ablator = HeadAblator(model, ablation, unit, batches if reference is None else list(reference), per_cell, progress)
    mask = torch.zeros(1, model.cfg.n_layers, ablator.n_units(), dtype=torch.bool)
    for l, h in heads:
        mask[0, l, h] = True
    n_ex = sum(int(b["input_ids"].shape[0]) for b in batches)
    targets = _as_list(targets, n_ex, "targets")
    hits, seen = 0, 0
    for batch in batches:
        ex = int(batch["input_ids"].shape[0])
        hooks = ablator.for_batch(batch)(mask.repeat_interleave(ex, 0)) if heads else []
        logits = logits_at(model, batch, hooks, last_positions(batch))
        hits += int((logits.argmax(-1).cpu() == torch.tensor(targets[seen:seen + ex])).sum())
        seen += ex
    return hits / seen


def top_vs_random_heads(model, batches: Sequence[Batch], result: HeadAttributionResult, targets, k: int, *,
                        n_random: int = 10, seed: int = 0, reference=None) -> dict:
    """Accuracy with the ``k`` top-attributed heads ablated vs ``n_random`` random sets of
    ``k`` heads (same ablation as ``result``)."""
    kw = dict(ablation=result.settings["ablation"], unit=result.settings["unit"], reference=reference,
              per_cell=result.settings["per_cell"])
    n_units = result.weights.shape[1]
    g = torch.Generator().manual_seed(seed)
    top = result.top_heads(k)
    randoms = []
    for _ in range(n_random):
        pick = torch.randperm(result.weights.numel(), generator=g)[:k].tolist()
        randoms.append(accuracy_with_heads_ablated(model, batches, [(i // n_units, i % n_units) for i in pick],
                                                   targets, **kw))
    return {"k": k, "clean": accuracy_with_heads_ablated(model, batches, [], targets, **kw),
            "top_heads": top, "top": accuracy_with_heads_ablated(model, batches, top, targets, **kw),
            "random_mean": sum(randoms) / len(randoms), "random": randoms}
