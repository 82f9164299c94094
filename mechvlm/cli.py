"""Command line: ``mechvlm report`` (the main job), ``demo``, ``hooks``, ``crosscheck``,
``make-mmbench``, ``train-toy`` and ``finetune`` (Registering fine-tuning, `mechvlm.training`).

``report`` runs seed 000's analyses (attention share, cumulative received attention, the
knockout table on an MMBench-format TSV) on both shipped toys by default, or on local
checkpoint directories (``--model``, repeatable), and writes an HTML report and a JSON.

``demo`` needs nothing but this package: it builds a small random Qwen2.5-VL, runs the
same image prompt through Hugging Face and through mechvlm, and prints the parity and a
knockout's effect. ``hooks`` lists the hook points of a checkpoint with their shapes.
``crosscheck`` compares mechvlm with nnsight tracing the HF model (exit status 1 when a
quantity is out of tolerance; needs ``pip install mechvlm[crosscheck]``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .argtypes import positive_int


def probe_ids(cfg, n: int) -> torch.Tensor:
    """``[1, n]`` token ids for a text-only probe forward: ids from 3 up that are none of the
    image / video / image-start / image-end tokens (which need pixels or are refused)."""
    special = {cfg.image_token_id, cfg.video_token_id, cfg.image_start_token_id, cfg.image_end_token_id}
    ids = [i for i in range(3, cfg.d_vocab) if i not in special][:n]
    if len(ids) < n:
        ids = (ids * n)[:n]
    return torch.tensor([ids])


def _demo(args: argparse.Namespace) -> int:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mechvlm import HookedVLM
    from mechvlm.synthetic import QWEN_IDS, qwen2_5_vl_config, qwen_pixel_values, qwen_prompt

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    hf = Qwen2_5_VLForConditionalGeneration._from_config(
        qwen2_5_vl_config(n_layers=args.layers), attn_implementation="eager").eval()
    model = HookedVLM.from_hf(hf)
    ids, grid = qwen_prompt([6, (1, 8, 8), 10], generator=g)
    pixels = qwen_pixel_values(grid, generator=g)
    inputs = dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid)
    c = model.cfg
    print(f"HookedVLM({c.architecture}, random weights): {c.n_layers} layers, d_model {c.d_model}, "
          f"{c.n_heads} heads / {c.n_kv_heads} KV heads, mRoPE sections {c.mrope_section}")
    print(f"{len(model.hook_dict)} hook points; prompt: {ids.shape[1]} tokens, "
          f"{int((ids == QWEN_IDS['image']).sum())} image tokens\n")
    with torch.no_grad():
        ref = hf(**inputs, mm_token_type_ids=(ids == QWEN_IDS["image"]).long(), output_attentions=True)
        logits, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("hook_pattern"))
    print(f"logits   max |mechvlm - HF eager| = {(logits - ref.logits).abs().max():.2e}")
    for l in range(model.cfg.n_layers):
        d = (cache["pattern", l] - ref.attentions[l]).abs().max()
        print(f"layer {l}  max |pattern - HF output_attentions| = {d:.2e}")

    from mechvlm.interventions import knockout

    roles = model.roles(**inputs)  # seed 000 Eq. 3-4: text->image attention zeroed, no renormalisation
    with torch.no_grad():
        ko = model.run_with_hooks(**inputs, fwd_hooks=knockout(roles, query="text", key="image"))
    shift = (ko[0, -1].softmax(-1) - logits[0, -1].softmax(-1)).abs().sum() / 2
    print(f"text->image knockout in all layers: total-variation change of the last "
          f"next-token distribution = {shift:.3f}")
    return 0


def _hooks(args: argparse.Namespace) -> int:
    if not args.online:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mechvlm import HookedVLM

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = HookedVLM.from_pretrained(args.model, dtype=dtype, device=args.device)
    ids = probe_ids(model.cfg, args.tokens)
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=lambda n: n.startswith(("hook_", "blocks.0.", "ln_final")))
    print(model.cfg)
    for name, act in cache.items():
        print(f"{name:40s} {tuple(act.shape)} {act.dtype}")
    print(f"... and the same per-layer hooks for blocks 1..{model.cfg.n_layers - 1}; "
          f"{len(model.hook_dict)} hook points in all")
    return 0


def _crosscheck(args: argparse.Namespace) -> int:
    if not args.online:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import nnsight  # noqa: F401
    except ImportError:
        print("mechvlm crosscheck needs nnsight: pip install 'mechvlm[crosscheck]'", file=sys.stderr)
        return 2
    import json

    from mechvlm.crosscheck import crosscheck, perturb_layer

    if args.json:
        from .outdir import prepare_out_file

        prepare_out_file(args.json, overwrite=True, arg="--json")  # writable, before any compute
    dtype = getattr(torch, args.dtype) if args.dtype else None
    kw = dict(dtype=dtype, device=args.device, image=args.image, prompt=args.prompt, seed=args.seed,
              knockouts=not args.no_knockouts, share=not args.no_share)
    if args.perturb_layer is None:
        report = crosscheck(args.model, **kw)
    else:  # testing the checker: a hooked model that is wrong from one layer on
        from mechvlm import HookedVLM
        from mechvlm.crosscheck.inputs import build_inputs, load_hf_eager

        hf = load_hf_eager(args.model, dtype=dtype, device=args.device)
        hooked = HookedVLM.from_hf(hf)
        perturb_layer(hooked, args.perturb_layer)
        batch, _ = build_inputs(hf.config, args.model, image=args.image, prompt=args.prompt, seed=args.seed)
        kw.pop("image"), kw.pop("prompt"), kw.pop("seed")
        report = crosscheck(hf, batch, hooked=hooked, **kw)
        report.model += f" (mechvlm layer {args.perturb_layer} perturbed on purpose)"
    print(report.table())
    if args.json:
        from .fileio import write_text

        write_text(args.json, json.dumps(report.to_dict(), indent=1))
    return 0 if report.passed else 1


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _report(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .distributed import init_from_env, shutdown, terminate_cleanly
    from .report import ReportConfig, run_report

    device = init_from_env(args.device)  # under torchrun: join the group; "cuda" -> cuda:LOCAL_RANK
    cfg = ReportConfig(models=tuple(args.model or ()), mmbench=args.mmbench, limit=args.limit,
                       device=device, device_map=args.device_map, dtype=args.dtype, out=args.out,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, examples=args.examples,
                       progress=not args.no_progress, analyses=tuple(_csv(args.analyses)),
                       overwrite=args.overwrite, resume=args.resume,
                       **({"conditions": tuple(_csv(args.conditions))} if args.conditions else {}))
    with terminate_cleanly():
        run_report(cfg)
    shutdown()
    return 0


def _make_mmbench(args: argparse.Namespace) -> int:
    from .outdir import prepare_out_file
    from .toy.benchmark import write_benchmark

    prepare_out_file(args.out, overwrite=args.overwrite)  # before generating: exists / not writable
    path = write_benchmark(args.out, n_questions=args.questions, seed=args.seed,
                           circular=not args.no_circular)
    print(f"wrote {path}")
    return 0


def _train_toy(args: argparse.Namespace) -> int:
    from .toy.train import main as train_main

    return train_main(args.rest, prog="mechvlm train-toy")


DESCRIPTION = ("mechvlm: mechanistic interpretability of vision-language models (Qwen2.5-VL, Gemma3). "
               "'mechvlm report' runs the visual-information-flow analyses of Sakajo et al. (attention "
               "share, received attention, the attention-knockout Table 1) on checkpoints and an MMBench "
               "TSV and writes an HTML page; with no arguments it runs both shipped toy models offline.")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every option's help, except when there is nothing to show
    (None, a flag's False) or the help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("mechvlm")
    except metadata.PackageNotFoundError:  # pragma: no cover - a source tree without install
        from . import __version__

        return __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-toy"]:  # every argument, --help included, is the training script's
        return _train_toy(argparse.Namespace(rest=argv[1:]))
    parser = _Parser(prog="mechvlm", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mechvlm {_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    rep = sub.add_parser("report", help="attention share, received attention and the knockout Table 1 -> "
                                        "HTML page and JSON")
    rep.add_argument("--model", action="append", default=None, metavar="DIR",
                     help="local checkpoint directory; repeat it to compare several models on the same "
                          "items (default: both shipped toys, Qwen2.5-VL and Gemma3)")
    rep.add_argument("--mmbench", default=None, help="MMBench-format TSV (default: shipped synthetic one)")
    rep.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N rows (default: all)")
    rep.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    rep.add_argument("--device-map", default=None, choices=["auto", "balanced", "balanced_low_0", "sequential"],
                     help="split each model over the GPUs as HF's device_map does (under torchrun: over this "
                          "process's share of the node's GPUs), offloading to the CPU what does not fit "
                          "(default: all on --device)")
    rep.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="weights and activations")
    rep.add_argument("--out", default="mechvlm-report", help="output directory")
    rep.add_argument("--overwrite", action="store_true",
                     help="replace files in --out that mechvlm did not write (refused otherwise)")
    rep.add_argument("--resume", action="store_true",
                     help="continue an interrupted run in --out from its journal (refused if a model, the "
                          "TSV or a setting changed)")
    rep.add_argument("--batch-size", type=positive_int, default=16, help="items per forward")
    rep.add_argument("--max-new-tokens", type=positive_int, default=4, help="tokens generated greedily per item")
    rep.add_argument("--examples", type=int, default=4, help="items drawn as attention-on-image rows")
    rep.add_argument("--no-progress", action="store_true", help="no progress bars")
    rep.add_argument("--analyses", default=None, metavar="NAME[,NAME...]",
                     help="optional report sections (mechvlm.report.sections.ANALYSES), e.g. logit_lens "
                          "(default: none)")
    rep.add_argument("--conditions", default=None, metavar="NAME[,NAME...]",
                     help="MMBench conditions (default: the five of Table 1, none and text->image / text->EOI "
                          "in both knockout modes; see mechvlm.mmbench.conditions.CONDITIONS and the "
                          "registered parsers)")
    rep.set_defaults(fn=_report)
    mk = sub.add_parser("make-mmbench", help="write the synthetic benchmark as an MMBench TSV")
    mk.add_argument("--out", required=True, help="the TSV file to write")
    mk.add_argument("--overwrite", action="store_true", help="replace --out if it exists (refused otherwise)")
    mk.add_argument("--questions", type=positive_int, default=100,
                    help="base questions (each with circular copies)")
    mk.add_argument("--seed", type=int, default=2026, help="seed of the scenes and questions")
    mk.add_argument("--no-circular", action="store_true", help="no rotated copies")
    mk.set_defaults(fn=_make_mmbench)
    tr = sub.add_parser("train-toy", help="train a toy checkpoint (arguments: see python -m mechvlm.toy.train -h)",
                        add_help=False)
    tr.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of python -m mechvlm.toy.train")
    tr.set_defaults(fn=_train_toy)
    from .training.cli import add_finetune_parser

    add_finetune_parser(sub)
    demo = sub.add_parser("demo", help="parity with HF and a knockout on a small random Qwen2.5-VL")
    demo.add_argument("--layers", type=int, default=4, help="layers of the random model")
    demo.add_argument("--seed", type=int, default=0, help="seed of the weights, prompt and pixels")
    demo.set_defaults(fn=_demo)
    hooks = sub.add_parser("hooks", help="list the hook points of a checkpoint with their shapes")
    hooks.add_argument("--model", required=True, help="hub id or local HF directory")
    hooks.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")
    hooks.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    hooks.add_argument("--tokens", type=positive_int, default=8, help="length of the text-only probe input")
    hooks.add_argument("--online", action="store_true", help="allow hub downloads")
    hooks.set_defaults(fn=_hooks)
    cc = sub.add_parser("crosscheck", help="compare mechvlm with nnsight tracing the HF model (eager)")
    cc.add_argument("--model", required=True, help="hub id or local HF directory")
    cc.add_argument("--image", default=None, help="image file (needs the model's processor; default: synthetic)")
    cc.add_argument("--prompt", default=None, help="text prompt (needs the model's processor; default: a synthetic prompt)")
    cc.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")
    cc.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    cc.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompt and pixels")
    cc.add_argument("--json", default=None, help="also write the report as JSON to this file (default: no JSON)")
    cc.add_argument("--no-knockouts", action="store_true", help="skip the knockout comparisons")
    cc.add_argument("--no-share", action="store_true", help="skip the attention-share comparison")
    cc.add_argument("--online", action="store_true", help="allow hub downloads")
    cc.add_argument("--perturb-layer", type=int, default=None, metavar="L",
                    help="testing the checker: perturb one weight of mechvlm's layer L (must FAIL at L; "
                         "default: no perturbation)")
    cc.set_defaults(fn=_crosscheck)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
