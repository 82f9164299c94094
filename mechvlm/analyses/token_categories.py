"""Sink / dead / alive visual tokens (seed 003, EmbedLens; METHODS §10, §11).

Two criteria, both at the language model's input level (the projected image features):

* `embedlens_categories` (EmbedLens' ``find_useless_tokens``): the top-``k`` (3) input-
  embedding rows nearest each image token by cosine; ``sink`` if a user-given sink id is
  among them, else ``dead`` if a dead id is, else ``alive``. The ids are model specific.
* `massive_activation_categories` (model-agnostic): ``sink`` = a massive-activation token
  (Kang et al., ICLR 2025): ``r = |h| / sqrt(mean(h^2) + 1e-6)`` and ``max_{d in D_sink} r_d >
  threshold`` (20) in the residual stream entering a layer ``>= first_layer`` (2; HF's
  ``hidden_states[l]``), with ``D_sink`` the dimensions where BOS-like tokens have ``r_d >
  threshold`` (`find_sink_dims`); ``dead`` = near-zero norm (``<= dead_norm x`` the median
  norm of the text-embedding rows, as the model scales them) or nearest by cosine to a
  padding / unused row (``dead_ids``, default the pad id); else ``alive``. A token that is
  both is a ``sink``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechvlm.analyses._common import image_features
from mechvlm.image_layout import ImageSpan, check_one_grid_images, kept_feature_index
from mechvlm.metrics._common import Batch, FwdHooks, chunk_rows, frame, iter_batches, run_forward, user_hooks

CATEGORIES = ("alive", "sink", "dead")
ALIVE, SINK, DEAD = range(3)


@dataclass
class TokenCategoriesResult:
    """The category of every image token, per image.

    Attributes:
        category: per image ``[n_tokens]`` codes into `CATEGORIES` (0 alive, 1 sink, 2 dead).
        spans: per image, its `ImageSpan` in its batch; example: ``[image]`` its example.
        top_ids: per image ``[n_tokens, k]`` the nearest embedding rows (EmbedLens), or None.
        sink_by_layer: per image ``[n_tokens, layer]`` massive activation at each checked
            layer (model-agnostic criterion), or None; layers: those layers.
        norm: per image ``[n_tokens]`` the input-level norm of each token.
        criterion: ``"embedlens"`` or ``"massive_activation"``; settings: its parameters
            (ids, threshold, sink dims, dead-norm cut-off, ...).
    """

    category: list[Int[Tensor, " token"]]
    spans: list[ImageSpan]
    example: Int[Tensor, " image"]
    norm: list[Float[Tensor, " token"]]
    criterion: str
    settings: dict
    top_ids: list[Int[Tensor, "token k"]] | None = None
    sink_by_layer: list[Bool[Tensor, "token layer"]] | None = None
    layers: list[int] | None = None

    @property
    def fractions(self) -> Float[Tensor, "image category"]:
        """Per image, the fraction of its tokens in each category (`CATEGORIES` order)."""
        return torch.stack([torch.bincount(c, minlength=3).float() / len(c) for c in self.category])

    @property
    def layer_sink_fraction(self) -> Float[Tensor, "image layer"] | None:
        """Per image and checked layer, the fraction of its tokens with a massive activation."""
        if self.sink_by_layer is None:
            return None
        return torch.stack([s.float().mean(0) for s in self.sink_by_layer])

    def grid(self, i: int) -> Float[Tensor, "t h w"]:
        """Image ``i``'s categories on its grid (NaN for cells without a token)."""
        s = self.spans[i]
        g = torch.full((s.n_cells,), float("nan"))
        g[torch.tensor(s.cell_ids)] = self.category[i].float()
        return g.reshape(s.grid)

    def masks(self, roles_shape: tuple[int, int], category: str) -> Bool[Tensor, "batch pos"]:
        """``[batch, pos]`` True on the tokens of ``category`` for a batch whose images are
        exactly this result's images (same order), e.g. to prune them."""
        code = CATEGORIES.index(category)
        out = torch.zeros(roles_shape, dtype=torch.bool)
        for c, s in zip(self.category, self.spans):
            out[s.row, s.start:s.stop] = c == code
        return out

    def to_dict(self) -> dict:
        return {"category": self.category, "categories": list(CATEGORIES), "grids": [s.grid for s in self.spans],
                "example": self.example, "fractions": self.fractions, "layer_sink_fraction": self.layer_sink_fraction,
                "top_ids": self.top_ids, "layers": self.layers, "criterion": self.criterion,
                "settings": self.settings}

    def to_frame(self):
        """Long format: one row per image with its category fractions."""
        fr = self.fractions
        return frame([{"image": i, "example": int(self.example[i]), **{c: float(fr[i, j]) for j, c in enumerate(CATEGORIES)}}
                      for i in range(len(self.category))])


