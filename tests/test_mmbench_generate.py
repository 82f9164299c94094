"""`greedy_generate` against Hugging Face: ``generate(do_sample=False)`` on the same tiny
random models (Qwen2.5-VL and Gemma3, with and without left padding), and, for role-based
knockouts that must also cover the generated tokens, an independent no-cache HF loop
whose eager attention is edited with masks computed from the token ids alone."""

from __future__ import annotations

import pytest
import torch

from _mmbench_ref import hf_knockout_greedy
from conftest import hf_kwargs, qwen_batch
from mechvlm import HookedVLM
from mechvlm.generation import greedy_generate
from mechvlm.mmbench import CONDITIONS
from mechvlm.synthetic import GEMMA3_IDS, QWEN_IDS, gemma3_config, gemma3_pixel_values, gemma3_prompt, left_pad

NEVER = 10**6  # an EOS id no model emits
TOL = 1e-4


def _present(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if v is not None}


def _eos_from_free_run(model, batch, step=2) -> int:
    """A token row 0 emits at ``step`` when nothing stops it, so that row stops early."""
    free = greedy_generate(model, batch, step + 1, [NEVER])
    return int(free.new_tokens[0, step])


# ----------------------------------------------------------------------- Qwen2.5-VL --
QWEN_ROWS = {
    "one_row": [[4, (1, 4, 6), 6]],
    "left_padded": [[4, (1, 4, 6), 6], [2, (1, 4, 4), 3], [9]],
}


@pytest.mark.parametrize("rows", QWEN_ROWS, ids=list(QWEN_ROWS))
def test_qwen_equals_hf_generate(qwen_hf, qwen_model, rows):
    batch = _present(qwen_batch(QWEN_ROWS[rows], seed=1))
    eos = _eos_from_free_run(qwen_model, batch)
    ours = greedy_generate(qwen_model, batch, 6, [eos, NEVER], pad_token_id=QWEN_IDS["pad"])
    ref = qwen_hf.generate(**hf_kwargs(batch), max_new_tokens=6, do_sample=False, eos_token_id=[eos, NEVER],
                           pad_token_id=QWEN_IDS["pad"])
    assert torch.equal(ours.sequences, ref)
    assert ours.finished[0] and ours.tokens(0, include_eos=True)[-1] == eos
    assert ours.tokens(0) == ours.new_tokens[0, : len(ours.tokens(0))].tolist()
    if len(QWEN_ROWS[rows]) > 1 and not ours.finished.all():  # row 0 is continued with the pad token
        assert (ours.new_tokens[0, 3:] == QWEN_IDS["pad"]).all()


def test_qwen_runs_until_max_new_tokens(qwen_hf, qwen_model):
    batch = _present(qwen_batch(QWEN_ROWS["left_padded"], seed=4))
    ours = greedy_generate(qwen_model, batch, 5, NEVER)
    ref = qwen_hf.generate(**hf_kwargs(batch), max_new_tokens=5, do_sample=False, eos_token_id=NEVER,
                           pad_token_id=QWEN_IDS["pad"])
    assert torch.equal(ours.sequences, ref) and ours.new_tokens.shape == (3, 5) and not ours.finished.any()


# -------------------------------------------------------------------------- Gemma3 --
@pytest.fixture(scope="module")
def gemma_hf():
    """A Gemma3 whose tied embedding is small next to the other weights: with HF's
    spread the sqrt(d_model)-scaled embedding dominates and greedy decoding just repeats
    the last token, which would make the comparison weak."""
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    cfg = gemma3_config(n_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    model = Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_((0.02 if "embed_tokens" in name else 0.3) * noise)
    return model


def _gemma_batch(rows, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = [gemma3_prompt(segs, mm_tokens=4, generator=g)[0] for segs in rows]
    input_ids, mask = (ids[0][None], None) if len(ids) == 1 else left_pad(ids, GEMMA3_IDS["pad"])
    n_images = sum(s == "image" for segs in rows for s in segs)
    return _present({"input_ids": input_ids, "attention_mask": mask,
                     "pixel_values": gemma3_pixel_values(n_images, generator=g)})


@pytest.mark.parametrize("rows", [[[3, "image", 7]], [[3, "image", 5], [2, "image", 1, "image", 3]]],
                         ids=["one_row", "left_padded"])
def test_gemma3_equals_hf_generate(gemma_hf, rows):
    model = HookedVLM.from_hf(gemma_hf)
    batch = _gemma_batch(rows)
    eos = _eos_from_free_run(model, batch)
    hf_kw = dict(batch, token_type_ids=(batch["input_ids"] == GEMMA3_IDS["image"]).long())
    ref = gemma_hf.generate(**hf_kw, max_new_tokens=6, do_sample=False, eos_token_id=[eos],
                            pad_token_id=GEMMA3_IDS["pad"])
    assert len(set(ref[0, -6:].tolist())) > 1  # not a degenerate repetition
    for kw in (batch, hf_kw):  # token_type_ids are optional and get extended
        ours = greedy_generate(model, kw, 6, eos, pad_token_id=GEMMA3_IDS["pad"])
        assert torch.equal(ours.sequences, ref)
    assert ours.finished[0]


# ------------------------------------------- hooks re-evaluated on the growing batch --
def test_callable_hooks_see_every_step(qwen_model):
    batch = _present(qwen_batch(QWEN_ROWS["left_padded"][:2], seed=1))
    n = batch["input_ids"].shape[1]
    seen = []

    def hooks(b, roles):
        seen.append((b["input_ids"].shape[1], b["attention_mask"].shape[1], roles.text[:, -1].tolist()))
        return []

    greedy_generate(qwen_model, batch, 3, NEVER, fwd_hooks=hooks)
    assert seen == [(n, n, [True, True]), (n + 1, n + 1, [True, True]), (n + 2, n + 2, [True, True])]


def test_right_padding_rejected(qwen_model):
    batch = _present(qwen_batch([[5], [3]], seed=0))
    batch["attention_mask"] = batch["attention_mask"].flip(-1)
    batch["input_ids"] = batch["input_ids"].flip(-1)
    with pytest.raises(ValueError, match="left-padded"):
        greedy_generate(qwen_model, batch, 2, NEVER)


@pytest.mark.parametrize("name", [n for n in CONDITIONS if n != "none"])
def test_knockout_condition_covers_generated_tokens(qwen_hf, qwen_model, name):
    cond = CONDITIONS[name]
    batch = _present(qwen_batch([[3, (1, 4, 6), 5], [2, (1, 4, 4), 7]], seed=21))
    ours = greedy_generate(qwen_model, batch, 3, NEVER, fwd_hooks=cond, output_logits=True)
    clean = greedy_generate(qwen_model, batch, 3, NEVER, output_logits=True)
    ref_ids, ref_logits = hf_knockout_greedy(qwen_hf, batch, 3, cond.key, cond.mode)
    assert torch.equal(ours.sequences, ref_ids)
    assert (ours.logits - ref_logits).abs().max() <= TOL
    assert (ours.logits[:, 0] - clean.logits[:, 0]).abs().max() > 1e-2  # the knockout does something
