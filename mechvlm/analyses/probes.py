"""Zero-shot probes of the image keys and values (seed 002): segmentation (k-means or a
linear probe, scored by mIoU), semantic correspondence (nearest neighbour, PCK) and
referring-expression localisation (the expression token's query against the image keys).

Every probe is scored per feature table, i.e. per (kind, layer) with kind ``key`` /
``value`` / ``key_pre`` and the layer-less ``vision`` baseline (the vision encoder's
output, the language model's input), each next to its chance level:

* segmentation: the same probe on features whose tokens are shuffled within each image;
* correspondence: a uniformly random cell;
* localisation: the fraction of the grid the target box covers.

`run_probes` builds the inputs from samples of the Dataset protocol (`probe_data`),
extracts the features with `image_kv` and runs every probe; ``text_prefix`` puts text before
the image (the seed's text-prefix control, `text_prefix_control`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Int
from torch import Tensor

from mechvlm.analyses.estimators import kmeans, logistic_probe, ridge_classifier, single_thread
from mechvlm.analyses.image_kv import VISION, ImageKV, image_kv
from mechvlm.analyses.probe_data import (CorrespondenceSample, ReferringSample, SegmentationSample,
                                         check_samples, grid_box, grid_mask, grid_points, image_size, pil)
from mechvlm.analyses.probe_metrics import majority_labels, miou, pck, pck_chance
from mechvlm.metrics._common import frame, iter_batches, run_forward, select_layers

TASKS = ("segmentation", "correspondence", "referring")
SEGMENTATION_METHODS = ("kmeans", "linear", "logistic")


@dataclass
class ProbeResult:
    """Probe scores, one row per (task, kind, layer[, head]).

    ``rows``: dicts with ``task``, ``kind`` (``key`` / ``value`` / ``key_pre`` / ``vision``),
    ``layer`` (None for ``vision``), ``head`` (``"all"``, or a query-head index for the
    per-head localisation rows), ``score`` (mIoU, PCK or hit rate), ``chance``, ``n`` (images,
    keypoints or expressions scored). ``settings``: how each probe ran.
    """

    rows: list[dict]
    settings: dict = field(default_factory=dict)

    def select(self, task: str, kind: str | None = None, head="all") -> list[dict]:
        return [r for r in self.rows if r["task"] == task and (kind is None or r["kind"] == kind)
                and r["head"] == head]

    def score(self, task: str, kind: str, layer: int | None = None, head="all") -> float:
        for r in self.select(task, kind, head):
            if r["layer"] == layer:
                return r["score"]
        raise KeyError(f"no {task} score for {kind} at layer {layer} (head {head})")

    def table(self, task: str, value: str = "score") -> tuple[list[str], list[int], Tensor]:
        """``(kinds, layers, [kind, layer])`` of ``value``; the ``vision`` row repeats its
        one number across the layers."""
        rows = self.select(task)
        kinds = [k for k in ("key", "value", "key_pre", VISION) if any(r["kind"] == k for r in rows)]
        layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
        out = torch.full((len(kinds), len(layers)), float("nan"), dtype=torch.float64)
        for r in rows:
            i = kinds.index(r["kind"])
            if r["layer"] is None:
                out[i, :] = r[value]
            else:
                out[i, layers.index(r["layer"])] = r[value]
        return kinds, layers, out

    def best(self, task: str) -> dict:
        """The language-model row (not ``vision``) with the highest score."""
        rows = [r for r in self.select(task) if r["kind"] != VISION and r["score"] == r["score"]]
        if not rows:
            raise KeyError(f"no {task} rows")
        return max(rows, key=lambda r: r["score"])

    def to_dict(self) -> dict:
        return {"rows": self.rows, "settings": self.settings}

    def to_frame(self):
        return frame(self.rows)


def _table_names(kv: ImageKV, names: Sequence[str] | None) -> list[str]:
    return list(kv.features) if names is None else list(names)


def _split(name: str) -> tuple[str, int | None]:
    if name == VISION:
        return VISION, None
    kind, layer = name.split(".")
    return kind, int(layer)


def _image_features(kv: ImageKV, name: str, image: int, head: int | None) -> Tensor:
    """``[h * w, F]`` float64 features of one image (heads concatenated unless ``head``)."""
    kind, layer = _split(name)
    g = kv.grid(kind, layer, image)
    g = g[..., head:head + 1, :] if head is not None and kind != VISION else g
    return g.reshape(g.shape[0] * g.shape[1], -1).double()


# ----------------------------------------------------------------------- segmentation --
def segmentation_scores(kv: ImageKV, masks: Sequence[Bool[Tensor, "h w"]], *, method: str = "kmeans",
                        k: int = 4, head: int | None = None, train_fraction: float = 0.5, seed: int = 0,
                        n_shuffles: int = 3, names: Sequence[str] | None = None) -> list[dict]:
    """mIoU (object vs background, pooled over the scored images) of each feature table.

    ``method="kmeans"``: per image, k-means (``k`` clusters) on the L2-normalised token
    features; each cluster takes the majority ground-truth class of its tokens.
    ``method="linear"``: a linear probe (closed-form ridge classifier,
    `estimators.ridge_classifier`) trained on the tokens of the first ``train_fraction`` of
    the images (in a seeded random order), scored on the rest; ``"logistic"``: the same
    with logistic regression (`estimators.logistic_probe`, L-BFGS; slower).
    Chance: the same probe with the tokens shuffled within each image (``n_shuffles`` draws).
    """
    if method not in SEGMENTATION_METHODS:
        raise ValueError(f"method must be one of {SEGMENTATION_METHODS}, got {method!r}")
    if len(masks) != kv.n_images:
        raise ValueError(f"{len(masks)} masks for {kv.n_images} images")
    truth = [torch.as_tensor(m).flatten().long() for m in masks]
    for i, (m, t) in enumerate(zip(masks, truth)):
        if t.numel() != int(kv.image_grid[i, 1] * kv.image_grid[i, 2]):
            raise ValueError(f"mask {i} has {tuple(torch.as_tensor(m).shape)} cells, image {i} has grid "
                             f"{tuple(kv.image_grid[i].tolist())}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(kv.n_images, generator=g).tolist()
    n_train = max(1, int(round(train_fraction * kv.n_images)))
    train, test = order[:n_train], order[n_train:]
    if method != "kmeans" and not test:
        raise ValueError("the linear probe needs at least two images (a train and a test split)")
    perms = [[torch.randperm(len(t), generator=g) for t in truth] for _ in range(n_shuffles)]

    def clusters(feats: list[Tensor]) -> list[Tensor]:
        """k-means per image, images of one token count clustered together."""
        out: list[Tensor | None] = [None] * len(feats)
        for n in {len(f) for f in feats}:
            idx = [i for i, f in enumerate(feats) if len(f) == n]
            labels = kmeans(F.normalize(torch.stack([feats[i] for i in idx]), dim=-1), min(k, n), seed=seed)
            for i, lab in zip(idx, labels):
                out[i] = lab
        return out

    def score(feats: list[Tensor]) -> float:
        if method == "kmeans":
            pred = [majority_labels(c, t) for c, t in zip(clusters(feats), truth)]
            return miou(torch.cat(pred), torch.cat(truth))
        fit = ridge_classifier if method == "linear" else logistic_probe
        predict = fit(torch.cat([feats[i] for i in train]), torch.cat([truth[i] for i in train]), n_classes=2)
        return miou(torch.cat([predict(feats[i]) for i in test]), torch.cat([truth[i] for i in test]))

    rows = []
    for name in _table_names(kv, names):
        with single_thread():
            feats = [_image_features(kv, name, i, head) for i in range(kv.n_images)]
            chance = sum(score([f[p] for f, p in zip(feats, perm)]) for perm in perms) / max(1, n_shuffles)
            value = score(feats)
        kind, layer = _split(name)
        rows.append({"task": "segmentation", "kind": kind, "layer": layer, "head": "all", "score": value,
                     "chance": chance, "n": kv.n_images if method == "kmeans" else len(test)})
    return rows


# --------------------------------------------------------------------- correspondence --
def _match(kv, name, pairs, cells_a, cells_b, alpha, head) -> tuple[float, float, int]:
    hits, chance, n = 0.0, 0.0, 0
    for (ia, ib), ca, cb in zip(pairs, cells_a, cells_b):
        h, w = kv.image_grid[ib, 1:].tolist()
        fa = _image_features(kv, name, ia, head).reshape(*kv.image_grid[ia, 1:].tolist(), -1)
        src = F.normalize(fa[ca[:, 0], ca[:, 1]], dim=-1)
        dst = F.normalize(_image_features(kv, name, ib, head), dim=-1)
        idx = (src @ dst.T).argmax(-1)
        pred = torch.stack([idx // w, idx % w], -1)
        hits += pck(pred, cb, (h, w), alpha) * len(cb)
        chance += pck_chance(cb, (h, w), alpha) * len(cb)
        n += len(cb)
    return hits, chance, n


def correspondence_scores(kv: ImageKV, pairs: Sequence[tuple[int, int]], cells_a: Sequence[Tensor],
                          cells_b: Sequence[Tensor], *, alpha: float = 0.0, head: int | None = None,
                          names: Sequence[str] | None = None) -> list[dict]:
    """PCK@``alpha`` of nearest-neighbour matching: each keypoint cell of image ``a`` is
    matched to the cell of image ``b`` whose feature has the highest cosine similarity."""
    if not (len(pairs) == len(cells_a) == len(cells_b)):
        raise ValueError("pairs, cells_a and cells_b must have one entry per pair")
    rows = []
    for name in _table_names(kv, names):
        with single_thread():
            hits, chance, n = _match(kv, name, pairs, cells_a, cells_b, alpha, head)
        kind, layer = _split(name)
        rows.append({"task": "correspondence", "kind": kind, "layer": layer, "head": "all",
                     "score": hits / n if n else float("nan"), "chance": chance / n if n else float("nan"), "n": n})
    return rows


# -------------------------------------------------------------------------- referring --
def _score_rows(got, boxes, k, n_rows, layer_list, rep, scale, chance, add) -> int:
    """Hits of one batch's rows (see `referring_scores`); returns the next example index."""
    for r in range(n_rows):
        box = torch.as_tensor(boxes[k]).flatten()
        k += 1
        chance.append(float(box.double().mean()))
        cos = F.cosine_similarity(got["embed"][r][None], got["vision"][r], dim=-1)
        add((VISION, None, "all"), box[cos.argmax()])
        for l in layer_list:
            q, keys = got[f"q{l}"][r], got[f"k{l}"][r]  # [head, d], [n_img, kv, d]
            logits = torch.einsum("hd,nhd->hn", q, keys.repeat_interleave(rep, dim=1)) * scale
            for h in range(q.shape[0]):
                add(("key", l, h), box[logits[h].argmax()])
            add(("key", l, "all"), box[logits.softmax(-1).mean(0).argmax()])
            vq, vi = got[f"vq{l}"][r].flatten(), got[f"vi{l}"][r].flatten(1)
            add(("value", l, "all"), box[F.cosine_similarity(vq[None], vi, dim=-1).argmax()])
    return k


