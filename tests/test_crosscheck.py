"""mechvlm.crosscheck: mechvlm against nnsight tracing the untouched HF model (eager).

The HF side is validated on its own first (its nnsight captures equal HF's own
``output_hidden_states`` / ``output_attentions``, its knockout edits equal the patched
eager references of test_interventions), then the cross-check must pass on both
families, fail on a deliberately broken hooked model and name the layer where it breaks.
"""

from __future__ import annotations

import ast
import json
import pathlib

import pytest
import torch

pytest.importorskip("nnsight")

from conftest import hf_kwargs as qwen_hf_kwargs  # noqa: E402
from conftest import hf_with_attention_edit, make_hf_qwen, qwen_batch  # noqa: E402
from mechvlm import HookedVLM  # noqa: E402
from mechvlm.cli import main  # noqa: E402
from mechvlm.components import RotaryEmbedding  # noqa: E402
from mechvlm.crosscheck import Tol, crosscheck, perturb_layer, tolerances_for  # noqa: E402
from mechvlm.crosscheck.hf_roles import hf_roles  # noqa: E402
from mechvlm.crosscheck.hf_side import EagerTwin, eager_copy, hf_inputs  # noqa: E402
from test_gemma3 import batch_from, make_hf  # noqa: E402

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from 2 threads, and on a shared CPU 2 spinning OpenMP
    threads make a cross-check up to 20x slower (measured); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


QWEN_ROWS = [[3, (1, 4, 6), 5], [2, (1, 4, 4), 7], [6]]  # left-padded; a text-only row (NaN shares)
GEMMA_ROWS = [[3, "image", 5], [2, "image", 1, "image", 3]]


@pytest.fixture(scope="module")
def qwen():
    return make_hf_qwen(seed=3, n_layers=3)


@pytest.fixture(scope="module")
def gemma():
    return make_hf(seed=3)  # layers S S F S S F


@pytest.fixture(scope="module")
def qwen_padded():
    return qwen_batch(QWEN_ROWS, seed=5)


