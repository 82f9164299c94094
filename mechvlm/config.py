"""`VLMConfig`: the family-independent description of a hooked language backbone.

Each model family (`mechvlm.models.*`) maps its Hugging Face config onto this dataclass.
Field names follow TransformerLens (`n_layers`, `d_model`, `d_head`, ...) so that
`transformer_lens.ActivationCache` helpers (`accumulated_resid`, `stack_activation`,
`apply_ln_to_stack`) work on a mechvlm cache unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass
class VLMConfig:
    """Architecture of one hooked VLM language backbone.

    Attributes:
        architecture: the HF class name, e.g. ``"Qwen2_5_VLForConditionalGeneration"``.
        model_type: the HF ``config.model_type`` (``"qwen2_5_vl"``), which picks the family.
        n_layers, d_model, n_heads, n_kv_heads, d_head, d_mlp, d_vocab: sizes.
        eps: RMSNorm epsilon.
        act_fn: the HF activation name of the gated MLP (``"silu"``, ``"gelu_pytorch_tanh"``).
        attn_scale: the softmax scale applied to ``q @ k.T`` (``d_head ** -0.5`` for Qwen).
        rope_theta: RoPE base (Gemma3: of the full-attention layers).
        rope_type: HF rope type; ``"default"``, ``"linear"`` and (Llama) ``"llama3"`` are
            supported (Llama's scaled frequencies sit in ``extra["rope_inv_freq"]``).
        rope_scaling_factor: the ``factor`` of linear RoPE scaling (1.0 when none).
        rope_local_theta: Gemma3: the RoPE base of the sliding-attention layers (unscaled);
            ``None`` when every layer type uses ``rope_theta``.
        mrope_section: for multimodal RoPE, how the ``d_head/2`` frequency slots are split
            over the (temporal, height, width) position rows, e.g. ``(16, 24, 24)``;
            ``None`` for 1-D RoPE.
        layer_types: per layer, ``"full_attention"`` or ``"sliding_attention"``.
        sliding_window: the window of sliding layers (a key is visible iff
            ``k > q - sliding_window``); ``None`` when no layer slides.
        image_token_id: the placeholder token each image feature replaces.
        image_start_token_id: ``<|vision_start|>`` (Qwen) / ``<start_of_image>`` (Gemma3);
            None for a model without one (LLaVA).
        image_end_token_id: the end-of-image (EOI) token: ``<|vision_end|>`` / ``<end_of_image>``;
            None for a model without one (LLaVA: the ``eoi`` role is then missing).
        video_token_id: the video placeholder (Qwen2.5-VL ``<|video_pad|>``); None for a model
            mechvlm takes no video for.
        bos_token_id, eos_token_id, pad_token_id: from the HF config (may be ``None``).
        spatial_merge_size: vision patches merged per side into one LM token (Qwen: 2).
        tie_word_embeddings: whether the unembedding shares the embedding matrix.
        n_ctx: the HF ``max_position_embeddings`` (TransformerLens' name); a longer input
            warns once (None: unknown).
        registering: a Registering model's setting (seed 000 section 4), from the HF config's
            ``registering`` entry that `mechvlm.training` writes (variant, registers, mask);
            None for other models.
        register_token_id: the id of its inserted register tokens (the ``register`` role).
        dtype, device: of the language-model weights.
        use_attn_result: when True, ``blocks.{l}.attn.hook_result`` exists (opt-in, as in
            TransformerLens: it materialises ``[batch, pos, head, d_model]``).
        normalization_type: ``"RMS"``; ``"RMSPre"`` once ``fold_ln`` moved the norm weights
            into the next linear maps (TransformerLens' names).
        attn_only: constant TransformerLens' ActivationCache reads.
        use_split_qkv_input, use_attn_in, use_hook_mlp_in, use_hook_tokens: the opt-in hooks
            (``HookedVLM.set_use_*``).
        default_prepend_bos, tokenizer_prepends_bos, tokenizer_name: set from the attached
            tokenizer (TransformerLens' meaning).
        ln_folded: True after ``process_weights_(fold_ln=True)``.
        extra: family-specific settings (Gemma3 ``mm_tokens_per_image``; Qwen2.5-VL
            ``tokens_per_second``; LLaVA the tower geometry, ``image_grid_pinpoints``,
            ``image_newline``, ``max_patches``, ``qkv_bias``, ``rope_inv_freq``).

    TransformerLens' derived names are properties: ``n_key_value_heads``,
    ``positional_embedding_type`` (``"rotary"``), ``gated_mlp``, ``final_rms``,
    ``original_architecture``, ``window_size``, ``rotary_dim``, ``rotary_base``,
    ``d_vocab_out``, ``model_name``, ``use_normalization_before_and_after``,
    ``rmsnorm_uses_offset``.
    """

    architecture: str
    model_type: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    eps: float
    act_fn: str
    attn_scale: float
    rope_theta: float
    rope_type: str = "default"
    rope_scaling_factor: float = 1.0
    rope_local_theta: float | None = None
    mrope_section: tuple[int, ...] | None = None
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    image_token_id: int | None = None
    image_start_token_id: int | None = None
    image_end_token_id: int | None = None
    video_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    spatial_merge_size: int = 1
    tie_word_embeddings: bool = False
    n_ctx: int | None = None
    registering: dict | None = None
    register_token_id: int | None = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    use_attn_result: bool = False
    normalization_type: str = "RMS"
    attn_only: bool = False
    use_split_qkv_input: bool = False
    use_attn_in: bool = False
    use_hook_mlp_in: bool = False
    use_hook_tokens: bool = False
    default_prepend_bos: bool = False
    tokenizer_prepends_bos: bool = False
    tokenizer_name: str | None = None
    ln_folded: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = (FULL_ATTENTION,) * self.n_layers
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.n_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers"
            )
        unknown = set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
        if unknown:
            raise NotImplementedError(f"unsupported attention layer types {sorted(unknown)}")
        if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a positive sliding_window")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.mrope_section is not None:
            self.mrope_section = tuple(int(s) for s in self.mrope_section)
            if sum(self.mrope_section) != self.d_head // 2:
                raise ValueError(
                    f"mrope_section {self.mrope_section} must sum to d_head/2 = {self.d_head // 2}"
                )

    @property
    def n_key_value_heads(self) -> int:
        """TransformerLens' name for ``n_kv_heads``."""
        return self.n_kv_heads

    # TransformerLens' names for what the fields above already say ------------------
    positional_embedding_type = "rotary"
    gated_mlp = True
    final_rms = True
    ungroup_grouped_query_attention = False
    parallel_attn_mlp = False
    n_devices = 1
    default_padding_side = "right"

    @property
    def original_architecture(self) -> str:
        return self.architecture

    @property
    def model_name(self) -> str:
        return self.architecture

    @property
    def window_size(self) -> int | None:
        return self.sliding_window

    @property
    def rotary_dim(self) -> int:
        return self.d_head

    @property
    def rotary_base(self) -> float:
        return self.rope_theta

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    @property
    def rmsnorm_uses_offset(self) -> bool:
        """Gemma3's norms scale by ``1 + w``."""
        return self.model_type == "gemma3"

    @property
    def use_normalization_before_and_after(self) -> bool:
        return self.model_type == "gemma3"

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer``, or None for a full-attention layer."""
        return self.sliding_window if self.layer_types[layer] == SLIDING_ATTENTION else None

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["dtype"] = str(self.dtype)
        return out
