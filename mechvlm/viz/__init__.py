"""mechvlm.viz: circuitsvis widgets (one offline bundle per page), attention over the
input image, and matplotlib figures of the metric results.

Needs the ``viz`` extra: ``pip install 'mechvlm[viz]'`` (circuitsvis, matplotlib).
"""

from mechvlm.viz.attention import (attention_heads, attention_pattern, collapse, colored_tokens,
                                   head_thumbnails, pattern_of, token_groups)
from mechvlm.viz.figures import (fig_attention_share, fig_logit_lens, fig_logit_lens_on_image,
                                 fig_received_attention, fig_visual_text_similarity)
from mechvlm.viz.html import (HTMLFragment, Page, Widget, circuitsvis_bundle, figure_to_img_html,
                              figure_to_png, image_to_img_html)
from mechvlm.viz.image import (ImagePanel, attention_on_image, attention_on_image_html, attention_on_image_layers,
                               grids_on_image, heat_pixels, image_grids, image_panels, model_pixel_size, overlay,
                               received_per_position, resize_to_grid)
from mechvlm.viz.knockout import fig_knockout, knockout_table_html, normalize_knockout
from mechvlm.viz.kv_heads_tracing import fig_causal_trace, fig_head_attribution, fig_key_artifacts, fig_probe_scores
from mechvlm.viz.labels import html_safe, token_labels
from mechvlm.viz.layout import layout_problems, text_boxes, text_overlaps
from mechvlm.viz.table1 import fig_table1, wilson_ci95
from mechvlm.viz.training import fig_loss_curve, fig_registering_table
from mechvlm.viz.visual_tokens import fig_category_fractions, fig_contribution, fig_token_budget, fig_token_categories

__all__ = [
    "HTMLFragment", "ImagePanel", "Page", "Widget", "attention_heads", "attention_on_image", "attention_on_image_html",
    "attention_on_image_layers", "fig_table1", "layout_problems", "text_boxes", "text_overlaps", "wilson_ci95",
    "attention_pattern", "circuitsvis_bundle", "collapse", "colored_tokens", "fig_attention_share",
    "fig_category_fractions", "fig_causal_trace", "fig_contribution", "fig_head_attribution", "fig_key_artifacts",
    "fig_knockout", "fig_probe_scores", "fig_token_budget", "fig_token_categories",
    "grids_on_image", "fig_logit_lens", "fig_logit_lens_on_image", "fig_loss_curve", "fig_registering_table",
    "fig_received_attention",
    "fig_visual_text_similarity", "figure_to_img_html", "knockout_table_html", "normalize_knockout",
    "figure_to_png", "head_thumbnails", "heat_pixels", "html_safe", "image_grids", "image_panels", "image_to_img_html",
    "model_pixel_size", "overlay", "pattern_of", "received_per_position", "resize_to_grid", "token_groups",
    "token_labels",
]