def _input_vectors(model, batch, roles) -> Float[Tensor, "image_token d_model"]:
    """The LM-input vectors of the image tokens, in feature (= span) order."""
    feats = image_features(model, batch)
    if batch.get("image_cells") is not None:
        feats = feats[kept_feature_index(roles.spans, feats.shape[0]).to(feats.device)]
    return feats.to(model.device, model.dtype)


def nearest_rows(model, vectors: Float[Tensor, "n d"], k: int) -> Int[Tensor, "n k"]:
    """The ``k`` input-embedding rows with the highest cosine to each vector (chunked)."""
    W = F.normalize(model.W_E.float(), dim=-1)
    v = F.normalize(vectors.float(), dim=-1)
    step = chunk_rows(model, max(1, v.shape[0]), W.shape[0])
    return torch.cat([(v[i:i + step] @ W.T).topk(k, dim=-1).indices for i in range(0, v.shape[0], step)]).cpu()


def _per_image(spans, values):
    out, at = [], 0
    for s in spans:
        out.append(values[at:at + s.n_tokens])
        at += s.n_tokens
    return out


@torch.no_grad()
def embedlens_categories(model, batches: Batch | Iterable[Batch], sink_ids: Sequence[int], dead_ids: Sequence[int],
                         *, k: int = 3, progress: bool = True) -> TokenCategoriesResult:
    """EmbedLens' criterion (see the module doc): no LM forward, only the vision features
    and the input-embedding matrix."""
    sink_t, dead_t = torch.tensor(list(sink_ids), dtype=torch.long), torch.tensor(list(dead_ids), dtype=torch.long)
    if not len(sink_t) and not len(dead_t):
        raise ValueError("give the model's sink and/or dead token ids (EmbedLens' criterion is model specific); "
                         "massive_activation_categories needs none")
    V = model.cfg.d_vocab
    bad = [int(i) for i in torch.cat([sink_t, dead_t]) if not 0 <= int(i) < V]
    if bad:
        raise ValueError(f"token ids {bad} are outside the vocabulary (d_vocab={V})")
    cats, spans_out, example, norms, tops, n_ex = [], [], [], [], [], 0
    for batch in iter_batches(batches, progress, "embedlens_categories"):
        roles = model.roles(**batch)
        check_one_grid_images(roles.spans, "embedlens_categories")
        spans = sorted(roles.spans, key=lambda s: s.image)
        vec = _input_vectors(model, batch, roles)
        top = nearest_rows(model, vec, k)
        cat = torch.full((top.shape[0],), ALIVE, dtype=torch.long)
        cat[torch.isin(top, dead_t).any(-1)] = DEAD
        cat[torch.isin(top, sink_t).any(-1)] = SINK
        cats += _per_image(spans, cat)
        tops += _per_image(spans, top)
        norms += _per_image(spans, vec.float().norm(dim=-1).cpu())
        spans_out += spans
        example += [n_ex + s.row for s in spans]
        n_ex += roles.shape[0]
    return TokenCategoriesResult(category=cats, spans=spans_out, example=torch.tensor(example), norm=norms,
                                 criterion="embedlens", top_ids=tops,
                                 settings={"sink_ids": sink_t.tolist(), "dead_ids": dead_t.tolist(), "k": k})


