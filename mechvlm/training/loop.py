"""The fine-tuning loop (seed 000 section 4.1, Table 3): `finetune(cfg)`.

One optimizer step takes a global batch of ``cfg.global_batch`` caption examples (a seeded
permutation per epoch), splits it over the ranks and into micro-batches, and accumulates
the gradient of the caption-token cross-entropy (`mechvlm.losses.next_token_loss`) under
the Registering mask. The loss of a step is the mean over every scored token of the global
batch: each micro-batch contributes ``sum(nll) * world_size / n_scored_tokens_global``, so
the result does not depend on how the batch is split (the 2-rank = 1-process test).

The vision tower and projector are frozen (``requires_grad=False``, encoded under
``no_grad``: no gradient reaches them); every language-model weight is trained with AdamW
on a cosine schedule with warm-up and gradient clipping, in bf16 autocast on CUDA (fp32
master weights) and fp32 on CPU. A tqdm bar shows loss, lr and tokens/s; every step goes
to ``log.jsonl``; the validation loss is measured every ``val_every`` steps; checkpoints
(HF layout, resumable) are written every ``save_every`` steps, the final model to
``out/model``, and the loss curve to ``out/loss_curve.png``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mechvlm.fileio import write_bytes, write_json, write_text
from mechvlm.losses import next_token_loss, scored_positions
from mechvlm.training import distributed as D
from mechvlm.training.checkpoints import (checkpoint_name, list_checkpoints, load_training_state,
                                          prune_checkpoints, rng_state, save_checkpoint, set_rng_state)
from mechvlm.training.config import FinetuneConfig
from mechvlm.training.data import DEFAULT_PROMPT, CaptionCollator, CCSBUAlign, split_indices, write_toy_cc_sbu_align
from mechvlm.training.optim import build_optimizer
from mechvlm.training.registers import Registering, add_register_token, mask_hooks, registering_of, set_registering

#: settings a resumed run must share with the run it continues
RESUME_KEYS = ("model", "data", "registering", "mask", "prompt", "epochs", "max_steps", "global_batch", "lr",
               "min_lr_ratio", "warmup_ratio", "betas", "eps", "weight_decay", "max_grad_norm", "seed",
               "max_pixels", "min_pixels", "val_fraction", "toy_examples")


class Finetuner:
    """Holds a run's model, data and optimizer; `run` trains to the end (or resumes)."""

    def __init__(self, cfg: FinetuneConfig, info: D.DistInfo | None = None):
        self.cfg = cfg
        self.info = info or D.init_distributed(cfg.device)
        self.out = Path(cfg.out)
        self.rows: list[dict] = []
        self.step = 0
        self.extra_hooks: list = []  # further interventions after the mask (e.g. a probe)
        self._setup()

    # ------------------------------------------------------------------------ setup --
    def _setup(self) -> None:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        from mechvlm import HookedVLM
        from mechvlm.processing import InputBuilder, _image_processor

        cfg, info = self.cfg, self.info
        resume_from = self._resume_point()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        source = resume_from or cfg.model_dir()
        if not Path(source).is_dir():
            raise FileNotFoundError(f"model directory {source} does not exist")
        self.model = HookedVLM.from_pretrained(str(source), dtype=torch.float32, device=info.device)
        self.hf_config = AutoConfig.from_pretrained(source)
        self.tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
        proc = _image_processor(Path(source), self.hf_config.model_type)
        if self.hf_config.model_type == "qwen2_5_vl":  # seed 000: max / min pixels
            proc = type(proc).from_pretrained(source, size={"shortest_edge": cfg.min_pixels,
                                                            "longest_edge": cfg.max_pixels})
        self.image_processor = proc
        gen = Path(source) / "generation_config.json"
        self.generation_config = GenerationConfig.from_pretrained(source) if gen.is_file() else None
        wanted = Registering.parse(cfg.registering, cfg.mask)
        have = registering_of(self.model)
        if resume_from is not None or have.active:
            if (have.variant, have.n_registers, have.mask) != (wanted.variant, wanted.n_registers, wanted.mask):
                raise ValueError(f"{source} is a Registering model ({have.label}) but the run asks for "
                                 f"{wanted.label}")
            self.registering = have  # its token and trained register row are in the checkpoint
            set_registering(self.model, self.hf_config, have)
        else:
            self.registering = add_register_token(self.model, self.tokenizer, self.hf_config, wanted)
        self.mask = mask_hooks(self.registering)
        self.builder = InputBuilder(self.tokenizer, self.image_processor, self.hf_config)
        self._setup_data()
        for name, p in self.model.named_parameters():
            p.requires_grad_(not name.startswith("vision."))
        self.model.train()
        if self.model.vision is not None:
            self.model.vision.eval()
        self.wrapped = self.model
        if info.distributed:
            self.wrapped = D.wrap_fsdp(self.model, info) if cfg.fsdp else D.wrap_ddp(self.model, info)
        self.optimizer, self.scheduler = build_optimizer(self.model.parameters(), cfg, self.total_steps)
        if resume_from is not None:
            state = load_training_state(resume_from)
            self._check_resumable(state["config"])
            D.load_optimizer_state(self.model, self.optimizer, state["optimizer"], cfg.fsdp and info.distributed)
            self.scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)])
            self.step = int(state["step"])
            self.rows = [r for r in state["log"] if r["step"] <= self.step]
        self.resumed_from = resume_from

    def _resume_point(self) -> Path | None:
        cfg, out = self.cfg, self.out
        found = list_checkpoints(out)
        if cfg.resume:
            if not found:
                raise FileNotFoundError(f"--resume: {out} holds no checkpoint with a training state")
            return found[-1][1]
        if found or (out / "model").exists() or (out / "log.jsonl").exists():
            if not cfg.overwrite:
                raise FileExistsError(f"{out} already holds a fine-tuning run; pass --resume to continue it "
                                      "or --overwrite to start it again")
            if self.info.is_main:
                for _, p in found:
                    shutil.rmtree(p)
                shutil.rmtree(out / "model", ignore_errors=True)
                for f in ("log.jsonl", "run.json", "loss_curve.png"):
                    (out / f).unlink(missing_ok=True)
            D.barrier(self.info)
        return None

    def _check_resumable(self, saved: dict) -> None:
        now = self.cfg.to_dict()
        diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in RESUME_KEYS if saved.get(k) != now.get(k)]
        if diff:
            raise ValueError("--resume with other settings than the run it continues: " + "; ".join(diff))

    def _setup_data(self) -> None:
        cfg, info = self.cfg, self.info
        data_dir = Path(cfg.data) if cfg.data else self.out / "toy_cc_sbu_align"
        if cfg.data is None and not data_dir.exists():
            if info.is_main:
                write_toy_cc_sbu_align(data_dir, cfg.toy_examples)
            D.barrier(info)
        self.dataset = CCSBUAlign(data_dir)
        prompt = cfg.prompt if cfg.prompt is not None else self.dataset.prompt
        self.prompt = DEFAULT_PROMPT if prompt is None else prompt
        self.train_idx, self.val_idx = split_indices(len(self.dataset), cfg.val_fraction, cfg.seed)
        self.collator = CaptionCollator(self.builder, self.prompt, cfg.max_length)
        per_rank, rest = divmod(cfg.global_batch, info.world_size)
        if rest or per_rank % cfg.micro_batch:
            raise ValueError(f"global_batch {cfg.global_batch} must be a multiple of world_size x micro_batch = "
                             f"{info.world_size} x {cfg.micro_batch}")
        self.accumulation = per_rank // cfg.micro_batch
        self.steps_per_epoch = len(self.train_idx) // cfg.global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(self.train_idx)} training examples do not fill one global batch of "
                             f"{cfg.global_batch}")
        self.total_steps = cfg.max_steps or math.ceil(cfg.epochs * self.steps_per_epoch)
        self._perm: tuple[int, list[int]] | None = None

    # ------------------------------------------------------------------------ steps --
    def global_batch(self, step: int) -> list[int]:
        """Dataset indices of optimizer step ``step`` (0-based): epoch ``e`` walks a
        permutation of the training set seeded with ``(seed, e)``; a last partial batch is
        dropped."""
        epoch, slot = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm = (epoch, [self.train_idx[i] for i in torch.randperm(len(self.train_idx), generator=g)])
        b = self.cfg.global_batch
        return self._perm[1][slot * b:(slot + 1) * b]

    def autocast(self):
        p, dev = self.cfg.precision, self.info.device
        if p == "bf16" or (p == "auto" and dev.type == "cuda"):
            return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def micro_nll(self, batch: dict, target: torch.Tensor, model=None) -> torch.Tensor:
        """Summed caption-token NLL of one micro-batch under the mask (fp32 scalar)."""
        return caption_nll(self.model, batch, target, mask=self.mask, autocast=self.autocast,
                           extra_hooks=self.extra_hooks, call=model or self.wrapped)

    def _scored(self, batch, target) -> int:
        return int(scored_positions(batch["input_ids"], target, attention_mask=batch["attention_mask"],
                                    image_token_id=self.model.cfg.image_token_id).sum())

    def train_step(self) -> dict:
        """One optimizer step; returns its log row."""
        cfg, info = self.cfg, self.info
        t0 = time.perf_counter()
        mine = D.shard(self.global_batch(self.step), info)
        micro = [self.collator([self.dataset[i] for i in mine[j:j + cfg.micro_batch]])
                 for j in range(0, len(mine), cfg.micro_batch)]
        n_scored, n_real = D.all_reduce_sum([sum(self._scored(b, t) for b, t in micro),
                                             sum(int(b["attention_mask"].sum()) for b, _ in micro)], info)
        scale = info.world_size / n_scored
        nll_sum = 0.0
        ddp = info.distributed and not cfg.fsdp
        for j, (batch, target) in enumerate(micro):
            sync = j == len(micro) - 1
            with self.wrapped.no_sync() if ddp and not sync else contextlib.nullcontext():
                nll = self.micro_nll(batch, target)
                (nll * scale).backward()
            nll_sum += float(nll.detach())
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        (loss_sum,) = D.all_reduce_sum([nll_sum], info)
        self.step += 1
        wall = time.perf_counter() - t0
        return {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "loss": loss_sum / n_scored,
                "lr": lr, "grad_norm": norm, "scored_tokens": int(n_scored), "tokens": int(n_real),
                "tokens_per_s": round(n_real / wall, 1), "step_s": round(wall, 4)}

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean caption-token NLL over (at most ``val_limit``) validation examples, under the mask."""
        cfg, info = self.cfg, self.info
        idx = self.val_idx[:cfg.val_limit] if cfg.val_limit else self.val_idx
        per = len(idx) // info.world_size  # equal shares: FSDP forwards are collective
        if per == 0:
            return None
        mine = idx[info.rank * per:(info.rank + 1) * per]
        model = self.wrapped if cfg.fsdp else self.model
        nll = count = 0.0
        for j in range(0, len(mine), cfg.micro_batch):
            batch, target = self.collator([self.dataset[i] for i in mine[j:j + cfg.micro_batch]])
            nll += float(self.micro_nll(batch, target, model=model))
            count += self._scored(batch, target)
        nll, count = D.all_reduce_sum([nll, count], info)
        return nll / count

    # ------------------------------------------------------------------------- run --
    def run(self, on_step: Callable[[dict], None] | None = None) -> dict:
        """Train from ``self.step`` to the end; returns the run record (also ``run.json``).
        ``on_step(row)`` is called after every step (e.g. to stop a test run early)."""
        from tqdm.auto import tqdm

        cfg, info = self.cfg, self.info
        t_start = time.time()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="finetune", unit="step",
                   disable=not (cfg.progress and info.is_main))
        if self.step == 0 and not self.rows:
            val = self.validate()
            self.rows.append({"step": 0, "val_loss": val, "lr": self.scheduler.get_last_lr()[0]})
        try:
            while self.step < self.total_steps:
                row = self.train_step()
                if self.step % cfg.val_every == 0 or self.step == self.total_steps:
                    row["val_loss"] = self.validate()
                self.rows.append(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                if self.step % 10 == 0:
                    self._write_log()
                if self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save(self.out / checkpoint_name(self.step), resumable=True)
                if on_step is not None:
                    on_step(row)
        finally:
            bar.close()
            self._write_log()
        record = self.record(time.time() - t_start)
        self.save(self.out / "model", resumable=False, record=record)
        if info.is_main:
            write_json(self.out / "run.json", record)
            self._write_figure()
        return record

    def record(self, wall_s: float) -> dict:
        train = [r for r in self.rows if "loss" in r]
        vals = [r for r in self.rows if r.get("val_loss") is not None]
        return {"config": self.cfg.to_dict(), "registering": self.registering.to_dict(),
                "base_model": str(self.cfg.model_dir()), "data": str(self.dataset.root), "prompt": self.prompt,
                "n_train": len(self.train_idx), "n_val": len(self.val_idx), "world_size": self.info.world_size,
                "accumulation": self.accumulation, "steps": self.step, "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch, "device": str(self.info.device),
                "precision": "bf16-autocast" if isinstance(self.autocast(), torch.autocast) else "fp32",
                "n_trainable": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                "final_loss": train[-1]["loss"] if train else None,
                "first_val_loss": vals[0]["val_loss"] if vals else None,
                "final_val_loss": vals[-1]["val_loss"] if vals else None,
                "median_tokens_per_s": float(np.median([r["tokens_per_s"] for r in train])) if train else None,
                "wall_s": round(wall_s, 1), "resumed_from": str(self.resumed_from) if self.resumed_from else None}

    def save(self, path: Path, *, resumable: bool, record: dict | None = None) -> None:
        """A checkpoint (every rank takes part; rank 0 writes)."""
        info, fsdp = self.info, self.cfg.fsdp and self.info.distributed
        weights = D.full_state_dict(self.model, info, fsdp)
        state = None
        if resumable:
            states = [rng_state()]
            if info.distributed:
                states = [None] * info.world_size
                torch.distributed.all_gather_object(states, rng_state())
            state = {"step": self.step, "optimizer": D.full_optimizer_state(self.model, self.optimizer, fsdp),
                     "scheduler": self.scheduler.state_dict(), "rng": states, "log": self.rows,
                     "config": self.cfg.to_dict()}
        if info.is_main:
            save_checkpoint(path, self.model, self.hf_config, self.tokenizer, self.image_processor,
                            generation_config=self.generation_config, weights=weights, training_state=state,
                            record=record or {"step": self.step, "registering": self.registering.to_dict()})
            if resumable:
                prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        D.barrier(info)

    def _write_log(self) -> None:
        if self.info.is_main:
            write_text(self.out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))

    def _write_figure(self) -> None:
        try:
            from mechvlm.viz import figure_to_png
            from mechvlm.viz.training import fig_loss_curve
        except ImportError:  # the viz extra is optional
            return
        fig = fig_loss_curve(self.rows, title=f"{self.model.cfg.model_type}, registering {self.registering.label}")
        write_bytes(self.out / "loss_curve.png", figure_to_png(fig))


def caption_nll(model, batch: dict, target: torch.Tensor, *, mask: Callable | None = None,
                autocast: Callable = contextlib.nullcontext, extra_hooks=(), call=None) -> torch.Tensor:
    """The summed next-token NLL (fp32 scalar) of the ``target`` tokens of one batch.

    The images are encoded under ``no_grad`` (the frozen tower and projector get no
    gradient; their features enter as constants), then the language model runs under
    ``mask(batch, roles)`` (the Registering hooks; None: no mask) and ``extra_hooks``.
    ``call``: what runs the forward (the DDP / FSDP wrapper of ``model``; default ``model``)."""
    dev = model.device
    batch = {k: v.to(dev) for k, v in batch.items()}
    with torch.no_grad(), autocast():
        embeds = model.encode_images(batch["pixel_values"], batch.get("image_grid_thw")) \
            if batch.get("pixel_values") is not None else None
    hooks = list(mask(batch, model.roles(**batch))) if mask is not None else []
    with autocast(), model.hooks(fwd_hooks=hooks + list(extra_hooks)):
        logits = (call or model)(**batch, image_embeds=embeds)
    nll = next_token_loss(logits, batch["input_ids"], target.to(dev), attention_mask=batch.get("attention_mask"),
                          image_token_id=model.cfg.image_token_id, per_token=True)
    return nll.sum()


def finetune(cfg: FinetuneConfig, on_step: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) a fine-tuning; returns the run record. Under torchrun, every rank
    calls this."""
    info = D.init_distributed(cfg.device)
    try:
        return Finetuner(cfg, info).run(on_step)
    finally:
        D.shutdown(info)
