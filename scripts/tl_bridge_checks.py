"""What TransformerLens' own TransformerBridge does on the shipped toy checkpoints, for the
xfail markers of tests/tl_compat (run: .venv/bin/python scripts/tl_bridge_checks.py)."""
import sys, torch, transformers, contextlib
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
from transformer_lens.head_detector import detect_head
from mechvlm.toy.checkpoint import SHIPPED
from _peers import _bridge_without_torchvision
from mechvlm import HookedVLM
from tests._tl_models import scene_images
for fam in ("qwen2_5_vl", "gemma3"):
    cls = getattr(transformers, {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration"}[fam])
    hf = cls.from_pretrained(str(SHIPPED[fam]), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(SHIPPED[fam]))
    with _bridge_without_torchvision([]):
        br = build_bridge_from_module(hf, type(hf).__name__, hf_config=hf.config, tokenizer=tok)
    print(fam, "bridge tokenizer:", getattr(br, "tokenizer", None) is not None, "default_prepend_bos", br.cfg.default_prepend_bos)
    print("  'hook_pos_embed' in the bridge's hook_dict:", "hook_pos_embed" in br.hook_dict)
    try:
        _, c = br.run_with_cache(br.to_tokens(" red circle square"))
        c["pos_embed"]
        print("  cache['pos_embed']: ok")
    except KeyError as e:
        print("  cache['pos_embed']: KeyError", e)
    if getattr(br, "tokenizer", None) is None:
        from transformer_lens.model_bridge.sources._hf_format import setup_tokenizer  # noqa
    try:
        print("  to_tokens(' red circle square') ->", br.to_tokens(" red circle square").shape)
        print("  to_tokens('') ->", br.to_tokens("").shape)
        try:
            detect_head(br, "", "previous_token_head")
        except Exception as e:
            print("  detect_head('') ->", type(e).__name__, str(e)[:80])
    except Exception as e:
        print("  tokens error", type(e).__name__, str(e)[:200])
    if fam == "gemma3":
        m = HookedVLM.from_pretrained(str(SHIPPED[fam]), dtype=torch.float32)
        b = m.to_inputs(["<bos><start_of_image> red circle square"], [[scene_images()[0]]], chat_template=False)
        tt = (b["input_ids"] == hf.config.image_token_id).long()
        try:
            _, cache = br.run_with_cache(b["input_ids"], pixel_values=b["pixel_values"], token_type_ids=tt)
            pat = cache["blocks.0.attn.hook_pattern"][0]
            print("  bridge image pattern upper-triangle mass:", float(pat.triu(1).sum()))
            cache_nb = {k: v[0] for k, v in cache.items()}
            from transformer_lens import ActivationCache
            c = ActivationCache(cache_nb, br, has_batch_dim=False)
            from transformer_lens.head_detector import compute_head_attention_similarity_score, get_previous_token_head_detection_pattern
            det = get_previous_token_head_detection_pattern(b["input_ids"])
            try:
                compute_head_attention_similarity_score(pat[0], det, exclude_bos=False, exclude_current_token=False, error_measure="abs")
                print("  head-detector abs score on the bridge's pattern: ok")
            except AssertionError:
                print("  head-detector abs score on the bridge's pattern: AssertionError (its lower-triangular check)")
        except Exception as e:
            print("  bridge image run error", type(e).__name__, str(e)[:300])
