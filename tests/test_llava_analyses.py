"""The streaming metrics on the LLaVA families against HF's own attentions and hidden
states (the METHODS formulas in plain torch, roles from the token ids), and the
checkpoint path: save_pretrained -> HookedVLM.from_pretrained / InputBuilder (checked
against HF's own processors) -> ``mechvlm report --model``."""

from __future__ import annotations

import json

import pytest
import torch

from llava_helpers import FAMILIES, hf_kwargs, llava_batch, make_hf_llava
from mechvlm import HookedVLM, attention_share, logit_lens, received_attention
from mechvlm.synthetic import LLAVA_IDS
from test_metrics import THRESHOLDS, ref_fraction, ref_mass, ref_raw

torch.set_num_threads(min(2, torch.get_num_threads()))
TOL = 1e-4
SIZES = {"llava": None, "llava_next": [(10, 60), (50, 50), (84, 10)],
         "llava_onevision": [(50, 70), (20, 40), (40, 20)]}


class Pair:
    """A HF LLaVA model, its HookedVLM, two batches (one left-padded), hand-built roles."""

    def __init__(self, family: str):
        self.family = family
        self.hf = make_hf_llava(family, seed=11, n_layers=3, n_heads=6, n_kv_heads=2, d_model=96)
        self.model = HookedVLM.from_hf(self.hf)
        sizes = SIZES[family]
        self.batches = [llava_batch(self.hf, [[3, "image", 6]], sizes and sizes[:1], seed=1),
                        llava_batch(self.hf, [[2, "image", 4], [1, "image", 2, "image", 3]], sizes, seed=2,
                                    per_row_images=family == "llava_onevision")]

    def roles(self, batch) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"]
        am = batch.get("attention_mask")
        real = am.bool() if am is not None else torch.ones_like(ids, dtype=torch.bool)
        image = ids == LLAVA_IDS["image"]
        bos = ids == LLAVA_IDS["bos"]
        after = image.long().cumsum(-1) > 0
        return {"image": image, "bos": bos & real, "text": real & after & ~image & ~bos, "real": real}

    def hf_run(self, batch):
        with torch.no_grad():
            return self.hf(**hf_kwargs(batch), output_attentions=True, output_hidden_states=True, use_cache=False)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    return Pair(request.param)


def test_attention_share_matches_hf(pair):
    keys = ("image", "text", "bos")
    res = attention_share(pair.model, pair.batches, keys=keys, progress=False, query_chunk=5)
    ref = torch.cat([ref_raw(pair.hf_run(b).attentions, pair.roles(b)["text"], [pair.roles(b)[k] for k in keys])
                     for b in pair.batches])
    assert res.raw.shape == ref.shape == (3, 3, 6, 3) and ref[..., 0].min() > 0.05
    share = ref / ref.sum(-1, keepdim=True)
    diff = max((res.raw - ref).abs().max().item(), (res.share - share).abs().max().item())
    print(f"\n[{pair.family} attention_share vs HF] max abs diff {diff:.1e}")
    assert diff <= TOL


def test_received_attention_matches_hf(pair):
    res = received_attention(pair.model, pair.batches, layers=[0, 2], heads=[1, 4], progress=False)
    ex, diffs = 0, []
    for batch in pair.batches:
        roles, attn = pair.roles(batch), pair.hf_run(batch).attentions
        for row in range(batch["input_ids"].shape[0]):
            img = roles["image"][row]
            ref = torch.stack([ref_mass(attn[l], roles["text"])[row][[1, 4]][:, img] for l in (0, 2)])
            assert res.positions[ex].tolist() == img.nonzero().squeeze(-1).tolist()
            diffs.append((res.received[ex] - ref).abs().max().item())
            want = [ref_fraction(ref[1].mean(0).double().numpy(), p) for p in THRESHOLDS]
            assert res.frac_tokens_head_mean[ex, 1].tolist() == pytest.approx(want)
            ex += 1
    print(f"\n[{pair.family} received_attention vs HF] max abs diff {max(diffs):.1e}")
    assert ex == 3 and max(diffs) <= TOL


def test_logit_lens_matches_hf(pair):
    batch = pair.batches[1]
    out = pair.hf_run(batch)
    img = pair.roles(batch)["image"]
    lm = pair.hf.model.language_model
    states = list(out.hidden_states[:-1])
    with torch.no_grad():
        ref = [torch.softmax(pair.hf.lm_head(lm.norm(h[img])).float(), -1).topk(3, -1) for h in states]
        ref.append(torch.softmax(out.logits[img].float(), -1).topk(3, -1))  # the last layer: the model's output
    res = logit_lens(pair.model, batch, k=3, progress=False)
    assert res.top_ids.shape == (int(img.sum()), 4, 3)
    for li, r in enumerate(ref):
        assert torch.equal(res.top_ids[:, li], r.indices), li
        assert (res.top_probs[:, li] - r.values).abs().max() <= 1e-5


