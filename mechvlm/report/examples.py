"""Per-example pictures for the report: where the text's attention lands on the image.

For a few items (one per category), the unmodified model's attention from the text tokens
to each image token, in several layers, drawn over the input image on one colour scale per
row. The unit is the mean attention weight: ``a_j = mean_{i in text} mean_h A^h_ij`` (a
text token's post-softmax weight on image token ``j``, averaged over the text tokens and
the heads), so a row of values is comparable with ``1 / n_keys`` (uniform attention).
"""

from __future__ import annotations

import numpy as np
import torch

from ..mmbench.prompt import mmbench_prompt

MAX_LAYERS_SHOWN = 8


def example_items(items, n: int = 4) -> list:
    """The first item with an image of each category (base questions first), at most ``n``."""
    seen, out = set(), []
    for it in sorted(items, key=lambda it: (it.circular_copy, it.index)):
        if it.image is not None and it.category not in seen:
            seen.add(it.category)
            out.append(it)
        if len(out) == n:
            break
    return out


def layers_shown(n_layers: int, max_layers: int = MAX_LAYERS_SHOWN) -> list[int]:
    """Every layer when there are at most ``max_layers``, else ``max_layers`` evenly spaced
    ones from the first to the last."""
    if n_layers <= max_layers:
        return list(range(n_layers))
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, max_layers)})


def example_attention(model, builder, items, n: int = 4, layers: list[int] | None = None) -> list[dict]:
    """For the `example_items`: the mean attention weight from the text tokens to each image
    token (see the module docstring) per shown layer, on the image's token grid, and the
    figure of the row (``"figure_html"``, a PNG ``<img>``; one shared colour scale). Only the
    shown layers' patterns are cached, one example at a time.

    Returns one dict per item: ``index``, ``category``, ``question``, ``hint``, ``options``,
    ``answer``, ``layers``, ``n_layers``, ``grid`` (``[h, w]``), ``grids`` (``[layer][h][w]``),
    ``n_text_queries``, ``vmax``, ``figure_html``, ``figure_layout_problems``,
    ``figure_text_boxes`` (what `mechvlm.viz.layout` measured on the figure).
    """
    from ..viz import attention_on_image_layers, figure_to_img_html, image_grids
    from ..viz.layout import measure_layout
    from ..viz.image import received_per_position

    n_layers = model.cfg.n_layers
    layers = list(layers) if layers is not None else layers_shown(n_layers)
    names = {f"blocks.{l}.attn.hook_pattern" for l in layers}
    out = []
    for it in example_items(items, n):
        image = it.pil_image()
        batch = builder([mmbench_prompt(it)], [[image]])
        with torch.no_grad():
            _, cache = model.run_with_cache(**batch, names_filter=lambda name: name in names)
        roles = model.roles(**batch)
        n_text = int(roles.text[0].sum())
        grids, span = [], None
        for layer in layers:
            r = received_per_position(cache, roles, layer=layer, queries="text", head_reduce="mean") / n_text
            span, g = image_grids(r, roles)[0]
            grids.append(g)
        fig = attention_on_image_layers(grids, layers, image, span=span, cfg=model.cfg,
                                        label="mean attention weight, text → image token")
        boxes, problems = measure_layout(fig)
        n_boxes = len(boxes)
        out.append({
            "index": it.index, "category": it.category, "question": it.question, "hint": it.hint,
            "options": dict(it.options), "answer": it.answer, "layers": layers, "n_layers": n_layers,
            "grid": list(grids[0].shape), "grids": [g.round(6).tolist() for g in grids],
            "n_text_queries": n_text, "vmax": float(max(g.max() for g in grids)),
            "figure_html": figure_to_img_html(fig, alt=f"attention of the text on the image of item "
                                                       f"{it.index}, layers {layers}", close=True),
            "figure_layout_problems": problems, "figure_text_boxes": n_boxes,
        })
        del cache
    return out
