"""Train a toy Qwen2.5-VL or Gemma3 on the synthetic visual questions.

``python -m mechvlm.toy.train --family qwen2_5_vl --out DIR`` (also ``mechvlm train-toy``).
The model is the exact HF architecture (``*ForConditionalGeneration``) at ~1M parameters.
What made letters learnable (see ``docs/toy_models.md``, with the prototype before it):

- one token per option line, with its embedding initialised as letter + option word;
- a curriculum: open-ended answers only for the first ``--open-steps``, then a mix;
- fresh scenes every step (no fixed pool to memorise), loss on the answer token and EOS.

The prompts are the seed-000 MMBench prompt inside the checkpoint's chat template, built by
the same `InputBuilder` the evaluation uses. The record (seed, steps, wall time, held-out
accuracy per category) is saved as ``training.json`` next to the weights.
"""

from __future__ import annotations

import argparse
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..mmbench.prompt import mmbench_prompt_text
from ..processing import InputBuilder
from .checkpoint import build_toy, save_toy
from .scenes import CATEGORIES, LETTERS, OPEN_INSTRUCTION, Scene, make_scene, option_line


def fast_pixels(images: np.ndarray, builder: InputBuilder) -> dict[str, torch.Tensor]:
    """The HF image processor's output for uint8 images ``[N, H, W, 3]`` already at the
    processor's size (no resize), computed in torch; equal to ``builder.process_images``
    (a test checks it) and fast enough to run every training step."""
    proc = builder.image_processor
    x = torch.from_numpy(images).float().permute(0, 3, 1, 2) * proc.rescale_factor
    mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    x = (x - mean) / std
    if builder.model_type == "gemma3":
        return {"pixel_values": x}
    n, c, h, w = x.shape
    p, m, t = proc.patch_size, proc.merge_size, proc.temporal_patch_size
    gh, gw = h // p, w // p
    x = x.reshape(n, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(*x.shape[:6], t, p, p)
    pixel_values = x.reshape(n * gh * gw, c * t * p * p)
    grid = torch.tensor([[1, gh, gw]] * n)
    return {"pixel_values": pixel_values, "image_grid_thw": grid}


def mc_item(scene: Scene, py: random.Random, answer_style: str = "option") -> tuple[str, str]:
    """(prompt, target token) with the options shuffled. The target is the whole option
    line (``"B. red"``, one token) for ``answer_style="option"``, else the bare letter."""
    options = list(scene.options)
    py.shuffle(options)
    letter = LETTERS[options.index(scene.answer)]
    target = option_line(letter, scene.answer) if answer_style == "option" else letter
    return mmbench_prompt_text(scene.question, dict(zip(LETTERS, options)), scene.hint), target


def open_item(scene: Scene) -> tuple[str, str]:
    hint = f"{scene.hint}\n" if scene.hint else ""
    return f"{hint}{scene.question}\n{OPEN_INSTRUCTION}", scene.answer


class Batches:
    """Fresh scenes -> HF training batches with the answer positions marked."""

    def __init__(self, builder: InputBuilder, seed: int, answer_style: str = "option"):
        self.builder = builder
        self.answer_style = answer_style
        self.rng = np.random.default_rng(seed)
        self.py = random.Random(seed)
        tok = builder.tokenizer
        self.eos = builder.eos_token_ids[0] if builder.model_type == "qwen2_5_vl" else \
            tok.convert_tokens_to_ids("<end_of_turn>")
        self.n_image_tokens = 16

    def make(self, scenes: list[Scene], open_frac: float) -> dict:
        prompts, answers = [], []
        for s in scenes:
            p, a = open_item(s) if self.py.random() < open_frac else mc_item(s, self.py, self.answer_style)
            prompts.append(p)
            answers.append(a)
        return self.tensors(scenes, prompts, answers)

    def tensors(self, scenes, prompts, answers) -> dict:
        b, tok = self.builder, self.builder.tokenizer
        texts = [b.expand_images(b.render(p, 1), [self.n_image_tokens]) for p in prompts]
        rows = tok(texts, add_special_tokens=False)["input_ids"]
        targets = [tok.convert_tokens_to_ids(a) for a in answers]
        if tok.unk_token_id in targets:
            raise ValueError(f"an answer is not one token: {answers}")
        seqs = [r + [t, self.eos] for r, t in zip(rows, targets)]
        n = max(map(len, seqs))
        ids = torch.full((len(seqs), n), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        answer_pos = torch.tensor([len(r) - 1 for r in rows])  # predicts the answer
        for i, s in enumerate(seqs):  # right padding: positions stay 0..len-1
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        batch = {"input_ids": ids, "attention_mask": mask,
                 **fast_pixels(np.stack([s.image for s in scenes]), b)}
        image = (ids == tok.convert_tokens_to_ids(b.image_token)).long()
        batch["mm_token_type_ids" if b.model_type == "qwen2_5_vl" else "token_type_ids"] = image
        return {"batch": batch, "answer_pos": answer_pos, "targets": torch.tensor(targets)}


def loss_fn(model, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(**item["batch"], use_cache=False).logits
    rows = torch.arange(logits.shape[0])
    pos = item["answer_pos"]
    eos_target = item["batch"]["input_ids"][rows, pos + 2]
    loss = F.cross_entropy(logits[rows, pos], item["targets"]) + \
        0.5 * F.cross_entropy(logits[rows, pos + 1], eos_target)
    return loss, logits[rows, pos].argmax(-1)


@torch.no_grad()
def held_out_accuracy(model, batches: Batches, scenes: list[Scene], open_ended: bool) -> dict:
    """Greedy first-token accuracy per category on fixed held-out scenes."""
    model.eval()
    py = random.Random(1234)
    hits: dict[str, list[int]] = {c: [] for c in CATEGORIES}
    for i in range(0, len(scenes), 64):
        chunk = scenes[i:i + 64]
        pa = [open_item(s) if open_ended else mc_item(s, py, batches.answer_style) for s in chunk]
        item = batches.tensors(chunk, [p for p, _ in pa], [a for _, a in pa])
        _, pred = loss_fn(model, item)
        said = batches.builder.tokenizer.convert_ids_to_tokens(pred.tolist())
        for s, (_, want), got in zip(chunk, pa, said):  # MC: the letter decides, as in extraction
            hits[s.category].append(int(got == want if open_ended else got[:1] == want[:1]))
    model.train()
    out = {c: float(np.mean(v)) for c, v in hits.items() if v}
    out["all"] = float(np.mean([x for v in hits.values() for x in v]))
    return out


def compositional_init_(model, tokenizer) -> int:
    """Add to each option-line token's ("B. red") random embedding its letter's and its
    option word's embeddings: the content is readable from the start, and the random part
    keeps the token distinguishable from "A. red" (a copy of the options present in the
    prompt then tells the right letter from the others)."""
    emb = model.get_input_embeddings().weight
    n = 0
    with torch.no_grad():
        for tok, i in tokenizer.get_vocab().items():
            if len(tok) > 3 and tok[1:3] == ". " and tok[0] in LETTERS:
                word = tokenizer.convert_tokens_to_ids(tok[3:])
                if word != tokenizer.unk_token_id:
                    emb[i] += emb[tokenizer.convert_tokens_to_ids(tok[0])] + emb[word]
                    n += 1
    return n


def train(family: str, out: str, *, steps: int, batch_size: int, lr: float, seed: int,
          open_steps: int, open_frac: float, eval_every: int, threads: int, sizes: dict,
          answer_style: str = "option", snapshot_every: int = 0, overwrite: bool = False) -> dict:
    """Train and save the toy to ``out`` (and ``out-stepN`` snapshots). Before any compute,
    ``out`` (and every snapshot folder) must be writable and hold nothing mechvlm did not
    write, unless ``overwrite`` (`mechvlm.outdir.prepare_out_dir`)."""
    from ..outdir import prepare_out_dir

    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every),
                        ("threads", threads)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if snapshot_every < 0:
        raise ValueError(f"snapshot_every must be >= 0, got {snapshot_every}")
    snapshots = [s for s in range(1, steps) if snapshot_every and s % snapshot_every == 0 and s % eval_every == 0]
    for folder in [out, *(f"{out}-step{s}" for s in snapshots)]:
        prepare_out_dir(folder, overwrite=overwrite, check_parent_only=True)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    model, tokenizer, image_processor = build_toy(family, **sizes)
    builder = InputBuilder(tokenizer, image_processor, model.config)
    n_comp = compositional_init_(model, tokenizer)
    batches = Batches(builder, seed, answer_style)
    eval_rng = np.random.default_rng(10_000 + seed)
    held_out = [make_scene(CATEGORIES[i % len(CATEGORIES)], eval_rng) for i in range(400)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, min(200, steps // 10))  # at least one step: --steps < 10 must not divide by zero
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    history, t0 = [], time.time()
    model.train()
    for step in range(1, steps + 1):
        scenes = [make_scene(CATEGORIES[int(c)], batches.rng)
                  for c in batches.rng.integers(0, len(CATEGORIES), batch_size)]
        item = batches.make(scenes, 1.0 if step <= open_steps else open_frac)
        loss, _ = loss_fn(model, item)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            mc = held_out_accuracy(model, batches, held_out, open_ended=False)
            oe = held_out_accuracy(model, batches, held_out[:200], open_ended=True)
            row = {"step": step, "wall_s": round(time.time() - t0, 1), "loss": round(loss.item(), 4),
                   "mc": mc, "open": oe}
            history.append(row)
            if snapshot_every and step % snapshot_every == 0 and step < steps:
                save_toy(model, tokenizer, image_processor, f"{out}-step{step}",
                         {"family": family, "seed": seed, "step": step, "mc": mc})
            print(f"step {step:5d}  {row['wall_s']:7.1f}s  loss {loss.item():.3f}  MC "
                  + "  ".join(f"{k} {v:.2f}" for k, v in mc.items())
                  + "  | open " + " ".join(f"{v:.2f}" for v in oe.values()), flush=True)
    record = {
        "family": family, "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
        "open_steps": open_steps, "open_frac": open_frac, "answer_style": answer_style, "threads": threads, "sizes": sizes,
        "compositional_tokens": n_comp, "wall_s": round(time.time() - t0, 1),
        "n_params": sum(p.numel() for p in model.parameters()),
        "held_out_mc": history[-1]["mc"],
        "held_out_open": held_out_accuracy(model, batches, held_out, open_ended=True),
        "history": history, "torch": torch.__version__,
    }
    save_toy(model, tokenizer, image_processor, out, record)
    return record


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from ..argtypes import positive_int

    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=["qwen2_5_vl", "gemma3"], default="qwen2_5_vl")
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out even if it holds files mechvlm did not write")
    ap.add_argument("--steps", type=positive_int, default=4000)
    ap.add_argument("--batch-size", type=positive_int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--open-steps", type=int, default=300)
    ap.add_argument("--open-frac", type=float, default=0.3)
    ap.add_argument("--eval-every", type=positive_int, default=250)
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--snapshot-every", type=int, default=0, help="also save OUT-stepN every N steps")
    ap.add_argument("--answer-style", choices=["option", "letter"], default="option")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--d-mlp", type=int, default=384)
    ap.add_argument("--vision-hidden", type=int, default=64)
    ap.add_argument("--vision-depth", type=int, default=2)
    a = ap.parse_args(argv)
    sizes = dict(d_model=a.d_model, n_layers=a.n_layers, d_mlp=a.d_mlp, vision_hidden=a.vision_hidden,
                 vision_depth=a.vision_depth)
    rec = train(a.family, a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                open_steps=a.open_steps, open_frac=a.open_frac, eval_every=a.eval_every,
                threads=a.threads, sizes=sizes, answer_style=a.answer_style, snapshot_every=a.snapshot_every,
                overwrite=a.overwrite)
    print(f"saved {a.out}: held-out MC {rec['held_out_mc']}, wall {rec['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
