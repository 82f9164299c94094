"""What a cross-check measures and costs: diffs per family and dtype, and the time of one
`mechvlm.crosscheck.crosscheck` relative to one plain mechvlm forward.

Models (random weights, HF's own init; nothing from a hub):
    tiny:  the test configs of `mechvlm.synthetic` (Qwen2.5-VL 3 layers d_model 64;
           Gemma3 6 layers d_model 64), synthetic prompt (~20 tokens, one image);
    mid:   Qwen2.5-VL-3B text dimensions with ``--layers`` layers (d_model 2048, vocab
           151936; 6+1 image+8 text tokens) and Gemma3-4B text dimensions (d_model 2560,
           vocab 262208) with ``--layers`` layers and a 224x224 image of 16 tokens.

For each (model, dtype) one cross-check (all quantities: clean run, 4 knockouts, shares;
in bf16 also the fp32 reference trace) is timed ``--reps`` times (min reported);
``ratio`` = cross-check seconds / one mechvlm forward (median of 5 after a warm-up).

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/crosscheck_cost.py               # tiny only, ~1 min
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/crosscheck_cost.py --mid --layers 2
"""

from __future__ import annotations

import argparse
import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def _models(mid: bool, layers: int):
    from transformers import Gemma3ForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    from mechvlm import synthetic as syn

    yield "qwen tiny", lambda: Qwen2_5_VLForConditionalGeneration._from_config(
        syn.qwen2_5_vl_config(n_layers=3)).eval()
    yield "gemma3 tiny", lambda: Gemma3ForConditionalGeneration._from_config(syn.gemma3_config()).eval()
    if mid:
        yield f"qwen 3B-shaped x{layers}", lambda: Qwen2_5_VLForConditionalGeneration._from_config(
            syn.qwen2_5_vl_3b_text_config(n_layers=layers)).eval()
        # Gemma3-4B text dimensions, but a 224x224 image of 16 tokens (not 896x896 / 256):
        # the 262k-vocab unembedding over 256+ positions would dominate a CPU run
        yield f"gemma3 4B-shaped x{layers}", lambda: Gemma3ForConditionalGeneration._from_config(
            syn.gemma3_config(vocab=262208, d_model=2560, n_layers=layers, n_heads=8, n_kv_heads=4, head_dim=256,
                              d_mlp=10240, sliding_window=1024, mm_tokens=16, image_size=224, patch_size=14,
                              vision_hidden=64, query_pre_attn_scalar=256, ids=syn.GEMMA3_REAL_IDS,
                              layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"])).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mid", action="store_true", help="also the 3B/4B-shaped models")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tables", action="store_true", help="print every full table")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from mechvlm.crosscheck import crosscheck

    torch.manual_seed(0)
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mechvlm.synthetic import qwen2_5_vl_config

    crosscheck(Qwen2_5_VLForConditionalGeneration._from_config(qwen2_5_vl_config(n_layers=1)).eval())  # warm-up
    print(f"{'model':24s} {'dtype':9s} {'logits':>9s} {'resid max':>9s} {'pattern':>9s} {'share':>9s} "
          f"{'knockout':>9s} {'pass':>5s} {'xcheck s':>9s} {'fwd ms':>8s} {'ratio':>6s}")
    for name, build in _models(args.mid, args.layers):
        hf = build()
        for dt in args.dtypes.split(","):
            dtype = getattr(torch, dt)
            best = None
            for _ in range(args.reps):
                r = crosscheck(hf, dtype=dtype)
                if best is None or r.timing["crosscheck_s"] < best.timing["crosscheck_s"]:
                    best = r
                gc.collect()
            rows = best.rows

            def worst(pred):
                return max((x.max_abs for x in rows if pred(x)), default=float("nan"))

            print(f"{name:24s} {dt:9s} {worst(lambda x: x.quantity == 'logits'):9.2e} "
                  f"{worst(lambda x: x.quantity in ('resid_post', 'final_norm', 'embed')):9.2e} "
                  f"{worst(lambda x: x.quantity == 'pattern'):9.2e} {worst(lambda x: x.kind == 'share'):9.2e} "
                  f"{worst(lambda x: x.quantity.startswith('knockout')):9.2e} {str(best.passed):>5s} "
                  f"{best.timing['crosscheck_s']:9.2f} {best.timing['mechvlm_forward_s'] * 1e3:8.1f} "
                  f"{best.timing['ratio']:6.0f}", flush=True)
            if args.tables:
                print(best.table())
        del hf
        gc.collect()


if __name__ == "__main__":
    main()
