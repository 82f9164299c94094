"""Interventions built from one batch's TokenRoles refuse to run on another batch.

Before issue 12, ``[1, n]`` roles on a ``[2, n]`` batch broadcast silently (row 1 changed
as if it were row 0) and roles of another length crashed with torch's "The size of tensor
a (18) must match ..."; roles of another batch of the same shape cut the wrong positions.
"""

from __future__ import annotations

import pytest
import torch

from conftest import qwen_batch
from mechvlm.interventions import insert_registers, knockout, register_mask, skip_sublayers
from mechvlm.roles import RolesBatchMismatch
from mechvlm.synthetic import QWEN_IDS


def _rows(n_rows: int, seed: int, length: int = 6):
    return qwen_batch([[length, (1, 4, 6), 4]] * n_rows, seed=seed)


@pytest.mark.parametrize("mode", ["post_softmax_zero", "pre_softmax_mask"])
def test_knockout_roles_of_one_row_on_a_two_row_batch(qwen_model, mode):
    one = qwen_batch([[6, (1, 4, 6), 4]], seed=1)
    two = qwen_batch([[6, (1, 4, 6), 4], [6, (1, 4, 6), 4]], seed=1)
    n = one["input_ids"].shape[1]
    hooks = knockout(qwen_model.roles(**one), query="text", key="image", mode=mode)
    with pytest.raises(RolesBatchMismatch, match=rf"knockout\(query='text', key='image'\).*\(1, {n}\).*"
                                                 rf"'blocks\.0\.attn\.hook_(pattern|attn_mask)'.*\(2, {n}\)"):
        qwen_model.run_with_hooks(**two, fwd_hooks=hooks)
    assert not any(hp.fwd_hooks for hp in qwen_model.hook_dict.values())


def test_knockout_roles_of_another_length(qwen_model):
    short = qwen_batch([[6, (1, 4, 6), 4]], seed=1)
    long = qwen_batch([[10, (1, 4, 6), 6]], seed=1)
    hooks = knockout(qwen_model.roles(**short), query=["text", "last"], key="eoi")
    with pytest.raises(RolesBatchMismatch, match=r"key='eoi'.*\(1, 18\).*\(1, 24\)"):
        qwen_model.run_with_hooks(**long, fwd_hooks=hooks)


def test_knockout_roles_of_another_batch_of_the_same_shape(qwen_model):
    a = qwen_batch([[6, (1, 4, 6), 4]], seed=1)
    b = qwen_batch([[3, (1, 4, 6), 7]], seed=2)  # same length, image elsewhere
    assert a["input_ids"].shape == b["input_ids"].shape
    hooks = knockout(qwen_model.roles(**a), query="text", key="image", mode="pre_softmax_mask")
    with pytest.raises(RolesBatchMismatch, match=r"another batch of the same shape \(1, 18\).*token ids"):
        qwen_model.run_with_hooks(**b, fwd_hooks=hooks)


def test_roles_of_the_batch_that_runs_still_work(qwen_model):
    batch = _rows(2, seed=4)
    roles = qwen_model.roles(**batch)
    with torch.no_grad():
        clean = qwen_model(**batch)
        cut = qwen_model.run_with_hooks(**batch, fwd_hooks=knockout(roles, query="text", key="image"))
        again = qwen_model.run_with_hooks(**batch, fwd_hooks=knockout(roles.to("cpu"), query="text", key="image"))
    assert not torch.allclose(cut, clean)
    torch.testing.assert_close(cut, again, atol=0, rtol=0)


def test_register_mask_and_skip_sublayers_of_another_batch(qwen_model):
    one = qwen_batch([[6, (1, 4, 6), 4]], seed=1)
    two = qwen_batch([[6, (1, 4, 6), 4], [6, (1, 4, 6), 4]], seed=1)
    roles = qwen_model.roles(**one)
    with pytest.raises(RolesBatchMismatch, match=r"register_mask.*\(1, 18\).*\(2, 18\)"):
        qwen_model.run_with_hooks(**two, fwd_hooks=register_mask(roles))
    with pytest.raises(ValueError, match=r"skip_sublayers: positions mask \(1, 18\).*\(2, 18\)"):
        qwen_model.run_with_hooks(**two, fwd_hooks=skip_sublayers(roles.image, layers=0))


def test_insert_registers_with_roles_of_other_ids(qwen_model):
    a = qwen_batch([[6, (1, 4, 6), 4]], seed=1)
    b = qwen_batch([[3, (1, 4, 6), 7]], seed=2)
    with pytest.raises(RolesBatchMismatch, match="insert_registers"):
        insert_registers(b["input_ids"], 2, roles=qwen_model.roles(**a), token_id=QWEN_IDS["pad"])
