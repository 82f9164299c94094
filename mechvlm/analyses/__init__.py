"""Analyses that run many forwards per example: interventions measured over data.

`mechvlm.metrics` reads one forward per batch (attention share, logit lens, ...); an
analysis here runs a family of interventions per example (token budgets, contribution
maps, head attribution, causal tracing, probes on extracted features) and returns a
result dataclass with ``to_dict()``. Each one loops with a progress bar, batches its
forwards, and is checked in the tests against a brute-force or independent reference.
"""

__all__: list[str] = []
