"""The MMBench prompt of seed 000, Appendix A.1 (METHODS §5).

Exactly::

    {Hint}
    {Question}
    A. {Choice A}
    B. {Choice B}
    C. {Choice C}
    D. {Choice D}
    Answer with the option's letter from the given choices directly.

The hint line is omitted when the hint is missing or blank; only the options present are
listed, in letter order. No trailing newline. This is the text part only: the image and
the chat template are the input builder's business.
"""

from __future__ import annotations

from mechvlm.mmbench.tsv import MMBenchItem

INSTRUCTION = "Answer with the option's letter from the given choices directly."


def mmbench_prompt(item: MMBenchItem) -> str:
    """The seed-000 prompt text of one item (see the module docstring)."""
    return mmbench_prompt_text(item.question, item.options, item.hint)


def mmbench_prompt_text(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """The same prompt from its parts (``options``: letter -> text, in letter order)."""
    lines = []
    if hint is not None and hint.strip():
        lines.append(hint)
    lines.append(question)
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    lines.append(INSTRUCTION)
    return "\n".join(lines)
