"""Train a head on cached features: the linear probe (``probe.py``), or AdamW + ReduceLROnPlateau with early
stopping and restore-best, seeded, its learning rate and weight decay chosen on validation.

Everything random (the split, weight init, shuffling, dropout) derives from one seed, inside
``torch.random.fork_rng`` so the caller's global RNG state is left as it was. Same seed + same features ->
bit-identical head on the same machine.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DataError
from ..runtime.session import check_fits
from .heads import make_head, standardization
from .options import TrainConfig


MLP_LR_GRID = (1e-3, 3e-3)
MLP_WEIGHT_DECAY_GRID = (1e-4, 1e-2)


@dataclass
class TrainResult:
    head: object  # heads.LinearHead (lbfgs), or a torch.nn.Module with the chosen weights in eval mode (adamw)
    method: str  # lbfgs | adamw
    loss: float  # train loss of the chosen model (before a refit)
    accuracy: float
    val_loss: float
    val_accuracy: float
    chosen: dict  # the settings chosen on validation: {"l2": ...} or {"lr": ..., "weight_decay": ...}
    curve: list[dict]  # lbfgs: per L2 strength; adamw: per (lr, weight decay) tried
    class_weights: list[float] | None
    seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)  # adamw: per epoch of the chosen run
    best_epoch: int | None = None  # adamw, 1-based
    epochs_run: int | None = None
    stopped_early: bool | None = None
    refit: bool = False  # lbfgs: refit on train + validation at the chosen strength
    train_only_head: object = field(repr=False, default=None)  # lbfgs with refit: the head fitted on train only
    val_probabilities: np.ndarray = field(repr=False, default=None)


def stratified_split(labels: np.ndarray, classes: Sequence[str], val_split: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): ``val_split`` of each class (at least one) goes to validation, seeded."""
    labels = np.asarray(labels)
    if not 0.0 < val_split < 1.0:  # a caller's bug: FinetuneOptions.check() rejects these before any work
        raise ValueError(f"val_split must be between 0 and 1 (exclusive), got {val_split}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c, name in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            raise DataError(f"class {name!r} has {len(idx)} usable example{'s' if len(idx) != 1 else ''}; the "
                            f"validation split needs at least 2 per class (one to train on, one to validate)")
        n_val = min(len(idx) - 1, max(1, int(round(len(idx) * val_split))))
        idx = rng.permutation(idx)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights, mean 1 over examples: n / (k * count_c)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return (len(labels) / (n_classes * np.maximum(counts, 1.0))).astype(np.float32)


def train_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, n_classes: int,
               config: TrainConfig, log: Callable[[str], None] | None = None) -> TrainResult:
    """Fit a head: the linear probe by L-BFGS with its L2 strength chosen on validation, or AdamW with early
    stopping (an MLP, or any head given ``lr``) with learning rate and weight decay chosen from a small grid."""
    start = time.perf_counter()
    x_train = np.ascontiguousarray(x_train, dtype=np.float32)
    x_val = np.ascontiguousarray(x_val, dtype=np.float32)
    if not np.isfinite(x_train).all() or not np.isfinite(x_val).all():
        raise DataError("the backbone produced non-finite features (NaN or inf); check the preprocessing "
                        "(--preprocess, --mean, --std) and the cut")
    weights = class_weights(y_train, n_classes) if config.balance else None
    if config.method == "lbfgs":
        from .probe import fit_probe

        r = fit_probe(x_train, y_train, x_val, y_val, n_classes, l2=config.weight_decay, class_weights=weights,
                      refit=config.refit, log=log)
        best = r.best
        return TrainResult(r.head, "lbfgs", best["loss"], best["accuracy"], best["val_loss"], best["val_accuracy"],
                           {"l2": r.l2}, r.curve, weights.tolist() if weights is not None else None,
                           time.perf_counter() - start, refit=r.refit, val_probabilities=r.val_probabilities,
                           train_only_head=r.train_only_head)
    import torch

    lrs = (config.lr,) if config.lr is not None else MLP_LR_GRID
    decays = (config.weight_decay,) if config.weight_decay is not None else MLP_WEIGHT_DECAY_GRID
    mean, std = standardization(x_train)
    width = config.hidden if config.head == "mlp" else n_classes
    with few_threads(config.batch_size * x_train.shape[1] * width < 4_000_000, torch):
        runs = []
        for lr in lrs:
            for wd in decays:
                run = _train(torch, torch.nn, x_train, y_train, x_val, y_val, n_classes,
                             replace(config, lr=lr, weight_decay=wd), log if len(lrs) * len(decays) == 1 else None,
                             mean, std, weights)
                runs.append(run)
                if log and len(lrs) * len(decays) > 1:
                    log(f"adamw lr {lr:g} weight_decay {wd:g}: best epoch {run.best_epoch}/{run.epochs_run}, "
                        f"val_loss {run.val_loss:.4f}, val_acc {run.val_accuracy:.4f}")
    best = min(runs, key=lambda r: r.val_loss)
    best.curve = [{"lr": r.chosen["lr"], "weight_decay": r.chosen["weight_decay"], "val_loss": r.val_loss,
                   "val_accuracy": r.val_accuracy, "best_epoch": r.best_epoch} for r in runs]
    best.seconds = time.perf_counter() - start
    return best


