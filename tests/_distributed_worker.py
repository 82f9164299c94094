"""Run by tests/test_distributed.py under ``torchrun --nproc-per-node 2``: the metrics' and
the long analyses' Python API under a gloo process group, and the sharded loop's checks. Each rank saves what
it got to ``<out>.rank<r>.pt``."""

from __future__ import annotations

import sys

import torch

from mechvlm import HookedVLM, attention_share, distributed, logit_lens, received_attention, visual_text_similarity

#: Prompt segments of each batch (text lengths and image grids); 5 batches over 2 ranks.
BATCHES = [[[4, (1, 4, 6), 6], [3, (1, 4, 4), 2]], [[5, (1, 4, 4), 3]], [[2, (1, 6, 4), 7], [6, (1, 4, 4), 1]],
           [[3, (1, 4, 4), 4]], [[4, (1, 4, 4), 2], [1, (1, 4, 6), 5]]]


def build():
    """The model and batches both sides use."""
    from conftest import make_hf_qwen, qwen_batch

    model = HookedVLM.from_hf(make_hf_qwen(seed=5, n_layers=3))
    return model, [qwen_batch(rows, seed=i) for i, rows in enumerate(BATCHES)]


def loss_batches(batches) -> list:
    """``(batch, target_mask)`` pairs: the last two tokens of every row are the answer."""
    out = []
    for b in batches:
        target = torch.zeros_like(b["input_ids"], dtype=torch.bool)
        target[:, -2:] = True
        out.append((b, target))
    return out


def metrics(model, batches) -> dict:
    from mechvlm.analyses import head_attribution, token_budget, token_contribution

    pairs = loss_batches(batches)
    return {
        "attention_share": attention_share(model, batches, keys=("image", "eoi", "bos"), progress=False).to_dict(),
        "received_attention": received_attention(model, batches, progress=False).to_dict(),
        "logit_lens": logit_lens(model, batches, k=3, labels=[7, 9, 11], progress=False).to_dict(),
        "similarity": visual_text_similarity(model, batches, progress=False).to_dict(),
        "token_budget": token_budget(model, pairs, fractions=[0.5, 1.0], strategies=("first", "random"), draws=2,
                                     progress=False).to_dict(),
        "token_contribution": token_contribution(model, pairs, unit="row", progress=False).to_dict(),
        "head_attribution": {k: v for k, v in head_attribution(
            model, batches, n_masks=8, ablate_prob=0.3, masks_per_forward=8, n_bootstrap=10, per_cell=False,
            attention=False, progress=False).to_dict().items() if k != "wall_s"},
    }


def main(out: str) -> None:
    distributed.init_from_env("cpu")
    rank, world = distributed.rank_world()
    assert world == 2, world
    model, batches = build()
    got = {"metrics": metrics(model, batches)}
    try:  # every rank must pass the same work
        attention_share(model, batches[rank:], progress=False)
    except ValueError as e:
        got["different_work"] = str(e)
    try:  # one rank fails: every rank stops, none hangs
        distributed.map_units(lambda u: 1 // (0 if rank == 1 else 1), [0, 1, 2])
    except Exception as e:  # noqa: BLE001
        got["failure"] = f"{type(e).__name__}: {e}"
    with distributed.local():
        got["local"] = distributed.map_units(lambda u: (u, distributed.rank_world()), [0, 1, 2])
    torch.save(got, f"{out}.rank{rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
