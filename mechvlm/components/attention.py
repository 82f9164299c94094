"""Grouped-query attention with TransformerLens hook points and two backends.

Backends:
    * SDPA (``torch.nn.functional.scaled_dot_product_attention``) whenever nothing needs
      the attention scores or pattern: no ``[q, k]`` score matrix is materialised.
    * Explicit ``softmax(q k^T * scale + mask)`` whenever a hook is attached to
      ``hook_attn_scores`` or ``hook_pattern`` (the HF eager computation, op for op).
    * Post-softmax zeroing in bounded memory when the only hooks at ``hook_pattern`` are
      `PostSoftmaxCut` edits (the ``post_softmax_zero`` knockout): SDPA over the kept keys,
      then the rows that lost keys scaled by the mass they kept; no pattern materialised.
      Any other hook at ``hook_pattern`` (a cache, a user edit) brings back the explicit
      path, where the cuts run as ordinary hooks in list order.

The choice is made per layer and per forward from the hooks attached at that moment.

KV cache: with a cache entry, a forward holds only the new positions. Every hook fires.
``hook_q/k/v``, ``hook_rot_q/k``, ``hook_z``, ``hook_result`` see ``[batch, new_pos, ...]``;
``hook_attn_mask``, ``hook_attn_scores``, ``hook_pattern`` see ``[batch, head, new_pos,
cached + new_pos]``. The entry stores the keys after ``hook_rot_k`` and the values after
``hook_v``: an edit there (or at ``hook_k``) is what every later step reads, and the
cached keys are never re-hooked.
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

from mechvlm.components.attention_mask import AttentionMask
from mechvlm.components.rotary import apply_rotary
from mechvlm.components.post_softmax import PostSoftmaxCut, row_chunk, softmax_rows
from mechvlm.hook_points import HookPoint


def _mask_shape_rule(n_heads: int):
    def rule(act: torch.Size, out: torch.Size) -> bool:
        return len(out) == 4 and out[0] == act[0] and out[1] in (1, n_heads) and out[2:] == act[2:]

    return rule


def repeat_kv(x: Float[Tensor, "batch kv pos d"], n_rep: int) -> Float[Tensor, "batch head pos d"]:
    if n_rep == 1:
        return x
    b, kv, p, d = x.shape
    return x[:, :, None].expand(b, kv, n_rep, p, d).reshape(b, kv * n_rep, p, d)


class Attention(nn.Module):
    """Causal self-attention of one layer.

    Weights are ``nn.Linear`` in HF layout (q/k/v with bias for Qwen, o without);
    TransformerLens views ``W_Q``, ``W_K``, ``W_V`` ``[head, d_model, d_head]``, ``W_O``
    ``[head, d_head, d_model]`` and ``b_Q/b_K/b_V``, ``b_O`` are properties. As in
    TransformerLens' grouped-query attention, ``W_K``/``W_V``/``b_K``/``b_V`` are repeated to
    the query heads (query head ``h`` reads KV head ``h // (head / kv_head)``), so
    ``FactoredMatrix(W_Q, W_K.mT)`` is the per-head QK circuit; ``_W_K``/``_W_V``/``_b_K``/
    ``_b_V`` are the raw ``[kv_head, ...]`` weights.

    Hooks (``head`` = query heads, ``kv_head`` = key/value heads under GQA):
        hook_q: ``[batch, pos, head, d_head]`` queries before RoPE (after q_norm if any).
        hook_k, hook_v: ``[batch, pos, kv_head, d_head]`` before RoPE.
        hook_rot_q, hook_rot_k: the same after RoPE.
        hook_attn_mask: ``[batch, 1, q, k]`` bool, True = may attend. A hook may return
            ``[batch, 1 | head, q, k]``. Computed only when hooked.
        hook_attn_scores: ``[batch, head, q, k]`` ``q.k * scale`` with disallowed entries
            set to ``finfo(dtype).min`` (as HF eager; not -inf, so no NaN on empty rows).
        hook_pattern: ``[batch, head, q, k]`` softmax (fp32, cast back). Rows with no
            allowed key (left-padding queries) are all zero, as SDPA returns them.
        hook_z: ``[batch, pos, head, d_head]`` the pattern-weighted values.
        hook_result: ``[batch, pos, head, d_model]`` what each head adds to the residual;
            exists only when ``cfg.use_attn_result`` (see ``HookedVLM.set_use_attn_result``).
            With a sandwich post-norm (Gemma3's ``ln1_post``) each head's ``z @ W_O`` goes
            through that norm at the layer's actual scale (`RMSNorm.forward_parts`), so the
            heads sum to ``hook_attn_out``.

    ``forward(..., qkv_inputs=(q_in, k_in, v_in))`` takes per-head inputs (already
    normalised) ``[batch, pos, head | kv_head, d_model]`` instead of ``x``: TransformerLens'
    ``use_split_qkv_input`` / ``use_attn_in``.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, d_head: int, scale: float,
                 window: int | None = None, qkv_bias: bool = True, q_norm: nn.Module | None = None,
                 k_norm: nn.Module | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_head
        self.scale = scale
        self.window = window
        self.q_proj = nn.Linear(d_model, n_heads * d_head, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * d_head, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * d_head, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * d_head, d_model, bias=False)
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_rot_q = HookPoint()
        self.hook_rot_k = HookPoint()
        self.hook_attn_mask = HookPoint(shape_rule=_mask_shape_rule(n_heads))
        self.hook_attn_mask.n_heads = n_heads  # lets a mask edit target single heads
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()
        self.hook_result: HookPoint | None = None

    def post_softmax_cuts(self) -> list[PostSoftmaxCut] | None:
        """The hooks at ``hook_pattern`` when every one is a `PostSoftmaxCut` (forward only):
        the layer can then run without materialising its pattern. Else None."""
        point = self.hook_pattern
        if not point.fwd_hooks or point.bwd_hooks:
            return None
        fns = [getattr(h.user_hook, "fn", h.user_hook) for h in point.fwd_hooks]
        return fns if all(isinstance(f, PostSoftmaxCut) for f in fns) else None

    def needs_pattern(self) -> bool:
        """True when this layer must materialise scores and pattern: a hook reads or edits
        ``hook_attn_scores``, or ``hook_pattern`` holds a hook other than `PostSoftmaxCut`s."""
        return self.hook_attn_scores.is_observed() or (
            self.hook_pattern.is_observed() and self.post_softmax_cuts() is None)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"] | None,
        rope: tuple[Tensor, Tensor],
        mask: AttentionMask,
        *,
        qkv_inputs: tuple[Tensor, Tensor, Tensor] | None = None,
        post_norm: nn.Module | None = None,
        kv_cache=None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``kv_cache``: this layer's `mechvlm.kv_cache.VLMKeyValueCacheEntry` (or None).
        With it, ``x`` holds only the new positions; their keys (after ``hook_rot_k``) and
        values (after ``hook_v``) are appended to the entry, and attention runs over every
        cached key. Without it, the forward is the whole sequence."""
        if qkv_inputs is None:
            b, p, _ = x.shape
            q = self.q_proj(x).view(b, p, self.n_heads, self.d_head)
            k = self.k_proj(x).view(b, p, self.n_kv_heads, self.d_head)
            v = self.v_proj(x).view(b, p, self.n_kv_heads, self.d_head)
        else:
            q_in, k_in, v_in = qkv_inputs
            b, p = q_in.shape[:2]
            per_head = "b p head d_model, head d_model d_head -> b p head d_head"
            q = einops.einsum(q_in, self.W_Q, per_head) + self.b_Q
            # K/V inputs per KV head (split qkv), or per query head (attn_in): then every
            # query head gets its own K/V, from its own copy of the input
            grouped = k_in.shape[2] == self.n_kv_heads
            k = einops.einsum(k_in, self._W_K if grouped else self.W_K, per_head) + (self._b_K if grouped else self.b_K)
            v = einops.einsum(v_in, self._W_V if grouped else self.W_V, per_head) + (self._b_V if grouped else self.b_V)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        cos, sin = rope
        q = self.hook_rot_q(apply_rotary(q, cos, sin))
        k = self.hook_rot_k(apply_rotary(k, cos, sin))
        # heads-first [batch, head, pos, d_head] from here on (SDPA's layout, the cache's)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)

        allowed = None
        if self.hook_attn_mask.is_observed():
            # a copy: the dense mask is shared by all layers, an in-place edit must stay here
            allowed = self.hook_attn_mask(mask.dense(self.window).clone())
        explicit = self.needs_pattern()
        cuts = None if explicit else self.post_softmax_cuts()
        if explicit:
            if allowed is None:
                allowed = mask.dense(self.window)
            may_have_empty_rows = mask.key_padding is not None or self.hook_attn_mask.is_observed()
            z = self._explicit(q, k, v, allowed, may_have_empty_rows)
        elif cuts:
            z = self._post_softmax_zero(q, k, v, allowed if allowed is not None else mask.dense(self.window), cuts)
        elif allowed is not None:
            z = self._sdpa(q, k, v, allowed, is_causal=False)
        else:
            z = self._sdpa(q, k, v, *mask.sdpa_args(self.window))
        z = self.hook_z(z.transpose(1, 2))
        if self.hook_result is not None and self.hook_result.is_observed():
            result = einops.einsum(z, self.W_O, "b p head d_head, head d_head d_model -> b p head d_model")
            if post_norm is not None:
                result = post_norm.forward_parts(result)
            return self.hook_result(result).sum(dim=2)
        out = self.o_proj(z.reshape(b, p, self.n_heads * self.d_head))
        return post_norm(out) if post_norm is not None else out

    def _sdpa(self, q, k, v, allowed: Bool[Tensor, "batch h q k"] | None, is_causal: bool) -> Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, is_causal=is_causal, scale=self.scale,
            enable_gqa=k.shape[1] != self.n_heads,
        )

    def _explicit(self, q, k, v, allowed: Bool[Tensor, "batch h q k"], zero_empty_rows: bool) -> Tensor:
        rep = self.n_heads // k.shape[1]
        k = repeat_kv(k, rep)
        v = repeat_kv(v, rep)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        scores = self.hook_attn_scores(scores)
        pattern = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if zero_empty_rows:  # a query with no allowed key gets 0, as SDPA returns it
            pattern = pattern * allowed.any(dim=-1, keepdim=True)
        pattern = self.hook_pattern(pattern)
        return torch.matmul(pattern, v)

    def _post_softmax_zero(self, q, k, v, allowed: Bool[Tensor, "batch h q k"],
                           cuts: list[PostSoftmaxCut]) -> Tensor:
        """``softmax(scores) * ~cut @ v`` without the pattern: SDPA over the kept keys gives
        each row normalised over what it kept; a row that lost keys is then scaled by the
        attention mass it kept, ``sum_kept softmax(scores)``, computed for those rows only,
        in chunks (`softmax_rows`)."""
        n_q, n_k = q.shape[2], k.shape[2]
        cut = None
        for c in cuts:
            part = c.cut(q.shape[0], self.n_heads, n_q, n_k, q.device, self.hook_pattern.name)
            cut = part if cut is None else cut | part
        cut = cut & allowed
        kept = allowed & ~cut
        z = self._sdpa(q, k, v, kept, is_causal=False)
        rows = cut.flatten(0, 1).any(-1).any(0).nonzero().squeeze(-1)  # queries that lost keys
        if not len(rows):
            return z
        b = q.shape[0]
        scale = torch.ones(b, self.n_heads, n_q, dtype=torch.float32, device=q.device)
        step = row_chunk(b, self.n_heads, n_k)
        for s in range(0, len(rows), step):
            idx = rows[s:s + step]
            probs = softmax_rows(q[:, :, idx], k, allowed[:, :, idx], self.scale)
            scale[:, :, idx] = (probs * kept[:, :, idx]).sum(-1)
        return z * scale[..., None].to(z.dtype)

    # TransformerLens weight views -------------------------------------------------------
    def _heads_in(self, lin: nn.Linear, n: int) -> Tensor:
        return einops.rearrange(lin.weight, "(head d_head) d_model -> head d_model d_head", head=n)

    def _bias(self, lin: nn.Linear, n: int) -> Tensor:
        if lin.bias is None:
            return lin.weight.new_zeros(n, self.d_head)
        return lin.bias.view(n, self.d_head)

    @property
    def W_Q(self) -> Float[Tensor, "head d_model d_head"]:
        return self._heads_in(self.q_proj, self.n_heads)

    def _to_query_heads(self, t: Tensor) -> Tensor:
        return t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)

    @property
    def _W_K(self) -> Float[Tensor, "kv_head d_model d_head"]:
        return self._heads_in(self.k_proj, self.n_kv_heads)

    @property
    def _W_V(self) -> Float[Tensor, "kv_head d_model d_head"]:
        return self._heads_in(self.v_proj, self.n_kv_heads)

    @property
    def W_K(self) -> Float[Tensor, "head d_model d_head"]:
        return self._to_query_heads(self._W_K)

    @property
    def W_V(self) -> Float[Tensor, "head d_model d_head"]:
        return self._to_query_heads(self._W_V)

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        return einops.rearrange(self.o_proj.weight, "d_model (head d_head) -> head d_head d_model",
                                head=self.n_heads)

    @property
    def b_Q(self) -> Float[Tensor, "head d_head"]:
        return self._bias(self.q_proj, self.n_heads)

    @property
    def _b_K(self) -> Float[Tensor, "kv_head d_head"]:
        return self._bias(self.k_proj, self.n_kv_heads)

    @property
    def _b_V(self) -> Float[Tensor, "kv_head d_head"]:
        return self._bias(self.v_proj, self.n_kv_heads)

    @property
    def b_K(self) -> Float[Tensor, "head d_head"]:
        return self._to_query_heads(self._b_K)

    @property
    def b_V(self) -> Float[Tensor, "head d_head"]:
        return self._to_query_heads(self._b_V)

    @property
    def OV(self):
        """The per-head OV circuit ``W_V @ W_O`` as a TransformerLens ``FactoredMatrix``."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self):
        """The per-head QK circuit ``W_Q @ W_K^T`` (before RoPE) as a ``FactoredMatrix``."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def b_O(self) -> Float[Tensor, " d_model"]:
        return self.o_proj.weight.new_zeros(self.o_proj.out_features)
