"""Letter extraction with VLMEvalKit's exact-matching rules, and the kind of each output.

`can_infer` reimplements ``can_infer`` / ``can_infer_option`` / ``can_infer_text`` of
VLMEvalKit's ``vlmeval/utils/matching_util.py`` (open-compass/VLMEvalKit), the functions
its MMBench evaluation (``vlmeval/dataset/utils/multiple_choice.py``, ``exact_matching``
judge) uses to read a letter out of a model's output:

1. Option rule. If the output contains one of the refusal sentences
   (`REFUSALS`) the answer is ``"Z"``. Otherwise replace each of ``.()[],:;!*#{}`` by a
   space and split on whitespace; if exactly one option letter (case-sensitive, ``"b"``
   is not ``"B"``) is among the words, that letter -- from ``rules="2025"`` on, only when
   it is one of the last 4 words (``splits.index(ch) > len(splits) - 5``). If no option
   letter is a word but ``"Z"`` is, the answer is ``"Z"``.
   ``rules="2026"`` then also accepts ``answer is X`` / ``correct answer is **X**``
   (case-insensitive, X in A-D and among the options).
2. Text rule (when 1 found nothing). Lower-case the output; if exactly one option's
   lower-cased text is a substring, that option. From ``rules="2025"`` on, skipped when
   the output is longer than twice the options' total length.
3. Otherwise nothing (None): exact matching scores it 0.

``"Z"`` is VLMEvalKit's "no valid option" answer: never an MMBench option, so it scores 0.
The ``VERBOSE`` environment switch of VLMEvalKit (an extra "A might be a quantifier"
rejection, off by default) is not reproduced. Rule sets, by VLMEvalKit commit:

* ``"2024"``: bc4b28be (2024-01) .. aca64dbb (2025-04): the rule METHODS §5 states.
* ``"2025"`` (default): c3371551 (2025-08-04, "Improve can_infer_option and
  can_infer_text"): last-4-words window, text-length cap. Current when seed 000 was
  written. For outputs of at most 4 words (a few greedy tokens) it agrees with "2024"
  except for the length cap.
* ``"2026"``: a67ace50 (2026-06-17, "Match verbose Chain-of-Thought"): adds the
  ``answer is X`` pattern.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

RULES = ("2024", "2025", "2026")
DEFAULT_RULES = "2025"
#: VLMEvalKit's ``reject_to_answer`` sentences: an output containing one answers "Z".
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
API_FAILURE = "Failed to obtain answer via API"
STRIP_CHARS = ".()[],:;!*#{}"
_VERBOSE_ANSWER_RE = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")

#: Output kinds: a valid option letter was extracted / nothing but EOS (or special tokens,
#: or whitespace) was generated / anything else (text without a readable option).
OUTPUT_KINDS = ("letter", "eos_only", "other")


def _check_rules(rules: str) -> None:
    if rules not in RULES:
        raise ValueError(f"unknown VLMEvalKit rule set {rules!r}; choose one of {RULES}")


def can_infer_option(answer: str, options: Mapping[str, str], rules: str = DEFAULT_RULES) -> str | None:
    """Step 1 of `can_infer`: the letter written as a word (or ``"Z"``), else None."""
    _check_rules(rules)
    if API_FAILURE in answer:
        return None
    if any(r in answer for r in REFUSALS):
        return "Z"
    mod = answer
    for c in STRIP_CHARS:
        mod = mod.replace(c, " ")
    splits = [x.strip() for x in mod.split()]
    count = sum(1 for c in options if c in splits)
    if count == 1:
        for ch in options:
            if ch in splits and (rules == "2024" or splits.index(ch) > len(splits) - 5):
                return ch
    elif count == 0 and "Z" in splits:
        return "Z"
    if rules == "2026":
        m = _VERBOSE_ANSWER_RE.search(answer)
        if m and m.group(1).upper() in options:
            return m.group(1).upper()
    return None


def can_infer_text(answer: str, options: Mapping[str, str], rules: str = DEFAULT_RULES) -> str | None:
    """Step 2 of `can_infer`: the one option whose text the answer contains, else None."""
    _check_rules(rules)
    answer = answer.lower()
    if rules != "2024" and len(answer) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    cands = [k for k, v in options.items() if str(v).lower() in answer]
    return cands[0] if len(cands) == 1 else None


def can_infer(answer: str, options: Mapping[str, str], rules: str = DEFAULT_RULES) -> str | None:
    """The option letter VLMEvalKit reads from ``answer`` (``"Z"``: refused / none),
    or None when it reads nothing. ``options`` is ``{letter: text}`` of the options
    present (`MMBenchItem.options`). See the module docstring for the rules."""
    answer = str(answer)
    return can_infer_option(answer, options, rules) or can_infer_text(answer, options, rules)


def classify_output(text: str, prediction: str | None, options: Mapping[str, str]) -> str:
    """The kind of one output (`OUTPUT_KINDS`).

    ``text`` is the generated text decoded without special tokens; ``prediction`` is
    `can_infer`'s letter. ``"letter"`` when the prediction is one of the options (by
    either rule); ``"eos_only"`` when the text is empty after stripping whitespace (the
    model generated nothing but EOS / special tokens); ``"other"`` otherwise.
    """
    if prediction is not None and prediction in options:
        return "letter"
    if not text.strip():
        return "eos_only"
    return "other"
