"""Hook-level building blocks shared by every model family."""

from mechvlm.components.attention import Attention
from mechvlm.components.attention_mask import AttentionMask
from mechvlm.components.block import TransformerBlock
from mechvlm.components.embed import Embed, Unembed
from mechvlm.components.mlp import GatedMLP
from mechvlm.components.rms_norm import RMSNorm
from mechvlm.components.rotary import RotaryEmbedding, apply_rotary
from mechvlm.components.post_softmax import PostSoftmaxCut, softmax_rows

__all__ = [
    "Attention",
    "AttentionMask",
    "Embed",
    "GatedMLP",
    "PostSoftmaxCut",
    "RMSNorm",
    "RotaryEmbedding",
    "TransformerBlock",
    "Unembed",
    "apply_rotary",
    "softmax_rows",
]