def massive_ratio(h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
    """Kang et al.'s ``|h / sqrt(mean(h^2) + 1e-6)|`` per dimension (fp32)."""
    h = h.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()


def _check_threshold(model, threshold: float) -> None:
    bound = model.cfg.d_model ** 0.5  # r_d <= sqrt(d) (all the mass in one dimension)
    if threshold >= bound:
        raise ValueError(f"threshold {threshold} can never be reached: r = |h| / rms(h) cannot exceed sqrt(d_model) "
                         f"= {bound:.1f} for this model; pass a lower threshold")


def _checked_layers(model, first_layer: int) -> list[int]:
    if not 0 <= first_layer < model.cfg.n_layers:
        raise ValueError(f"first_layer must be in [0, {model.cfg.n_layers}), got {first_layer}")
    return list(range(first_layer, model.cfg.n_layers))


def _reference_mask(roles, reference: str) -> Bool[Tensor, "batch pos"]:
    if reference == "bos":
        if bool(roles.bos.any()):
            return roles.bos
        reference = "first"
    if reference == "first":  # the first real token of each row
        pos = torch.arange(roles.shape[1], device=roles.real.device).expand(roles.shape)
        first = torch.where(roles.real, pos, roles.shape[1]).min(-1).values[:, None]
        return pos == first
    raise ValueError(f"reference must be 'bos' (the BOS token, else the first token) or 'first', got {reference!r}")


@torch.no_grad()
def find_sink_dims(model, batch: Batch, *, threshold: float = 20.0, first_layer: int = 2, reference: str = "bos",
                   fwd_hooks: FwdHooks = None) -> list[int]:
    """``D_sink``: the residual dimensions where a BOS-like token (``reference``: the BOS
    token, or the first real token when there is none / ``"first"``) has ``r_d > threshold``
    entering some layer ``>= first_layer``. One forward."""
    _check_threshold(model, threshold)
    roles = model.roles(**batch)
    ref = _reference_mask(roles, reference).to(model.device)
    found = torch.zeros(model.cfg.d_model, dtype=torch.bool, device=model.device)

    def look(resid, hook):
        found.logical_or_((massive_ratio(resid[ref]) > threshold).any(0))

    hooks = user_hooks(fwd_hooks, batch, roles)
    run_forward(model, batch, hooks + [(f"blocks.{l}.hook_resid_pre", look) for l in _checked_layers(model, first_layer)])
    return found.nonzero().squeeze(-1).tolist()


@torch.no_grad()
def massive_activation_categories(
    model, batches: Batch | Iterable[Batch], *, threshold: float = 20.0, first_layer: int = 2,
    sink_dims: Sequence[int] | None = None, reference: str = "bos", dead_norm: float = 0.05,
    dead_ids: Sequence[int] | None = None, fwd_hooks: FwdHooks = None, progress: bool = True,
) -> TokenCategoriesResult:
    """The model-agnostic criterion (see the module doc). ``sink_dims`` None: found on the
    first batch (`find_sink_dims`; in a causal model a BOS-like token's residual is the same
    in every input). ``dead_ids`` None: the pad id (if any). One forward per batch, the
    residuals read in hooks (only ``[n_image_tokens, layer]`` flags are kept)."""
    batches = [batches] if isinstance(batches, dict) else list(batches)
    if not batches:
        raise ValueError("no batches")
    layers = _checked_layers(model, first_layer)
    if sink_dims is None or len(sink_dims):  # with sink_dims=[] no token can be a sink: no threshold
        _check_threshold(model, threshold)
    if sink_dims is None:
        sink_dims = find_sink_dims(model, batches[0], threshold=threshold, first_layer=first_layer,
                                   reference=reference, fwd_hooks=fwd_hooks)
        if not sink_dims:
            warnings.warn(f"no BOS-like token has a massive activation (r > {threshold}) from layer {first_layer} "
                          "on: D_sink is empty, so no image token is a sink", stacklevel=3)
    dims = torch.tensor(list(sink_dims), dtype=torch.long)
    if len(dims) and not (0 <= int(dims.min()) and int(dims.max()) < model.cfg.d_model):
        raise ValueError(f"sink_dims must lie in [0, {model.cfg.d_model})")
    if dead_ids is None:
        dead_ids = [model.cfg.pad_token_id] if model.cfg.pad_token_id is not None else []
    dead_t = torch.tensor(list(dead_ids), dtype=torch.long)
    scale = model.embed.scale if model.embed.scale is not None else 1.0
    norm_cut = dead_norm * float(model.W_E.float().norm(dim=-1).median()) * float(scale)
    cats, spans_out, example, norms, sinks, n_ex = [], [], [], [], [], 0
    for batch in iter_batches(batches, progress, "massive_activation_categories"):
        roles = model.roles(**batch)
        check_one_grid_images(roles.spans, "massive_activation_categories")
        spans = sorted(roles.spans, key=lambda s: s.image)
        image = roles.image.to(model.device)
        flags = {}

        def look(resid, hook):
            if len(dims):
                flags[hook.name] = (massive_ratio(resid[image])[:, dims.to(resid.device)] > threshold).any(-1).cpu()
            else:
                flags[hook.name] = torch.zeros(int(image.sum()), dtype=torch.bool)

        names = [f"blocks.{l}.hook_resid_pre" for l in layers]
        run_forward(model, batch, user_hooks(fwd_hooks, batch, roles) + [(n, look) for n in names])
        # resid[image] is in position order over rows; spans sorted by image are too
        sink = torch.stack([flags[n] for n in names], dim=-1)
        vec = _input_vectors(model, batch, roles)
        norm = vec.float().norm(dim=-1).cpu()
        dead = norm <= norm_cut
        if len(dead_t):
            dead |= torch.isin(nearest_rows(model, vec, 1)[:, 0], dead_t)
        cat = torch.full((len(norm),), ALIVE, dtype=torch.long)
        cat[dead] = DEAD
        cat[sink.any(-1)] = SINK
        cats += _per_image(spans, cat)
        sinks += _per_image(spans, sink)
        norms += _per_image(spans, norm)
        spans_out += spans
        example += [n_ex + s.row for s in spans]
        n_ex += roles.shape[0]
    return TokenCategoriesResult(
        category=cats, spans=spans_out, example=torch.tensor(example), norm=norms, criterion="massive_activation",
        sink_by_layer=sinks, layers=layers,
        settings={"threshold": threshold, "first_layer": first_layer, "sink_dims": [int(d) for d in dims],
                  "reference": reference, "dead_norm": dead_norm, "dead_norm_cut": norm_cut,
                  "dead_ids": dead_t.tolist()})
