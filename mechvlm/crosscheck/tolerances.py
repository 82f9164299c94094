"""Tolerances of the cross-check, per dtype and quantity kind.

Both sides run the same weights, inputs and math in the same dtype; they differ only in
the order of some floating-point operations (mechvlm's RMSNorm divides by the scale where
HF multiplies by ``rsqrt``; GQA through SDPA's ``enable_gqa`` where HF repeats K/V; a
bool-mask SDPA where HF adds a float mask). A compared quantity passes when

    max_abs <= atol + rtol * max|HF| + noise_factor * noise

over the compared entries (real tokens; for patterns real query x real key), where
``noise`` = max |HF in the run dtype - HF in float32| on the same entries: HF's own
rounding error, measured by tracing an fp32 copy of the same (already rounded) weights.

float32 (unit roundoff 6e-8; the tiny test models agree to a few 1e-6): no noise term.
    logits / activations (residual stream, final norm): ``atol 1e-4`` plus ``rtol 1e-5``,
    so real checkpoints (residual entries in the thousands on "massive activation"
    tokens, logits around 30) are not held to an absolute bound their magnitude makes
    meaningless. Patterns and shares are probabilities in [0, 1]: ``atol 1e-5``.
bfloat16 (8 mantissa bits; one rounding is 2**-8 = 0.4% of a value) and float16: two
    correct implementations in low precision differ by about as much as either differs
    from exact arithmetic, and that grows with depth and with the model's magnitudes, so
    no fixed number fits every model. With the fp32 reference (the default):
    ``3 x noise`` (mechvlm's own rounding error may be up to twice HF's, and
    ``|mechvlm - HF| <= |mechvlm - exact| + |HF - exact|``) plus a floor of one rounding
    step (``rtol 2**-8`` of the largest entry; ``atol 2**-8`` on probabilities).
    Measured on the tiny test models: mechvlm-vs-HF bf16 differences are 0.5-1.5x HF's
    own bf16-vs-fp32 error in every layer.
    Without the fp32 reference (``reference_fp32=False``, e.g. no memory for an fp32 copy)
    fixed bounds apply: ``rtol 0.05`` (5% of the largest magnitude, the bound of mechvlm's
    bf16 parity tests) and ``atol 0.05`` on probabilities; float16 a quarter of those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANTITY_KINDS = ("roles", "activation", "logits", "pattern", "share")
LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Tol:
    """``max_abs <= atol + rtol * scale + noise_factor * noise``; ``scale`` = max |HF|,
    ``noise`` = max |HF - HF in fp32| (0 when not measured)."""

    atol: float
    rtol: float = 0.0
    noise_factor: float = 0.0

    def bound(self, scale: float, noise: float = 0.0) -> float:
        return self.atol + self.rtol * scale + self.noise_factor * noise


def _kinds(act: Tol, prob: Tol) -> dict[str, Tol]:
    return {"roles": Tol(0.0), "activation": act, "logits": act, "pattern": prob, "share": prob}


_FP32 = {"roles": Tol(0.0), "activation": Tol(1e-4, 1e-5), "logits": Tol(1e-4, 1e-5),
         "pattern": Tol(1e-5), "share": Tol(1e-5)}

#: with an fp32 reference run (noise measured)
TOLERANCES: dict[torch.dtype, dict[str, Tol]] = {
    torch.float32: _FP32,
    torch.float64: _FP32,
    torch.bfloat16: _kinds(Tol(0.0, 2**-8, 3.0), Tol(2**-8, 0.0, 3.0)),
    torch.float16: _kinds(Tol(0.0, 2**-11, 3.0), Tol(2**-11, 0.0, 3.0)),
}

#: low precision without an fp32 reference run
FIXED_TOLERANCES: dict[torch.dtype, dict[str, Tol]] = {
    torch.bfloat16: _kinds(Tol(0.0, 0.05), Tol(0.05)),
    torch.float16: _kinds(Tol(0.0, 0.0125), Tol(0.0125)),
}


def tolerances_for(dtype: torch.dtype, overrides: dict[str, Tol] | None = None, *,
                   measured_noise: bool = True) -> dict[str, Tol]:
    """The `Tol` of each quantity kind for ``dtype`` (``overrides`` replace entries).
    ``measured_noise=False``: the fixed low-precision bounds (no fp32 reference run)."""
    table = TOLERANCES if measured_noise or dtype not in FIXED_TOLERANCES else FIXED_TOLERANCES
    if dtype not in table:
        raise ValueError(f"no cross-check tolerances for dtype {dtype}; known: {list(TOLERANCES)}")
    tols = dict(table[dtype])
    for k, v in (overrides or {}).items():
        if k not in QUANTITY_KINDS:
            raise ValueError(f"unknown quantity kind {k!r}; kinds are {QUANTITY_KINDS}")
        tols[k] = v
    return tols
