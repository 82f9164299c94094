"""matplotlib figures of the image-K/V probes, key artifacts, head attribution and causal
tracing (`mechvlm.analyses`); each returns a ``Figure`` whose drawn numbers are the result's.

- `fig_probe_scores`: ``ProbeResult`` -> score per layer, one line per kind (key / value /
  key_pre), the vision baseline dashed and chance dotted; one panel per task.
- `fig_key_artifacts`: ``KeyArtifactResult`` -> the cross-image key cosine on the token grid,
  one panel per (layer, KV head), artifacts outlined.
- `fig_head_attribution`: ``HeadAttributionResult`` -> layer x head heatmaps of the weights
  (and of the single-head drops and the attention to the image, when present).
- `fig_causal_trace`: ``CausalTraceResult`` -> layer x position-group recovery (and layer x
  head with ``heads``).
"""

from __future__ import annotations

import numpy as np

from mechvlm.viz.figures import _np, _subplots

__all__ = ["fig_causal_trace", "fig_head_attribution", "fig_key_artifacts", "fig_probe_scores"]

_KIND_COLORS = {"key": "#4C72B0", "value": "#C44E52", "key_pre": "#55A868"}
_TASK_LABEL = {"segmentation": "segmentation (mIoU)", "correspondence": "correspondence (PCK)",
               "referring": "referring localisation (hit rate)"}


def fig_probe_scores(result, *, tasks=None, width: float = 4.2, height: float = 3.2, title: str | None = None):
    """Probe score per layer and kind, with the vision-encoder baseline and chance."""
    present = [t for t in ("segmentation", "correspondence", "referring") if result.select(t)]
    tasks = present if tasks is None else list(tasks)
    if not tasks:
        raise ValueError("the result holds no probe scores")
    fig, axes = _subplots(len(tasks), width, height)
    for ax, task in zip(axes, tasks):
        kinds, layers, scores = result.table(task)
        _, _, chance = result.table(task, "chance")
        x = np.arange(len(layers))
        for i, kind in enumerate(kinds):
            y = _np(scores[i])
            if kind == "vision":
                ax.plot(x, y, color="black", ls="--", lw=1.2, label="vision encoder")
            else:
                ax.plot(x, y, color=_KIND_COLORS.get(kind), marker="o", ms=3, label=kind)
        ax.plot(x, _np(chance[0]), color="grey", ls=":", lw=1.2, label="chance")
        ax.set_xticks(x, [str(l) for l in layers])
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(_TASK_LABEL.get(task, task), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title or "Zero-shot probes of the image keys and values", fontsize=10)
    fig.tight_layout()
    return fig


def fig_key_artifacts(result, *, size: float = 1.6, title: str | None = None):
    """Mean cross-image cosine of each key on the grid; artifacts (>= threshold) boxed."""
    import matplotlib.patches as patches

    cons = _np(result.consistency)  # [layer, h, w, kv]
    n_layers, h, w, kv = cons.shape
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(kv, n_layers, figsize=(size * n_layers + 1, size * kv + 0.6), squeeze=False)
    im = None
    for j in range(kv):
        for i in range(n_layers):
            ax = axes[j][i]
            im = ax.imshow(cons[i, :, :, j], vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
            for r, c in zip(*np.nonzero(cons[i, :, :, j] >= result.threshold)):
                ax.add_patch(patches.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="black", lw=1.5))
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_title(f"layer {result.layers[i]}", fontsize=8)
            if i == 0:
                ax.set_ylabel(f"KV head {j}", fontsize=8)
    fig.colorbar(im, ax=axes, fraction=0.02, pad=0.01, label="mean cosine across images")
    fig.suptitle(title or f"Input-agnostic image keys (boxed: cosine >= {result.threshold})", fontsize=10)
    return fig


def _heatmap(ax, fig, values, title, cmap="RdBu_r", symmetric=True, ylabel="layer", xlabel="head",
             xticks=None, yticks=None):
    v = _np(values)
    lim = np.nanmax(np.abs(v)) if symmetric and np.isfinite(v).any() else None
    im = ax.imshow(v, cmap=cmap, aspect="auto", interpolation="nearest",
                   vmin=-lim if lim else None, vmax=lim if lim else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xticks is not None:
        ax.set_xticks(range(len(xticks)), xticks, rotation=45, ha="right", fontsize=7)
    if yticks is not None:
        ax.set_yticks(range(len(yticks)), [str(t) for t in yticks], fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    return im


def fig_head_attribution(result, *, width: float = 4.0, height: float = 3.4, title: str | None = None):
    """Layer x head heatmaps: the attribution weights, the single-head drops and the
    attention of the answer position to the image (the last two when measured)."""
    panels = [("attribution w (drop per ablated head)", result.weights, True)]
    if result.single is not None:
        panels.append(("single-head ablation drop", result.single, True))
    if result.attention is not None:
        panels.append(("attention to the image", result.attention, False))
    fig, axes = _subplots(len(panels), width, height)
    unit = "KV head" if result.settings.get("unit") == "kv_head" else "head"
    for ax, (name, values, sym) in zip(axes, panels):
        _heatmap(ax, fig, values, name, cmap="RdBu_r" if sym else "viridis", symmetric=sym, xlabel=unit)
    r2 = result.r2_test
    fig.suptitle(title or f"Head attribution ({result.settings.get('ablation')}, M={result.masks.shape[0]}, "
                          f"held-out R²={r2:.2f})", fontsize=10)
    fig.tight_layout()
    return fig


def fig_causal_trace(result, *, width: float = 5.0, height: float = 3.6, title: str | None = None):
    """Recovery of the answer probability per (layer, position group), and per (layer,
    head) when the heads were traced."""
    panels = [(f"restored {result.kind} (window {result.window})", result.recovery, result.groups, "position group")]
    if result.p_heads is not None:
        heads = [str(h) for h in range(result.p_heads.shape[-1])]
        panels.append(("restored head output (hook_z)", result.head_recovery, heads, "head"))
    fig, axes = _subplots(len(panels), width, height)
    for ax, (name, values, xt, xl) in zip(axes, panels):
        _heatmap(ax, fig, values, name, cmap="Purples", symmetric=False, xlabel=xl, xticks=xt, yticks=result.layers)
    fig.suptitle(title or f"Causal tracing (corruption: {result.corruption}; p clean "
                          f"{float(result.p_clean.mean()):.2f}, corrupted {float(result.p_corrupt.mean()):.2f})",
                 fontsize=10)
    fig.tight_layout()
    return fig
