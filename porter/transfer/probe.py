"""The linear head solved to its optimum: L2-regularized multinomial logistic regression (the CLIP linear probe).

Features are standardized with the training split's mean and std. For each L2 strength ``lam`` on a log-spaced
grid (strong to weak, each solve warm-started from the last) porter minimizes

    (1 / n) * sum_i w_i * CE(W x_i + b, y_i)  +  (lam / 2) * ||W||^2        (the bias is not penalized)

with full-batch L-BFGS (``torch.optim.LBFGS``, strong Wolfe line search, float64) -- the objective of
scikit-learn's ``LogisticRegression(C=1 / (n * lam))`` -- and scores the validation split; the grid is refined
around the best strength, the one with the lowest validation loss wins, and the head is refit on train +
validation at that strength. Deterministic: no randomness at all.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .heads import make_head, standardization
from .train import few_threads

# coarse: one per decade, refined to half decades around the best. Below 1e-5 a separable training set drives the
# weights so large that float32 inference of the merged model drifts from the head it was checked against.
L2_GRID = tuple(10.0 ** e for e in range(-5, 2))
TOLERANCE_GRAD = 1e-4  # L-BFGS stops when the largest gradient entry is below this (scikit-learn's default tol)
MAX_ITER = 500


@dataclass
class ProbeResult:
    head: object  # torch head (linear), standardization in its buffers, eval mode
    l2: float  # the chosen strength
    curve: list[dict[str, float]]  # per strength: l2, loss (train), val_loss, val_accuracy, iterations
    refit: bool  # refit on train + validation at the chosen strength
    seconds: float
    val_probabilities: np.ndarray = field(repr=False, default=None)  # of the model fitted on train only
    train_only_head: object = field(repr=False, default=None)  # that model (LP-FT's phase 2 starts from it)

    @property
    def best(self) -> dict[str, float]:
        return next(p for p in self.curve if p["l2"] == self.l2)


def solve(x: "np.ndarray", y: "np.ndarray", n_classes: int, l2: float, *, weights: np.ndarray | None = None,
          init: tuple | None = None, tolerance_grad: float = TOLERANCE_GRAD,
          max_iter: int = MAX_ITER) -> tuple[object, object, int]:
    """(W [classes x features], b, iterations) minimizing the objective above on standardized ``x`` (float64)."""
    import torch
    # examples along the columns: (classes x n) logits from one (k x d) @ (d x n) product, the layout in which these
    # narrow matmuls and the class reductions run fastest on the CPU (the solve is bound by a few small ops)
    xt = torch.as_tensor(x, dtype=torch.float64)
    n, d = xt.shape
    x_cols = xt.T.contiguous()
    yt = torch.as_tensor(y, dtype=torch.int64)
    w = torch.zeros(n_classes, d, dtype=torch.float64) if init is None else init[0].clone()
    b = torch.zeros(n_classes, dtype=torch.float64) if init is None else init[1].clone()
    sample_w = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)[yt]
    onehot = torch.nn.functional.one_hot(yt, n_classes).to(torch.float64).T.contiguous()
    scale = (sample_w / n)[None, :] if sample_w is not None else torch.full((1, n), 1.0 / n, dtype=torch.float64)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=tolerance_grad,
                            tolerance_change=1e-6 * tolerance_grad, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        # loss and gradient by hand: a few matmuls instead of autograd's graph (the solve is overhead-bound)
        with torch.no_grad():
            logits = torch.addmm(b[:, None], w, x_cols)
            lse = torch.logsumexp(logits, dim=0, keepdim=True)
            ce = lse - (logits * onehot).sum(0, keepdim=True)
            loss = (ce * scale).sum() + 0.5 * l2 * (w * w).sum()
            r = (torch.exp(logits - lse) - onehot) * scale
            w.grad = torch.addmm(w, r, xt, beta=l2)
            b.grad = r.sum(1)
        return loss

    opt.step(closure)
    state = opt.state[opt._params[0]]
    return w.detach(), b.detach(), int(state.get("n_iter", 0))


def _loss(torch, logits, y, sample_w):
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    return (ce * sample_w).mean() if sample_w is not None else ce.mean()


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, n_classes: int, *,
              l2: float | Sequence[float] | None = None, class_weights: np.ndarray | None = None, refit: bool = True,
              log: Callable[[str], None] | None = None) -> ProbeResult:
    """Choose the L2 strength on the validation split (or take ``l2``), then refit on train + val."""
    import torch

    start = time.perf_counter()
    mean, std = standardization(x_train)
    xs = (x_train.astype(np.float64) - mean) / std
    xv = torch.as_tensor((x_val.astype(np.float64) - mean) / std)
    yv = torch.as_tensor(y_val, dtype=torch.int64)
    wv = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float64)[yv]
    curve: dict[float, dict[str, float]] = {}
    solutions: dict[float, tuple] = {}

    def evaluate(lam: float, init) -> tuple:
        w, b, iters = solve(xs, y_train, n_classes, lam, weights=class_weights, init=init)
        with torch.no_grad():
            val_logits = xv @ w.T + b
            val_loss = float(_loss(torch, val_logits, yv, wv))
            val_acc = float((val_logits.argmax(1) == yv).double().mean())
            tr_logits = torch.as_tensor(xs) @ w.T + b
            yt = torch.as_tensor(y_train, dtype=torch.int64)
            tr_loss = float(_loss(torch, tr_logits, yt, None if class_weights is None else
                                  torch.as_tensor(class_weights, dtype=torch.float64)[yt]))
            tr_acc = float((tr_logits.argmax(1) == yt).double().mean())
        curve[lam] = {"l2": lam, "loss": tr_loss, "accuracy": tr_acc, "val_loss": val_loss, "val_accuracy": val_acc,
                      "iterations": iters}
        solutions[lam] = (w, b)
        if log:
            log(f"probe l2 {lam:.3g}: loss {tr_loss:.4f}  val_loss {val_loss:.4f}  val_acc {val_acc:.4f}  "
                f"({iters} iterations)")
        return w, b

    def best_l2() -> float:  # the lowest validation loss; ties go to the stronger penalty
        return min(curve.values(), key=lambda p: (p["val_loss"], -p["l2"]))["l2"]

    with few_threads(x_train.size * n_classes < 20_000_000):
        grid = sorted({float(v) for v in ([l2] if isinstance(l2, (int, float)) else (l2 or L2_GRID))}, reverse=True)
        init = None
        for lam in grid:  # strong to weak: each solve starts from the smoother solution
            init = evaluate(lam, init)
        if l2 is None:  # refine to half decades around the best
            best = best_l2()
            for lam in (best * math.sqrt(10), best / math.sqrt(10)):
                if lam not in curve and L2_GRID[0] <= lam <= L2_GRID[-1]:
                    nearest = min(solutions, key=lambda k: abs(math.log(k / lam)))
                    evaluate(lam, solutions[nearest])
        chosen = best_l2()
        w, b = solutions[chosen]
        with torch.no_grad():
            val_prob = torch.softmax(xv @ w.T + b, dim=1).numpy().astype(np.float32)
        head_mean, head_std = mean, std
        train_only = (w, b)
        if refit:
            x_all = np.concatenate([x_train, x_val])
            y_all = np.concatenate([y_train, y_val])
            head_mean, head_std = standardization(x_all)
            # the train-only solution, re-expressed in the new standardization, is the warm start
            w0 = w * torch.as_tensor(head_std / std, dtype=torch.float64)[None, :]
            b0 = b + (w * torch.as_tensor((head_mean - mean) / std, dtype=torch.float64)[None, :]).sum(1)
            w, b, _ = solve((x_all.astype(np.float64) - head_mean) / head_std, y_all, n_classes, chosen,
                            weights=class_weights, init=(w0, b0))
    def linear_head(w, b, mean, std):
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten; the caller's RNG is left alone
            head = make_head("linear", x_train.shape[1], n_classes, mean=mean, std=std)
        with torch.no_grad():
            head.net[-1].weight.copy_(w.float())
            head.net[-1].bias.copy_(b.float())
        return head.eval()

    points = [curve[k] for k in sorted(curve)]
    return ProbeResult(linear_head(w, b, head_mean, head_std), chosen, points, refit, time.perf_counter() - start,
                       val_prob, linear_head(*train_only, mean, std) if refit else None)
