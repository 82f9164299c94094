"""Analyses that run many forwards per example: interventions measured over data.

`mechvlm.metrics` reads one forward per batch (attention share, logit lens, ...); an
analysis here runs a family of interventions per example (token budgets, contribution
maps, head attribution, causal tracing, probes on extracted features) and returns a
result dataclass with ``to_dict()``. Each one loops with a progress bar, batches its
forwards, and is checked in the tests against a brute-force or independent reference.

* `token_budget`: answer loss vs image tokens kept, four keep strategies (METHODS §8).
* `token_contribution`: loss increase per dropped token / grid row / block (seed 001).
* `embedlens_categories` / `massive_activation_categories`: sink, dead and alive visual
  tokens (METHODS §10-11).

Image tokens are dropped from the sequence or masked as keys (`mechvlm.interventions.pruning`);
the analyses take ``(batch, target_mask)`` pairs from `InputBuilder.with_targets`.
"""

from mechvlm.analyses.contribution import ContributionResult, token_contribution
from mechvlm.analyses.token_budget import TokenBudgetResult, token_budget
from mechvlm.analyses.token_categories import (TokenCategoriesResult, embedlens_categories, find_sink_dims,
                                               massive_activation_categories)
from mechvlm.analyses.token_selection import STRATEGIES, token_order

__all__ = [
    "STRATEGIES", "ContributionResult", "TokenBudgetResult", "TokenCategoriesResult", "embedlens_categories",
    "find_sink_dims", "massive_activation_categories", "token_budget", "token_contribution", "token_order",
]
