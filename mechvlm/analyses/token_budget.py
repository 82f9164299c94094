"""Number of visual tokens vs LM loss (seed 001; METHODS §8).

Keep ``k`` tokens of every image (the first ``k`` of a strategy's ranking,
`mechvlm.analyses.token_selection`), drop the others -- removed from the sequence or masked
as keys (`mechvlm.interventions.pruning`) -- and measure the cross-entropy of the answer /
caption tokens. One forward per (strategy, draw, budget) and loss batch, plus one for the
full input and one for the attention ranking when ``top_attention`` is asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechvlm.analyses._common import DROP_MODES, LossBatch, image_features, loss_batch_list, loss_without, row_losses
from mechvlm.analyses.token_selection import STRATEGIES, check_strategies, received_scores, token_order
from mechvlm.distributed import map_units
from mechvlm.image_layout import check_one_grid_images
from mechvlm.metrics._common import frame


@dataclass
class TokenBudgetResult:
    """Answer loss with ``k`` image tokens kept per image.

    Attributes:
        loss: ``[strategy, budget, draw, example]`` mean cross-entropy of each example's
            target tokens (NaN for the draws a deterministic strategy does not have).
        full_loss: ``[example]`` with every image token.
        kept_fraction: ``[budget]`` kept tokens / image tokens, averaged over images.
        budgets: the ``ks`` (tokens per image, capped at the image's size) or ``fractions``
            (of each image's tokens, rounded, at least 1 when > 0) as given; ``budget_kind``
            says which.
        strategies, draws (of ``random``; the others have one), mode (``removed`` or
        ``masked``), seed; n_forwards: forwards run, every one counted.
    """

    loss: Float[Tensor, "strategy budget draw example"]
    full_loss: Float[Tensor, " example"]
    kept_fraction: Float[Tensor, " budget"]
    budgets: list
    budget_kind: str
    strategies: list[str]
    draws: int
    mode: str
    seed: int
    n_forwards: int

    @property
    def draw_loss(self) -> Float[Tensor, "strategy budget draw"]:
        """Mean over examples, per draw."""
        return self.loss.nanmean(-1)

    @property
    def mean_loss(self) -> Float[Tensor, "strategy budget"]:
        """loss(k): the example mean, averaged over draws."""
        return self.draw_loss.nanmean(-1)

    @property
    def std_loss(self) -> Float[Tensor, "strategy budget"]:
        """Sample std over draws of the example-mean loss (0 for a deterministic strategy)."""
        out = torch.zeros(self.draw_loss.shape[:2])
        for s, name in enumerate(self.strategies):
            if name == "random" and self.draws > 1:
                out[s] = self.draw_loss[s].std(-1)
        return out

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in (
            "loss", "full_loss", "kept_fraction", "budgets", "budget_kind", "strategies", "draws", "mode",
            "seed", "n_forwards", "mean_loss", "std_loss")}

    def to_frame(self):
        """Long format: one row per (strategy, budget) with the mean and std over draws."""
        rows = []
        for s, name in enumerate(self.strategies):
            for b, budget in enumerate(self.budgets):
                rows.append({"strategy": name, self.budget_kind: budget,
                             "kept_fraction": float(self.kept_fraction[b]),
                             "loss": float(self.mean_loss[s, b]), "std": float(self.std_loss[s, b])})
        return frame(rows)


def _kept(n: int, budget, kind: str) -> int:
    return min(int(budget), n) if kind == "k" else (0 if budget <= 0 else max(1, min(n, round(budget * n))))


def _check_budgets(ks, fractions, mode):
    if (ks is None) == (fractions is None):
        raise ValueError("give exactly one of ks (tokens kept per image) or fractions (of each image's tokens)")
    kind, budgets = ("k", list(ks)) if ks is not None else ("fraction", list(fractions))
    if not budgets:
        raise ValueError("an empty budget grid")
    for b in budgets:
        if kind == "k" and (isinstance(b, bool) or int(b) != b or b < 0):
            raise ValueError(f"ks must be non-negative integers, got {b!r}")
        if kind == "fraction" and not 0.0 <= float(b) <= 1.0:
            raise ValueError(f"fractions must be in [0, 1], got {b!r}")
        if mode == "removed" and float(b) == 0:
            raise ValueError("mode='removed' keeps at least one token per image (an empty image has no "
                             "positions the model would assign); use mode='masked' for a budget of 0")
    return kind, budgets


@torch.no_grad()
def token_budget(
    model,
    batches: LossBatch | Iterable[LossBatch],
    *,
    ks: Sequence[int] | None = None,
    fractions: Sequence[float] | None = None,
    strategies: Sequence[str] | str = STRATEGIES,
    draws: int = 3,
    seed: int = 0,
    mode: str = "removed",
    progress: bool = True,
    journal=None,
) -> TokenBudgetResult:
    """Loss of the target tokens when every image keeps only some of its tokens.

    Args:
        model: a `HookedVLM`.
        batches: ``(batch, target_mask)`` pairs (`InputBuilder.with_targets`), or one pair.
        ks / fractions: the budget grid, exactly one of them: tokens kept per image, or a
            fraction of each image's tokens.
        strategies: which tokens are kept (`mechvlm.analyses.token_selection.STRATEGIES`).
            ``top_attention`` ranks by the attention received from the prompt's text tokens
            (text that is not a target), on the full input.
        draws: random orders per example for ``random`` (seeded by ``seed``).
        mode: ``"removed"`` (from the sequence, positions as the model assigns them) or
            ``"masked"`` (as keys); see `mechvlm.interventions.pruning`.
        progress: a tqdm bar over the batches.
        journal: a `mechvlm.journal.JournalTask`: batches it holds are read back, the
            others computed and appended (a resumable run).

    Batch ``i``'s random orders are drawn from a generator seeded with ``(seed, i)``, so
    under an initialised process group (``torchrun``) the batches are shared out over the
    ranks (`mechvlm.distributed.map_units`) and every rank returns the one-process result.
    """
    if mode not in DROP_MODES:
        raise ValueError(f"mode must be one of {DROP_MODES}, got {mode!r}")
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    kind, budgets = _check_budgets(ks, fractions, mode)
    strategies = check_strategies(strategies)

    def one_batch(unit) -> dict:
        index, (batch, target) = unit
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)  # per batch: shardable, resumable
        roles = model.roles(**batch)
        check_one_grid_images(roles.spans, "token_budget")
        if not roles.spans:
            raise ValueError(f"loss batch {index} holds no image: the token budget needs image tokens")
        batch = dict(batch, image_embeds=image_features(model, batch))  # the tower runs once per batch
        full = row_losses(model, batch, target)
        n_forwards = 1
        scores = None
        if "top_attention" in strategies:
            prompt_text = roles.text & ~target.to(roles.text.device)
            scores = received_scores(model, batch, roles, prompt_text)
            n_forwards += 1
        spans = sorted(roles.spans, key=lambda s: s.image)
        fracs = torch.tensor([[_kept(s.n_tokens, b, kind) / s.n_tokens for s in spans] for b in budgets])
        per = torch.full((len(strategies), len(budgets), draws, roles.shape[0]), float("nan"))
        for si, strategy in enumerate(strategies):
            for d in range(draws if strategy == "random" else 1):
                orders = [token_order(strategy, s, generator=gen,
                                      scores=None if scores is None else scores[s.row, s.start:s.stop])
                          for s in spans]
                for bi, budget in enumerate(budgets):
                    drop = torch.zeros(roles.shape, dtype=torch.bool)
                    for s, order in zip(spans, orders):
                        drop[s.row, s.start + order[_kept(s.n_tokens, budget, kind):]] = True
                    per[si, bi, d] = loss_without(model, batch, target, roles, drop, mode)
                    n_forwards += 1
        return {"loss": per, "full": full, "fracs": fracs, "n_forwards": n_forwards}

    parts = map_units(one_batch, list(enumerate(loss_batch_list(batches))), journal=journal,
                      progress=progress, desc="token_budget")
    losses, full, fracs = ([p[k] for p in parts] for k in ("loss", "full", "fracs"))
    n_forwards = sum(p["n_forwards"] for p in parts)
    return TokenBudgetResult(
        loss=torch.cat(losses, dim=-1), full_loss=torch.cat(full), kept_fraction=torch.cat(fracs, 1).mean(1),
        budgets=budgets, budget_kind=kind, strategies=strategies, draws=draws, mode=mode, seed=seed,
        n_forwards=n_forwards)

