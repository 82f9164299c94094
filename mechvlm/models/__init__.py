"""Model families: each maps one HF architecture onto mechvlm's shared components."""

from mechvlm.models.base import ModelFamily, family_for
from mechvlm.models.gemma3 import GEMMA3
from mechvlm.models.qwen2_5_vl import QWEN2_5_VL

__all__ = ["GEMMA3", "ModelFamily", "QWEN2_5_VL", "family_for"]
