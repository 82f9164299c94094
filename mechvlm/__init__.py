"""mechvlm: TransformerLens-style hooked language backbones for vision-language models."""

from mechvlm.cache import UnfoldedNormError, VLMActivationCache
from mechvlm.config import VLMConfig
from mechvlm.hook_points import HookEditError, HookPoint, UnknownHookError
from mechvlm.hooked_vlm import HookedVLM
from mechvlm.metrics import attention_share, logit_lens, received_attention, visual_text_similarity
from mechvlm.processing import InputBuilder

__all__ = [
    "HookEditError",
    "HookPoint",
    "HookedVLM",
    "InputBuilder",
    "UnfoldedNormError",
    "UnknownHookError",
    "VLMActivationCache",
    "VLMConfig",
    "attention_share",
    "logit_lens",
    "received_attention",
    "visual_text_similarity",
]
__version__ = "0.1.0"