def referring_scores(model, batches: Sequence[dict], query_positions: Sequence[Int[Tensor, " batch"]],
                     boxes: Sequence[Bool[Tensor, "h w"]], layers=None, *, progress: bool = True) -> list[dict]:
    """Localisation by the expression token (one image per row; ``query_positions[i]`` the
    token of each row of batch ``i``; ``boxes``: the target box on each example's grid).

    ``key``, per query head ``h`` of layer ``l``: the image cell of the highest
    ``q_h . k_j`` (post-RoPE query of the expression token against the image keys of the
    head's KV group); ``head="all"``: the argmax of the head-averaged attention
    distribution over the image tokens. ``value``: the highest cosine between the
    expression token's value and the image values (KV heads concatenated). ``vision``: the
    highest cosine between the token's input embedding and the vision features. A hit is a
    predicted cell inside the box; chance is the box's share of the grid.
    """
    layer_list = select_layers(model, layers)
    rep = model.cfg.n_heads // model.cfg.n_kv_heads
    hits: dict[tuple, list[float]] = {}
    chance, k = [], 0

    def add(key, hit):
        hits.setdefault(key, []).append(float(hit))

    with torch.no_grad():
        for batch, qpos in zip(iter_batches(batches, progress, "referring"), query_positions):
            roles = model.roles(**batch)
            rows = torch.arange(len(qpos), device=model.device)
            qpos = qpos.to(model.device)
            image = roles.image.to(model.device)
            got: dict[str, Tensor] = {}

            counts = image.sum(-1).tolist()

            def grab(name, at_query):
                def hook(act, hook):
                    got[name] = act[rows, qpos].double().cpu() if at_query else \
                        list(act[image].double().cpu().split(counts))
                return hook

            hooks = [("hook_embed", grab("embed", True)), ("hook_image_embeds", lambda a, hook: got.__setitem__(
                "vision", list(a.double().cpu().split(counts))))]
            for l in layer_list:
                hooks += [(f"blocks.{l}.attn.hook_rot_q", grab(f"q{l}", True)),
                          (f"blocks.{l}.attn.hook_rot_k", grab(f"k{l}", False)),
                          (f"blocks.{l}.attn.hook_v", grab(f"vq{l}", True)),
                          (f"blocks.{l}.attn.hook_v", grab(f"vi{l}", False))]
            run_forward(model, batch, hooks)
            with single_thread():
                k = _score_rows(got, boxes, k, len(rows), layer_list, rep, model.cfg.attn_scale, chance, add)
    if k != len(boxes):
        raise ValueError(f"{len(boxes)} boxes for {k} examples")
    base = sum(chance) / len(chance)
    return [{"task": "referring", "kind": kind, "layer": layer, "head": head, "score": sum(v) / len(v),
             "chance": base, "n": len(v)} for (kind, layer, head), v in hits.items()]


