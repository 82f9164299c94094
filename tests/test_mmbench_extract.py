"""Letter extraction against VLMEvalKit's rules (``vlmeval/utils/matching_util.py``).

The expected values of `CASES` were checked by running VLMEvalKit's own ``can_infer`` of
the three commits the rule sets are named after (aca64dbb for "2024", c3371551 for
"2025", a67ace50 for "2026") on every case; mechvlm agreed on all of them.
"""

from __future__ import annotations

import pytest

from mechvlm.mmbench import OUTPUT_KINDS, RULES, can_infer, classify_output

OPTS = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
CASES = [
    # (model output, options (None: OPTS), expected letter, or {rules: letter})
    ("B", None, "B"),
    ("(B)", None, "B"),
    ("B.", None, "B"),
    ("[B]", None, "B"),
    ("**B**", None, "B"),
    ("B\n", None, "B"),
    (" B", None, "B"),
    ("Answer: B", None, "B"),
    ("B. blue", None, "B"),
    ("B: blue", None, "B"),
    ("(A) red", None, "A"),
    ("The answer is B.", None, "B"),
    ("I think it is C", None, "C"),
    ("blue", None, "B"),                       # option-text rule
    ("Blue", None, "B"),                       # ... case-insensitive
    ("greenish", None, "C"),                   # ... substring
    ("b", None, None),                         # the letter rule is case-sensitive
    ("A or B", None, None),                    # two letters
    ("A, B", None, None),
    ("AB", None, None),
    ("red or blue", None, None),               # two option texts
    ("B blue C", None, "B"),                   # two letters, then one option text
    ("light blue", {"A": "blue", "B": "light blue"}, None),  # both texts contained
    ("", None, None),                          # EOS only
    ("   ", None, None),
    ("None of these", None, None),
    ("A cat", None, "A"),                      # VLMEvalKit reads the article as option A
    ("Z", None, "Z"),                          # VLMEvalKit's "no option" answer
    ("Cannot determine the answer", None, "Z"),
    ("Sorry, I can't help with images of people yet. B", None, "Z"),
    ("D", {"A": "red", "B": "blue", "C": "green"}, None),   # not an option of this item
    ("C", {"A": "red", "B": "blue", "C": "green"}, "C"),
    ("E", {"A": "1", "B": "2", "C": "3", "D": "4", "E": "5"}, "E"),
    # where the rule sets differ
    ("B is right, not the others at all.", None, {"2024": "B", "2025": None, "2026": None}),  # last-4 window
    ("blue blue blue blue blue blue blue blue", None, {"2024": "B", "2025": None, "2026": None}),  # length cap
    ("Failed to obtain answer via API. blue", None, {"2024": "B", "2025": None, "2026": None}),
    ("The answer is b", None, {"2024": None, "2025": None, "2026": "B"}),
    ("The correct answer is **C** and not B", None, {"2024": None, "2025": None, "2026": "C"}),
]


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("case", CASES, ids=[repr(c[0]) for c in CASES])
def test_can_infer_matches_vlmevalkit(case, rules):
    answer, options, expected = case
    if isinstance(expected, dict):
        expected = expected[rules]
    options = dict(options or OPTS)
    before = dict(options)
    assert can_infer(answer, options, rules) == expected
    assert options == before  # VLMEvalKit lower-cases the dict in place; mechvlm does not


def test_default_rules_and_errors():
    assert can_infer("B is right, not the others at all.", OPTS) is None  # "2025" by default
    with pytest.raises(ValueError, match="rule set"):
        can_infer("B", OPTS, rules="2023")


@pytest.mark.parametrize("text,prediction,kind", [
    ("B", "B", "letter"),
    ("blue", "B", "letter"),
    ("", None, "eos_only"),
    (" \n", None, "eos_only"),
    ("A or B", None, "other"),
    ("Cannot determine the answer", "Z", "other"),
    ("maybe", None, "other"),
])
def test_classify_output(text, prediction, kind):
    assert kind in OUTPUT_KINDS
    assert can_infer(text, OPTS) == prediction
    assert classify_output(text, prediction, OPTS) == kind
