"""Streaming attention and representation metrics over batches of a `HookedVLM`.

Every metric is ``metric(model, batches, ...)``: ``batches`` is one batch dict (the keyword
arguments of ``model(**batch)``) or an iterable of them. Metrics run under
``torch.no_grad()``, compute inside hooks on the model's device, keep only small
per-example results (moved to CPU), show a tqdm bar (``progress=False``), and compose with
interventions through ``fwd_hooks=`` (a hook list, or ``(batch, roles) -> hook list``).

* `attention_share`: Eq. 1-2 of seed 000, per layer x head x key role (METHODS §1).
* `attention_share_conditions`: the same under several conditions (Table 1's knockouts),
  one prefill of the prompt prefix they share per batch.
* `received_attention`: attention received per image token, cumulative curves (§2).
* `logit_lens`: top-k tokens of intermediate residuals at image positions (§6).
* `visual_text_similarity`: cosine of image hidden states to text embeddings (§7).
"""

from mechvlm.metrics.attention_rows import QueryAttention, query_attention_rows
from mechvlm.metrics.attention_share import AttentionShareResult, attention_share
from mechvlm.metrics.attention_share_conditions import ConditionsAttentionShare, attention_share_conditions
from mechvlm.metrics.logit_lens import LogitLensResult, logit_lens
from mechvlm.metrics.received_attention import ReceivedAttentionResult, received_attention
from mechvlm.metrics.similarity import VisualTextSimilarityResult, visual_text_similarity

__all__ = [
    "AttentionShareResult",
    "ConditionsAttentionShare",
    "LogitLensResult",
    "QueryAttention",
    "ReceivedAttentionResult",
    "VisualTextSimilarityResult",
    "attention_share",
    "attention_share_conditions",
    "logit_lens",
    "query_attention_rows",
    "received_attention",
    "visual_text_similarity",
]
