"""Model-level weight views of `HookedVLM`, in TransformerLens' shapes.

Every stack is a fresh tensor built from the blocks' views (``[n_layers, ...]``), so
editing it does not edit the model. As TransformerLens does for grouped-query attention,
``W_K``/``W_V``/``b_K``/``b_V`` are repeated to the query heads; ``_W_K``/``_W_V``/``_b_K``/
``_b_V`` hold the raw per-KV-head weights.

The unembedding reads the residual stream after ``ln_final``. Only once ``fold_ln`` has
moved that norm's weight into ``W_U`` (`mechvlm.fold_ln`) is ``tokens_to_residual_directions``
the direction that TransformerLens' attribution helpers take it for.
"""

from __future__ import annotations

import einops
import torch
from jaxtyping import Float
from torch import Tensor


class WeightsMixin:
    """``W_Q ... b_U``, ``OV``/``QK`` and the residual-direction helpers."""

    def _stack(self, get) -> Tensor:
        return torch.stack([get(block) for block in self.blocks], dim=0)

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self.unembed.b_U

    @property
    def W_Q(self) -> Float[Tensor, "n_layers head d_model d_head"]:
        return self._stack(lambda b: b.attn.W_Q)

    @property
    def W_K(self) -> Float[Tensor, "n_layers head d_model d_head"]:
        return self._stack(lambda b: b.attn.W_K)

    @property
    def W_V(self) -> Float[Tensor, "n_layers head d_model d_head"]:
        return self._stack(lambda b: b.attn.W_V)

    @property
    def _W_K(self) -> Float[Tensor, "n_layers kv_head d_model d_head"]:
        return self._stack(lambda b: b.attn._W_K)

    @property
    def _W_V(self) -> Float[Tensor, "n_layers kv_head d_model d_head"]:
        return self._stack(lambda b: b.attn._W_V)

    @property
    def W_O(self) -> Float[Tensor, "n_layers head d_head d_model"]:
        return self._stack(lambda b: b.attn.W_O)

    @property
    def b_Q(self) -> Float[Tensor, "n_layers head d_head"]:
        return self._stack(lambda b: b.attn.b_Q)

    @property
    def b_K(self) -> Float[Tensor, "n_layers head d_head"]:
        return self._stack(lambda b: b.attn.b_K)

    @property
    def b_V(self) -> Float[Tensor, "n_layers head d_head"]:
        return self._stack(lambda b: b.attn.b_V)

    @property
    def _b_K(self) -> Float[Tensor, "n_layers kv_head d_head"]:
        return self._stack(lambda b: b.attn._b_K)

    @property
    def _b_V(self) -> Float[Tensor, "n_layers kv_head d_head"]:
        return self._stack(lambda b: b.attn._b_V)

    @property
    def b_O(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack(lambda b: b.attn.b_O)

    @property
    def W_in(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._stack(lambda b: b.mlp.W_in)

    @property
    def W_gate(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._stack(lambda b: b.mlp.W_gate)

    @property
    def W_out(self) -> Float[Tensor, "n_layers d_mlp d_model"]:
        return self._stack(lambda b: b.mlp.W_out)

    @property
    def b_in(self) -> Float[Tensor, "n_layers d_mlp"]:
        return self._stack(lambda b: b.mlp.b_in)

    @property
    def b_out(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack(lambda b: b.mlp.b_out)

    @property
    def QK(self):
        """``FactoredMatrix(W_Q, W_K^T)`` ``[n_layers, head, d_model, d_model]`` (before RoPE)."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self):
        """``FactoredMatrix(W_V, W_O)`` ``[n_layers, head, d_model, d_model]``."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    def tl_parameters(self) -> dict[str, Tensor]:
        """TransformerLens-named weights (``embed.W_E``, ``blocks.{l}.attn.W_Q`` ..., ``unembed.W_U``;
        ``blocks.{l}.ln1.w``/``ln2.w`` and ``ln_final.w`` only while not folded), what
        `SVDInterpreter` reads. Views: an edit edits the model."""
        out = {"embed.W_E": self.W_E}
        for l, b in enumerate(self.blocks):
            p = f"blocks.{l}."
            for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
                out[p + "attn." + name] = getattr(b.attn, name)
            for name in ("W_in", "W_gate", "W_out", "b_in", "b_out"):
                out[p + "mlp." + name] = getattr(b.mlp, name)
            if not self.cfg.ln_folded:
                out[p + "ln1.w"], out[p + "ln2.w"] = b.ln1.w, b.ln2.w
        if not self.cfg.ln_folded:
            out["ln_final.w"] = self.ln_final.w
        out["unembed.W_U"], out["unembed.b_U"] = self.W_U, self.b_U
        return out

    # ------------------------------------------------------------ residual directions --
    def tokens_to_residual_directions(self, tokens: str | int | Tensor) -> Tensor:
        """The ``W_U`` columns of ``tokens``: ``[d_model]`` for a str, an int or a scalar
        tensor, ``[..., d_model]`` for a ``[k]`` or ``[batch, k]`` tensor (TL's layout)."""
        if isinstance(tokens, Tensor) and tokens.numel() > 1:
            return einops.rearrange(self.W_U[:, tokens.to(self.W_U.device)], "d_model ... -> ... d_model")
        if isinstance(tokens, str):
            token = self.to_single_token(tokens)
        elif isinstance(tokens, int):
            token = tokens
        elif isinstance(tokens, Tensor) and tokens.numel() == 1:
            token = int(tokens.item())
        else:
            raise ValueError(f"Invalid token type: {type(tokens)}")
        return self.W_U[:, token]

    def accumulated_bias(self, layer: int, mlp_input: bool = False,
                         include_mlp_biases: bool = True) -> Float[Tensor, " d_model"]:
        """Sum of the output biases (``b_O``, ``b_out``) written to the residual before
        ``layer`` (TL's definition; with ``mlp_input`` also layer's ``b_O``). Both families
        have none, so this is zero; q/k/v biases act inside the heads' results."""
        out = torch.zeros(self.cfg.d_model, device=self.device, dtype=self.dtype)
        for i in range(layer):
            out = out + self.blocks[i].attn.b_O
            if include_mlp_biases:
                out = out + self.blocks[i].mlp.b_out
        if mlp_input:
            assert layer < self.cfg.n_layers, "Cannot include attn_bias from beyond the final layer"
            out = out + self.blocks[layer].attn.b_O
        return out
