"""The linear head solved to its optimum: L2-regularized multinomial logistic regression (the CLIP linear probe).

Features are standardized with the training split's mean and std. For each L2 strength ``lam`` on a log-spaced
grid (strong to weak, each solve warm-started from the last) porter minimizes

    (1 / n) * sum_i w_i * CE(W x_i + b, y_i)  +  (lam / 2) * ||W||^2        (the bias is not penalized)

with full-batch L-BFGS (scipy's L-BFGS-B, as scikit-learn's lbfgs solver, float64) -- the objective of
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

from .heads import LinearHead, softmax_parts, standardization
from .train import few_threads

# coarse: one per decade, refined to half decades around the best. Below 1e-5 a separable training set drives the
# weights so large that float32 inference of the merged model drifts from the head it was checked against.
L2_GRID = tuple(10.0 ** e for e in range(-5, 2))
TOLERANCE_GRAD = 1e-4  # L-BFGS stops when the largest gradient entry is below this (scikit-learn's default tol)
MAX_ITER = 500


@dataclass
class ProbeResult:
    head: LinearHead  # its standardization included
    l2: float  # the chosen strength
    curve: list[dict[str, float]]  # per strength: l2, loss (train), val_loss, val_accuracy, iterations
    refit: bool  # refit on train + validation at the chosen strength
    seconds: float
    val_probabilities: np.ndarray = field(repr=False, default=None)  # of the model fitted on train only
    train_only_head: LinearHead = field(repr=False, default=None)  # that model (LP-FT's phase 2 starts from it)

    @property
    def best(self) -> dict[str, float]:
        return next(p for p in self.curve if p["l2"] == self.l2)


class LogisticObjective:
    """The objective above on one standardized training set (float64), built once for every strength solved on it.

    Solved by scipy's L-BFGS-B (the solver scikit-learn's lbfgs uses): on these small problems a solve is bound by
    per-iteration overhead, and scipy's compiled loop costs about a third of ``torch.optim.LBFGS``'s Python one at
    the same iteration count (measured: 7 warm-started strengths, 64 features x 1437 examples, 35 ms vs 120 ms).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, n_classes: int, weights: np.ndarray | None = None):
        self.x = np.ascontiguousarray(x, dtype=np.float64)
        n, self.d = self.x.shape
        self.k = n_classes
        # examples along the columns: (classes x n) logits from one (k x d) @ (d x n) product
        self.x_cols = np.ascontiguousarray(self.x.T)
        y = np.asarray(y, dtype=np.int64)
        self.scale = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=np.float64)[y] / n
        self.onehot_scaled = np.zeros((n_classes, n))
        self.onehot_scaled[y, np.arange(n)] = self.scale
        self.true_class = y * n + np.arange(n)  # flat index of each example's own logit in the (k x n) array

    def value_and_grad(self, theta: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
        size = self.k * self.d
        w, b = theta[:size].reshape(self.k, self.d), theta[size:]
        shifted = w @ self.x_cols
        shifted += b[:, None]
        shifted -= shifted.max(0)  # overflow-free log-sum-exp
        e = np.exp(shifted)
        total = e.sum(0)
        loss = float(self.scale @ (np.log(total) - shifted.ravel().take(self.true_class)))
        loss += 0.5 * l2 * float(theta[:size] @ theta[:size])
        e *= self.scale / total  # the weighted softmax minus the weighted one-hot: d loss / d logits
        e -= self.onehot_scaled
        grad = np.empty_like(theta)
        grad_w = grad[:size].reshape(self.k, self.d)
        np.matmul(e, self.x, out=grad_w)
        grad_w += l2 * w
        grad[size:] = e.sum(1)
        return loss, grad

    def solve(self, l2: float, starts: Sequence[tuple[np.ndarray, np.ndarray]] = (), *,
              tolerance_grad: float = TOLERANCE_GRAD, max_iter: int = MAX_ITER) -> tuple[np.ndarray, np.ndarray, int]:
        """(W [classes x features], b, iterations) at strength ``l2``, from the lowest of the given ``starts``."""
        from scipy.optimize import minimize

        size = self.k * self.d
        thetas = [np.concatenate([np.ravel(w), np.ravel(b)]) for w, b in starts] or [np.zeros(size + self.k)]
        theta0 = min(thetas, key=lambda t: self.value_and_grad(t, l2)[0]) if len(thetas) > 1 else thetas[0]
        result = minimize(self.value_and_grad, theta0, args=(l2,), jac=True, method="L-BFGS-B",
                          options={"maxcor": 20, "gtol": tolerance_grad, "ftol": 1e-6 * tolerance_grad,
                                   "maxiter": max_iter})
        return result.x[:size].reshape(self.k, self.d).copy(), result.x[size:].copy(), int(result.nit)


def solve(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, *, weights: np.ndarray | None = None,
          init: tuple[np.ndarray, np.ndarray] | None = None, tolerance_grad: float = TOLERANCE_GRAD,
          max_iter: int = MAX_ITER) -> tuple[np.ndarray, np.ndarray, int]:
    """(W [classes x features], b, iterations) minimizing the objective above on standardized ``x``."""
    return LogisticObjective(x, y, n_classes, weights).solve(l2, [init] if init is not None else (),
                                                             tolerance_grad=tolerance_grad, max_iter=max_iter)


def path_start(solutions: dict[float, tuple], lam: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Warm starts for strength ``lam`` from the solutions found so far: the nearest one, and the regularization
    path continued linearly in log(l2) from the two nearest (a continuation method's predictor step; between two
    solved strengths it interpolates). The solver starts from whichever has the lower objective."""
    if not solutions or lam <= 0:  # no path to continue in log(l2) (a strength of 0 is a plain warm start)
        return [solutions[min(solutions, key=lambda k: abs(k - lam))]] if solutions else []
    near = sorted(solutions, key=lambda k: abs(math.log(k / lam)))
    starts = [solutions[near[0]]]
    if len(near) > 1:
        (a, (wa, ba)), (c, (wc, bc)) = (near[0], solutions[near[0]]), (near[1], solutions[near[1]])
        t = math.log(lam / a) / math.log(c / a)
        starts.append((wa + t * (wc - wa), ba + t * (bc - ba)))
    return starts


def _scores(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray,
            sample_w: np.ndarray | None) -> tuple[float, float, np.ndarray]:
    """(mean cross-entropy, weighted per example as in training; accuracy; class probabilities [n x classes])."""
    logits = w @ x.T + b[:, None]
    prob, lse = softmax_parts(logits, axis=0)
    ce = lse - logits[y, np.arange(len(y))]
    loss = float((ce * sample_w).mean() if sample_w is not None else ce.mean())
    return loss, float((logits.argmax(0) == y).mean()), prob.T


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, n_classes: int, *,
              l2: float | Sequence[float] | None = None, class_weights: np.ndarray | None = None, refit: bool = True,
              log: Callable[[str], None] | None = None) -> ProbeResult:
    """Choose the L2 strength on the validation split (or take ``l2``), then refit on train + val."""
    start = time.perf_counter()
    mean, std = standardization(x_train)
    xs = (x_train.astype(np.float64) - mean) / std
    xv = (x_val.astype(np.float64) - mean) / std
    y_train = np.asarray(y_train, dtype=np.int64)
    y_val = np.asarray(y_val, dtype=np.int64)
    weigh = (lambda y: None) if class_weights is None else (lambda y: np.asarray(class_weights, np.float64)[y])
    curve: dict[float, dict[str, float]] = {}
    solutions: dict[float, tuple] = {}

    objective = LogisticObjective(xs, y_train, n_classes, class_weights)

    def evaluate(lam: float) -> None:
        w, b, iters = objective.solve(lam, path_start(solutions, lam))
        val_loss, val_acc, _ = _scores(xv, y_val, w, b, weigh(y_val))
        tr_loss, tr_acc, _ = _scores(xs, y_train, w, b, weigh(y_train))
        curve[lam] = {"l2": lam, "loss": tr_loss, "accuracy": tr_acc, "val_loss": val_loss, "val_accuracy": val_acc,
                      "iterations": iters}
        solutions[lam] = (w, b)
        if log:
            log(f"probe l2 {lam:.3g}: loss {tr_loss:.4f}  val_loss {val_loss:.4f}  val_acc {val_acc:.4f}  "
                f"({iters} iterations)")

    def best_l2() -> float:  # the lowest validation loss; ties go to the stronger penalty
        return min(curve.values(), key=lambda p: (p["val_loss"], -p["l2"]))["l2"]

    with few_threads(x_train.size * n_classes < 20_000_000):
        grid = sorted({float(v) for v in ([l2] if isinstance(l2, (int, float)) else (l2 or L2_GRID))}, reverse=True)
        for lam in grid:  # strong to weak: each solve starts from the smoother solutions, continued along the path
            evaluate(lam)
        if l2 is None:  # refine to half decades around the best
            best = best_l2()
            for lam in (best * math.sqrt(10), best / math.sqrt(10)):
                if lam not in curve and L2_GRID[0] <= lam <= L2_GRID[-1]:
                    evaluate(lam)
        chosen = best_l2()
        w, b = solutions[chosen]
        val_prob = np.ascontiguousarray(_scores(xv, y_val, w, b, None)[2], dtype=np.float32)
        head_mean, head_std = mean, std
        train_only = (w, b)
        if refit:
            x_all = np.concatenate([x_train, x_val])
            y_all = np.concatenate([y_train, y_val])
            head_mean, head_std = standardization(x_all)
            # the train-only solution, re-expressed in the new standardization, is the warm start
            w0 = w * (head_std / std)[None, :]
            b0 = b + (w * ((head_mean - mean) / std)[None, :]).sum(1)
            w, b, _ = solve((x_all.astype(np.float64) - head_mean) / head_std, y_all, n_classes, chosen,
                            weights=class_weights, init=(w0, b0))

    def linear_head(w, b, mean, std) -> LinearHead:
        return LinearHead(np.asarray(mean, np.float32), np.asarray(std, np.float32), w.astype(np.float32),
                          b.astype(np.float32))

    points = [curve[k] for k in sorted(curve)]
    return ProbeResult(linear_head(w, b, head_mean, head_std), chosen, points, refit, time.perf_counter() - start,
                       val_prob, linear_head(*train_only, mean, std) if refit else None)
