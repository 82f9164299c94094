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
* `image_kv` (+ `kv_store`): image keys / values per layer and KV head on the token grid.
* `probes` (+ `probe_data`, `probe_metrics`): segmentation, correspondence and referring
  probes of those features (seed 002); `key_artifacts`: input-agnostic keys.
* `head_attribution`: random joint head ablations + ridge regression (seed 004).
* `causal_tracing`: clean vs corrupted runs, sites restored in batched forwards.

Image tokens are dropped from the sequence or masked as keys (`mechvlm.interventions.pruning`);
the token analyses take ``(batch, target_mask)`` pairs from `InputBuilder.with_targets`.
"""

from mechvlm.analyses.causal_tracing import CausalTraceResult, Site, causal_trace, default_groups, run_sites
from mechvlm.analyses.contribution import ContributionResult, token_contribution
from mechvlm.analyses.head_attribution import (HeadAttributionResult, accuracy_with_heads_ablated,
                                               fit_head_attribution, head_attribution, sample_masks,
                                               top_vs_random_heads)
from mechvlm.analyses.image_kv import ImageKV, image_kv
from mechvlm.analyses.key_artifacts import KeyArtifactResult, key_artifacts, replace_artifact_keys
from mechvlm.analyses.kv_baseline import ImageKVBaseline, image_kv_means
from mechvlm.analyses.kv_store import ImageKVStore
from mechvlm.analyses.probe_data import toy_correspondence, toy_referring, toy_segmentation
from mechvlm.analyses.probes import ProbeResult, run_probes, text_prefix_control
from mechvlm.analyses.token_budget import TokenBudgetResult, token_budget
from mechvlm.analyses.token_categories import (TokenCategoriesResult, embedlens_categories, find_sink_dims,
                                               massive_activation_categories)
from mechvlm.analyses.token_selection import STRATEGIES, token_order

__all__ = [
    "STRATEGIES", "CausalTraceResult", "ContributionResult", "HeadAttributionResult", "ImageKV", "ImageKVBaseline",
    "ImageKVStore", "KeyArtifactResult", "ProbeResult", "Site", "TokenBudgetResult", "TokenCategoriesResult",
    "accuracy_with_heads_ablated", "causal_trace", "default_groups", "embedlens_categories", "find_sink_dims",
    "fit_head_attribution", "head_attribution", "image_kv", "image_kv_means", "key_artifacts",
    "massive_activation_categories", "replace_artifact_keys", "run_probes", "run_sites", "sample_masks",
    "text_prefix_control", "token_budget", "token_contribution", "token_order", "top_vs_random_heads",
    "toy_correspondence", "toy_referring", "toy_segmentation",
]
