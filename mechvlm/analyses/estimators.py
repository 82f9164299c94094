"""Small torch estimators the analyses fit: k-means, ridge regression with a held-out R^2,
a logistic linear probe and percentile bootstrap intervals.

Plain, deterministic (seeded) implementations in float64 on the CPU; scikit-learn is not
a dependency. Each is checked in the tests against a closed form or a hand-made case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor


@contextlib.contextmanager
def single_thread():
    """Run tiny CPU ops on one thread (restored afterwards): on a shared CPU, OpenMP
    threads waiting for each other make ops on a few hundred numbers 10-20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def kmeans(x: Float[Tensor, "*batch n d"], k: int, *, n_init: int = 4, iters: int = 50,
           seed: int = 0) -> Int[Tensor, "*batch n"]:
    """Lloyd's k-means with k-means++ seeding, the best of ``n_init`` restarts (lowest
    inertia); a leading batch axis clusters many small sets at once (e.g. the tokens of
    each image). Returns the cluster of each row (``0..k-1``)."""
    x = x.detach().to("cpu", torch.float64)
    batch_shape = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])
    b, n, _ = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n rows, got k={k}, n={n}")
    g = torch.Generator().manual_seed(seed)
    xs = x.repeat_interleave(n_init, 0)  # [b * n_init, n, d]
    rows = torch.arange(xs.shape[0])
    with single_thread():
        centres = xs[rows, torch.randint(n, (xs.shape[0],), generator=g)][:, None]
        for _ in range(1, k):  # k-means++: the next centre drawn with probability ~ squared distance
            d2 = torch.cdist(xs, centres).pow(2).min(-1).values + 1e-12
            idx = torch.multinomial(d2 / d2.sum(-1, keepdim=True), 1, generator=g)[:, 0]
            centres = torch.cat([centres, xs[rows, idx][:, None]], 1)
        labels = None
        for _ in range(iters):
            new = torch.cdist(xs, centres).argmin(-1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            onehot = torch.nn.functional.one_hot(labels, k).double()  # [B, n, k]
            counts = onehot.sum(1)[..., None]
            centres = torch.where(counts > 0, onehot.transpose(1, 2) @ xs / counts.clamp_min(1), centres)
        inertia = (xs - centres.gather(1, labels[..., None].expand_as(xs))).pow(2).sum((1, 2))
    best = inertia.view(b, n_init).argmin(-1)
    out = labels.view(b, n_init, n)[torch.arange(b), best]
    return out.reshape(*batch_shape, n)


def ridge_fit(x: Float[Tensor, "n p"], y: Float[Tensor, "n *t"], alpha: float = 1.0
              ) -> tuple[Float[Tensor, "p *t"], Float[Tensor, " *t"]]:
    """Ridge regression with an unpenalised intercept: ``argmin |y - b - x w|^2 + alpha |w|^2``.
    Returns ``(w, b)``; ``y`` may have extra target columns."""
    x = x.detach().to("cpu", torch.float64)
    y = y.detach().to("cpu", torch.float64)
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    gram = xc.T @ xc + alpha * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, xc.T @ (yc if yc.ndim > 1 else yc[:, None]))
    w = w if y.ndim > 1 else w[:, 0]
    return w, ym - xm @ w


def r_squared(y: Float[Tensor, " n"], pred: Float[Tensor, " n"]) -> float:
    """``1 - SS_res / SS_tot`` (NaN when ``y`` is constant)."""
    y, pred = y.double(), pred.double()
    ss_tot = float((y - y.mean()).pow(2).sum())
    return float("nan") if ss_tot == 0 else 1.0 - float((y - pred).pow(2).sum()) / ss_tot


def bootstrap(fn: Callable[[Tensor], Tensor], n: int, *, samples: int = 200, level: float = 0.95,
              seed: int = 0) -> tuple[Tensor, Tensor]:
    """Percentile bootstrap: ``fn(idx)`` on ``samples`` resamples (with replacement) of
    ``range(n)``; returns the ``(lower, upper)`` quantiles at ``(1 -+ level) / 2``."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.stack([torch.as_tensor(fn(torch.randint(n, (n,), generator=g))).double()
                         for _ in range(samples)])
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(draws, q, dim=0)
    return lo, hi


def logistic_probe(x: Float[Tensor, "n d"], y: Int[Tensor, " n"], *, n_classes: int | None = None,
                   weight_decay: float = 1e-3, steps: int = 100) -> Callable[[Tensor], Tensor]:
    """A multinomial logistic-regression probe on standardised features, fitted with L-BFGS
    (full batch, L2 penalty). Returns ``predict(x) -> class index``."""
    x = x.detach().to("cpu", torch.float64)
    y = y.detach().to("cpu", torch.long)
    n_classes = n_classes or int(y.max()) + 1
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, tolerance_change=1e-7, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), single_thread():
        opt.step(closure)
    w, b = w.detach(), b.detach()

    def predict(features: Tensor) -> Tensor:
        f = (features.detach().to("cpu", torch.float64) - mean) / std
        return (f @ w + b).argmax(-1)

    return predict


def ridge_classifier(x: Float[Tensor, "n d"], y: Int[Tensor, " n"], *, n_classes: int | None = None,
                     alpha: float = 1.0) -> Callable[[Tensor], Tensor]:
    """A linear probe in closed form: ridge regression of one-hot labels on standardised
    features; ``predict(x)`` is the class of the highest output."""
    x = x.detach().to("cpu", torch.float64)
    y = y.detach().to("cpu", torch.long)
    n_classes = n_classes or int(y.max()) + 1
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    w, b = ridge_fit((x - mean) / std, torch.nn.functional.one_hot(y, n_classes).double(), alpha)

    def predict(features: Tensor) -> Tensor:
        f = (features.detach().to("cpu", torch.float64) - mean) / std
        return (f @ w + b).argmax(-1)

    return predict
