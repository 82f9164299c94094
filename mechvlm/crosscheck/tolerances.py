"""Tolerances of the cross-check, per dtype and quantity.

Both sides run the same weights, the same inputs and the same math in the same dtype;
they differ only in the order of some floating-point operations (mechvlm's RMSNorm
divides by the scale where HF multiplies by ``rsqrt``; GQA through SDPA's
``enable_gqa`` where HF repeats K/V; the bool-mask SDPA path where HF adds a float mask).
A check passes when ``max_abs <= atol + rtol * max|HF|`` over the compared entries
(real tokens; for patterns, real query x real key).

float32 (unit roundoff 6e-8): differences stay at a few 1e-6 on the tiny test models.
    logits / residual stream / knockout logits: ``atol 1e-4`` plus ``rtol 1e-5`` so that
    real checkpoints (residual entries in the thousands on "massive activation" tokens,
    logits around 30) are not held to an absolute bound their magnitudes make
    meaningless. Patterns and shares are probabilities in [0, 1]: ``atol 1e-5``.
bfloat16 (8 mantissa bits, unit roundoff 2**-9 = 2e-3): one rounding of a residual entry
    is already 0.4% of its size, and a different rounding in one layer propagates
    through every later one. The two sides are only expected to agree to a few roundings
    of the largest entry: ``rtol 0.05`` (5% of the largest magnitude, the bound
    mechvlm's own bf16 parity tests use for logits) and ``atol 0.02`` on patterns and
    shares (5 bf16 steps near 1).
float16 (11 bits, roundoff 5e-4): a quarter of the bf16 bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANTITY_KINDS = ("roles", "activation", "logits", "pattern", "share")


@dataclass(frozen=True)
class Tol:
    """``max_abs <= atol + rtol * scale`` where ``scale`` = max |HF reference|."""

    atol: float
    rtol: float = 0.0

    def bound(self, scale: float) -> float:
        return self.atol + self.rtol * scale


_FP32 = {"roles": Tol(0.0), "activation": Tol(1e-4, 1e-5), "logits": Tol(1e-4, 1e-5),
         "pattern": Tol(1e-5), "share": Tol(1e-5)}
_BF16 = {"roles": Tol(0.0), "activation": Tol(0.0, 0.05), "logits": Tol(0.0, 0.05),
         "pattern": Tol(0.02), "share": Tol(0.02)}
_FP16 = {"roles": Tol(0.0), "activation": Tol(0.0, 0.0125), "logits": Tol(0.0, 0.0125),
         "pattern": Tol(0.005), "share": Tol(0.005)}

TOLERANCES: dict[torch.dtype, dict[str, Tol]] = {
    torch.float32: _FP32, torch.bfloat16: _BF16, torch.float16: _FP16,
    torch.float64: _FP32,
}


def tolerances_for(dtype: torch.dtype, overrides: dict[str, Tol] | None = None) -> dict[str, Tol]:
    """The tolerance of each quantity kind for ``dtype`` (``overrides`` replace entries)."""
    if dtype not in TOLERANCES:
        raise ValueError(f"no cross-check tolerances for dtype {dtype}; known: {list(TOLERANCES)}")
    tols = dict(TOLERANCES[dtype])
    for k, v in (overrides or {}).items():
        if k not in QUANTITY_KINDS:
            raise ValueError(f"unknown quantity kind {k!r}; kinds are {QUANTITY_KINDS}")
        tols[k] = v
    return tols