@functools.cache
def blas_threads():
    """threadpoolctl's view of the loaded BLAS libraries, made once: scanning them costs ~3 ms a time with
    TensorFlow and torch loaded (7% of a probe)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def few_threads(small: bool, torch: Any = None):
    """One thread while ``small`` -- the BLAS numpy uses, and ``torch``'s when the block trains with it: tiny matmuls
    run several times faster on one thread than on two, and on a busy machine OpenBLAS's spinning threads make them
    10-20x slower (measured: the probe on 2883 x 64 features, 0.16 s alone vs 3 s beside another process); the
    caller's settings are restored. torch is passed, not looked up: the probe never loads it, and a background
    thread may be importing it meanwhile (steps.prefetch_imports)."""
    if not small:
        yield
        return
    threads = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(1)
    try:
        with blas_threads().limit(limits=1, user_api="blas"):
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(threads)


def _train(torch, nn, x_train, y_train, x_val, y_val, n_classes, config, log, mean, std, weights):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        # trained on features standardized once (cheaper per step); the buffers are set to the real mean/std after
        if config.head == "mlp":  # weights, gradients and AdamW's two moments, float32
            params = x_train.shape[1] * config.hidden + config.hidden * n_classes
            check_fits(params * 4 * 4, f"an MLP head of {params:,} parameters (--hidden {config.hidden})",
                       "give a smaller --hidden")
        head = make_head(config.head, x_train.shape[1], n_classes, hidden=config.hidden, dropout=config.dropout)
        xt = torch.from_numpy((x_train - mean) / std)
        xv = torch.from_numpy((x_val - mean) / std)
        yt, yv = torch.from_numpy(y_train.astype(np.int64)), torch.from_numpy(y_val.astype(np.int64))
        loss_fn = nn.CrossEntropyLoss(weight=torch.from_numpy(weights) if weights is not None else None)
        opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=config.lr_patience,
                                                           min_lr=config.lr * 1e-3)
        gen = torch.Generator().manual_seed(config.seed)
        history: dict[str, list[float]] = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": [], "lr": []}
        best_loss, best_epoch, best_state, since_best = math.inf, 0, None, 0
        n = len(xt)
        bs = max(1, min(config.batch_size, n))
        epoch = 0
        for epoch in range(1, config.epochs + 1):
            head.train()
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                opt.zero_grad()
                loss = loss_fn(head(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
            head.eval()
            with torch.no_grad():
                tr_logits, va_logits = head(xt), head(xv)
                tr_loss = float(loss_fn(tr_logits, yt))
                va_loss = float(loss_fn(va_logits, yv))
                tr_acc = float((tr_logits.argmax(1) == yt).float().mean())
                va_acc = float((va_logits.argmax(1) == yv).float().mean())
            lr = opt.param_groups[0]["lr"]
            for k, v in (("loss", tr_loss), ("accuracy", tr_acc), ("val_loss", va_loss), ("val_accuracy", va_acc),
                         ("lr", lr)):
                history[k].append(v)
            improved = va_loss < best_loss - max(1e-7, 1e-4 * abs(best_loss)) if math.isfinite(best_loss) else True
            if improved:
                best_loss, best_epoch, since_best = va_loss, epoch, 0
                best_state = copy.deepcopy(head.state_dict())
            else:
                since_best += 1
            if log:
                log(f"epoch {epoch:3d}/{config.epochs}  loss {tr_loss:.4f}  acc {tr_acc:.4f}  val_loss {va_loss:.4f}  "
                    f"val_acc {va_acc:.4f}  lr {lr:.2g}{'  *' if improved else ''}")
            if not math.isfinite(tr_loss):
                raise DataError(f"training diverged at epoch {epoch} (loss {tr_loss}); lower --lr")
            sched.step(va_loss)
            if since_best >= config.patience:
                break
        head.load_state_dict(best_state)
        head.eval()
        with torch.no_grad():
            val_prob = torch.softmax(head(xv), dim=1).numpy()
            head.mean.copy_(torch.from_numpy(mean))
            head.std.copy_(torch.from_numpy(std))
    stopped = epoch < config.epochs
    if log and stopped:
        log(f"early stop: no better val_loss for {config.patience} epochs; restored epoch {best_epoch} "
            f"(val_loss {best_loss:.4f}, val_acc {history['val_accuracy'][best_epoch - 1]:.4f})")
    i = best_epoch - 1
    return TrainResult(head, "adamw", history["loss"][i], history["accuracy"][i], history["val_loss"][i],
                       history["val_accuracy"][i], {"lr": config.lr, "weight_decay": config.weight_decay}, [],
                       weights.tolist() if weights is not None else None, 0.0, history=history,
                       best_epoch=best_epoch, epochs_run=epoch, stopped_early=stopped, val_probabilities=val_prob)


def pick_by_validation(results: Sequence[TrainResult], y_val: np.ndarray) -> tuple[int, list[float]]:
    """Index of the result to keep, preferring the first (the default) unless another beats it clearly.

    The lowest validation loss wins only if it is lower than the first's by more than one standard error of the
    per-example loss difference (the one-standard-error rule): on a few hundred validation examples, picking the
    raw minimum among several cuts chases noise. Returns (index, the standard error for each result vs the first).
    """
    errors = [0.0]
    margins = [0.0]
    for r in results[1:]:
        margin, se = loss_margin(r.val_probabilities, results[0].val_probabilities, y_val)
        errors.append(se)
        margins.append(margin)
    best = min(range(len(results)), key=lambda i: (results[i].val_loss, i))
    if best != 0 and margins[best] >= 0:
        best = 0
    return best, errors


def loss_margin(prob: np.ndarray, base: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean per-example validation loss difference of ``prob`` vs ``base`` plus its standard error, that standard
    error): a margin below 0 means ``prob`` is better by more than one standard error (the one-SE rule)."""
    y = np.asarray(y, np.int64)

    def per_example(p: np.ndarray) -> np.ndarray:
        return -np.log(np.clip(p[np.arange(len(y)), y].astype(np.float64), 1e-12, 1.0))

    d = per_example(prob) - per_example(base)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()) + se, se


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
