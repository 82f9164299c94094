"""Scoring: accuracy and population std, per category, circular groups, output kinds,
against numbers computed by hand."""

from __future__ import annotations

import json
import math

import pytest

from mechvlm.mmbench import accuracy_std, score_records


def rec(index, answer, prediction, kind="letter", category="x"):
    return {"index": index, "answer": answer, "prediction": prediction, "kind": kind, "category": category,
            "l2_category": "L"}


def records():
    return [
        rec(1, "A", "A"), rec(1_000_001, "B", "B"), rec(2_000_001, "C", "C"),         # group 1: all right
        rec(2, "A", "A", category="y"), rec(1_000_002, "B", None, "eos_only", "y"),     # group 2: one wrong
        rec(3, "D", "D", category="y"),                                                # group 3: no copies
        rec(1_000_009, "A", "B"),                                  # a copy whose original is absent
        rec(4, None, "C", category="y"),                           # test split: not scored
        rec(5, "A", None, "other", "y"),                           # group 5: wrong
    ]


def test_accuracy_std_is_population_std():
    out = accuracy_std([1] * 392 + [0] * 608)
    assert out["n"] == 1000 and out["accuracy"] == pytest.approx(0.392)
    assert out["std"] == pytest.approx(math.sqrt(0.392 * 0.608)) and round(out["std"], 3) == 0.488
    assert accuracy_std([]) == {"accuracy": None, "std": None, "n": 0}
    assert accuracy_std([True, True]) == {"accuracy": 1.0, "std": 0.0, "n": 2}


def test_score_records_by_hand():
    recs = records()
    s = score_records(recs)
    # 8 scored items, 5 correct: 1, 1000001, 2000001, 2, 3
    assert (s["n"], s["n_items"], s["n_unscored"]) == (8, 9, 1)
    assert s["accuracy"] == pytest.approx(5 / 8) and s["std"] == pytest.approx(math.sqrt(5 / 8 * 3 / 8))
    assert [r["correct"] for r in recs] == [True, True, True, True, False, True, False, False, False]
    # per category: x = 1, 1000001, 2000001, 1000009 (3/4); y = 2, 1000002, 3, 5 (2/4)
    assert s["per_category"]["x"] == {"accuracy": 0.75, "std": pytest.approx(math.sqrt(0.75 * 0.25)), "n": 4}
    assert s["per_category"]["y"] == {"accuracy": 0.5, "std": 0.5, "n": 4}
    assert s["per_l2_category"] == {"L": {"accuracy": 5 / 8, "std": pytest.approx(s["std"]), "n": 8}}
    # originals only: 1, 2, 3, 5 -> 3/4
    assert s["vanilla_0"]["accuracy"] == 0.75 and s["vanilla_0"]["n"] == 4
    # circular groups 1 (right), 2 (a copy wrong), 3 (right), 5 (wrong); 1000009 has no original
    circ = s["circular"]
    assert (circ["accuracy"], circ["n"], circ["std"]) == (0.5, 4, 0.5)
    assert circ["per_category"]["x"]["accuracy"] == 1.0 and circ["per_category"]["y"]["accuracy"] == pytest.approx(1 / 3)
    # output kinds over all 9 items
    assert s["outputs"] == {"letter": 7, "eos_only": 1, "other": 1}
    assert s["output_fractions"] == pytest.approx({"letter": 7 / 9, "eos_only": 1 / 9, "other": 1 / 9})
    json.dumps(s)


def test_no_circular_copies():
    s = score_records([rec(1, "A", "A"), rec(2, "B", "A"), rec(3, "C", None, "eos_only")])
    assert s["circular"] is None and s["vanilla_0"] is None
    assert s["accuracy"] == pytest.approx(1 / 3) and s["outputs"] == {"letter": 2, "eos_only": 1, "other": 0}


def test_z_and_unknown_kind():
    s = score_records([rec(1, "A", "Z", "other")])
    assert s["accuracy"] == 0.0
    with pytest.raises(ValueError, match="output kind"):
        score_records([rec(1, "A", "A", "letters")])
