"""mechvlm: TransformerLens-style hooked language backbones for vision-language models."""

from mechvlm.config import VLMConfig
from mechvlm.hook_points import HookEditError, HookPoint, UnknownHookError
from mechvlm.hooked_vlm import HookedVLM

__all__ = ["HookEditError", "HookPoint", "HookedVLM", "UnknownHookError", "VLMConfig"]
__version__ = "0.1.0"
