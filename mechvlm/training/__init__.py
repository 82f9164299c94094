"""Registering fine-tuning (seed 000 section 4, Table 2-3): fine-tune a `HookedVLM`'s
language model on captions with a register mask, save HF checkpoints that carry the
setting, and evaluate them with the same mask.

* `FinetuneConfig` (seed 000 Table 3 defaults) and `finetune(cfg)` / ``mechvlm finetune``.
* `Registering`, `add_register_token`; `apply_registering(model)` installs the mask a loaded
  checkpoint carries (``mechvlm report`` does), `registering_hooks` returns it as hooks.
* `CCSBUAlign`, `split_indices`, `write_toy_cc_sbu_align` (MiniGPT-4's caption layout).
* Checkpoints in HF layout (`mechvlm.hf_export`), resumable; DDP / FSDP2 under torchrun.
"""

from mechvlm.training.config import FinetuneConfig
from mechvlm.training.data import CaptionCollator, CCSBUAlign, scene_caption, split_indices, write_toy_cc_sbu_align
from mechvlm.training.loop import Finetuner, finetune
from mechvlm.training.registers import (Registering, RegisteringMask, add_register_token, apply_registering,
                                        hf_attention_mask, registering_hooks, registering_of)

__all__ = [
    "CCSBUAlign", "CaptionCollator", "FinetuneConfig", "Finetuner", "Registering", "RegisteringMask",
    "add_register_token", "apply_registering", "finetune", "hf_attention_mask", "registering_hooks", "registering_of",
    "scene_caption", "split_indices", "write_toy_cc_sbu_align",
]
