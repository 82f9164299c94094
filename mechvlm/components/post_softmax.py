"""Post-softmax attention rows of selected queries, and the `PostSoftmaxCut` hook protocol.

`softmax_rows` computes ``softmax(q k^T * scale)`` for a few query rows under a boolean
mask, in fp32, without the rest of the pattern. The streaming metrics read attention this
way, and `Attention` uses it to rescale the rows a post-softmax knockout touches.

`PostSoftmaxCut` is the base of a ``hook_pattern`` edit that zeroes a boolean selection of
the pattern without renormalising (seed 000 Eq. 3-4 as written). Called as a hook it does
exactly that on a materialised pattern; but when every hook at a layer's ``hook_pattern`` is
one, `Attention` never materialises the pattern: it runs SDPA over the kept keys and scales
each touched row by the attention mass it kept (the same numbers, in bounded memory).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

#: fp32 elements of one chunk of score rows (16 MiB; its softmax temporaries hold a few times
#: that): the rows of a post-softmax knockout are computed in chunks of at most this size.
ROW_CHUNK_ELEMENTS = 1 << 22


def softmax_rows(
    q: Float[Tensor, "batch head query d_head"],
    k: Float[Tensor, "batch kv_head key d_head"],
    allowed: Bool[Tensor, "batch one_or_head query key"],
    scale: float,
) -> Float[Tensor, "batch head query key"]:
    """``softmax(q . k^T * scale)`` over the allowed keys, fp32, heads-first layout.

    Grouped-query attention maps query head ``h`` to key head ``h // (head / kv_head)`` (as
    ``repeat_kv``); a row with no allowed key is all zero (as SDPA returns it).
    """
    b, h, c, d = q.shape
    kv, n = k.shape[1], k.shape[2]
    rep = h // kv
    qf = q.float().reshape(b, kv, rep * c, d)  # each key head serves its `rep` query heads
    scores = torch.matmul(qf, k.float().transpose(-1, -2)).reshape(b, h, c, n) * scale
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    rows = torch.softmax(scores, dim=-1)
    return rows * allowed.any(dim=-1, keepdim=True)


def row_chunk(batch: int, heads: int, keys: int) -> int:
    """Query rows per chunk so that a chunk of fp32 score rows stays within the budget."""
    return max(1, ROW_CHUNK_ELEMENTS // max(1, batch * heads * keys))


class PostSoftmaxCut:
    """A ``hook_pattern`` edit that zeroes ``cut(...)`` after the softmax (no renormalisation).

    Subclasses implement `cut`. As a hook it edits a materialised pattern; `Attention` also
    reads `cut` directly to run the layer without materialising the pattern (see the module
    docstring), so `cut` must depend only on the shapes it is given, not on the pattern.
    """

    def cut(self, batch: int, n_heads: int, n_queries: int, n_keys: int, device: torch.device,
            where: str = "") -> Bool[Tensor, "batch h q k"]:
        """Broadcastable ``[batch, 1 | head, n_queries, n_keys]``: True = set to zero
        (``where``: the hook point's name, for error messages)."""
        raise NotImplementedError

    def __call__(self, pattern: Tensor, hook) -> Tensor:
        b, h, q, k = pattern.shape
        return pattern.masked_fill(self.cut(b, h, q, k, pattern.device, hook.name), 0.0)