def test_knockouts_change_the_output_and_both_modes_differ(pair):
    """(Their values against HF eager are in the nnsight cross-check, test_llava.)"""
    from mechvlm.interventions import knockout

    batch = pair.batches[1]
    roles = pair.model.roles(**batch)
    with torch.no_grad():
        clean = pair.model(**batch)
        post, pre = (pair.model.run_with_hooks(**batch, fwd_hooks=knockout(roles, "text", "image", mode=m))
                     for m in ("post_softmax_zero", "pre_softmax_mask"))
    real = roles.real
    assert (post - clean)[real].abs().max() > 1e-2 and (pre - post)[real].abs().max() > 1e-3


# --- checkpoints on disk: from_pretrained, InputBuilder, report ---------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from mechvlm.toy.checkpoint import build_toy, save_toy

    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model, tok, proc = build_toy(family, d_model=64, n_layers=2, d_mlp=128, vision_hidden=32)
        out[family] = save_toy(model, tok, proc, tmp_path_factory.mktemp(family) / family)
    return out


def _scenes(n: int):
    from mechvlm.mmbench import load_mmbench, mmbench_prompt
    from mechvlm.toy.benchmark import SHIPPED_TSV

    items = load_mmbench(SHIPPED_TSV)[:n]
    return items, [mmbench_prompt(it) for it in items], [[it.pil_image()] for it in items]


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_loads_and_input_builder_matches_hf(checkpoints, family):
    """from_pretrained == HF's from_pretrained; the InputBuilder's batch == HF's own processor's
    (LlavaProcessor / LlavaNextProcessor; OneVision's needs torchvision for its video part, so
    its token counts are checked against HF's feature count by the forward itself)."""
    import transformers

    from mechvlm.processing import InputBuilder

    path = checkpoints[family]
    model = HookedVLM.from_pretrained(str(path))
    hf = transformers.AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    builder = InputBuilder.from_pretrained(path)
    _, prompts, images = _scenes(3)
    batch = builder(prompts, images)
    if family != "llava_onevision":
        cls = transformers.LlavaProcessor if family == "llava" else transformers.LlavaNextProcessor
        proc = cls(image_processor=builder.image_processor, tokenizer=builder.tokenizer, patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
        texts = [builder.render(p, 1) for p in prompts]
        theirs = proc(text=texts, images=[im for ims in images for im in ims], return_tensors="pt", padding=True,
                      add_special_tokens=False)
        for key in batch:
            assert torch.equal(batch[key], theirs[key]), key
    with torch.no_grad():
        ref = hf(**hf_kwargs(batch)).logits
        out = model(**batch)
    real = batch["attention_mask"].bool()
    assert (out - ref)[real].abs().max() <= TOL and ref[real].abs().max() > 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_lengths_equal_the_built_rows(checkpoints, family):
    """`InputBuilder.prompt_lengths` (what `mmbench.evaluate` sorts by, from image sizes alone)
    equals the rows the builder makes with HF's image processor: anyres tiles, and
    OneVision's untiled images in rows with several."""
    from PIL import Image

    from mechvlm.processing import InputBuilder

    builder = InputBuilder.from_pretrained(checkpoints[family])
    images = [[Image.new("RGB", (97, 41))], [Image.new("RGB", (40, 90)), Image.new("RGB", (64, 64))], []]
    prompts = ["a wide image", "two images, one tall", "no image at all"]
    lengths = builder.prompt_lengths(prompts, images)
    rows = [int(builder([p], [ims])["attention_mask"].sum()) for p, ims in zip(prompts, images)]
    assert lengths == rows and len(set(lengths)) == 3


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_report_runs_on_a_local_checkpoint(checkpoints, family, tmp_path):
    from mechvlm.cli import main

    out = tmp_path / "report"
    assert main(["report", "--model", str(checkpoints[family]), "--out", str(out), "--no-progress",
                 "--limit", "2", "--batch-size", "2", "--analyses", "logit_lens,share_conditions"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["model_type"] == family and res["n_items"] == 2
    assert set(res["knockout"]) == {"none", "text→image:pre_softmax_mask", "text→image:post_softmax_zero"}
    assert set(res["skipped"]) == {"text→EOI:pre_softmax_mask", "text→EOI:post_softmax_zero"}
    assert res["attention_share"]["keys"] == ["image", "text"]
    under = res["analyses"]["share_conditions"]["results"]  # the same conditions and keys as the report's
    assert set(under) == set(res["knockout"]) and {r["keys"] == ["image", "text"] for r in under.values()} == {True}
    html = (out / "report.html").read_text()
    assert "not run: text→EOI:pre_softmax_mask" in html and html.count("data:image/png;base64,") >= 3
    assert "this model has no end-of-image token" in html
