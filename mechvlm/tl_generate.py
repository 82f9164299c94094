"""``HookedVLM.generate``: TransformerLens' ``generate`` signature on `mechvlm.generation`.

Argument names and defaults follow TransformerLens (``HookedTransformer.generate``, today
``TransformerBridge.generate``): ``do_sample=True`` by default, ``return_type="input"``,
``stop_at_eos``, ``eos_token_id``, ``use_past_kv_cache``, ``verbose``. What a VLM adds:
the input may be a batch mapping (``InputBuilder`` output, with the images), hooks
(``fwd_hooks``, a list or ``(batch, roles) -> hooks``) and a ``seed``. Hooks attached with
``model.hooks(...)`` around the call fire on every step as well.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from mechvlm.generation import Generation, generate

RETURN_TYPES = ("input", "str", "tokens", "generation")


def _tokenizer(model):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("string input needs a tokenizer: load the model with HookedVLM.from_pretrained(<dir>) "
                         "or set one (model.set_tokenizer(...)), or pass token ids / a batch (to_inputs)")
    return tok


def _encode(model, text: str | list[str], prepend_bos: bool | None) -> dict:
    """TL's tokenization (``model.to_tokens``, BOS as ``prepend_bos``), each row on its own,
    then left-padded with an attention mask (generation needs the mask)."""
    from mechvlm.synthetic import left_pad

    tok = _tokenizer(model)
    rows = [model.to_tokens(t, prepend_bos=prepend_bos, move_to_device=False)[0]
            for t in ([text] if isinstance(text, str) else list(text))]
    ids, mask = left_pad(rows, tok.pad_token_id if tok.pad_token_id is not None else 0)
    return {"input_ids": ids, "attention_mask": mask}


def tl_generate(model, input="", max_new_tokens: int = 10, stop_at_eos: bool = True,
                eos_token_id: int | list[int] | None = None, do_sample: bool = True, top_k: int | None = None,
                top_p: float | None = None, temperature: float = 1.0, freq_penalty: float = 0.0,
                repetition_penalty: float = 1.0, use_past_kv_cache: bool = True, prepend_bos: bool | None = None,
                padding_side: str | None = None, return_type: str | None = "input", verbose: bool = True,
                output_logits: bool = False, attention_mask: Tensor | None = None, *, fwd_hooks=None,
                seed: int | None = None, pad_token_id: int | None = None):
    """Sample (or, ``do_sample=False``, greedily decode) up to ``max_new_tokens`` tokens.

    Args:
        input: a string or list of strings (needs ``model.tokenizer``; text only, batched
            strings are left-padded), token ids ``[batch, pos]`` (with ``attention_mask`` if
            left-padded), or a batch mapping of ``HookedVLM.forward`` keyword arguments
            (``input_ids``, ``attention_mask``, ``pixel_values``, ...) for prompts with images.
        max_new_tokens, stop_at_eos, eos_token_id (default: the model config's, else the
            tokenizer's), do_sample, top_k, top_p, temperature, freq_penalty,
            repetition_penalty, use_past_kv_cache, prepend_bos: as TransformerLens.
        padding_side: accepted for compatibility; generation always left-pads strings.
        return_type: ``"input"`` (strings for string input, else tokens), ``"str"`` (the
            decoded prompt + continuation of each row, special tokens skipped; a single row
            gives one string, as TransformerLens), ``"tokens"`` (``[batch, pos + new]``) or ``"generation"``
            (mechvlm's `Generation`, with ``finished`` and the step logits).
        verbose: a progress bar over the steps.
        output_logits: return HF's ``GenerateDecoderOnlyOutput(sequences, logits)`` (logits:
            a tuple of ``[batch, d_vocab]``, one per step), as TransformerLens does.
        fwd_hooks: hooks for every step (see `mechvlm.generation`).
        seed: seeds the sampling.
        pad_token_id: what finished rows continue with (default: the tokenizer's EOS or the
            first stop token, as TransformerLens).
    """
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if isinstance(input, str) or (isinstance(input, list) and all(isinstance(s, str) for s in input) and input):
        input_type, batch = ("str" if isinstance(input, str) else "list"), _encode(model, input, prepend_bos)
    elif isinstance(input, Tensor):
        if input.is_floating_point():
            raise TypeError("HookedVLM.generate takes token ids or a batch mapping, not embeddings")
        input_type = "tokens"
        batch = {"input_ids": input if input.ndim == 2 else input[None]}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
    elif isinstance(input, Mapping):
        input_type, batch = "tokens", dict(input)
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
    else:
        raise TypeError(f"input must be a string, a list of strings, token ids or a batch mapping, "
                        f"got {type(input).__name__}")
    if return_type == "input":
        return_type = "str" if input_type in ("str", "list") else "tokens"
    tok = getattr(model, "tokenizer", None)
    eos = eos_token_id
    if stop_at_eos and eos is None:
        eos = model.cfg.eos_token_id if model.cfg.eos_token_id is not None else getattr(tok, "eos_token_id", None)
    if pad_token_id is None and stop_at_eos and eos is not None:
        tok_eos = getattr(tok, "eos_token_id", None)
        pad_token_id = tok_eos if tok_eos is not None and not isinstance(eos, int) else \
            (eos if isinstance(eos, int) else list(eos)[0])
    gen: Generation = generate(
        model, batch, max_new_tokens, eos, fwd_hooks, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, freq_penalty=freq_penalty, repetition_penalty=repetition_penalty, seed=seed,
        stop_at_eos=stop_at_eos, pad_token_id=pad_token_id, output_logits=output_logits or return_type == "generation",
        use_past_kv_cache=use_past_kv_cache, progress=verbose)
    if return_type == "generation":
        return gen
    if output_logits:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=gen.sequences, logits=tuple(gen.logits.unbind(1)))
    if return_type == "tokens":
        return gen.sequences
    texts = [_tokenizer(model).decode(row, skip_special_tokens=True) for row in gen.sequences]
    return texts[0] if len(texts) == 1 else texts  # as TransformerLens, a single row gives a str


__all__ = ["RETURN_TYPES", "tl_generate"]
