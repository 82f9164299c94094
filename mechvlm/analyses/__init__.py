"""Analyses that run many forwards per example: interventions measured over data.

`mechvlm.metrics` reads one forward per batch (attention share, logit lens, ...); an
analysis here runs a family of interventions per example (token budgets, contribution
maps, head attribution, causal tracing, probes on extracted features) and returns a
result dataclass with ``to_dict()``. Each one loops with a progress bar, batches its
forwards, and is checked in the tests against a brute-force or independent reference.

* `image_kv` (+ `kv_store`): image keys / values per layer and KV head on the token grid.
* `probes` (+ `probe_data`, `probe_metrics`): segmentation, correspondence and referring
  probes of those features (seed 002); `key_artifacts`: input-agnostic keys.
* `head_attribution`: random joint head ablations + ridge regression (seed 004).
* `causal_tracing`: clean vs corrupted runs, sites restored in batched forwards.
"""

from mechvlm.analyses.causal_tracing import CausalTraceResult, Site, causal_trace, default_groups, run_sites
from mechvlm.analyses.head_attribution import (HeadAttributionResult, accuracy_with_heads_ablated,
                                               fit_head_attribution, head_attribution, sample_masks,
                                               top_vs_random_heads)
from mechvlm.analyses.image_kv import ImageKV, image_kv
from mechvlm.analyses.key_artifacts import KeyArtifactResult, key_artifacts, replace_artifact_keys
from mechvlm.analyses.kv_baseline import ImageKVBaseline, image_kv_means
from mechvlm.analyses.kv_store import ImageKVStore
from mechvlm.analyses.probe_data import toy_correspondence, toy_referring, toy_segmentation
from mechvlm.analyses.probes import ProbeResult, run_probes, text_prefix_control

__all__ = [
    "CausalTraceResult", "HeadAttributionResult", "ImageKV", "ImageKVBaseline", "ImageKVStore", "KeyArtifactResult",
    "ProbeResult", "Site", "accuracy_with_heads_ablated", "causal_trace", "default_groups", "fit_head_attribution",
    "head_attribution", "image_kv", "image_kv_means", "key_artifacts", "replace_artifact_keys", "run_probes",
    "run_sites", "sample_masks", "text_prefix_control", "top_vs_random_heads", "toy_correspondence",
    "toy_referring", "toy_segmentation",
]
