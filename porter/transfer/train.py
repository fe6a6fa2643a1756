"""Train a head on cached features: AdamW, ReduceLROnPlateau, early stopping with restore-best, seeded.

Everything random (the split, weight init, shuffling, dropout) derives from one seed, inside
``torch.random.fork_rng`` so the caller's global RNG state is left as it was. Same seed + same features ->
bit-identical head on the same machine.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import DataError
from .heads import make_head, standardization


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-2
    weight_decay: float = 1e-4
    head: str = "linear"
    hidden: int = 256
    dropout: float = 0.0
    patience: int = 20  # epochs without a better validation loss before stopping
    lr_patience: int = 5  # epochs without improvement before the learning rate is halved
    balance: bool = False
    seed: int = 0


@dataclass
class TrainResult:
    head: object  # torch.nn.Module with the best epoch's weights, in eval mode
    history: dict[str, list[float]]  # loss, accuracy, val_loss, val_accuracy, lr per epoch
    best_epoch: int  # 1-based
    epochs_run: int
    stopped_early: bool
    class_weights: list[float] | None
    seconds: float
    val_probabilities: np.ndarray = field(repr=False, default=None)


def stratified_split(labels: np.ndarray, classes: Sequence[str], val_split: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): ``val_split`` of each class (at least one) goes to validation, seeded."""
    labels = np.asarray(labels)
    if not 0.0 < val_split < 1.0:
        raise DataError(f"--val-split must be between 0 and 1 (exclusive), got {val_split}")
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
    """Fit a head; stop when the validation loss hasn't improved for ``patience`` epochs; keep the best."""
    import torch
    from torch import nn

    start = time.perf_counter()
    x_train = np.ascontiguousarray(x_train, dtype=np.float32)
    x_val = np.ascontiguousarray(x_val, dtype=np.float32)
    if not np.isfinite(x_train).all() or not np.isfinite(x_val).all():
        raise DataError("the backbone produced non-finite features (NaN or inf); check the preprocessing "
                        "(--preprocess, --mean, --std) and the cut")
    mean, std = standardization(x_train)
    weights = class_weights(y_train, n_classes) if config.balance else None
    width = config.hidden if config.head == "mlp" else n_classes
    small = config.batch_size * x_train.shape[1] * width < 4_000_000
    threads = torch.get_num_threads()
    if small:  # tiny matmuls: one thread is fastest (and a cold thread pool costs seconds on a busy machine)
        torch.set_num_threads(1)
    try:
        return _train(torch, nn, x_train, y_train, x_val, y_val, n_classes, config, log, mean, std, weights, start)
    finally:
        if small:
            torch.set_num_threads(threads)


def _train(torch, nn, x_train, y_train, x_val, y_val, n_classes, config, log, mean, std, weights, start):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        # trained on features standardized once (cheaper per step); the buffers are set to the real mean/std after
        head = make_head(config.head, x_train.shape[1], n_classes, hidden=config.hidden, dropout=config.dropout)
        xt = torch.from_numpy((x_train - mean) / std)
        xv = torch.from_numpy((x_val - mean) / std)
        yt, yv = torch.from_numpy(y_train.astype(np.int64)), torch.from_numpy(y_val.astype(np.int64))
        loss_fn = nn.CrossEntropyLoss(weight=torch.from_numpy(weights) if weights is not None else None)
        opt = AdamW(list(head.parameters()), lr=config.lr, weight_decay=config.weight_decay)
        sched = Plateau(opt, factor=0.5, patience=config.lr_patience, min_lr=config.lr * 1e-3)
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
            lr = opt.lr
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
    return TrainResult(head=head, history=history, best_epoch=best_epoch, epochs_run=epoch, stopped_early=stopped,
                       class_weights=weights.tolist() if weights is not None else None,
                       seconds=time.perf_counter() - start, val_probabilities=val_prob)


class AdamW:
    """``torch.optim.AdamW``'s update in plain tensor ops: decoupled weight decay, bias-corrected moments.

    Numerically the same as torch.optim.AdamW (amsgrad off; tested against it). torch.optim imports
    ``torch._dynamo`` on first use, about a second of start-up that a head's two to four tensors don't need.
    """

    def __init__(self, params, lr: float, weight_decay: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-8):
        import torch

        self.params = list(params)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        import torch

        self.steps += 1
        b1, b2 = self.betas
        bias1 = 1 - b1 ** self.steps
        bias2_sqrt = math.sqrt(1 - b2 ** self.steps)
        with torch.no_grad():
            for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
                if p.grad is None:
                    continue
                g = p.grad
                p.mul_(1 - self.lr * self.weight_decay)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / bias2_sqrt).add_(self.eps)
                p.addcdiv_(m, denom, value=-self.lr / bias1)


class Plateau:
    """``torch.optim.lr_scheduler.ReduceLROnPlateau(mode="min", threshold=1e-4, threshold_mode="rel")``."""

    def __init__(self, opt: AdamW, factor: float = 0.5, patience: int = 5, min_lr: float = 0.0,
                 threshold: float = 1e-4):
        self.opt, self.factor, self.patience, self.min_lr, self.threshold = opt, factor, patience, min_lr, threshold
        self.best, self.bad_epochs = math.inf, 0

    def step(self, metric: float) -> None:
        if metric < self.best * (1 - self.threshold):
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            new = max(self.opt.lr * self.factor, self.min_lr)
            if self.opt.lr - new > 1e-8:
                self.opt.lr = new
            self.bad_epochs = 0


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
