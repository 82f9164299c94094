"""Gated MLP (SwiGLU / GeGLU) with TransformerLens hook points."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformers.activations import ACT2FN

from mechvlm.hook_points import HookPoint


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``, no biases.

    Weights are stored as HF lays them out (``nn.Linear``), so the matmuls are the same ops
    HF runs. TransformerLens-style views: ``W_gate``, ``W_in`` ``[d_model, d_mlp]``,
    ``W_out`` ``[d_mlp, d_model]``.

    Hooks:
        hook_pre: ``[batch, pos, d_mlp]`` gate pre-activation ``gate(x)``.
        hook_pre_linear: ``[batch, pos, d_mlp]`` the linear branch ``up(x)``.
        hook_post: ``[batch, pos, d_mlp]`` ``act(pre) * pre_linear``, the input of ``down``.
    """

    def __init__(self, d_model: int, d_mlp: int, act_fn: str):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_mlp, bias=False)
        self.up_proj = nn.Linear(d_model, d_mlp, bias=False)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=False)
        self.act = ACT2FN[act_fn]
        self.hook_pre = HookPoint()
        self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        # As HF's one-liner: the gate pre-activation is dropped once activated, before up(x) is
        # computed, so at most three [pos, d_mlp] tensors are alive (holding it made four).
        activated = self.act(self.hook_pre(self.gate_proj(x)))
        post = self.hook_post(activated * self.hook_pre_linear(self.up_proj(x)))
        return self.down_proj(post)

    @property
    def W_gate(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.gate_proj.weight.T

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.up_proj.weight.T

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.down_proj.weight.T

    @property
    def b_in(self) -> Float[Tensor, " d_mlp"]:
        return self.up_proj.weight.new_zeros(self.up_proj.out_features)

    @property
    def b_out(self) -> Float[Tensor, " d_model"]:
        return torch.zeros(self.down_proj.out_features, dtype=self.down_proj.weight.dtype,
                           device=self.down_proj.weight.device)
