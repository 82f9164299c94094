"""Per-example pictures for the report: where the text's attention lands on the image."""

from __future__ import annotations

import html

from ..mmbench.prompt import mmbench_prompt


def example_items(items, n: int = 4) -> list:
    """The first item of each category (base questions first), at most ``n``."""
    seen, out = set(), []
    for it in sorted(items, key=lambda it: (it.circular_copy, it.index)):
        if it.image is not None and it.category not in seen:
            seen.add(it.category)
            out.append(it)
        if len(out) == n:
            break
    return out


def example_heatmaps(model, builder, items, n: int = 4, layers: tuple[int, ...] | None = None) -> list[str]:
    """HTML fragments: for a few items, the attention the text tokens pay to each image token
    (head mean) over the input image, in the first, middle and last layers. Only those layers'
    patterns are cached, one example at a time."""
    from ..viz import attention_on_image_html

    n_layers = model.cfg.n_layers
    layers = layers or tuple(sorted({0, n_layers // 2, n_layers - 1}))
    names = {f"blocks.{l}.attn.hook_pattern" for l in layers}
    out = []
    for it in example_items(items, n):
        image = it.pil_image()
        batch = builder([mmbench_prompt(it)], [[image]])
        _, cache = model.run_with_cache(**batch, names_filter=lambda name: name in names)
        roles = model.roles(**batch)
        figs = "".join(attention_on_image_html(cache, roles, [image], layer=l, cfg=model.cfg, size=2.6,
                                               title=f"layer {l}", alt=f"layer {l}") for l in layers)
        caption = f"#{it.index} ({it.category}): {it.question} answer {it.answer}. {it.options.get(it.answer, '')}"
        out.append(f"<div><p>{html.escape(caption)}</p>{figs}</div>")
    return out
