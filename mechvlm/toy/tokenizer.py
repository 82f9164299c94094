"""The toy models' tokenizer: a word-level ``tokenizers`` model whose specials sit at the
ids the toy configs use, saved next to the weights like a real checkpoint's tokenizer.

Each option line (``"B. red"``) is one token. docs/toy_models.md (the prototype) measured why: a tiny model
binds an answer to its letter much sooner when the letter and the option text share a
token. Everything else is a word or a punctuation mark; newlines are tokens.
"""

from __future__ import annotations

from .scenes import all_words, sentence_lines

# Special tokens per family, in id order (id 0 first). The toy configs take their ids from here.
SPECIALS = {
    "qwen2_5_vl": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                   "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "[UNK]"],
    "gemma3": ["<pad>", "<eos>", "<bos>", "[UNK]", "<start_of_turn>", "<end_of_turn>",
               "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
    "llava": ["<pad>", "<s>", "</s>", "[UNK]", "<image>"],
    "llava_next": ["<pad>", "<s>", "</s>", "[UNK]", "<image>"],
    "llava_onevision": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]", "<image>", "<video>"],
}

# LLaVA-1.5 / NeXT: Vicuna's "USER: <image>\n... ASSISTANT:" shape (the toy vocabulary has
# no colon: "user\n"); OneVision: Qwen2's chat markup.
_VICUNA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if m['role'] == 'assistant' %}</s>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant\n{% endif %}"
)

# Chat templates in the shape of the real checkpoints' (Qwen2.5-VL without its default
# system turn; Gemma3 as released). An image content item renders as the real templates do.
CHAT_TEMPLATES = {
    "qwen2_5_vl": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "gemma3": (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>"
        "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<start_of_image>"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "llava": _VICUNA_TEMPLATE,
    "llava_next": _VICUNA_TEMPLATE,
    "llava_onevision": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}"
    ),
}

def _pretokenize_pattern() -> str:
    """Whole known sentences (questions, hints, instructions) and option lines are single
    tokens; any other text falls back to words and punctuation marks."""
    import re

    sentences = sorted(sentence_lines(), key=len, reverse=True)
    return "|".join([*(re.escape(s) for s in sentences),
                     r"[A-D]\. [^\n]+", r"\n", r"[A-Za-z0-9'-]+", r"[^\sA-Za-z0-9'-]"])


PRETOKENIZE = _pretokenize_pattern()
CHAT_WORDS = ["user", "assistant", "model", "system"]


def vocabulary(family: str) -> dict[str, int]:
    """token -> id: the family's specials first, then every word a toy prompt can hold."""
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="removed", invert=True)
    vocab = {tok: i for i, tok in enumerate(SPECIALS[family])}
    for text in [*all_words(), *CHAT_WORDS, "\n"]:
        for piece, _ in split.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    return vocab


def toy_tokenizer(family: str):
    """A ``PreTrainedTokenizerFast`` for the toy ``family`` (a key of `SPECIALS`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if family not in SPECIALS:
        raise ValueError(f"unknown family {family!r}; known: {sorted(SPECIALS)}")
    specials = SPECIALS[family]
    tok = Tokenizer(models.WordLevel(vocabulary(family), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="removed", invert=True)
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tok.add_special_tokens(specials)
    if family in ("qwen2_5_vl", "llava_onevision"):
        named = dict(pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="[UNK]")
    elif family in ("llava", "llava_next"):
        named = dict(pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="[UNK]")
    else:
        named = dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="[UNK]",
                     boi_token="<start_of_image>", eoi_token="<end_of_image>",
                     image_token="<image_soft_token>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left",
                                   extra_special_tokens={k: v for k, v in named.items()
                                                         if k.endswith(("oi_token", "image_token"))},
                                   **{k: v for k, v in named.items()
                                      if not k.endswith(("oi_token", "image_token"))})
    fast.chat_template = CHAT_TEMPLATES[family]
    return fast


def special_id(family: str, token: str) -> int:
    return SPECIALS[family].index(token)
