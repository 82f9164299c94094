"""Interventions: functions that return forward hooks ``[(hook_name, fn), ...]``.

They compose: concatenate their lists in one ``run_with_hooks`` (or ``run_with_cache``
via ``model.hooks(...)``). Hooks fire in list order at a given hook point.
"""

from mechvlm.interventions.activations import ablate_heads, mean_head_outputs, patch_activations, skip_sublayers
from mechvlm.interventions.attention import KNOCKOUT_MODES, knockout, knockout_reach
from mechvlm.interventions.by_row import ablate_head_outputs, ablate_image_kv, replace_where
from mechvlm.interventions.masks import gist_mask, mitre_mask
from mechvlm.interventions.injection import inject_at_layer
from mechvlm.interventions.pruning import PrunedBatch, mask_image_keys, remove_image_tokens
from mechvlm.interventions.registers import insert_registers, register_mask

__all__ = [
    "KNOCKOUT_MODES",
    "PrunedBatch",
    "ablate_head_outputs",
    "ablate_heads",
    "ablate_image_kv",
    "gist_mask",
    "inject_at_layer",
    "insert_registers",
    "knockout",
    "knockout_reach",
    "mask_image_keys",
    "mean_head_outputs",
    "mitre_mask",
    "patch_activations",
    "register_mask",
    "remove_image_tokens",
    "replace_where",
    "skip_sublayers",
]
