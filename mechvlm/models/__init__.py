"""Model families: each maps one HF architecture onto mechvlm's shared components."""

from mechvlm.models.base import ModelFamily, family_for
from mechvlm.models.gemma3 import GEMMA3
from mechvlm.models.llava import LLAVA
from mechvlm.models.llava_next import LLAVA_NEXT
from mechvlm.models.llava_onevision import LLAVA_ONEVISION
from mechvlm.models.qwen2_5_vl import QWEN2_5_VL

__all__ = ["GEMMA3", "LLAVA", "LLAVA_NEXT", "LLAVA_ONEVISION", "ModelFamily", "QWEN2_5_VL", "family_for"]