# ------------------------------------------------------------------------------ runner --
def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run_probes(model, builder, *, segmentation: Sequence[SegmentationSample] | None = None,
               correspondence: Sequence[CorrespondenceSample] | None = None,
               referring: Sequence[ReferringSample] | None = None, layers=None,
               kinds: Sequence[str] = ("key", "value"), text_prefix: str | None = None, prompt: str = "",
               method: str = "kmeans", k: int = 4, mask_threshold: float = 0.5, alpha: float = 0.0,
               batch_size: int = 16, seed: int = 0, progress: bool = True) -> ProbeResult:
    """Every probe given samples for, per layer and kind, with the vision baseline.

    Images are fed one per row behind ``prompt`` (for segmentation and correspondence the
    text after the image cannot change the image tokens' keys and values: attention to
    later text is causal-masked); ``text_prefix`` is put before the image (`InputBuilder`'s
    ``prefixes``). Masks become grid masks at ``mask_threshold`` coverage.
    """
    rows, settings = [], {"layers": select_layers(model, layers), "kinds": list(kinds), "text_prefix": text_prefix,
                          "prompt": prompt, "method": method, "k": k, "mask_threshold": mask_threshold,
                          "alpha": alpha, "seed": seed}

    def extract(images: list) -> ImageKV:
        batches = [builder([prompt] * len(c), [[pil(im)] for im in c], prefixes=text_prefix)
                   for c in _chunks(images, batch_size)]
        return image_kv(model, batches, layers, kinds=kinds, progress=progress)

    if segmentation is not None:
        samples = check_samples(segmentation, SegmentationSample)
        kv = extract([s.image for s in samples])
        masks = [grid_mask(s.mask, *kv.image_grid[i, 1:].tolist(), mask_threshold) for i, s in enumerate(samples)]
        rows += segmentation_scores(kv, masks, method=method, k=k, seed=seed)
    if correspondence is not None:
        samples = check_samples(correspondence, CorrespondenceSample)
        kv = extract([im for s in samples for im in (s.image_a, s.image_b)])
        ca = [grid_points(s.points_a, image_size(s.image_a), *kv.image_grid[2 * i, 1:].tolist())
              for i, s in enumerate(samples)]
        cb = [grid_points(s.points_b, image_size(s.image_b), *kv.image_grid[2 * i + 1, 1:].tolist())
              for i, s in enumerate(samples)]
        rows += correspondence_scores(kv, [(2 * i, 2 * i + 1) for i in range(len(samples))], ca, cb, alpha=alpha)
    if referring is not None:
        samples = check_samples(referring, ReferringSample)
        batches, qpos, boxes = [], [], []
        for c in _chunks(samples, batch_size):
            batch = builder([s.prompt for s in c], [[pil(s.image)] for s in c], prefixes=text_prefix)
            roles = model.roles(**batch)
            pos = []
            for r, s in enumerate(c):
                tid = builder.tokenizer.convert_tokens_to_ids(s.query_token)
                where = ((batch["input_ids"][r] == tid) & roles.text[r].cpu()).nonzero().flatten()
                if tid is None or tid == builder.tokenizer.unk_token_id or not len(where):
                    raise ValueError(f"referring sample {len(boxes) + r}: the query token {s.query_token!r} is "
                                     "not a token of its prompt after the image")
                pos.append(int(where[-1]))
            grids = [sp.grid for sp in roles.spans]
            if len(grids) != len(c):
                raise ValueError("referring samples need exactly one image per prompt")
            boxes += [grid_box(s.mask, g[1], g[2]) for s, g in zip(c, grids)]
            batches.append(batch)
            qpos.append(torch.tensor(pos))
        rows += referring_scores(model, batches, qpos, boxes, layers, progress=progress)
    if not rows:
        raise ValueError("give segmentation, correspondence and/or referring samples")
    return ProbeResult(rows, settings)


def text_prefix_control(model, builder, text_prefix: str, **kw) -> dict[str, ProbeResult]:
    """The probes without and with ``text_prefix`` before the image (seed 002's text-prefix
    control): ``{"no_prefix": ..., "prefix": ...}``; keyword arguments go to `run_probes`."""
    return {"no_prefix": run_probes(model, builder, **kw),
            "prefix": run_probes(model, builder, text_prefix=text_prefix, **kw)}