@pytest.fixture(scope="module")
def gemma_padded():
    return batch_from(GEMMA_ROWS, mm=4, seed=5)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _untouched(model, before: dict, impl: str) -> bool:
    """Same weights, same attention implementation, no module instrumented by nnsight."""
    after = model.state_dict()
    same = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    wrapped = any("__nnsight__" in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
    return same and not wrapped and model.config._attn_implementation == impl


# --- the HF side on its own -------------------------------------------------------------

def test_hf_side_captures_equal_hf_outputs(qwen, qwen_padded):
    kw = hf_inputs(qwen.config, qwen_padded, torch.float32, "cpu")
    run = EagerTwin(eager_copy(qwen)).run_clean(kw)
    with torch.no_grad():
        ref = qwen(**qwen_hf_kwargs(qwen_padded), output_hidden_states=True, output_attentions=True)
    assert torch.equal(run.logits, ref.logits)
    assert torch.equal(run.embed, ref.hidden_states[0])
    for l in range(3):
        assert torch.equal(run.patterns[l], ref.attentions[l])
    for l in range(2):
        assert torch.equal(run.resid_post[l], ref.hidden_states[l + 1])
    assert torch.equal(run.final_norm, ref.hidden_states[-1])  # after the final norm


@pytest.mark.parametrize("mode", ["post_softmax_zero", "pre_softmax_mask"])
def test_hf_side_knockout_equals_patched_eager(qwen, qwen_padded, mode):
    """nnsight's edit of HF's softmax equals HF's eager attention rewritten by hand."""
    kw = hf_inputs(qwen.config, qwen_padded, torch.float32, "cpu")
    roles = hf_roles(qwen.config, qwen_padded["input_ids"], qwen_padded["attention_mask"])
    cut = (roles.text[:, :, None] & roles.image[:, None, :])[:, None]
    low = torch.finfo(torch.float32).min
    edit = dict(pattern_fn=lambda w: w.masked_fill(cut, 0.0)) if mode == "post_softmax_zero" else \
        dict(scores_fn=lambda s: s.masked_fill(cut, low))
    twin = EagerTwin(eager_copy(qwen))
    run = twin.run_knockout(kw, cut, mode)
    with torch.no_grad():
        ref = hf_with_attention_edit(qwen, None, **edit)(**qwen_hf_kwargs(qwen_padded)).logits
        clean = qwen(**qwen_hf_kwargs(qwen_padded)).logits
    real = roles.real
    assert (run.logits - clean)[real].abs().max() > 1e-2
    assert (run.logits - ref)[real].abs().max() <= 1e-6
    if mode == "post_softmax_zero":
        assert all((p.masked_select(cut.expand_as(p)) == 0).all() for p in run.patterns)


def test_hf_side_does_not_import_mechvlm_model_code():
    """The reference side reads HF modules only: its files import nothing of mechvlm
    outside mechvlm.crosscheck."""
    root = pathlib.Path(__file__).parents[1] / "mechvlm" / "crosscheck"
    for name in ("hf_side.py", "hf_roles.py", "share.py"):
        tree = ast.parse((root / name).read_text())
        mods = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        bad = [m for m in mods if m and m.startswith("mechvlm") and not m.startswith("mechvlm.crosscheck")]
        assert not bad, (name, bad)


# --- the cross-check --------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen", "gemma"])
def test_crosscheck_passes_fp32_and_leaves_model_untouched(family, request, capsys):
    hf = request.getfixturevalue(family)
    batch = request.getfixturevalue(f"{family}_padded")
    before = _state(hf)
    report = crosscheck(hf, batch)
    print("\n" + report.table())
    assert report.passed, report.table()
    n = len(hf.model.language_model.layers)
    quantities = {(r.quantity, r.layer) for r in report.rows}
    for l in range(n):
        assert {("pattern", l), ("resid_post", l), ("share/image", l), ("share/eoi", l)} <= quantities
    for q in ("logits", "final_norm", "roles/text", "knockout post_softmax_zero text->image logits",
              "knockout pre_softmax_mask text->eoi logits"):
        assert (q, None) in quantities
    assert len(report.effects) == 4 and min(report.effects.values()) > 1e-2  # the knockouts did something
    try:  # mechvlm's side of the share is the metric when the package has it
        import mechvlm.metrics  # noqa: F401
        assert report.share_source == "mechvlm.metrics.attention_share"
    except ImportError:
        assert report.share_source.startswith("hook_pattern cache")
    logits = next(r for r in report.rows if r.quantity == "logits")
    assert logits.max_abs <= 1e-4
    d = report.to_dict()
    assert d["passed"] and d["first_diverging_layer"] is None and json.dumps(d)
    assert set(d["by_quantity"]["pattern"]) == set(range(n))
    assert _untouched(hf, before, "eager")
    # a second run on the same model works (nothing was left instrumented)
    assert crosscheck(hf, batch, knockouts=False, share=False).passed


@pytest.mark.parametrize("family,layer", [("qwen", 1), ("gemma", 3)])
def test_broken_hooked_model_fails_and_names_the_layer(family, layer, request):
    hf = request.getfixturevalue(family)
    hooked = HookedVLM.from_hf(hf)
    perturb_layer(hooked, layer)
    report = crosscheck(hf, request.getfixturevalue(f"{family}_padded"), hooked=hooked)
    assert not report.passed
    assert report.first_diverging_layer == layer
    assert report.first_divergence.quantity == "pattern"  # q_proj moved: the pattern breaks first
    assert all(r.passed for r in report.rows if r.layer is not None and r.layer < layer)
    assert f"first divergence at layer {layer}: pattern" in report.summary()
    assert not next(r for r in report.rows if r.quantity == "logits").passed


def test_swapped_mrope_sections_fail_at_layer_0(qwen, qwen_padded):
    hooked = HookedVLM.from_hf(qwen)
    c = hooked.cfg
    swapped = (c.mrope_section[1], c.mrope_section[0], c.mrope_section[2])  # (3, 2, 3): h and t rows trade slots
    hooked._rotary = {t: RotaryEmbedding(c.d_head, c.rope_theta, mrope_section=swapped) for t in hooked._rotary}
    report = crosscheck(qwen, qwen_padded, hooked=hooked, knockouts=False)
    assert not report.passed
    assert report.first_diverging_layer == 0 and report.first_divergence.quantity == "pattern"
    assert next(r for r in report.rows if r.quantity == "embed").passed  # the embeddings still agree


@pytest.mark.parametrize("family", ["qwen", "gemma"])
def test_crosscheck_bf16_within_bf16_tolerance(family, request):
    hf = request.getfixturevalue(family)
    report = crosscheck(hf, request.getfixturevalue(f"{family}_padded"), dtype=torch.bfloat16)
    print("\n" + report.table())
    assert report.dtype == "bfloat16" and report.passed, report.table()
    assert hf.dtype == torch.float32  # the user's model was not cast
    # bf16 really differs from fp32 somewhere, and a perturbed layer is still caught
    assert max(r.max_abs for r in report.rows if r.kind == "logits") > 1e-4
    hooked = HookedVLM.from_hf(hf, dtype=torch.bfloat16)
    perturb_layer(hooked, 1, delta=2.0)
    broken = crosscheck(hf, request.getfixturevalue(f"{family}_padded"), hooked=hooked, dtype=torch.bfloat16,
                        knockouts=False, share=False)
    assert broken.first_diverging_layer == 1


def test_tolerances_by_dtype():
    fp32, bf16 = tolerances_for(torch.float32), tolerances_for(torch.bfloat16)
    assert fp32["logits"].bound(10.0) == pytest.approx(2e-4) and bf16["logits"].bound(10.0, noise=0.1) == pytest.approx(0.3 + 10 * 2**-8)
    assert tolerances_for(torch.bfloat16, measured_noise=False)["logits"].bound(10.0) == pytest.approx(0.5)
    assert tolerances_for(torch.float32, {"pattern": Tol(1e-3)})["pattern"].atol == 1e-3
    with pytest.raises(ValueError, match="no cross-check tolerances"):
        tolerances_for(torch.int8)
    with pytest.raises(ValueError, match="unknown quantity kind"):
        tolerances_for(torch.float32, {"logit": Tol(1.0)})


# --- command line -----------------------------------------------------------------------

def test_cli_crosscheck_on_local_directories(tmp_path, capsys):
    make_hf_qwen(seed=4, n_layers=2).save_pretrained(tmp_path / "qwen")
    make_hf(seed=4, n_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"]
            ).save_pretrained(tmp_path / "gemma")
    for name in ("qwen", "gemma"):
        assert main(["crosscheck", "--model", str(tmp_path / name), "--json", str(tmp_path / f"{name}.json")]) == 0
        out = capsys.readouterr().out
        assert "synthetic inputs" in out and "PASS" in out and "knockout pre_softmax_mask text->eoi" in out
        assert json.loads((tmp_path / f"{name}.json").read_text())["passed"]
    # a broken hooked model: non-zero exit status and the layer named
    assert main(["crosscheck", "--model", str(tmp_path / "qwen"), "--perturb-layer", "1", "--no-knockouts"]) == 1
    assert "first divergence at layer 1: pattern" in capsys.readouterr().out
    with pytest.raises(ValueError, match="has no usable processor"):
        main(["crosscheck", "--model", str(tmp_path / "qwen"), "--prompt", "What is this?"])


def tiny_gemma3_processor(image_size: int = 28, mm_tokens: int = 4):
    """A real Gemma3Processor (SigLIP image processor + a word-level tokenizer whose
    special ids match `mechvlm.synthetic.GEMMA3_IDS`). The Qwen2.5-VL processor cannot be
    built here: transformers 5.23 requires torchvision for its video processor."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import Gemma3Processor, PreTrainedTokenizerFast
    from transformers.models.gemma3 import Gemma3ImageProcessorPil

    from mechvlm.synthetic import GEMMA3_IDS as ids

    vocab = {"<pad>": ids["pad"], "<eos>": ids["eos"], "<bos>": ids["bos"], "<start_of_image>": ids["boi"],
             "<end_of_image>": ids["eoi"], "<image_soft_token>": ids["image"]}
    words = "[UNK] describe the image what is in this picture a red square".split()
    vocab.update({w: 3 + i for i, w in enumerate(words)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+|[.?!,]"), behavior="removed")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>", extra_special_tokens={
                                      "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                      "image_token": "<image_soft_token>"})
    template = ("{{ bos_token }}{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<start_of_image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")
    return Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}),
                           tokenizer=tok, chat_template=template, image_seq_length=mm_tokens)


def test_cli_crosscheck_with_a_processor_image_and_prompt(tmp_path, capsys):
    from mechvlm.crosscheck.inputs import synthetic_image

    make_hf(seed=6, n_layers=2, layer_types=["sliding_attention", "full_attention"]).save_pretrained(tmp_path)
    tiny_gemma3_processor().save_pretrained(tmp_path)
    synthetic_image(64).save(tmp_path / "picture.png")
    argv = ["crosscheck", "--model", str(tmp_path), "--image", str(tmp_path / "picture.png"),
            "--prompt", "What is in this picture?", "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "processor inputs, (1, 12) tokens" in out and "PASS" in out, out
    # text after the image: "what is in this picture" (5 tokens), image share is a real number
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["by_quantity"]["share/image"]["0"]["passed"]
