"""Causal tracing / activation patching (METHODS §13; Meng et al. (ROME), Basu et al. 2024).

A clean and a corrupted run of the same examples: the corruption is Gaussian noise on the
image embeddings (ROME's recipe: ``noise_scale`` (3) times the embeddings' std), or any
corrupted batch of the same layout (a swapped image, a changed question). A *site* is one
activation restored from the clean run in the corrupted run: the residual stream
(``hook_resid_post``), the attention or MLP output (``hook_attn_out`` / ``hook_mlp_out``)
over a window of layers at one group of positions, or one head's ``hook_z`` at one layer.
The score of a site is the answer's probability with it restored; ``recovery`` normalises
it to ``(p - p_corrupt) / (p_clean - p_corrupt)``.

Position groups (per example, from its token roles): ``image row r`` for each row of the
merged grid of the first image (``image{i} row r`` for later images), ``eoi``, ``text``
(text tokens but the last) and ``last``; or any ``{name: selection}`` (role names, bool
masks, callables of the roles).

The sites are batched: the corrupted batch is stacked ``sites_per_forward`` times and row
``c * ex + e`` restores site ``c`` in example ``e`` (`interventions.replace_where` with the
clean activations broadcast over the copies), so a (layer x group) map costs a few forwards
instead of one per site as in TransformerLens' ``patching`` (which runs on mechvlm with
image batches, `forward_args.VLMBatch`; the tests use it, and a loop of
`interventions.patch_activations`, as the one-site-per-forward references).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechvlm.analyses.forward_rows import image_embeds, last_positions, logits_at, repeat_batch
from mechvlm.image_layout import check_one_grid_images
from mechvlm.interventions import replace_where
from mechvlm.metrics._common import Batch, iter_batches, resolve

SITE_KINDS = ("resid", "attn", "mlp", "head")
_HOOK = {"resid": "hook_resid_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out", "head": "attn.hook_z"}


@dataclass(frozen=True)
class Site:
    """Restore ``kind`` at ``layers`` on the positions of ``group`` (and only ``head`` of
    ``hook_z`` for ``kind="head"``)."""

    kind: str
    layers: tuple[int, ...]
    group: str
    head: int | None = None


def default_groups(roles) -> dict[str, Bool[Tensor, "batch pos"]]:
    """Image rows (per image slot), EOI (unless the model has none: LLaVA), text (all but
    the last token) and the last token."""
    check_one_grid_images(roles.spans, "causal_trace's default groups (image rows)")
    out: dict[str, Tensor] = {}
    slot_of: dict[int, int] = {}
    for s in roles.spans:
        slot = slot_of.setdefault(s.image, sum(1 for sp in roles.spans if sp.row == s.row and sp.image < s.image))
        for r in range(s.grid[1]):
            name = f"image row {r}" if slot == 0 else f"image{slot} row {r}"
            sel = out.setdefault(name, torch.zeros_like(roles.image))
            sel[s.row, s.start:s.stop] |= (roles.grid_row[s.row, s.start:s.stop] == r)
    if "eoi" not in roles.missing:  # no empty group that would trace to a plausible 0
        out["eoi"] = roles.eoi
    out["text"] = roles.text & ~roles.last
    out["last"] = roles.last
    return out


def _groups(roles, groups) -> dict[str, Tensor]:
    if groups is None:
        return default_groups(roles)
    return {name: resolve(roles, spec) for name, spec in groups.items()}


def window_layers(layer: int, window: int, n_layers: int) -> tuple[int, ...]:
    """``window`` layers centred on ``layer``, clipped to the model (ROME's
    ``range(max(0, l - w // 2), min(n, l - (-w // 2)))``)."""
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def run_sites(model, clean: Batch, corrupted: Batch, sites: Sequence[Site], groups: Mapping[str, Tensor], *,
              reduce: Callable[[Tensor], Tensor] | None = None, sites_per_forward: int = 64,
              clean_embeds: Tensor | None = None, corrupted_embeds: Tensor | None = None) -> tuple[Tensor, int]:
    """The corrupted run with each site restored from the clean run: ``[site, ex, ...]`` of
    ``reduce(logits at the last position)`` (the logits themselves without ``reduce``),
    and the number of forwards. ``groups``: ``{name: [ex, pos] bool}``."""
    for s in sites:
        if s.kind not in SITE_KINDS:
            raise ValueError(f"unknown site kind {s.kind!r}; known: {SITE_KINDS}")
        if s.group not in groups:
            raise KeyError(f"site group {s.group!r} is not one of {sorted(groups)}")
    if clean["input_ids"].shape != corrupted["input_ids"].shape:
        raise ValueError(f"clean {tuple(clean['input_ids'].shape)} and corrupted "
                         f"{tuple(corrupted['input_ids'].shape)} inputs must have the same shape")
    clean_embeds = image_embeds(model, clean) if clean_embeds is None else clean_embeds
    corrupted_embeds = image_embeds(model, corrupted) if corrupted_embeds is None else corrupted_embeds
    ex = int(clean["input_ids"].shape[0])
    last = last_positions(corrupted)
    needed = sorted({f"blocks.{l}.{_HOOK[s.kind]}" for s in sites for l in s.layers})
    cache: dict[str, Tensor] = {}
    with torch.no_grad():
        model.run_with_hooks(**repeat_batch(clean, 1, clean_embeds), return_type=None,
                             fwd_hooks=[(n, lambda a, hook: cache.__setitem__(hook.name, a)) for n in needed])
    out, n_fwd = [], 1
    for start in range(0, len(sites), sites_per_forward):
        chunk = sites[start:start + sites_per_forward]
        rows = len(chunk) * ex
        where: dict[str, Tensor] = {}
        for c, s in enumerate(chunk):
            sel = groups[s.group].to(model.device)
            for l in s.layers:
                name = f"blocks.{l}.{_HOOK[s.kind]}"
                if s.kind == "head":
                    w = where.setdefault(name, torch.zeros(rows, sel.shape[1], model.cfg.n_heads, 1, dtype=torch.bool,
                                                           device=model.device))
                    w[c * ex:(c + 1) * ex, :, s.head] |= sel[..., None]
                else:
                    w = where.setdefault(name, torch.zeros(rows, sel.shape[1], 1, dtype=torch.bool,
                                                           device=model.device))
                    w[c * ex:(c + 1) * ex] |= sel[..., None]
        hooks = replace_where({n: cache[n] for n in where}, where)
        logits = logits_at(model, repeat_batch(corrupted, len(chunk), corrupted_embeds), hooks, last.repeat(len(chunk)))
        n_fwd += 1
        value = logits if reduce is None else reduce(logits)
        out.append(value.view(len(chunk), ex, *value.shape[1:]).cpu())
    return torch.cat(out), n_fwd


@dataclass
class CausalTraceResult:
    """Answer probability with each site restored.

    Attributes:
        p: ``[example, layer, group]`` p(target) with ``kind`` restored at the window
            around ``layer`` on the group's positions (NaN where an example lacks the group).
        p_heads: ``[example, layer, head]`` with one head's ``hook_z`` restored at
            ``head_positions`` (None unless ``heads``).
        p_clean, p_corrupt: ``[example]``; targets: ``[example]`` target ids.
        layers, groups, kind, window, corruption, n_forwards, wall_s, settings.
    """

    p: Float[Tensor, "example layer group"]
    p_heads: Float[Tensor, "example layer head"] | None
    p_clean: Float[Tensor, " example"]
    p_corrupt: Float[Tensor, " example"]
    targets: Tensor
    layers: list[int]
    groups: list[str]
    kind: str
    window: int
    corruption: str
    n_forwards: int
    wall_s: float
    settings: dict = field(default_factory=dict)

    def _recovery(self, p: Tensor) -> Tensor:
        base, top = self.p_corrupt.mean(), self.p_clean.mean()
        return (p.nanmean(0) - base) / (top - base)

    @property
    def recovery(self) -> Float[Tensor, "layer group"]:
        """``(mean p - mean p_corrupt) / (mean p_clean - mean p_corrupt)`` per site."""
        return self._recovery(self.p)

    @property
    def head_recovery(self) -> Float[Tensor, "layer head"] | None:
        return None if self.p_heads is None else self._recovery(self.p_heads)

    def to_dict(self) -> dict:
        return {"p": self.p, "p_heads": self.p_heads, "p_clean": self.p_clean, "p_corrupt": self.p_corrupt,
                "targets": self.targets, "recovery": self.recovery, "head_recovery": self.head_recovery,
                "layers": self.layers, "groups": self.groups, "kind": self.kind, "window": self.window,
                "corruption": self.corruption, "n_forwards": self.n_forwards, "wall_s": self.wall_s,
                "settings": self.settings}


def _target_prob(targets: Tensor) -> Callable[[Tensor], Tensor]:
    """``logits [copies * ex, vocab] -> p(target) [copies * ex]`` for the ``ex`` targets."""
    def prob(logits: Tensor) -> Tensor:
        t = targets.repeat(len(logits) // len(targets)).to(logits.device)
        return logits.float().softmax(-1)[torch.arange(len(logits), device=logits.device), t]
    return prob


def _noise_std(model, batches) -> float:
    vals = [image_embeds(model, b) for b in batches]
    vals = torch.cat([v.flatten().float() for v in vals if v is not None])
    if not len(vals):
        raise ValueError("noise corruption needs images")
    return float(vals.std())


def causal_trace(
    model,
    clean: Batch | Iterable[Batch],
    corrupted: Batch | Iterable[Batch] | None = None,
    *,
    targets=None,
    kind: str = "resid",
    window: int = 1,
    layers: Sequence[int] | None = None,
    groups: Mapping[str, object] | None = None,
    heads: bool = False,
    head_positions: object = "real",
    noise_scale: float = 3.0,
    noise_std: float | None = None,
    seed: int = 0,
    sites_per_forward: int = 64,
    progress: bool = True,
) -> CausalTraceResult:
    """A (layer x position group) map of restored answer probability, plus a per-head map.

    Args:
        clean: batches of examples; corrupted: the same layout, corrupted (a swapped image,
            a changed question); None: Gaussian noise of ``noise_scale * noise_std`` on the
            image embeddings (``noise_std`` default: the std of the clean embeddings).
        targets: one token id per example (default the clean prediction).
        kind: ``"resid"``, ``"attn"`` or ``"mlp"``; window: layers restored together.
        layers: centre layers of the map (default all); groups: custom position groups.
        heads: also restore each head's ``hook_z`` (one layer) at ``head_positions``.
        sites_per_forward: sites stacked in one forward (rows = sites x examples).
    """
    if kind not in SITE_KINDS[:3]:
        raise ValueError(f"kind must be 'resid', 'attn' or 'mlp', got {kind!r}")
    t0 = time.perf_counter()
    clean_list = [clean] if isinstance(clean, dict) else list(clean)
    corr_list = None if corrupted is None else ([corrupted] if isinstance(corrupted, dict) else list(corrupted))
    if corr_list is not None and len(corr_list) != len(clean_list):
        raise ValueError(f"{len(clean_list)} clean batches but {len(corr_list)} corrupted ones")
    std = None if corr_list is not None else (noise_std if noise_std is not None else _noise_std(model, clean_list))
    n_layers = model.cfg.n_layers
    layer_list = list(range(n_layers)) if layers is None else [int(l) for l in layers]
    g = torch.Generator().manual_seed(seed)
    flat_targets = None if targets is None else torch.as_tensor(targets).flatten().tolist()
    ps, ph, pc, pk, tg, names, n_fwd, seen = [], [], [], [], [], [], 0, 0
    for i, batch in enumerate(iter_batches(clean_list, progress, "causal tracing")):
        ex = int(batch["input_ids"].shape[0])
        roles = model.roles(**batch)
        grp = _groups(roles, groups)
        emb = image_embeds(model, batch)
        if corr_list is None:
            if emb is None:
                raise ValueError(f"batch {i} has no image to put noise on")
            noise = torch.randn(emb.shape, generator=g).to(emb)
            cbatch, cemb = batch, emb + noise_scale * std * noise
        else:
            cbatch = corr_list[i]
            cemb = image_embeds(model, cbatch)
            croles = model.roles(**cbatch)
            if not torch.equal(croles.image.cpu(), roles.image.cpu()):
                raise ValueError(f"corrupted batch {i} puts its image tokens elsewhere than the clean one")
        last = last_positions(batch)
        clean_logits = logits_at(model, repeat_batch(batch, 1, emb), [], last)
        tgt = torch.tensor(flat_targets[seen:seen + ex]) if flat_targets else clean_logits.argmax(-1).cpu()
        prob = _target_prob(tgt)
        corrupt_logits = logits_at(model, repeat_batch(cbatch, 1, cemb), [], last)
        n_fwd += 2
        sites = [Site(kind, window_layers(l, window, n_layers), name) for l in layer_list for name in grp]
        hsites = [Site("head", (l,), "__heads__", h) for l in layer_list for h in range(model.cfg.n_heads)
                  if heads]
        grp_all = dict(grp, __heads__=resolve(roles, head_positions))
        vals, f = run_sites(model, batch, cbatch, sites + hsites, grp_all, reduce=prob,
                            sites_per_forward=sites_per_forward, clean_embeds=emb, corrupted_embeds=cemb)
        n_fwd += f
        present = torch.stack([grp[n].any(-1).cpu() for n in grp], -1)  # [ex, group]
        p = vals[:len(sites)].view(len(layer_list), len(grp), ex).permute(2, 0, 1)
        ps.append(dict(zip(grp, torch.where(present[:, None], p, float("nan")).unbind(-1))))
        if heads:
            ph.append(vals[len(sites):].view(len(layer_list), model.cfg.n_heads, ex).permute(2, 0, 1))
        pc.append(prob(clean_logits).cpu())
        pk.append(prob(corrupt_logits).cpu())
        tg.append(tgt)
        names += [n for n in grp if n not in names]
        seen += ex
    p_all = torch.cat([torch.stack([d.get(n, torch.full((len(next(iter(d.values()))), len(layer_list)),
                                                          float("nan"))) for n in names], -1) for d in ps])
    return CausalTraceResult(
        p=p_all, p_heads=torch.cat(ph) if heads else None, p_clean=torch.cat(pc), p_corrupt=torch.cat(pk),
        targets=torch.cat(tg), layers=layer_list, groups=names, kind=kind, window=window,
        corruption="noise" if corr_list is None else "batch", n_forwards=n_fwd, wall_s=time.perf_counter() - t0,
        settings={"noise_scale": noise_scale, "noise_std": std, "seed": seed, "sites_per_forward": sites_per_forward,
                  "head_positions": str(head_positions) if not isinstance(head_positions, str) else head_positions})
